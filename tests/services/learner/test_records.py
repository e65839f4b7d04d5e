"""The learner's per-step outputs: the metrics.jsonl record, the trained.jsonl ledger line, the console line."""

from __future__ import annotations

import json

import pytest

from streamrl.common.messages import Batch
from streamrl.services.learner.records import append_line, ledger_line, roll_back_ledger, step_log_line, step_record
from support import scored_item

STATS = {
    "loss/total": 0.5,
    "reward_mean": 0.25,
    "kl": 0.0123,
    "entropy": 1.5,
    "clip_fraction": 0.1,
    "importance_ratio_mean": 1.01,
    "importance_ratio_max": 1.5,
    "ess_fraction": 0.95,
    "staleness_min": 0.0,
    "staleness_max": 2.0,
    "tokens": 40,
}


def batch() -> Batch:
    rollouts = [scored_item("g1", k, version=3) for k in range(2)] + [scored_item("g2", k, version=5) for k in range(2)]
    rollouts[0].rollout.prompt_text, rollouts[0].rollout.completion_text = "Q", "A"
    rollouts[2].rollout.generator_id = "generator-1"
    return Batch(learner_version=5, rollouts=rollouts, dropped_stale=3, evicted=1, buffered_groups=2)


def test_step_record():
    b = batch()
    record = step_record(
        step=6,
        version=6,
        now=1234.5,
        stats=STATS,
        batch=b,
        behaviour_versions=[3, 3, 5, 5],
        wait_s=1.5,
        train_s=0.5,
        publish_s=0.25,
    )
    assert {k: record[k] for k in STATS} == STATS
    assert (record["step"], record["version"], record["time"]) == (6, 6, 1234.5)
    assert record["samples_per_second"] == 4 / (1.5 + 0.5)
    assert (record["dropped_stale"], record["evicted"], record["buffered_groups"]) == (3, 1, 2)
    assert record["behaviour_versions"] == [3, 5]
    assert record["generators_in_batch"] == 2
    assert record["samples"] == [
        {"prompt": "Q", "completion": "A", "reward": 0.0, "policy_version": 3},
        {"prompt": "", "completion": "", "reward": 1.0, "policy_version": 3},
    ]
    assert (record["wait_data_s"], record["train_s"], record["publish_s"]) == (1.5, 0.5, 0.25)
    assert json.loads(json.dumps(record)) == record  # one JSON line as written


def test_ledger_line_and_append(tmp_path):
    line = ledger_line(6, 6, batch())
    assert json.loads(line) == {"step": 6, "version": 6, "rollout_ids": ["g1-0", "g1-1", "g2-0", "g2-1"]}
    path = tmp_path / "trained.jsonl"
    append_line(path, line, fsync=True)
    append_line(path, ledger_line(7, 7, Batch(learner_version=6, rollouts=[])))
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [6, 7]


def test_step_log_line():
    record = step_record(
        step=6,
        version=6,
        now=0.0,
        stats=STATS,
        batch=batch(),
        behaviour_versions=[3, 3, 5, 5],
        wait_s=1.5,
        train_s=0.5,
        publish_s=0.25,
    )
    assert step_log_line(record, total_steps=100) == (
        "step 6/100 v6 | reward 0.250 | kl 0.0123 | entropy 1.500 | clip 0.100 | ratio 1.010/1.500 | ess 0.95 | "
        "stale 0-2 | dropped 3 | 2.0 samples/s | wait 1.5s | generators 2"
    )
    with pytest.raises(KeyError):
        step_log_line({"step": 1}, total_steps=1)


def test_roll_back_ledger_keeps_checkpointed_steps_and_moves_the_rest_aside(tmp_path):
    """Checkpoint at step 2, steps 3 and 4 trained then the learner was killed. After the
    roll-back trained.jsonl holds steps 1-2 once; 3-4 are in rolled_back.jsonl with the time; retraining
    appends step 3 again without a duplicate."""
    path = tmp_path / "trained.jsonl"
    for step in range(1, 5):
        append_line(path, json.dumps({"step": step, "version": step + 10, "rollout_ids": [f"r{step}"]}))
    assert roll_back_ledger(path, 2) == [3, 4]
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    moved = [json.loads(line) for line in (tmp_path / "rolled_back.jsonl").read_text().splitlines()]
    assert [(m["step"], m["rollout_ids"]) for m in moved] == [(3, ["r3"]), (4, ["r4"])]
    assert all(m["rolled_back_at"] > 0 for m in moved)
    assert roll_back_ledger(path, 2) == [] and not (tmp_path / "trained.jsonl.tmp").exists()
    append_line(path, json.dumps({"step": 3, "version": 15, "rollout_ids": ["r3"]}))
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    assert roll_back_ledger(tmp_path / "missing.jsonl", 0) == []
    path.write_text("not json\n")
    with pytest.raises(ValueError, match="trained.jsonl:1: not a ledger line"):
        roll_back_ledger(path, 0)
