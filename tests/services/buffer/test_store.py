"""ReplayBuffer: grouping, FIFO, staleness, reuse, overflow, timeouts, accounting."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from streamrl.common.modes import OverflowPolicy
from streamrl.services.buffer.store import AddOutcome, BufferEvent, ReplayBuffer, Sample
from support import scored_item as item

BLOCK = OverflowPolicy.BLOCK
EVICT = OverflowPolicy.EVICT_OLDEST


# ---------------------------------------------------------------- helpers


def add_group(buf: ReplayBuffer, group: str, *, size: int = 2, version: int | list[int] = 0) -> None:
    versions = version if isinstance(version, list) else [version] * size
    for k in range(size):
        assert buf.add(item(group, k, size=size, version=versions[k])) is AddOutcome.ACCEPTED


def make(**kw) -> ReplayBuffer:
    args = dict(
        capacity_groups=8, overflow=BLOCK, max_reuse=1, max_staleness=100, group_timeout_s=60.0, clock=lambda: 0.0
    )
    args.update(kw)
    return ReplayBuffer(**args)


def ids(sample: Sample) -> list[str]:
    return [r.rollout.rollout_id for r in sample.rollouts]


def groups_of(sample: Sample) -> list[str]:
    """Group ids in served order, asserting each group's members are contiguous."""
    out: list[str] = []
    for r in sample.rollouts:
        if not out or out[-1] != r.rollout.group_id:
            assert r.rollout.group_id not in out, "group members are not contiguous"
            out.append(r.rollout.group_id)
    return out


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def assert_conservation(buf: ReplayBuffer) -> None:
    assert buf.inserted_total == (buf.sampled_total + buf.dropped_stale_total + buf.evicted_total + buf.held_rollouts)


# ---------------------------------------------------------------- grouping and FIFO


def test_group_completes_only_when_all_members_arrived():
    buf = make()
    assert buf.add(item("a", 0, size=3)) is AddOutcome.ACCEPTED
    assert buf.add(item("a", 1, size=3)) is AddOutcome.ACCEPTED
    assert (buf.complete_groups, buf.incomplete_groups, buf.held_rollouts) == (0, 1, 2)
    assert buf.sample(1, learner_version=0) is None  # incomplete groups are never served
    assert buf.held_rollouts == 2 and buf.sampled_total == 0
    assert buf.add(item("a", 2, size=3)) is AddOutcome.ACCEPTED
    assert (buf.complete_groups, buf.incomplete_groups) == (1, 0)
    s = buf.sample(1, learner_version=0)
    assert ids(s) == ["a-0", "a-1", "a-2"]
    assert s.group_sizes == [3] and s.buffered_groups == 0
    assert buf.held_rollouts == 0 and buf.sampled_total == 3 and buf.inserted_total == 3


def test_incomplete_group_is_skipped_while_later_complete_group_is_served():
    buf = make()
    buf.add(item("a", 0))  # a starts first but never completes here
    add_group(buf, "b")
    s = buf.sample(1, learner_version=0)
    assert groups_of(s) == ["b"]
    assert buf.sample(1, learner_version=0) is None
    assert buf.incomplete_groups == 1


def test_fifo_is_order_of_completion_and_members_keep_arrival_order():
    buf = make()
    buf.add(item("a", 1))  # a's first member arrives first ...
    add_group(buf, "b")  # ... but b completes first
    buf.add(item("c", 0))
    buf.add(item("a", 0))  # a completes second, members in arrival order: a-1, a-0
    buf.add(item("c", 1))
    s = buf.sample(3, learner_version=0)
    assert groups_of(s) == ["b", "a", "c"]
    assert ids(s) == ["b-0", "b-1", "a-1", "a-0", "c-0", "c-1"]
    assert s.group_sizes == [2, 2, 2]


def test_sample_takes_oldest_groups_and_waits_for_enough():
    buf = make()
    for g in "abc":
        add_group(buf, g)
    assert buf.sample(4, learner_version=0) is None
    assert groups_of(buf.sample(2, learner_version=0)) == ["a", "b"]
    assert buf.sample(2, learner_version=0) is None
    assert groups_of(buf.sample(1, learner_version=0)) == ["c"]


# ---------------------------------------------------------------- staleness


