"""The labels database: SQLite in WAL mode, every label committed (fsync'd) before it is acknowledged.

Tables:

* ``labellers``: name, SHA-256 of the labeller's token (the token itself is shown once, never
  stored), created_at, disabled.
* ``rollouts``: every rollout a label refers to, as it streamed (texts, token ids, reward,
  reward parts, policy version, generator) and, once computed, its H-hat features.
* ``labels``: who (labeller), when (Unix seconds), which rollout(s), which policy version(s),
  which H-hat version the labeller saw; ``kind`` ``rating`` (value +1 / -1) or
  ``preference`` (``rollout_id`` preferred over ``other_rollout_id``, value 1).
* ``credits``: how a rating's credit is shared (TAMER's credit assignment over the reaction
  delay): (label, rollout, weight), the weights of one label summing to 1; a rating without
  rows here credits its rated rollout alone.
* ``models``: every H-hat version published (labels used, last label id, training loss).
* ``settings``: ``influence_active`` (the page's start / pause of the human influence).

``synchronous = FULL`` in WAL mode: a committed label survives a process kill and a power cut.
One connection, guarded by a lock, serves the web threads and the service loop.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamrl.common.messages import ScoredRollout

SCHEMA = """
CREATE TABLE IF NOT EXISTS labellers (
    name TEXT PRIMARY KEY,
    token_sha256 TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    disabled INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS rollouts (
    rollout_id TEXT PRIMARY KEY,
    group_id TEXT NOT NULL,
    prompt_id TEXT NOT NULL,
    generator_id TEXT NOT NULL,
    policy_version INTEGER NOT NULL,
    prompt_text TEXT NOT NULL,
    completion_text TEXT NOT NULL,
    reward REAL NOT NULL,
    reward_parts TEXT NOT NULL,
    prompt_tokens BLOB NOT NULL,
    completion_tokens BLOB NOT NULL,
    features BLOB,
    seen_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at REAL NOT NULL,
    labeller TEXT NOT NULL REFERENCES labellers(name),
    kind TEXT NOT NULL CHECK (kind IN ('rating', 'preference')),
    rollout_id TEXT NOT NULL REFERENCES rollouts(rollout_id),
    other_rollout_id TEXT REFERENCES rollouts(rollout_id),
    value INTEGER NOT NULL,
    policy_version INTEGER NOT NULL,
    other_policy_version INTEGER,
    model_version INTEGER NOT NULL,
    CHECK ((kind = 'rating' AND value IN (-1, 1) AND other_rollout_id IS NULL)
        OR (kind = 'preference' AND value = 1 AND other_rollout_id IS NOT NULL AND other_rollout_id != rollout_id))
);
CREATE INDEX IF NOT EXISTS labels_rollout ON labels(rollout_id);
CREATE TABLE IF NOT EXISTS credits (
    label_id INTEGER NOT NULL REFERENCES labels(id) ON DELETE CASCADE,
    rollout_id TEXT NOT NULL REFERENCES rollouts(rollout_id),
    weight REAL NOT NULL CHECK (weight > 0 AND weight <= 1),
    PRIMARY KEY (label_id, rollout_id)
);
CREATE TABLE IF NOT EXISTS models (
    version INTEGER PRIMARY KEY,
    created_at REAL NOT NULL,
    labels INTEGER NOT NULL,
    last_label_id INTEGER NOT NULL,
    loss REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

VOTE = (
    "labeller, kind, min(rollout_id, COALESCE(other_rollout_id, '')), max(rollout_id, COALESCE(other_rollout_id, ''))"
)
"""What one vote is about: a labeller's rating of a rollout, or their pick within an unordered pair."""
ONE_VOTE = f"CREATE UNIQUE INDEX IF NOT EXISTS labels_one_vote ON labels({VOTE})"
"""At most one stored label per vote: a new rating of the same rollout (or a new pick within the
same pair) by the same labeller replaces the old one, so one labeller repeating a label cannot
outweigh the others in H-hat's fit."""

LABELLER_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
"""Allowed labeller names: 1-64 letters, digits and ``_ . @ -``."""


def token_hash(token: str) -> str:
    """Hex SHA-256 of a labeller token (what the database keeps)."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class LabelRow:
    """A stored label with the features it is trained on.

    Attributes:
        id: label id (increasing).
        created_at: Unix seconds.
        kind: ``rating`` or ``preference``.
        value: +1 / -1 for a rating, 1 for a preference.
        features: ``[D]`` float32 of ``rollout_id`` (None until computed).
        other_features: ``[D]`` float32 of ``other_rollout_id`` (preferences), else None.
        credit: a rating whose credit is shared: ``[(features [D] float32, weight)]`` of every
            credited rollout (the rated one included; weights sum to 1), else None (all on
            ``features``).
    """

    id: int
    created_at: float
    kind: str
    value: int
    features: np.ndarray | None
    other_features: np.ndarray | None
    credit: list[tuple[np.ndarray, float]] | None = None


class LabelStore:
    """The feedback service's database (see the module docstring).

    Args:
        path: the SQLite file (its folder is created).

    Raises:
        sqlite3.DatabaseError: the file is not a database.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=10.0)
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = FULL")
        self._db.execute("PRAGMA foreign_keys = ON")
        self._db.executescript(SCHEMA)
        with self._lock:  # a database written before one vote per labeller: keep each vote's newest label
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(f"DELETE FROM labels WHERE id NOT IN (SELECT MAX(id) FROM labels GROUP BY {VOTE})")
            self._db.execute(ONE_VOTE)
            self._db.execute("COMMIT")

    def close(self) -> None:
        """Checkpoint the WAL and close."""
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()

    def _write(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                cursor = self._db.execute(sql, args)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return cursor

    def _read(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # ------------------------------------------------------------ labellers

    def add_labeller(self, name: str) -> str:
        """Create a labeller; returns the token (shown once: only its SHA-256 is stored).

        Raises:
            ValueError: a name outside :data:`LABELLER_NAME`, or one that exists.
        """
        if not LABELLER_NAME.match(name):
            raise ValueError(f"labeller name {name!r}: use 1-64 letters, digits, _ . @ -")
        token = secrets.token_urlsafe(32)
        try:
            self._write(
                "INSERT INTO labellers (name, token_sha256, created_at) VALUES (?, ?, ?)",
                (name, token_hash(token), time.time()),
            )
        except sqlite3.IntegrityError:
            raise ValueError(f"labeller {name!r} exists; fix: choose another name or revoke it first") from None
        return token

    def revoke_labeller(self, name: str) -> bool:
        """Disable a labeller's token (their labels stay); False when no such labeller."""
        return self._write("UPDATE labellers SET disabled = 1 WHERE name = ?", (name,)).rowcount == 1

    def labeller_for_token(self, token: str) -> str | None:
        """The enabled labeller whose token this is, else None (constant-time comparison of the digests)."""
        if not token or len(token) > 256:
            return None
        digest = token_hash(token)
        rows = self._read("SELECT name, token_sha256 FROM labellers WHERE token_sha256 = ? AND disabled = 0", (digest,))
        for name, stored in rows:
            if hmac.compare_digest(stored, digest):
                return name
        return None

    def labeller_enabled(self, name: str) -> bool:
        """True while ``name`` exists and is not revoked (read from the database: a revocation by
        another process, e.g. the admin command, counts at once)."""
        return bool(self._read("SELECT 1 FROM labellers WHERE name = ? AND disabled = 0", (name,)))

    def labellers(self) -> list[str]:
        """Names of the enabled labellers."""
        return [name for (name,) in self._read("SELECT name FROM labellers WHERE disabled = 0 ORDER BY name")]

    # --------------------------------------------------------------- labels

    def _keep_rollout(self, scored: ScoredRollout, seen_at: float) -> None:
        r = scored.rollout
        self._db.execute(
            "INSERT OR IGNORE INTO rollouts (rollout_id, group_id, prompt_id, generator_id, policy_version, "
            "prompt_text, completion_text, reward, reward_parts, prompt_tokens, completion_tokens, seen_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                r.rollout_id,
                r.group_id,
                r.prompt_id,
                r.generator_id,
                r.policy_version,
                r.prompt_text,
                r.completion_text,
                float(scored.reward),
                json.dumps(scored.reward_parts),
                np.asarray(r.prompt_tokens, "<i4").tobytes(),
                np.asarray(r.completion_tokens, "<i4").tobytes(),
                seen_at,
            ),
        )

    def add_label(
        self,
        *,
        labeller: str,
        kind: str,
        scored: ScoredRollout,
        value: int,
        other: ScoredRollout | None = None,
        model_version: int,
        seen_at: float,
        credit: Sequence[tuple[ScoredRollout, float, float]] = (),
    ) -> tuple[int, float]:
        """Store one label and the rollout(s) it refers to, in one transaction (committed on return).

        One vote per labeller: the labeller's earlier rating of the same rollout (or earlier pick
        within the same pair, either way round) is replaced; the new label gets a new, larger id.

        Args:
            labeller: an existing labeller's name.
            kind: ``rating`` (value +1 / -1) or ``preference`` (``scored`` preferred over ``other``; value 1).
            scored: the rated (or preferred) rollout.
            value: the rating.
            other: the rejected rollout of a preference.
            model_version: the H-hat version in force when the label was given.
            seen_at: when the rollout streamed in (Unix seconds).
            credit: a rating's shared credit, ``(rollout, seen_at, weight)`` per credited rollout
                (the rated one included, weights summing to 1); empty: all on ``scored``.

        Returns:
            ``(label id, created_at)``.

        Raises:
            sqlite3.IntegrityError: a label the schema refuses (bad kind/value, unknown labeller).
        """
        now = time.time()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._keep_rollout(scored, seen_at)
                if other is not None:
                    self._keep_rollout(other, seen_at)
                ids = sorted((scored.rollout.rollout_id, other.rollout.rollout_id if other is not None else ""))
                self._db.execute(f"DELETE FROM labels WHERE ({VOTE}) = (?, ?, ?, ?)", (labeller, kind, *ids))
                cursor = self._db.execute(
                    "INSERT INTO labels (created_at, labeller, kind, rollout_id, other_rollout_id, value, "
                    "policy_version, other_policy_version, model_version) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        now,
                        labeller,
                        kind,
                        scored.rollout.rollout_id,
                        other.rollout.rollout_id if other is not None else None,
                        value,
                        scored.rollout.policy_version,
                        other.rollout.policy_version if other is not None else None,
                        model_version,
                    ),
                )
                for credited, credited_seen_at, weight in credit:
                    self._keep_rollout(credited, credited_seen_at)
                    self._db.execute(
                        "INSERT INTO credits (label_id, rollout_id, weight) VALUES (?, ?, ?)",
                        (cursor.lastrowid, credited.rollout.rollout_id, weight),
                    )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        assert cursor.lastrowid is not None  # set by the INSERT above
        return cursor.lastrowid, now

    def count_labels(self) -> dict[str, int]:
        """``{"rating": n, "preference": m, "total": n + m}``."""
        counts = {"rating": 0, "preference": 0}
        counts.update(dict(self._read("SELECT kind, COUNT(*) FROM labels GROUP BY kind")))
        counts["total"] = counts["rating"] + counts["preference"]
        return counts

    def labels_by_labeller(self) -> dict[str, int]:
        """Labels given by each labeller."""
        return dict(self._read("SELECT labeller, COUNT(*) FROM labels GROUP BY labeller ORDER BY labeller"))

    def last_label_id(self) -> int:
        """Id of the newest label (0 when none)."""
        return int(self._read("SELECT COALESCE(MAX(id), 0) FROM labels")[0][0])

    def rollouts_without_features(self, limit: int = 64) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """``(rollout_id, prompt_tokens, completion_tokens)`` of labelled rollouts whose features are missing."""
        rows = self._read(
            "SELECT rollout_id, prompt_tokens, completion_tokens FROM rollouts WHERE features IS NULL "
            "ORDER BY seen_at LIMIT ?",
            (limit,),
        )
        return [(rid, np.frombuffer(p, "<i4"), np.frombuffer(c, "<i4")) for rid, p, c in rows]

    def set_features(self, features: dict[str, np.ndarray]) -> None:
        """Store H-hat features (``[D]`` float32 each) of labelled rollouts."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "UPDATE rollouts SET features = ? WHERE rollout_id = ?",
                [(np.asarray(f, "<f4").tobytes(), rid) for rid, f in features.items()],
            )
            self._db.execute("COMMIT")

    def training_labels(self, limit: int) -> list[LabelRow]:
        """The newest ``limit`` labels whose rollouts (credited ones included) all have features, oldest first."""
        rows = self._read(
            "SELECT l.id, l.created_at, l.kind, l.value, a.features, b.features FROM labels l "
            "JOIN rollouts a ON a.rollout_id = l.rollout_id LEFT JOIN rollouts b ON b.rollout_id = l.other_rollout_id "
            "WHERE a.features IS NOT NULL AND (l.other_rollout_id IS NULL OR b.features IS NOT NULL) "
            "AND NOT EXISTS (SELECT 1 FROM credits c JOIN rollouts r ON r.rollout_id = c.rollout_id "
            "WHERE c.label_id = l.id AND r.features IS NULL) ORDER BY l.id DESC LIMIT ?",
            (limit,),
        )
        credit: dict[int, list[tuple[np.ndarray, float]]] = {}
        if rows:
            for label_id, features, weight in self._read(
                "SELECT c.label_id, r.features, c.weight FROM credits c JOIN rollouts r ON r.rollout_id = "
                "c.rollout_id WHERE c.label_id >= ? ORDER BY c.label_id, c.rollout_id",
                (rows[-1][0],),
            ):
                credit.setdefault(label_id, []).append((np.frombuffer(features, "<f4"), float(weight)))
        return [
            LabelRow(
                id=i,
                created_at=t,
                kind=k,
                value=v,
                features=np.frombuffer(fa, "<f4"),
                other_features=np.frombuffer(fb, "<f4") if fb is not None else None,
                credit=credit.get(i),
            )
            for i, t, k, v, fa, fb in reversed(rows)
        ]

    # --------------------------------------------------------------- models

    def record_model(self, *, version: int, labels: int, last_label_id: int, loss: float) -> None:
        """Record a published H-hat version."""
        self._write(
            "INSERT INTO models (version, created_at, labels, last_label_id, loss) VALUES (?, ?, ?, ?, ?)",
            (version, time.time(), labels, last_label_id, loss),
        )

    def latest_model(self) -> tuple[int, int]:
        """``(version, last_label_id)`` of the newest H-hat version, ``(0, 0)`` before the first."""
        rows = self._read("SELECT version, last_label_id FROM models ORDER BY version DESC LIMIT 1")
        return (int(rows[0][0]), int(rows[0][1])) if rows else (0, 0)

    # ------------------------------------------------------------- settings

    def get_setting(self, key: str, default: str) -> str:
        """A stored setting, or ``default``."""
        rows = self._read("SELECT value FROM settings WHERE key = ?", (key,))
        return rows[0][0] if rows else default

    def set_setting(self, key: str, value: str) -> None:
        """Store a setting (committed on return)."""
        self._write(
            "INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    # --------------------------------------------------------------- export

    def export(self, layout: str) -> Iterator[dict]:
        """The labels as a dataset for the reward-model stage (``streamrl rm``, :mod:`streamrl.stages.rlhf_data`).

        Layouts:
            ``preferences``: one ``{"prompt", "chosen", "rejected"}`` row per pairwise pick, plus one per
                (+1, -1) pair of ratings of two completions of the same prompt text; each row also
                carries ``labeller``, ``created_at``, ``policy_versions`` and ``rollout_ids``.
            ``ratings``: one ``{"prompt", "completion", "rating", "reward", "labeller", "created_at",
                "policy_version", "rollout_id", "generator_id"}`` row per rating.

        Raises:
            ValueError: an unknown layout.
        """
        if layout == "ratings":
            for row in self._read(
                "SELECT r.prompt_text, r.completion_text, l.value, r.reward, l.labeller, l.created_at, "
                "l.policy_version, r.rollout_id, r.generator_id FROM labels l JOIN rollouts r ON "
                "r.rollout_id = l.rollout_id WHERE l.kind = 'rating' ORDER BY l.id"
            ):
                yield dict(
                    zip(
                        (
                            "prompt",
                            "completion",
                            "rating",
                            "reward",
                            "labeller",
                            "created_at",
                            "policy_version",
                            "rollout_id",
                            "generator_id",
                        ),
                        row,
                    )
                )
            return
        if layout != "preferences":
            raise ValueError(f"unknown export layout {layout!r}; use 'preferences' or 'ratings'")
        for prompt, chosen, rejected, who, at, va, vb, ra, rb in self._read(
            "SELECT a.prompt_text, a.completion_text, b.completion_text, l.labeller, l.created_at, "
            "l.policy_version, l.other_policy_version, a.rollout_id, b.rollout_id FROM labels l "
            "JOIN rollouts a ON a.rollout_id = l.rollout_id JOIN rollouts b ON b.rollout_id = l.other_rollout_id "
            "WHERE l.kind = 'preference' ORDER BY l.id"
        ):
            yield {
                "prompt": prompt,
                "chosen": chosen,
                "rejected": rejected,
                "labeller": who,
                "created_at": at,
                "policy_versions": [va, vb],
                "rollout_ids": [ra, rb],
            }
        # ratings of one prompt text: every +1 completion over every -1 completion (the newest rating of each)
        ratings = self._read(
            "SELECT r.prompt_text, r.completion_text, l.value, l.labeller, l.created_at, l.policy_version, "
            "r.rollout_id FROM labels l JOIN rollouts r ON r.rollout_id = l.rollout_id WHERE l.kind = 'rating' "
            "ORDER BY l.id"
        )
        latest: dict[str, tuple] = {}
        for row in ratings:
            latest[row[6]] = row
        by_prompt: dict[str, list[tuple]] = {}
        for row in latest.values():
            by_prompt.setdefault(row[0], []).append(row)
        for prompt, rows in by_prompt.items():
            good = [r for r in rows if r[2] > 0]
            bad = [r for r in rows if r[2] < 0]
            for g in good:
                for b in bad:
                    if g[1] == b[1]:
                        continue  # the same text rated both ways carries no preference
                    yield {
                        "prompt": prompt,
                        "chosen": g[1],
                        "rejected": b[1],
                        "labeller": g[3] if g[3] == b[3] else f"{g[3]},{b[3]}",
                        "created_at": max(g[4], b[4]),
                        "policy_versions": [g[5], b[5]],
                        "rollout_ids": [g[6], b[6]],
                    }
