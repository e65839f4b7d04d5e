"""The labels database: durable labels, hashed tokens, schema rules, and the export layouts."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from feedback_support import scored
from streamrl.services.feedback.store import LabelStore, token_hash


def test_tokens_are_stored_hashed_and_checked(tmp_path):
    store = LabelStore(tmp_path / "labels.sqlite3")
    token = store.add_labeller("alice")
    assert store.labeller_for_token(token) == "alice"
    assert store.labeller_for_token(token + "x") is None and store.labeller_for_token("") is None
    raw = sqlite3.connect(tmp_path / "labels.sqlite3").execute("SELECT token_sha256 FROM labellers").fetchall()
    assert raw == [(token_hash(token),)] and token not in str(raw)
    with pytest.raises(ValueError, match="exists"):
        store.add_labeller("alice")
    with pytest.raises(ValueError, match="labeller name"):
        store.add_labeller("no spaces please")
    assert store.revoke_labeller("alice") and store.labeller_for_token(token) is None
    assert store.labellers() == []


def test_a_label_survives_a_killed_process(tmp_path):
    path = tmp_path / "labels.sqlite3"
    code = f"""
import numpy as np, os, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
from streamrl.services.feedback.store import LabelStore
from feedback_support import scored
store = LabelStore({str(path)!r})
store.add_labeller("bob")
store.add_label(labeller="bob", kind="rating", scored=scored("r1"), value=-1, model_version=0, seen_at=1.0)
os._exit(0)  # no close, no checkpoint: what was committed must be there
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    store = LabelStore(path)
    assert store.count_labels() == {"rating": 1, "preference": 0, "total": 1}
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_labels_record_who_when_what_and_the_schema_refuses_nonsense(tmp_path):
    store = LabelStore(tmp_path / "db.sqlite3")
    store.add_labeller("alice")
    a, b = scored("r1", completion="aaa", version=4), scored("r2", completion="bbb", version=5)
    label_id, at = store.add_label(
        labeller="alice", kind="preference", scored=a, other=b, value=1, model_version=7, seen_at=10.0
    )
    row = (
        sqlite3.connect(tmp_path / "db.sqlite3")
        .execute(
            "SELECT labeller, kind, rollout_id, other_rollout_id, value, policy_version, other_policy_version, "
            "model_version, created_at FROM labels WHERE id = ?",
            (label_id,),
        )
        .fetchone()
    )
    assert row == ("alice", "preference", "r1", "r2", 1, 4, 5, 7, at)
    with pytest.raises(sqlite3.IntegrityError):  # a rating of 2
        store.add_label(labeller="alice", kind="rating", scored=a, value=2, model_version=0, seen_at=1.0)
    with pytest.raises(sqlite3.IntegrityError):  # an unknown labeller
        store.add_label(labeller="mallory", kind="rating", scored=a, value=1, model_version=0, seen_at=1.0)
    with pytest.raises(sqlite3.IntegrityError):  # a preference of a rollout over itself
        store.add_label(labeller="alice", kind="preference", scored=a, other=a, value=1, model_version=0, seen_at=1)
    assert store.count_labels()["total"] == 1  # the refused ones left nothing behind


def test_export_layouts_by_hand(tmp_path):
    store = LabelStore(tmp_path / "db.sqlite3")
    store.add_labeller("alice")
    store.add_labeller("bob")
    good, bad, meh = scored("r1", completion="great"), scored("r2", completion="awful"), scored("r3", completion="ok")
    store.add_label(labeller="alice", kind="rating", scored=good, value=1, model_version=0, seen_at=1.0)
    store.add_label(labeller="bob", kind="rating", scored=bad, value=-1, model_version=0, seen_at=1.0)
    store.add_label(labeller="alice", kind="rating", scored=meh, value=1, model_version=0, seen_at=1.0)
    store.add_label(labeller="alice", kind="rating", scored=meh, value=-1, model_version=0, seen_at=1.0)  # changed mind
    store.add_label(labeller="bob", kind="preference", scored=meh, other=good, value=1, model_version=0, seen_at=1.0)
    ratings = list(store.export("ratings"))
    assert [(r["completion"], r["rating"], r["labeller"]) for r in ratings] == [
        ("great", 1, "alice"),
        ("awful", -1, "bob"),
        ("ok", -1, "alice"),
    ]  # the new vote replaced the old
    prefs = list(store.export("preferences"))
    pairs = [(p["prompt"], p["chosen"], p["rejected"]) for p in prefs]
    # the pick, then every +1 over every -1 of the same prompt using each rollout's newest rating
    assert pairs == [
        ("The film was", "ok", "great"),
        ("The film was", "great", "awful"),
        ("The film was", "great", "ok"),
    ]
    assert prefs[1]["labeller"] == "alice,bob" and prefs[0]["rollout_ids"] == ["r3", "r1"]
    from streamrl.stages.rlhf_data import parse_row  # what streamrl rm reads

    assert parse_row(json.loads(json.dumps(prefs[0])), row_number=0).responses == ("ok", "great")
    with pytest.raises(ValueError, match="layout"):
        list(store.export("csv"))


