"""Buffer journal: recovery reproduces the store exactly, torn tails, compaction, history."""

from __future__ import annotations

import random

import pytest

from streamrl.common.messages import Batch, encode
from streamrl.common.modes import FsyncPolicy, OverflowPolicy
from streamrl.services.buffer.journal import (
    Journal,
    JournalDamaged,
    RecordType,
    RecoveredGroup,
    _record_at,
    _segments,
    read_records,
    torn_tail,
)
from streamrl.services.buffer.store import AddOutcome, ReplayBuffer
from support import scored_item


class Journaled:
    """A ReplayBuffer wired to a Journal the way the buffer service wires them."""

    def __init__(self, directory, *, max_reuse=1, capacity=6, clock=None, fsync=FsyncPolicy.ALWAYS, **journal_kw):
        self.now = 0.0
        self.journal = Journal(directory, fsync=fsync, max_reuse=max_reuse, **journal_kw)
        self.store = ReplayBuffer(
            capacity_groups=capacity,
            overflow=OverflowPolicy.EVICT_OLDEST,
            max_reuse=max_reuse,
            max_staleness=2,
            group_timeout_s=5.0,
            clock=clock or (lambda: self.now),
            on_event=self._event,
        )
        self._frames = None
        self.unacked: Batch | None = None

    def _event(self, event, ids):
        if event == "accepted":
            self.journal.accept(self._frames)
        elif event in ("dropped_stale", "evicted"):
            self.journal.remove(event, ids)

    def add(self, item) -> AddOutcome:
        self._frames = encode(item)
        outcome = self.store.add(item)
        self.journal.commit()
        return outcome

    def sample(self, n, version):
        s = self.store.sample(n, version)
        if s is not None:
            self.unacked = Batch(
                learner_version=version,
                rollouts=s.rollouts,
                dropped_stale=s.dropped_stale,
                evicted=s.evicted,
                buffered_groups=s.buffered_groups,
            )
            self.journal.serve(self.unacked)
            self.journal.commit()
        return s

    def ack(self):
        self.journal.ack(self.unacked.learner_version)
        self.unacked = None


def restored(directory, *, max_reuse=1, capacity=6) -> tuple[ReplayBuffer, Batch | None]:
    rec = Journal(directory, fsync=FsyncPolicy.NEVER, max_reuse=max_reuse).recover()
    store = ReplayBuffer(
        capacity_groups=capacity,
        overflow=OverflowPolicy.EVICT_OLDEST,
        max_reuse=max_reuse,
        max_staleness=2,
        group_timeout_s=5.0,
        clock=lambda: 0.0,
    )
    store.restore([(g.members, g.served) for g in rec.groups])
    return store, rec.unacknowledged


def state(store: ReplayBuffer) -> list[tuple[list[str], int]]:
    return [([m.rollout.rollout_id for m in members], served) for members, served in store.snapshot()]


def test_recovery_reproduces_groups_order_serve_counts_and_unacked_batch(tmp_path):
    j = Journaled(tmp_path, max_reuse=2)
    for g in "abcd":
        for k in range(2):
            j.add(scored_item(g, k, version=1))
    j.add(scored_item("e", 0, version=1))  # incomplete group
    first = j.sample(2, 1)  # a, b served once -> back of the queue: c d a b
    assert [m.rollout.group_id for m in first.rollouts] == ["a", "a", "b", "b"]
    j.ack()
    j.sample(1, 1)  # c served once; unacknowledged
    assert state(j.store) == [
        (["e-0"], 0),
        (["d-0", "d-1"], 0),
        (["a-0", "a-1"], 1),
        (["b-0", "b-1"], 1),
        (["c-0", "c-1"], 1),
    ]

    store, unacked = restored(tmp_path, max_reuse=2)
    assert state(store) == state(j.store)
    assert [m.rollout.rollout_id for m in unacked.rollouts] == ["c-0", "c-1"]
    assert unacked.learner_version == 1
    # the recovered store keeps serving exactly like the original one
    assert [m.rollout.rollout_id for m in store.sample(2, 1).rollouts] == ["d-0", "d-1", "a-0", "a-1"]
    j.ack()
    assert [m.rollout.rollout_id for m in j.sample(2, 1).rollouts] == ["d-0", "d-1", "a-0", "a-1"]
    # a group served max_reuse times is gone after recovery too (a: served twice now)
    j.journal.close()
    store2, _ = restored(tmp_path, max_reuse=2)
    assert "a-0" not in {i for ids, _ in state(store2) for i in ids}
    assert state(store2) == state(j.store)


