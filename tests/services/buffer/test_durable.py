"""DurableBuffer: admission capacity, the write-ahead journal (frames as received, nothing for a
refusal, removals in order), the learner protocol (pending, serve, serve again, restamp,
acknowledge) and recovery of all of it after a crash."""

from __future__ import annotations

import json

import pytest

from streamrl.common.ledger import Ledger, ledger_path
from streamrl.common.messages import Batch, BatchRequest, decode, encode
from streamrl.common.modes import FsyncPolicy, OverflowPolicy
from streamrl.services.buffer.durable import DurableBuffer, admission_capacity
from streamrl.services.buffer.journal import Journal, RecordType, _segments, read_records
from streamrl.services.buffer.store import AddOutcome, ReplayBuffer
from support import scored_item

ROUTE = b"\x00learner"


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def durable(
    directory=None,
    *,
    capacity=4,
    overflow=OverflowPolicy.EVICT_OLDEST,
    max_staleness=2,
    clock=None,
    max_reuse=1,
    keep_history=False,
) -> DurableBuffer:
    store = ReplayBuffer(
        capacity_groups=capacity,
        overflow=overflow,
        max_reuse=max_reuse,
        max_staleness=max_staleness,
        group_timeout_s=5.0,
        clock=clock or Clock(),
    )
    journal = (
        None
        if directory is None
        else Journal(directory, fsync=FsyncPolicy.ALWAYS, max_reuse=max_reuse, keep_history=keep_history)
    )
    return DurableBuffer(store, journal)


def add(buf: DurableBuffer, group: str, k: int, **kw) -> AddOutcome:
    item = scored_item(group, k, **kw)
    outcome = buf.add(item, encode(item))
    buf.commit()
    return outcome


def add_group(buf: DurableBuffer, group: str, version: int = 0) -> None:
    for k in range(2):
        assert add(buf, group, k, version=version) is AddOutcome.ACCEPTED


def records(directory) -> list[tuple[RecordType, object]]:
    """State records on disk, in order (segment markers left out)."""
    out = []
    for _, path in _segments(directory):
        out += [
            (kind, payload)
            for kind, payload in read_records(path)
            if kind not in (RecordType.BEGIN, RecordType.SNAPSHOT_END)
        ]
    return out


def request(version: int, groups: int = 1) -> BatchRequest:
    return BatchRequest(sender="learner-0", learner_version=version, num_groups=groups)


def ids(batch: Batch) -> list[str]:
    return [s.rollout.rollout_id for s in batch.rollouts]


def test_admission_capacity_bounds_buffer_to_what_learner_uses_within_eta():
    assert admission_capacity(64, 4, 2) == 12  # 3 versions x 4 groups
    assert admission_capacity(8, 4, 2) == 8  # the configured capacity is smaller
    assert admission_capacity(64, 4, 0) == 4  # on-policy: one batch
    assert admission_capacity(2, 4, 0) == 4  # never below one batch


def test_accepted_rollouts_are_journaled_with_their_frames_and_refusals_are_not(tmp_path):
    buf = durable(tmp_path)
    item = scored_item("a", 0)
    frames = encode(item)
    assert buf.add(item, frames) is AddOutcome.ACCEPTED
    assert buf.add(item, frames) is AddOutcome.DUPLICATE
    assert buf.add(scored_item("a", 1, size=3), encode(scored_item("a", 1, size=3))) is AddOutcome.GROUP_MISMATCH
    buf.commit()
    ((kind, payload),) = records(tmp_path)
    assert kind is RecordType.ACCEPT and payload == [bytes(f) for f in frames]  # the bytes as received


def test_an_eviction_is_journaled_after_the_acceptance_that_caused_it(tmp_path):
    """The newly completed group is the oldest version: it evicts itself; replay must not bring it back."""
    buf = durable(tmp_path, capacity=1)
    add_group(buf, "new", version=5)
    assert add(buf, "old", 0, size=1, version=0) is AddOutcome.ACCEPTED
    kinds = [(kind, payload.get("event") if kind is RecordType.REMOVE else None) for kind, payload in records(tmp_path)]
    assert kinds == [(RecordType.ACCEPT, None)] * 3 + [(RecordType.REMOVE, "evicted")]
    assert records(tmp_path)[-1][1]["ids"] == ["old-0"]
    again = durable(tmp_path, capacity=1)
    again.recover()
    assert [[m.rollout.rollout_id for m in members] for members, _ in again.store.snapshot()] == [["new-0", "new-1"]]