def test_features_and_training_rows(tmp_path):
    store = LabelStore(tmp_path / "db.sqlite3")
    store.add_labeller("alice")
    store.add_label(labeller="alice", kind="rating", scored=scored("r1"), value=1, model_version=0, seen_at=1.0)
    store.add_label(
        labeller="alice",
        kind="preference",
        scored=scored("r2"),
        other=scored("r3"),
        value=1,
        model_version=0,
        seen_at=1.0,
    )
    missing = store.rollouts_without_features()
    assert sorted(rid for rid, _, _ in missing) == ["r1", "r2", "r3"]
    assert missing[0][1].tolist() == [1, 2, 3] and missing[0][2].tolist() == [4, 5]
    assert store.training_labels(10) == []  # nothing trainable before the features exist
    store.set_features({"r1": np.array([1, 2], np.float32), "r2": np.array([3, 4], np.float32)})
    rows = store.training_labels(10)
    assert [(r.kind, r.value) for r in rows] == [("rating", 1)]  # the pick still lacks r3's features
    store.set_features({"r3": np.array([5, 6], np.float32)})
    rows = store.training_labels(10)
    assert [r.kind for r in rows] == ["rating", "preference"]
    assert rows[1].features.tolist() == [3, 4] and rows[1].other_features.tolist() == [5, 6]
    assert [r.kind for r in store.training_labels(1)] == ["preference"]  # the newest only
    store.record_model(version=1, labels=2, last_label_id=rows[-1].id, loss=0.5)
    assert store.latest_model() == (1, rows[-1].id)


def test_one_vote_per_labeller_and_rollout_a_new_vote_replaces_the_old(tmp_path):
    store = LabelStore(tmp_path / "db.sqlite3")
    store.add_labeller("alice")
    store.add_labeller("bob")
    r1, r2, r3 = scored("r1"), scored("r2"), scored("r3")
    first, _ = store.add_label(labeller="alice", kind="rating", scored=r1, value=1, model_version=0, seen_at=1.0)
    for _ in range(50):  # the same rating over and over: one vote
        store.add_label(labeller="alice", kind="rating", scored=r1, value=1, model_version=0, seen_at=1.0)
    last, _ = store.add_label(labeller="alice", kind="rating", scored=r1, value=-1, model_version=0, seen_at=1.0)
    store.add_label(labeller="bob", kind="rating", scored=r1, value=1, model_version=0, seen_at=1.0)  # another person
    store.add_label(labeller="alice", kind="preference", scored=r2, other=r3, value=1, model_version=0, seen_at=1.0)
    store.add_label(labeller="alice", kind="preference", scored=r3, other=r2, value=1, model_version=0, seen_at=1.0)
    store.add_label(labeller="alice", kind="rating", scored=r2, value=1, model_version=0, seen_at=1.0)  # another kind
    rows = (
        sqlite3.connect(tmp_path / "db.sqlite3")
        .execute("SELECT id, labeller, kind, rollout_id, other_rollout_id, value FROM labels ORDER BY id")
        .fetchall()
    )
    assert [r[1:] for r in rows] == [
        ("alice", "rating", "r1", None, -1),
        ("bob", "rating", "r1", None, 1),
        ("alice", "preference", "r3", "r2", 1),
        ("alice", "rating", "r2", None, 1),
    ]
    assert rows[0][0] == last > first and store.labels_by_labeller() == {"alice": 3, "bob": 1}


def test_a_database_with_repeated_votes_keeps_the_newest_of_each(tmp_path):
    path = tmp_path / "db.sqlite3"
    store = LabelStore(path)
    store.add_labeller("alice")
    store.add_label(labeller="alice", kind="rating", scored=scored("r1"), value=1, model_version=0, seen_at=1.0)
    store.close()
    con = sqlite3.connect(path)  # as an older version wrote it: no one-vote index, the same vote three times
    con.execute("DROP INDEX labels_one_vote")
    for value in (1, -1, 1, -1):
        con.execute(
            "INSERT INTO labels (created_at, labeller, kind, rollout_id, value, policy_version, model_version) "
            "VALUES (2.0, 'alice', 'rating', 'r1', ?, 3, 0)",
            (value,),
        )
    con.commit()
    con.close()
    store = LabelStore(path)
    assert [(r["rating"]) for r in store.export("ratings")] == [-1]


def test_shared_credit_is_stored_trained_on_and_replaced_with_its_vote(tmp_path):
    store = LabelStore(tmp_path / "db.sqlite3")
    store.add_labeller("alice")
    rated, shown = scored("r1"), scored("r2")
    store.add_label(
        labeller="alice",
        kind="rating",
        scored=rated,
        value=1,
        model_version=0,
        seen_at=5.0,
        credit=[(rated, 5.0, 0.5), (shown, 4.0, 0.5)],
    )
    store.set_features({"r1": np.array([1, 2], np.float32)})
    assert store.training_labels(10) == []  # the credited r2 has no features yet
    assert [rid for rid, _, _ in store.rollouts_without_features()] == ["r2"]  # kept to be featurised
    store.set_features({"r2": np.array([3, 4], np.float32)})
    (row,) = store.training_labels(10)
    assert [(f.tolist(), w) for f, w in row.credit] == [([1, 2], 0.5), ([3, 4], 0.5)]
    # a new vote replaces the old with its credit
    store.add_label(labeller="alice", kind="rating", scored=rated, value=-1, model_version=0, seen_at=5.0)
    (row,) = store.training_labels(10)
    assert row.value == -1 and row.credit is None
    assert sqlite3.connect(tmp_path / "db.sqlite3").execute("SELECT COUNT(*) FROM credits").fetchone() == (0,)