def test_acknowledged_batch_is_not_recovered_and_removals_are(tmp_path):
    j = Journaled(tmp_path)
    for g, v in (("old", 0), ("new", 5)):
        for k in range(2):
            j.add(scored_item(g, k, version=v))
    s = j.sample(1, 5)  # drops "old" as stale (5 - 0 > 2), serves "new"
    assert s.dropped_stale == 2
    j.ack()
    store, unacked = restored(tmp_path)
    assert unacked is None
    assert store.held_rollouts == 0


@pytest.mark.parametrize("cut", [1, 5, 11])
def test_torn_tail_is_ignored_and_counted(tmp_path, cut):
    j = Journaled(tmp_path)
    for k in range(2):
        j.add(scored_item("a", k))
    j.add(scored_item("b", 0))
    j.journal.close()
    ((_, path),) = _segments(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-cut])  # the crash tore the last record
    rec = Journal(tmp_path, fsync=FsyncPolicy.NEVER).recover()
    assert rec.bad_records == 1
    assert rec.records == 2
    assert [[m.rollout.rollout_id for m in g.members] for g in rec.groups] == [["a-0", "a-1"]]
    assert rec.torn_rollouts == 1  # the torn record accepted "b-0": reported in rollouts, not bytes


def test_torn_tail_reason_says_records_and_rollouts(tmp_path):
    j = Journaled(tmp_path)
    j.add(scored_item("a", 0))
    j.journal.close()
    ((_, path),) = _segments(tmp_path)
    data = path.read_bytes()
    start = 0  # where the last record (the accept of "a-0") begins
    while _record_at(data, start)[1] < len(data):
        start = _record_at(data, start)[1]
    assert _record_at(data, start)[0] == RecordType.ACCEPT
    accept = torn_tail(data[:-3], start)
    assert (accept.rollouts, str(accept).split(": ", 1)[1]) == (1, "1 record lost (accept): 1 rollout never accepted")
    header_cut = torn_tail(data[: start + 4], start)
    assert header_cut.rollouts == 1 and "header is torn" in header_cut
    removal = bytearray(data[:-3])
    removal[start + 8] = RecordType.REMOVE
    assert torn_tail(bytes(removal), start).rollouts == 0