def test_max_staleness_zero_keeps_only_on_policy_groups():
    buf = make(max_staleness=0)
    add_group(buf, "old", version=4)
    add_group(buf, "mixed", version=[5, 4])  # group version = min = 4
    add_group(buf, "new", version=5)
    add_group(buf, "new2", version=5, size=3)
    s = buf.sample(1, learner_version=5)
    assert groups_of(s) == ["new"]
    assert s.staleness == [0, 0]
    assert s.dropped_stale == 4  # old (2) + mixed (2)
    assert buf.dropped_stale_total == 4
    assert buf.complete_groups == 1 and buf.held_rollouts == 3
    # learner moves on: the last group (version 5) is now 1 behind -> dropped
    assert buf.sample(1, learner_version=6) is None
    assert buf.dropped_stale_total == 7 and buf.held_rollouts == 0
    assert_conservation(buf)


def test_max_staleness_two_boundary_eta_kept_eta_plus_one_dropped():
    buf = make(max_staleness=2)
    add_group(buf, "s3", version=7, size=3)  # staleness 3 at learner 10 -> dropped
    add_group(buf, "s2", version=8)  # staleness 2 == eta -> kept
    add_group(buf, "s1", version=[9, 10])  # group staleness 1, per-rollout [1, 0]
    add_group(buf, "s4", version=[6, 10])  # min version 6 -> staleness 4 -> dropped
    assert buf.drop_stale(learner_version=10) == 5
    s = buf.sample(2, learner_version=10)
    assert groups_of(s) == ["s2", "s1"]
    assert s.staleness == [2, 2, 1, 0]
    assert s.dropped_stale == 5 and s.evicted == 0
    assert buf.dropped_stale_total == 5


def test_stale_incomplete_group_is_dropped_and_its_late_members_rejected():
    buf = make(max_staleness=1)
    buf.add(item("late", 0, size=3, version=8))
    buf.add(item("late", 1, size=3, version=9))
    buf.add(item("fresh", 0, size=3, version=9))
    assert buf.drop_stale(learner_version=10) == 2  # late has version 8: staleness 2 > 1
    assert buf.incomplete_groups == 1
    assert buf.add(item("late", 2, size=3, version=10)) is AddOutcome.GROUP_DISCARDED
    assert buf.rejected_total["group_discarded"] == 1
    assert buf.incomplete_groups == 1 and buf.held_rollouts == 1


def test_incomplete_group_version_drops_with_an_older_member():
    buf = make(max_staleness=1)
    buf.add(item("g", 0, size=3, version=10))
    assert buf.drop_stale(learner_version=11) == 0
    buf.add(item("g", 1, size=3, version=9))  # group version now 9: staleness 2
    assert buf.drop_stale(learner_version=11) == 2
    assert buf.held_rollouts == 0


# ---------------------------------------------------------------- reuse


def test_max_reuse_one_serves_each_group_once():
    buf = make(max_reuse=1)
    add_group(buf, "a")
    add_group(buf, "b")
    assert groups_of(buf.sample(1, 0)) == ["a"]
    assert groups_of(buf.sample(1, 0)) == ["b"]
    assert buf.sample(1, 0) is None
    assert buf.sampled_total == 4 and buf.held_rollouts == 0


def test_max_reuse_three_serves_exactly_three_times_interleaved_with_fresh_groups():
    buf = make(max_reuse=3)
    served: list[str] = []

    def take() -> None:
        served.extend(groups_of(buf.sample(1, 0)))

    add_group(buf, "A")
    add_group(buf, "B")
    take()  # A        queue: B0 A1
    add_group(buf, "C")  # queue: B0 A1 C0
    take()  # B        queue: A1 C0 B1
    take()  # A        queue: C0 B1 A2
    take()  # C        queue: B1 A2 C1
    add_group(buf, "D")  # queue: B1 A2 C1 D0
    for _ in range(8):
        take()
    assert served == list("ABACBACDBCDD")
    assert Counter(served) == {"A": 3, "B": 3, "C": 3, "D": 3}
    assert buf.sample(1, 0) is None
    assert buf.sampled_total == 12 * 2 and buf.inserted_total == 8 and buf.held_rollouts == 0


def test_reuse_with_batch_of_all_groups_serves_each_once_per_batch():
    buf = make(max_reuse=2)
    for g in "abc":
        add_group(buf, g)
    assert groups_of(buf.sample(3, 0)) == ["a", "b", "c"]
    assert groups_of(buf.sample(3, 0)) == ["a", "b", "c"]
    assert buf.sample(1, 0) is None


# ---------------------------------------------------------------- overflow