def test_a_request_waits_until_enough_groups_then_newer_requests_acknowledge(tmp_path):
    buf = durable(tmp_path)
    assert buf.take_request(ROUTE, request(0, groups=2)) is None
    assert buf.serve_pending("buffer-0") is None  # nothing held yet
    add_group(buf, "a")
    assert buf.serve_pending("buffer-0") is None  # one group of two
    assert buf.take_request(b"other", request(0, groups=1)) is None  # replaces the older pending request
    route, batch = buf.serve_pending("buffer-0")
    assert route == b"other" and ids(batch) == ["a-0", "a-1"] and batch.learner_version == 0
    assert batch.sender == "buffer-0" and buf.pending is None and buf.unacked is batch
    add_group(buf, "b")
    assert buf.take_request(ROUTE, request(1)) is None  # a newer version: acknowledges "a"
    assert buf.unacked is None
    route, batch = buf.serve_pending("buffer-0")
    assert ids(batch) == ["b-0", "b-1"] and batch.learner_version == 1
    kinds = [kind for kind, _ in records(tmp_path)]
    assert kinds == [RecordType.ACCEPT] * 2 + [
        RecordType.SERVE,
        RecordType.ACCEPT,
        RecordType.ACCEPT,
        RecordType.ACK,
        RecordType.SERVE,
    ]


def test_a_repeated_or_older_request_gets_the_unacknowledged_batch_again(tmp_path):
    buf = durable(tmp_path)
    add_group(buf, "a", version=3)
    add_group(buf, "b", version=3)
    buf.take_request(ROUTE, request(3))
    _, first = buf.serve_pending("buffer-0")
    sent_at = first.sent_at
    again = buf.take_request(ROUTE, request(3))  # the learner lost the batch, or restarted at 3
    assert again is first and ids(again) == ["a-0", "a-1"] and again.sent_at >= sent_at
    assert buf.pending is None and buf.store.complete_groups == 1  # nothing new was sampled
    older = buf.take_request(ROUTE, request(2))  # restarted behind its checkpoint: restamped
    assert ids(older) == ["a-0", "a-1"] and older.learner_version == 2
    assert records(tmp_path)[-1] == (RecordType.RESTAMP, {"version": 2, "from": 3, "owner": -1})


def test_a_crashed_buffer_recovers_the_unacknowledged_batch_and_serves_it_again(tmp_path):
    buf = durable(tmp_path)
    for g in "abc":
        add_group(buf, g, version=1)
    buf.take_request(ROUTE, request(1, groups=2))
    _, served = buf.serve_pending("buffer-0")
    # crash: no close; everything was committed before it was sent
    restarted = durable(tmp_path)
    recovered = restarted.recover()
    assert recovered.rollouts == 2 and restarted.store.complete_groups == 1
    assert ids(restarted.unacked) == ids(served) == ["a-0", "a-1", "b-0", "b-1"]
    again = restarted.take_request(ROUTE, request(1, groups=2))
    assert ids(again) == ids(served)  # served again, not new data
    assert decode(encode(again), expected=[Batch]).learner_version == 1
    assert restarted.take_request(ROUTE, request(2, groups=1)) is None  # trained on it: acknowledged
    _, nxt = restarted.serve_pending("buffer-0")
    assert ids(nxt) == ["c-0", "c-1"]


def checkpointed(version: int, durable: int, resumed_at: int) -> BatchRequest:
    """A request from a learner that states its checkpoint (``durable``) and process (``resumed_at``)."""
    return BatchRequest(
        sender="learner-0", learner_version=version, num_groups=1, durable_version=durable, resumed_at=resumed_at
    )


def serve_one(buf: DurableBuffer, req: BatchRequest) -> Batch:
    assert buf.take_request(ROUTE, req) is None
    _, batch = buf.serve_pending("buffer-0")
    return batch