def test_corrupt_record_ends_its_segment(tmp_path):
    j = Journaled(tmp_path)
    for k in range(2):
        j.add(scored_item("a", k))
    j.journal.close()
    ((_, path),) = _segments(tmp_path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # flip bits inside the second record's payload: crc mismatch
    path.write_bytes(bytes(data))
    rec = Journal(tmp_path, fsync=FsyncPolicy.NEVER).recover()
    assert (rec.records, rec.bad_records, rec.rollouts) == (1, 1, 1)


def test_compaction_bounds_disk_and_keeps_state_and_history(tmp_path):
    rng = random.Random(3)
    # 100 groups compact the journal dozens of times; nothing crashes here, so commits need no fsync (the
    # durability tests have their own): 300 groups with fsync = always made this the slowest unit test
    j = Journaled(
        tmp_path,
        max_reuse=1,
        capacity=4,
        segment_bytes=4096,
        max_segments=2,
        keep_history=True,
        fsync=FsyncPolicy.NEVER,
    )
    accepted, version = [], 0
    for g in range(100):
        for k in range(2):
            item = scored_item(f"g{g}", k, version=version)
            assert j.add(item) is AddOutcome.ACCEPTED
            accepted.append(item.rollout.rollout_id)
        if rng.random() < 0.5 and j.store.complete_groups >= 2:
            if j.unacked is not None:
                j.ack()
            j.sample(2, version)
            version += rng.choice([0, 1, 3])
        if j.journal.needs_compaction():
            j.journal.compact([RecoveredGroup(members=m, served=s) for m, s in j.store.snapshot()], j.unacked)
        assert len(_segments(tmp_path)) <= 3
    assert j.journal.compactions > 5
    live_bytes = sum(p.stat().st_size for _, p in _segments(tmp_path))
    assert live_bytes <= 3 * 4096 + 4096  # segments bounded (+ one record past the limit)
    store, unacked = restored(tmp_path, capacity=4)
    assert state(store) == state(j.store)
    assert [m.rollout.rollout_id for m in unacked.rollouts] == [m.rollout.rollout_id for m in j.unacked.rollouts]
    # the history still accounts for every accepted id: served, dropped, evicted or held
    events: dict[str, set[str]] = {}
    for event, ids in j.journal.history():
        events.setdefault(event, set()).update(ids)
    assert events["accepted"] == set(accepted)
    held = {i for ids, _ in state(j.store) for i in ids}
    gone = events["sampled"] | events.get("dropped_stale", set()) | events.get("evicted", set())
    assert set(accepted) == gone | held
    assert events["dropped_stale"] and events["evicted"]  # the run exercised both


def test_fsync_policy_interval_and_never(tmp_path):
    clockless = Journal(tmp_path / "n", fsync=FsyncPolicy.NEVER)
    clockless.accept(encode(scored_item("a", 0)))
    clockless.commit()
    assert clockless.fsyncs == 0
    clockless.close()  # a clean close always fsyncs
    assert clockless.fsyncs == 1
    every = Journal(tmp_path / "a", fsync=FsyncPolicy.ALWAYS)
    for k in range(3):
        every.accept(encode(scored_item("a", k, size=3)))
    every.commit()
    every.commit()  # nothing new: no second fsync
    assert every.fsyncs == 1
    interval = Journal(tmp_path / "i", fsync=FsyncPolicy.INTERVAL, fsync_interval_s=3600)
    interval.accept(encode(scored_item("a", 0)))
    interval.commit()
    interval.accept(encode(scored_item("a", 1)))
    interval.commit()
    assert interval.fsyncs <= 1


# ---------------------------------------------------------------- damage is never skipped silently


def served_journal(directory, groups=6, segment_bytes=1 << 20):
    """A journal of ``groups`` complete groups of 2; the first half served (and acknowledged)."""
    j = Journaled(directory, capacity=groups, segment_bytes=segment_bytes)
    for g in range(groups):
        for k in range(2):
            j.add(scored_item(f"g{g}", k))
    for _ in range(groups // 2):
        if j.unacked is not None:
            j.ack()
        j.sample(1, 0)
    j.ack()
    j.journal.close()
    return j


def flip_byte(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_flipped_byte_mid_segment_stops_recovery(tmp_path):
    served_journal(tmp_path)
    ((_, path),) = _segments(tmp_path)
    flip_byte(path, 200)  # inside an early ACCEPT record; intact records follow
    before = path.read_bytes()
    with pytest.raises(JournalDamaged, match=r"segment-000001\.log: corrupt record at byte .*journal_repair"):
        Journal(tmp_path, fsync=FsyncPolicy.NEVER).recover()
    assert path.read_bytes() == before  # nothing on disk changed


def test_repair_moves_the_damaged_segment_aside_and_resurrects_nothing(tmp_path):
    """Bytes flipped before the SERVE records: repair must not bring back the groups they served."""
    j = served_journal(tmp_path)
    events: dict[str, set[str]] = {}
    for event, ids in j.journal.history():
        events.setdefault(event, set()).update(ids)
    trained = events["sampled"]
    assert len(trained) == 6  # three groups of two were served and acknowledged
    ((_, path),) = _segments(tmp_path)
    flip_byte(path, 200)
    rec = Journal(tmp_path, fsync=FsyncPolicy.NEVER).recover(repair=True)
    held = {m.rollout.rollout_id for g in rec.groups for m in g.members}
    assert not held & trained  # no served (trained) rollout comes back
    assert rec.quarantined == 0 and held == set()  # the only records after the damage are gone with it
    assert rec.damage and not path.exists()
    (kept,) = (tmp_path / "damaged").iterdir()
    assert kept.name.startswith("segment-000001.log.") and kept.stat().st_size > 0


def serve_in_the_middle(directory):
    """Groups g0..g3 accepted, g0 served (SERVE in a middle segment), then g4..g11 accepted."""
    j = Journaled(directory, capacity=12, segment_bytes=1500)
    for g in range(12):
        for k in range(2):
            j.add(scored_item(f"g{g}", k))
        if g == 3:
            j.sample(1, 0)
            j.ack()
    j.journal.close()
    serve_segment = next(
        path for _, path in _segments(directory) if any(kind is RecordType.SERVE for kind, _ in read_records(path))
    )
    return j, serve_segment


def test_repair_quarantines_groups_whose_later_records_are_lost(tmp_path):
    """Damage where g0's SERVE was recorded: without quarantine, replay would serve g0 a second time."""
    j, serve_segment = serve_in_the_middle(tmp_path)
    assert serve_segment != _segments(tmp_path)[-1][1]
    flip_byte(serve_segment, 30)  # the BEGIN/first records: the whole segment's content is lost
    with pytest.raises(JournalDamaged):
        Journal(tmp_path, fsync=FsyncPolicy.NEVER).recover()
    rec = Journal(tmp_path, fsync=FsyncPolicy.NEVER).recover(repair=True)
    held = {m.rollout.group_id for g in rec.groups for m in g.members}
    assert "g0-0" not in {m.rollout.rollout_id for g in rec.groups for m in g.members}
    assert held and all(int(g[1:]) > 3 for g in held)  # g1..g3 (in doubt) quarantined, later groups kept
    assert rec.quarantined >= 6
    assert (tmp_path / "damaged").is_dir() and not serve_segment.exists()


def test_a_deleted_segment_stops_recovery(tmp_path):
    j, serve_segment = serve_in_the_middle(tmp_path)
    number = int(serve_segment.name[8:14])
    serve_segment.unlink()
    with pytest.raises(JournalDamaged, match=f"segments {number:06d}..{number:06d} are missing"):
        Journal(tmp_path, fsync=FsyncPolicy.NEVER).recover()
    rec = Journal(tmp_path, fsync=FsyncPolicy.NEVER).recover(repair=True)
    assert rec.damage and rec.quarantined > 0
    assert "g0" not in {m.rollout.group_id for g in rec.groups for m in g.members}


def test_a_deleted_first_segment_is_noticed(tmp_path):
    """After a compaction the oldest segment is a snapshot; deleting the segment a newer one continues is damage."""
    served_journal(tmp_path, groups=12, segment_bytes=1500)
    segments = _segments(tmp_path)
    segments[0][1].unlink()
    with pytest.raises(JournalDamaged, match=f"segment {segments[0][0]:06d} before {segments[1][1].name} is missing"):
        Journal(tmp_path, fsync=FsyncPolicy.NEVER).recover()


def test_an_interrupted_compaction_replays_from_the_snapshot(tmp_path):
    """Snapshot written, old segments not yet deleted (a crash between the two): same state, no duplicates."""
    j = served_journal(tmp_path, groups=6, segment_bytes=1500)
    expected, _ = restored(tmp_path)
    old = [path for _, path in _segments(tmp_path)]
    copies = {path: path.read_bytes() for path in old}
    journal = Journal(tmp_path, fsync=FsyncPolicy.NEVER)
    journal.compact([RecoveredGroup(members=m, served=s) for m, s in j.store.snapshot()], None)
    journal.close()
    for path, data in copies.items():  # the crash: the old segments are still there
        path.write_bytes(data)
    store, _ = restored(tmp_path)
    assert state(store) == state(expected) == state(j.store)