def test_evict_oldest_evicts_oldest_version_ties_by_completion():
    log: list[tuple[str, list[str]]] = []
    buf = make(capacity_groups=2, overflow=EVICT, on_event=lambda e, i: log.append((e, i)))
    add_group(buf, "v5", version=5)
    add_group(buf, "v3a", version=3)
    assert buf.evicted_total == 0 and not buf.is_full()
    add_group(buf, "v3b", version=3)  # 3 > 2: oldest version 3, tie -> earliest completed v3a
    assert buf.evicted_total == 2 and buf.complete_groups == 2
    assert log[-1] == ("evicted", ["v3a-0", "v3a-1"])
    add_group(buf, "v7", version=7, size=3)  # evicts v3b
    assert buf.evicted_total == 4
    add_group(buf, "v1", version=1)  # the new group itself is the oldest: evicted at once
    assert buf.evicted_total == 6 and log[-1] == ("evicted", ["v1-0", "v1-1"])
    assert not buf.is_full()  # EVICT_OLDEST never reports full
    s = buf.sample(2, learner_version=7)
    assert groups_of(s) == ["v5", "v7"]
    assert s.evicted == 6 and s.dropped_stale == 0
    assert buf.held_rollouts == 0
    assert_conservation(buf)


def test_evict_oldest_after_reuse_uses_original_completion_order_for_ties():
    buf = make(capacity_groups=2, overflow=EVICT, max_reuse=2)
    add_group(buf, "x", version=3)
    add_group(buf, "y", version=3)
    assert groups_of(buf.sample(1, 3)) == ["x"]  # x goes to the back of the FIFO
    add_group(buf, "z", version=4)  # evict among x, y (version 3): x completed first
    assert buf.evicted_total == 2
    assert groups_of(buf.sample(2, 4)) == ["y", "z"]


def test_block_is_full_at_capacity_and_not_after_sample():
    buf = make(capacity_groups=2, overflow=BLOCK)
    add_group(buf, "a")
    assert not buf.is_full()
    buf.add(item("inc", 0, size=3))  # incomplete groups never count
    assert not buf.is_full()
    add_group(buf, "b")
    assert buf.is_full()
    add_group(buf, "c")  # already read from the socket: accepted, nothing dropped
    assert buf.complete_groups == 3 and buf.evicted_total == 0 and buf.is_full()
    buf.sample(1, 0)
    assert buf.is_full()  # 2 complete groups left
    buf.sample(1, 0)
    assert not buf.is_full()
    assert buf.held_rollouts == 2 + 1


def test_incomplete_groups_are_bounded_by_capacity_oldest_evicted():
    buf = make(capacity_groups=2)
    buf.add(item("a", 0, size=3))
    buf.add(item("a", 1, size=3))
    buf.add(item("b", 0, size=3))
    assert buf.add(item("single", 0, size=1)) is AddOutcome.ACCEPTED  # completes on arrival
    assert buf.evicted_total == 0
    buf.add(item("c", 0, size=3))  # third incomplete group -> a (oldest first arrival) evicted
    assert buf.incomplete_groups == 2 and buf.evicted_total == 2
    assert buf.add(item("a", 2, size=3)) is AddOutcome.GROUP_DISCARDED
    assert not buf.is_full()
    s = buf.sample(1, 0)
    assert ids(s) == ["single-0"] and s.evicted == 2


# ---------------------------------------------------------------- timeout


def test_incomplete_group_timeout_with_fake_clock():
    clock = FakeClock()
    log: list[tuple[str, list[str]]] = []
    buf = make(group_timeout_s=10.0, clock=clock, on_event=lambda e, i: log.append((e, i)))
    buf.add(item("a", 0, size=3))  # t = 0
    clock.now = 5.0
    buf.add(item("b", 0, size=3))  # t = 5
    clock.now = 8.0
    buf.add(item("a", 1, size=3))  # later members do not extend the deadline
    add_group(buf, "done")  # complete groups never expire
    clock.now = 10.0
    assert buf.expire() == 0  # exactly group_timeout_s old: not "more than"
    clock.now = 10.5
    assert buf.expire() == 2  # a: 2 members
    assert log[-1] == ("evicted", ["a-0", "a-1"])
    assert buf.incomplete_groups == 1 and buf.evicted_total == 2
    clock.now = 15.0
    assert buf.expire() == 0
    clock.now = 15.01
    assert buf.expire() == 1  # b
    assert buf.incomplete_groups == 0 and buf.complete_groups == 1
    assert buf.add(item("a", 2, size=3)) is AddOutcome.GROUP_DISCARDED
    s = buf.sample(1, 0)
    assert groups_of(s) == ["done"] and s.evicted == 3
    assert_conservation(buf)


# ---------------------------------------------------------------- rejection