def test_batches_trained_after_the_checkpoint_are_served_again_to_a_restarted_learner(tmp_path):
    """checkpoint_every = 3. A learner started at version 0 checkpoints at version 3,
    trains batches 3 and 4 and dies with batch 5 in flight; it resumes at published + 1 = 6 from the
    checkpoint of version 3. Batches 3, 4, 5 come back (oldest first, restamped 6, 7, 8) before new data;
    the buffer forgets them only once a checkpoint covers them, and the journal keeps all of that across
    a buffer crash."""
    buf = durable(tmp_path, capacity=8, max_staleness=20, keep_history=True)
    for g in "abcdefgh":
        add_group(buf, g)
    served = [serve_one(buf, checkpointed(v, durable=0 if v < 3 else 3, resumed_at=0)) for v in range(6)]
    assert [ids(b)[0] for b in served] == ["a-0", "b-0", "c-0", "d-0", "e-0", "f-0"]
    # at the request for 5 the checkpoint of version 3 covers batches 0, 1, 2: acknowledged
    assert [h.batch.learner_version for h in buf.held] == [3, 4, 5]
    # the process dies; a new one resumes from the checkpoint of version 3 at version 6
    again = buf.take_request(ROUTE, checkpointed(6, durable=3, resumed_at=6))
    assert ids(again) == ["d-0", "d-1"] and again.learner_version == 6 and buf.pending is None
    assert [(h.batch.learner_version, h.owner) for h in buf.held] == [(4, -2), (5, -2), (6, 6)]
    # the buffer crashes here: the journal knows which batches are lost
    buf = durable(tmp_path, capacity=8, max_staleness=20, keep_history=True)
    buf.recover()
    assert [(h.batch.learner_version, h.owner) for h in buf.held] == [(4, -2), (5, -2), (6, 6)]
    assert ids(buf.take_request(ROUTE, checkpointed(6, durable=3, resumed_at=6))) == ["d-0", "d-1"]  # in transit
    assert ids(buf.take_request(ROUTE, checkpointed(7, durable=3, resumed_at=6))) == ["e-0", "e-1"]
    assert ids(buf.take_request(ROUTE, checkpointed(8, durable=3, resumed_at=6))) == ["f-0", "f-1"]
    nxt = serve_one(buf, checkpointed(9, durable=9, resumed_at=6))  # checkpointed at 9: all three are durable
    assert ids(nxt) == ["g-0", "g-1"] and [h.batch.learner_version for h in buf.held] == [9]
    # the ledger: every served batch acknowledged exactly once, under the ids it was served with
    events = {}
    for event, batch_ids in Journal(tmp_path, fsync=FsyncPolicy.NEVER).history():
        events.setdefault(event, []).append(batch_ids[0] if batch_ids else None)
    assert sorted(events["acked"]) == ["a-0", "b-0", "c-0", "d-0", "e-0", "f-0"]


def test_a_clean_stop_checkpoint_acknowledges_what_it_covers_and_only_that(tmp_path):
    """A learner stopped cleanly checkpoints where it is (no request tells the buffer); the next process's
    first request states that checkpoint: the previous process's batches below it are durable, the one
    above it (served but not trained) comes back. A lost batch is never acknowledged by a later checkpoint
    before it has been served again."""
    buf = durable(tmp_path, capacity=8, max_staleness=20)
    for g in "abcde":
        add_group(buf, g)
    for v in range(3):
        serve_one(buf, checkpointed(v, durable=0, resumed_at=0))
    # stopped at version 2 with a checkpoint of version 2 (batch 2 was in flight, untrained)
    again = buf.take_request(ROUTE, checkpointed(3, durable=2, resumed_at=3))
    assert ids(again) == ["c-0", "c-1"] and [h.batch.learner_version for h in buf.held] == [3]
    # that process dies untrained; the next one resumed at 4 (published 3) with a checkpoint it claims
    # is newer than a lost batch: the lost batch is still served, not forgotten
    buf.take_request(ROUTE, checkpointed(4, durable=2, resumed_at=4))
    assert [(h.batch.learner_version, h.owner) for h in buf.held] == [(4, 4)]


def test_a_new_learner_and_an_old_one_interoperate(tmp_path):
    """A request without durable_version acknowledges everything older than it (the schema 1.1 rule)."""
    buf = durable(tmp_path, capacity=8, max_staleness=20)
    for g in "abc":
        add_group(buf, g)
    serve_one(buf, checkpointed(0, durable=0, resumed_at=0))
    serve_one(buf, checkpointed(1, durable=0, resumed_at=0))
    assert len(buf.held) == 2
    assert buf.take_request(ROUTE, request(2)) is None and buf.held == []


def test_a_batch_the_learner_refused_entirely_is_journaled_and_never_served_again(tmp_path):
    buf = durable(tmp_path, capacity=8, max_staleness=20)
    for g in "ab":
        add_group(buf, g)
    first = serve_one(buf, checkpointed(0, durable=0, resumed_at=0))
    req = checkpointed(0, durable=0, resumed_at=0)
    req.refused_batch = first.msg_id
    assert buf.take_request(ROUTE, req) is None and buf.held == []  # forgotten: new data instead
    _, nxt = buf.serve_pending("buffer-0")
    assert ids(nxt) == ["b-0", "b-1"]
    # the same request re-sent (the new batch is late): the new batch again, not forgotten
    assert buf.take_request(ROUTE, req) is nxt and [h.batch for h in buf.held] == [nxt]
    assert (RecordType.REMOVE, {"event": "refused", "ids": ["a-0", "a-1"]}) in records(tmp_path)


def test_requests_that_can_never_be_met_are_refused():
    buf = durable(capacity=2)
    with pytest.raises(ValueError, match="3 groups > capacity 2"):
        buf.take_request(ROUTE, request(0, groups=3))
    assert buf.pending is None


def test_without_a_journal_the_protocol_works_and_nothing_is_written(tmp_path):
    buf = durable(None)
    add_group(buf, "a")
    buf.take_request(ROUTE, request(0))
    _, batch = buf.serve_pending("buffer-0")
    assert buf.take_request(ROUTE, request(0)) is batch
    buf.housekeeping()
    buf.close()
    with pytest.raises(RuntimeError, match="no journal"):
        buf.recover()
    assert list(tmp_path.iterdir()) == []


def test_housekeeping_expires_incomplete_groups_into_the_journal(tmp_path):
    clock = Clock()
    buf = durable(tmp_path, clock=clock)
    add(buf, "lonely", 0)
    clock.now = 10.0  # group_timeout_s = 5
    buf.housekeeping()
    assert buf.store.incomplete_groups == 0 and buf.store.evicted_total == 1
    assert records(tmp_path)[-1] == (RecordType.REMOVE, {"event": "evicted", "ids": ["lonely-0"]})
    restarted = durable(tmp_path)
    assert restarted.recover().rollouts == 0


def test_a_group_a_scorer_dropped_is_evicted_journaled_and_its_later_members_refused(tmp_path):
    """The reward raised on one member of a group in some scorer: the members other scorers passed on
    leave at once (before, they waited group_timeout_s in the store, holding the generator's credit),
    a restart does not bring them back, and later members cannot rebuild the group."""
    buf = durable(tmp_path)
    add(buf, "flaky", 0, size=3)
    add_group(buf, "fine")
    assert buf.drop_group("flaky") == 1
    buf.commit()
    assert buf.store.incomplete_groups == 0 and buf.store.complete_groups == 1 and buf.store.evicted_total == 1
    assert records(tmp_path)[-1] == (RecordType.REMOVE, {"event": "reward_failed", "ids": ["flaky-0"]})
    assert add(buf, "flaky", 2, size=3) is AddOutcome.GROUP_DISCARDED
    assert buf.drop_group("unseen") == 0  # its members had not arrived yet: they are refused when they do
    assert add(buf, "unseen", 0) is AddOutcome.GROUP_DISCARDED
    assert buf.drop_group("fine") == 0 and buf.store.complete_groups == 1  # a complete group holds no failure
    restarted = durable(tmp_path)
    assert restarted.recover().rollouts == 2
    held = [[m.rollout.rollout_id for m in members] for members, _ in restarted.store.snapshot()]
    assert held == [["fine-0", "fine-1"]]


def test_the_store_must_not_have_another_ledger_hook():
    store = ReplayBuffer(
        capacity_groups=2,
        overflow=OverflowPolicy.BLOCK,
        max_reuse=1,
        max_staleness=1,
        group_timeout_s=1.0,
        on_event=lambda e, i: None,
    )
    with pytest.raises(ValueError, match="already has a ledger hook"):
        DurableBuffer(store, None)


def test_the_measured_ledger_counts_what_the_journal_committed(tmp_path):
    """accepted / refused / dropped_stale are written only after the journal commit, with what is
    held in groups and the ids of batches served and not yet acknowledged; a restarted buffer
    (recovery) continues the counts without counting the recovered rollouts as accepted again."""
    path = ledger_path(tmp_path, "buffer", 0)

    def with_ledger() -> DurableBuffer:
        store = ReplayBuffer(
            capacity_groups=4,
            overflow=OverflowPolicy.EVICT_OLDEST,
            max_reuse=1,
            max_staleness=2,
            group_timeout_s=5.0,
            clock=Clock(),
        )
        return DurableBuffer(store, Journal(tmp_path / "journal", fsync=FsyncPolicy.ALWAYS), Ledger(path))

    buf = with_ledger()
    item = scored_item("old", 0, version=0)
    assert buf.add(item, encode(item)) is AddOutcome.ACCEPTED
    assert not path.exists()  # not committed: not counted
    buf.commit()
    add(buf, "old", 1, version=0)
    assert add(buf, "old", 1, version=0) is AddOutcome.DUPLICATE
    add_group(buf, "new", version=5)
    add(buf, "part", 0, version=5)
    assert buf.take_request(ROUTE, request(5)) is None
    _, batch = buf.serve_pending("buffer-0")  # drops "old" as stale (5 - 0 > 2), serves "new"
    buf.commit()
    saved = json.loads(path.read_text())
    assert saved["counts"] == {"accepted": 5, "refused": 1, "dropped_stale": 2}
    assert saved["held"] == 1  # "part-0"
    assert saved["served_unacked_ids"] == sorted(s.rollout.rollout_id for s in batch.rollouts)
    buf.close()
    restarted = with_ledger()
    restarted.recover()
    restarted.commit()
    assert json.loads(path.read_text())["counts"] == saved["counts"]