def test_duplicate_rollout_ids_are_rejected():
    buf = make()
    assert buf.add(item("a", 0)) is AddOutcome.ACCEPTED
    assert buf.add(item("a", 0)) is AddOutcome.DUPLICATE
    assert buf.add(item("a", 1)) is AddOutcome.ACCEPTED
    buf.sample(1, 0)
    # still remembered after the group left the buffer, even under another group id
    assert buf.add(item("zz", 0, rid="a-1")) is AddOutcome.DUPLICATE
    assert buf.rejected_total["duplicate"] == 2
    assert buf.inserted_total == 2 and buf.held_rollouts == 0


def test_dedup_window_forgets_oldest_ids():
    buf = make(dedup_window=2)
    for g in "abc":
        buf.add(item(g, 0, size=1))
    assert buf.add(item("x", 0, size=1, rid="c-0")) is AddOutcome.DUPLICATE
    assert buf.add(item("x", 0, size=1, rid="a-0")) is AddOutcome.ACCEPTED  # forgotten


def test_group_mismatch_is_rejected():
    buf = make()
    buf.add(item("a", 0, size=2))
    assert buf.add(item("a", 1, size=3)) is AddOutcome.GROUP_MISMATCH
    assert buf.add(item("a", 1, size=2, prompt="other")) is AddOutcome.GROUP_MISMATCH
    assert buf.rejected_total["group_mismatch"] == 2
    assert buf.held_rollouts == 1 and buf.complete_groups == 0
    # a rejected id is not remembered: the corrected member is accepted
    assert buf.add(item("a", 1, size=2)) is AddOutcome.ACCEPTED
    assert buf.complete_groups == 1


def test_member_for_completed_group_is_overfull():
    buf = make()
    add_group(buf, "a")
    assert buf.add(item("a", 2)) is AddOutcome.GROUP_OVERFULL
    buf.sample(1, 0)
    assert buf.add(item("a", 3)) is AddOutcome.GROUP_OVERFULL
    assert buf.rejected_total == {"duplicate": 0, "group_mismatch": 0, "group_overfull": 2, "group_discarded": 0}
    assert buf.inserted_total == 2


# ---------------------------------------------------------------- counts in samples


def test_dropped_and_evicted_reported_once_in_next_sample_then_reset():
    clock = FakeClock()
    buf = make(max_staleness=1, group_timeout_s=1.0, clock=clock)
    add_group(buf, "stale", version=0, size=3)
    buf.add(item("inc", 0, version=5))
    clock.now = 2.0
    assert buf.expire() == 1
    assert buf.sample(1, learner_version=5) is None  # drops stale; nothing to serve
    assert buf.dropped_stale_total == 3 and buf.evicted_total == 1
    add_group(buf, "ok", version=5)
    s = buf.sample(1, learner_version=5)
    assert (s.dropped_stale, s.evicted) == (3, 1)
    add_group(buf, "ok2", version=5)
    s = buf.sample(1, learner_version=5)
    assert (s.dropped_stale, s.evicted) == (0, 0)
    assert buf.dropped_stale_total == 3 and buf.evicted_total == 1  # totals stay


# ---------------------------------------------------------------- validation


def test_config_errors_name_every_rule():
    with pytest.raises(ValueError) as exc:
        ReplayBuffer(capacity_groups=0, overflow="nope", max_reuse=0, max_staleness=-1, group_timeout_s=0)
    text = str(exc.value)
    for word in ("capacity_groups", "overflow", "max_reuse", "max_staleness", "group_timeout_s"):
        assert word in text
    assert make(overflow="evict_oldest").overflow is EVICT


def test_request_larger_than_capacity_is_an_error():
    buf = make(capacity_groups=2)
    with pytest.raises(ValueError, match="capacity_groups"):
        buf.sample(3, 0)
    with pytest.raises(ValueError):
        buf.sample(0, 0)


# ---------------------------------------------------------------- conservation


@pytest.mark.parametrize("overflow", [BLOCK, EVICT])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ledger_conservation_in_a_seeded_random_scenario(overflow, seed):
    rng = random.Random(seed)
    clock = FakeClock()
    events: dict[str, list[str]] = {"accepted": [], "sampled": [], "dropped_stale": [], "evicted": []}
    buf = ReplayBuffer(
        capacity_groups=6,
        overflow=overflow,
        max_reuse=1,
        max_staleness=2,
        group_timeout_s=5.0,
        clock=clock,
        on_event=lambda e, i: events[e].extend(i),
    )
    eta = 2
    learner_version = 0
    pending: list = []  # members in flight, delivered in random order
    returned: list[str] = []
    for n in range(1500):
        r = rng.random()
        if r < 0.15:
            size = rng.randint(1, 4)
            lo = max(0, learner_version - 3)
            members = [item(f"g{n}", k, size=size, version=rng.randint(lo, learner_version)) for k in range(size)]
            if rng.random() < 0.1:
                members.pop()  # a lost member: the group can only time out / be evicted
            pending.extend(members)
        elif r < 0.75 and pending:
            x = pending.pop(rng.randrange(len(pending)))
            outcome = buf.add(x)
            assert outcome in (AddOutcome.ACCEPTED, AddOutcome.GROUP_DISCARDED)
            if outcome is AddOutcome.ACCEPTED and rng.random() < 0.05:
                assert buf.add(x) is AddOutcome.DUPLICATE
        elif r < 0.85:
            clock.now += rng.uniform(0.0, 2.0)
            buf.expire()
        elif r < 0.95:
            if overflow is BLOCK and buf.is_full():
                assert buf.complete_groups >= 6
            s = buf.sample(rng.randint(1, 3), learner_version)
            if s is not None:
                returned.extend(ids(s))
                assert len(groups_of(s)) == len(s.group_sizes)
                assert all(0 <= st <= eta for st in s.staleness)
                assert s.buffered_groups == buf.complete_groups
        else:
            learner_version += 1
        assert_conservation(buf)
        if overflow is EVICT:
            assert buf.complete_groups <= 6
        assert buf.incomplete_groups <= 6

    # drain: everything incomplete times out, everything complete is served or dropped
    clock.now += 100.0
    buf.expire()
    while (s := buf.sample(1, learner_version)) is not None:
        returned.extend(ids(s))
    assert buf.held_rollouts == 0 and buf.complete_groups == 0 and buf.incomplete_groups == 0

    accepted = events["accepted"]
    assert len(accepted) == len(set(accepted)) == buf.inserted_total
    gone = events["sampled"] + events["dropped_stale"] + events["evicted"]
    assert Counter(gone) == Counter(accepted)  # every accepted id left exactly once
    assert events["sampled"] == returned
    assert len(events["sampled"]) == buf.sampled_total
    assert len(events["dropped_stale"]) == buf.dropped_stale_total
    assert len(events["evicted"]) == buf.evicted_total
    assert buf.dropped_stale_total > 0 and buf.evicted_total > 0 and buf.sampled_total > 0
    assert buf.rejected_total["duplicate"] > 0


def test_version_heaps_stay_bounded_under_long_reuse():
    buf = make(capacity_groups=4, max_reuse=3)
    for n in range(3000):
        add_group(buf, f"g{n}", version=n // 10)
        for _ in range(3):  # steady state: three serves per new group, each lives for three
            assert buf.sample(1, learner_version=n // 10) is not None
    assert buf.complete_groups <= 3
    assert buf.sampled_total == 3000 * 3 * 2
    assert len(buf._complete_heap) <= 2 * buf.complete_groups + 65
    assert len(buf._incomplete_heap) <= 2 * buf.incomplete_groups + 65


def test_admission_answers_what_add_would_without_changing_anything():
    buf = make(capacity_groups=1, overflow=EVICT)
    log = []
    buf.on_event = lambda e, i: log.append((e, i))
    first = item("a", 0)
    assert buf.admission(first) is AddOutcome.ACCEPTED
    assert (buf.held_rollouts, buf.inserted_total, log) == (0, 0, [])  # nothing changed
    assert buf.add(first) is AddOutcome.ACCEPTED
    assert buf.admission(first) is AddOutcome.DUPLICATE
    assert buf.admission(item("a", 1, size=3)) is AddOutcome.GROUP_MISMATCH
    assert buf.rejected_total[AddOutcome.DUPLICATE.value] == 0  # admission counts nothing; add does
    assert buf.add(first) is AddOutcome.DUPLICATE and buf.rejected_total[AddOutcome.DUPLICATE.value] == 1
    assert buf.add(item("a", 1)) is AddOutcome.ACCEPTED
    assert buf.admission(item("a", 2)) is AddOutcome.GROUP_OVERFULL  # the group closed
    assert [(type(e), e) for e, _ in log] == [(BufferEvent, BufferEvent.ACCEPTED)] * 2
    bad = item("b", 0)
    bad.rollout.group_size = 0
    with pytest.raises(ValueError, match="group_size must be >= 1"):
        buf.admission(bad)
