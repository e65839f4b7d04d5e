"""The replay buffer's data structure: groups, FIFO, staleness, reuse, overflow.

Pure, single-threaded, deterministic logic; no sockets, no threads. The buffer
service (``services/buffer``) owns one :class:`ReplayBuffer`, feeds it every
:class:`~streamrl.common.messages.ScoredRollout` it reads and answers batch requests
with :meth:`ReplayBuffer.sample`. Time enters only through the injected
``clock`` (seconds, monotonic), used by :meth:`ReplayBuffer.expire`.

Rules (G = ``group_size``, C = ``capacity_groups``, eta = ``max_staleness``,
K = ``max_reuse``; versions are policy-version integers, times are seconds):

Grouping
    Items are keyed by ``rollout.group_id``. The first member to arrive fixes
    the group's ``group_size`` and ``prompt_id``; a later member that disagrees
    on either is rejected (``GROUP_MISMATCH``). A group is *incomplete* until
    G members have arrived, then *complete*. Only complete groups are sampled,
    and always whole: members stay together, in arrival order. A group's
    behaviour version is the minimum ``policy_version`` of its members (so its
    staleness is the largest of its members').

Admission (:meth:`ReplayBuffer.add`)
    * ``DUPLICATE``: the ``rollout_id`` was accepted before (remembered for the
      last ``dedup_window`` accepted ids, default 1e6).
    * ``GROUP_OVERFULL``: the group already completed (it has G members).
    * ``GROUP_DISCARDED``: the group was evicted or dropped as stale before it
      completed; its late members cannot complete it any more. (Group ids are
      remembered for the last ``dedup_window`` closed groups.)
    * ``GROUP_MISMATCH``: see above.
    Rejected items are not stored and are counted in ``rejected_total[outcome]``.

FIFO
    Complete groups queue in order of completion (when their G-th member
    arrived). :meth:`ReplayBuffer.sample` takes the ``num_groups`` oldest.

Reuse
    Each time a group is served its serve count goes up by one. A group served
    K times is removed; otherwise it goes to the back of the FIFO, behind every
    group already queued, so reuse never starves fresh data. ``K = 1`` serves
    every group exactly once.

Staleness
    staleness = ``learner_version - version`` (in versions). :meth:`drop_stale`
    (run first by every :meth:`sample`) drops complete groups with staleness
    > eta, i.e. version < ``learner_version - eta``; staleness == eta is kept.
    Incomplete groups already past eta are dropped too: a group's version only
    goes down as members arrive and the learner version never goes back, so
    they could only be dropped later. The per-rollout staleness reported in a
    :class:`Sample` is ``learner_version - rollout.policy_version``.

Overflow and backpressure
    * ``BLOCK``: :meth:`is_full` is true while complete groups >= C. The service
      then stops reading its socket, so ZeroMQ's high-water marks block the
      scorers and generators. ``add`` itself never refuses or drops for space
      (items already read are still accepted, even past C).
    * ``EVICT_OLDEST``: when a group completes and complete groups > C, the
      complete group with the oldest behaviour version is evicted (ties: the
      earliest completed; this may be the group that just completed).
      :meth:`is_full` is always false.
    * Incomplete groups never make the buffer full (their missing members may
      be queued behind the items a full buffer refuses to read: deadlock).
      They are bounded on their own: at most C incomplete groups; a new group
      that would make C + 1 evicts the incomplete group whose first member
      arrived earliest. (A group of size 1 completes on arrival and evicts none.)
    * Timeout: :meth:`expire` evicts incomplete groups whose first member
      arrived more than ``group_timeout_s`` seconds ago (the service calls it
      periodically; nothing expires on its own).
    * Reward failed: :meth:`drop_group` evicts an incomplete group at once when a
      scorer reports that the reward raised on one of its members (that member
      never arrives, so the group could never complete), and refuses its later
      members (``GROUP_DISCARDED``). Ledger event ``REWARD_FAILED``.

Accounting
    Every accepted rollout leaves the buffer exactly once: sampled for the
    K-th time, dropped as stale, or evicted (overflow, incomplete bound,
    timeout, a member's reward failed). Hence, with K = 1,
    ``inserted_total == sampled_total + dropped_stale_total + evicted_total
    + held_rollouts``. Counters are monotonic totals in rollouts (Prometheus
    counters); ``sampled_total`` counts every serve (reuse included). Each
    :class:`Sample` carries the rollouts dropped as stale and evicted since the
    previous successful sample, then those pending counts reset.

Ledger
    ``on_event(event, rollout_ids)`` (optional) is called after the state
    changed, with a :class:`BufferEvent`: ``ACCEPTED`` (one id, per accepted
    add), ``SAMPLED`` (every serve, reuse included; an id leaves on its K-th),
    ``DROPPED_STALE``, ``EVICTED`` and ``REWARD_FAILED`` (evicted by :meth:`drop_group`;
    counted in ``evicted_total``), one call per operation, never with an
    empty list. :meth:`ReplayBuffer.admission` tells, without changing
    anything, what :meth:`ReplayBuffer.add` would answer, so a write-ahead log
    can record an accepted rollout before the store changes.

Cost
    ``add`` is amortised O(log n) (a lazily pruned min-heap on version per
    state finds the oldest version for eviction and staleness); ``sample`` is
    O(num_groups * G + log n) plus the groups it drops; ``expire`` is O(1) plus
    the groups it evicts.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from enum import Enum

from streamrl.common.messages import ScoredRollout
from streamrl.common.modes import OverflowPolicy

DEFAULT_DEDUP_WINDOW = 1_000_000
"""How many accepted rollout ids (and closed group ids) are remembered."""


class BufferEvent(str, Enum):
    """What happened to rollouts in the store (the ledger hook's first argument; the
    values are the journal's and the history's event names)."""

    ACCEPTED = "accepted"
    SAMPLED = "sampled"
    DROPPED_STALE = "dropped_stale"
    EVICTED = "evicted"
    REWARD_FAILED = "reward_failed"


LedgerHook = Callable[[BufferEvent, list[str]], None]
"""``on_event(event, rollout_ids)``, see "Ledger" in the module docstring."""


class AddOutcome(str, Enum):
    """Result of :meth:`ReplayBuffer.add`; the non-accepted values label ``rejected_total``."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"  # rollout_id already accepted
    GROUP_MISMATCH = "group_mismatch"  # group_size or prompt_id differs from the first member's
    GROUP_OVERFULL = "group_overfull"  # the group already has group_size members
    GROUP_DISCARDED = "group_discarded"  # the group was evicted / dropped before completing


REJECT_OUTCOMES: tuple[AddOutcome, ...] = tuple(o for o in AddOutcome if o is not AddOutcome.ACCEPTED)


@dataclass
class Sample:
    """What :meth:`ReplayBuffer.sample` returns.

    Attributes:
        rollouts: ``[N]`` the served rollouts, groups contiguous in FIFO order,
            members in arrival order.
        staleness: ``[N]`` per rollout, ``learner_version - policy_version`` (versions).
        group_sizes: ``[num_groups]`` members per served group (its G), in order;
            ``sum(group_sizes) == N``.
        dropped_stale: rollouts dropped as stale since the previous successful sample.
        evicted: rollouts evicted since the previous successful sample.
        buffered_groups: complete groups held after this sample.
    """

    rollouts: list[ScoredRollout]
    staleness: list[int]
    dropped_stale: int
    evicted: int
    group_sizes: list[int] = field(default_factory=list)
    buffered_groups: int = 0


class _Group:
    __slots__ = ("group_id", "prompt_id", "size", "members", "first_arrival", "version", "served", "seq")

    def __init__(self, item: ScoredRollout, now: float, seq: int):
        r = item.rollout
        self.group_id: str = r.group_id
        self.prompt_id: str = r.prompt_id
        self.size: int = r.group_size
        self.members: list[ScoredRollout] = []
        self.first_arrival = now
        self.version: int = r.policy_version
        self.served = 0
        self.seq = seq  # creation order while incomplete, completion order once complete

    def ids(self) -> list[str]:
        return [m.rollout.rollout_id for m in self.members]


class _RecentKeys:
    """The last ``limit`` keys added, each with a value; O(1) add / lookup."""

    def __init__(self, limit: int):
        self.limit = limit
        self._values: dict[Hashable, object] = {}
        self._order: deque[Hashable] = deque()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._values

    def get(self, key: Hashable) -> object:
        return self._values.get(key)

    def add(self, key: Hashable, value: object = True) -> None:
        if key not in self._values:
            self._order.append(key)
            if len(self._order) > self.limit:
                del self._values[self._order.popleft()]
        self._values[key] = value

    def __len__(self) -> int:
        return len(self._values)


class ReplayBuffer:
    """Replay buffer of scored rollout groups; see the module docstring for the rules.

    Args:
        capacity_groups: C, complete groups held before BLOCK reports full or
            EVICT_OLDEST evicts; also the bound on incomplete groups. >= 1.
        overflow: :class:`~streamrl.common.modes.OverflowPolicy`.
        max_reuse: K, times a group is served before it is removed. >= 1.
        max_staleness: eta, largest staleness (versions) a served group may have. >= 0.
        group_timeout_s: seconds an incomplete group may wait after its first
            member arrived before :meth:`expire` evicts it. > 0.
        clock: monotonic time in seconds (injected for tests).
        on_event: optional ledger hook ``on_event(event, rollout_ids)``.
        dedup_window: how many accepted rollout ids / closed group ids are remembered.
    """

    def __init__(
        self,
        *,
        capacity_groups: int,
        overflow: OverflowPolicy,
        max_reuse: int,
        max_staleness: int,
        group_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_event: LedgerHook | None = None,
        dedup_window: int = DEFAULT_DEDUP_WINDOW,
    ):
        errors = []
        if capacity_groups < 1:
            errors.append(f"capacity_groups must be >= 1 (got {capacity_groups})")
        if max_reuse < 1:
            errors.append(f"max_reuse must be >= 1; 1 serves each group once (got {max_reuse})")
        if max_staleness < 0:
            errors.append(f"max_staleness must be >= 0; 0 is on-policy (got {max_staleness})")
        if not group_timeout_s > 0:
            errors.append(f"group_timeout_s must be > 0 seconds (got {group_timeout_s})")
        if dedup_window < 1:
            errors.append(f"dedup_window must be >= 1 (got {dedup_window})")
        try:
            overflow = OverflowPolicy(overflow)
        except ValueError:
            errors.append(f"overflow must be one of {[p.value for p in OverflowPolicy]} (got {overflow!r})")
        if errors:
            raise ValueError("ReplayBuffer: " + "; ".join(errors))

        self.capacity_groups = capacity_groups
        self.overflow = overflow
        self.max_reuse = max_reuse
        self.max_staleness = max_staleness
        self.group_timeout_s = float(group_timeout_s)
        self.clock = clock
        self.on_event = on_event

        # Monotonic totals, in rollouts.
        self.inserted_total = 0
        self.sampled_total = 0
        self.dropped_stale_total = 0
        self.evicted_total = 0
        self.rejected_total: dict[str, int] = {o.value: 0 for o in REJECT_OUTCOMES}

        self._incomplete: OrderedDict[str, _Group] = OrderedDict()  # by first arrival
        self._complete: OrderedDict[str, _Group] = OrderedDict()  # FIFO serve order
        # Min-heaps of (version, seq, group), pruned lazily: stale entries are
        # skipped when popped and the heap is rebuilt when mostly stale.
        self._incomplete_heap: list[tuple[int, int, _Group]] = []
        self._complete_heap: list[tuple[int, int, _Group]] = []
        self._seen_ids = _RecentKeys(dedup_window)
        self._closed_groups = _RecentKeys(dedup_window)  # group_id -> AddOutcome for late members
        self._seq = itertools.count()
        self._held = 0
        self._pending_dropped = 0
        self._pending_evicted = 0

    # ------------------------------------------------------------------ state

    @property
    def held_rollouts(self) -> int:
        """Rollouts held, complete and incomplete groups together."""
        return self._held

    @property
    def complete_groups(self) -> int:
        """Complete groups held (waiting to be sampled)."""
        return len(self._complete)

    @property
    def incomplete_groups(self) -> int:
        """Groups still waiting for members."""
        return len(self._incomplete)

    def is_full(self) -> bool:
        """True when overflow is BLOCK and complete groups >= ``capacity_groups``."""
        return self.overflow is OverflowPolicy.BLOCK and len(self._complete) >= self.capacity_groups

    # ------------------------------------------------------------------ add

    def admission(self, item: ScoredRollout) -> AddOutcome:
        """What :meth:`add` would answer for ``item`` now; changes and counts nothing.

        Raises:
            ValueError: ``group_size`` < 1 (``decode()`` refuses such a rollout).
        """
        r = item.rollout
        if r.group_size < 1:
            raise ValueError(f"group_size must be >= 1 (got {r.group_size}); decode() checks this")
        if r.rollout_id in self._seen_ids:
            return AddOutcome.DUPLICATE
        group = self._incomplete.get(r.group_id)
        if group is None:
            closed = self._closed_groups.get(r.group_id)
            if isinstance(closed, AddOutcome):  # the group was closed: its late members get its outcome
                return closed
        elif r.group_size != group.size or r.prompt_id != group.prompt_id:
            return AddOutcome.GROUP_MISMATCH
        return AddOutcome.ACCEPTED

    def add(self, item: ScoredRollout) -> AddOutcome:
        """Admit one scored rollout; see the module docstring for the outcomes.

        Raises:
            ValueError: ``group_size`` < 1 (``decode()`` refuses such a rollout).
        """
        outcome = self.admission(item)
        if outcome is not AddOutcome.ACCEPTED:
            return self._reject(outcome)
        r = item.rollout
        group = self._incomplete.get(r.group_id)
        evicted: list[str] = []
        if group is None:
            if r.group_size > 1 and len(self._incomplete) >= self.capacity_groups:
                _, oldest = self._incomplete.popitem(last=False)
                evicted += self._discard(oldest, evict=True)
            group = _Group(item, self.clock(), next(self._seq))
            self._incomplete[group.group_id] = group
            self._push(self._incomplete_heap, self._incomplete, group)
        elif r.policy_version < group.version:
            group.version = r.policy_version
            self._push(self._incomplete_heap, self._incomplete, group)

        group.members.append(item)
        self._seen_ids.add(r.rollout_id)
        self._held += 1
        self.inserted_total += 1

        if len(group.members) == group.size:
            del self._incomplete[group.group_id]
            self._closed_groups.add(group.group_id, AddOutcome.GROUP_OVERFULL)
            group.seq = next(self._seq)
            self._complete[group.group_id] = group
            self._push(self._complete_heap, self._complete, group)
            if self.overflow is OverflowPolicy.EVICT_OLDEST and len(self._complete) > self.capacity_groups:
                victim = self._pop_oldest(self._complete_heap, self._complete, None)
                assert victim is not None
                evicted += self._discard(victim, evict=True)

        self._emit(BufferEvent.ACCEPTED, [r.rollout_id])
        self._emit(BufferEvent.EVICTED, evicted)
        return AddOutcome.ACCEPTED

    # ------------------------------------------------------------------ removal

    def expire(self) -> int:
        """Evict incomplete groups whose first member arrived more than
        ``group_timeout_s`` seconds ago. Returns the number of rollouts evicted."""
        now = self.clock()
        evicted: list[str] = []
        while self._incomplete:
            oldest = next(iter(self._incomplete.values()))
            if now - oldest.first_arrival <= self.group_timeout_s:
                break
            del self._incomplete[oldest.group_id]
            evicted += self._discard(oldest, evict=True)
        self._emit(BufferEvent.EVICTED, evicted)
        return len(evicted)

    def drop_group(self, group_id: str) -> int:
        """A scorer dropped ``group_id`` (the reward raised on one of its members): evict what is held
        of it (an incomplete group; a complete one is left alone: it holds every member, so none of
        them failed) and refuse its later members as ``GROUP_DISCARDED``. Returns the rollouts evicted."""
        group = self._incomplete.pop(group_id, None)
        if group is None:
            if group_id not in self._complete:
                self._closed_groups.add(group_id, AddOutcome.GROUP_DISCARDED)
            return 0
        evicted = self._discard(group, evict=True)  # remembered as GROUP_DISCARDED (incomplete)
        self._emit(BufferEvent.REWARD_FAILED, evicted)
        return len(evicted)

    def drop_stale(self, learner_version: int) -> int:
        """Drop complete and incomplete groups whose version < ``learner_version - max_staleness``
        (staleness > eta). Returns the number of rollouts dropped."""
        limit = learner_version - self.max_staleness
        dropped: list[str] = []
        for heap, groups in (
            (self._complete_heap, self._complete),
            (self._incomplete_heap, self._incomplete),
        ):
            while (group := self._pop_oldest(heap, groups, limit)) is not None:
                dropped += self._discard(group, evict=False)
        self._emit(BufferEvent.DROPPED_STALE, dropped)
        return len(dropped)

    # ------------------------------------------------------------------ sample

    def sample(self, num_groups: int, learner_version: int) -> Sample | None:
        """Serve the ``num_groups`` oldest complete groups (FIFO) after dropping stale ones.

        Returns ``None`` (nothing served, pending counts kept) when fewer than
        ``num_groups`` complete groups are held.

        Raises:
            ValueError: ``num_groups`` < 1 or > ``capacity_groups`` (such a request
                could never be met: the buffer never holds more; raise
                ``capacity_groups`` or ask for fewer groups).
        """
        if not 1 <= num_groups <= self.capacity_groups:
            raise ValueError(
                f"num_groups must be in [1, capacity_groups={self.capacity_groups}] "
                f"(got {num_groups}); raise capacity_groups or request fewer groups"
            )
        self.drop_stale(learner_version)
        if len(self._complete) < num_groups:
            return None
        served = list(itertools.islice(self._complete.values(), num_groups))
        rollouts: list[ScoredRollout] = []
        for group in served:
            rollouts += group.members
            group.served += 1
            if group.served >= self.max_reuse:
                del self._complete[group.group_id]  # its heap entry is pruned lazily
                self._held -= len(group.members)
            else:
                self._complete.move_to_end(group.group_id)
        self.sampled_total += len(rollouts)
        result = Sample(
            rollouts=rollouts,
            staleness=[learner_version - m.rollout.policy_version for m in rollouts],
            dropped_stale=self._pending_dropped,
            evicted=self._pending_evicted,
            group_sizes=[len(g.members) for g in served],
            buffered_groups=len(self._complete),
        )
        self._pending_dropped = 0
        self._pending_evicted = 0
        self._emit(BufferEvent.SAMPLED, [m.rollout.rollout_id for m in rollouts])
        return result

    # ------------------------------------------------------------------ durability

    def snapshot(self) -> list[tuple[list[ScoredRollout], int]]:
        """The groups held, as ``(members, times served)`` in restore order:
        incomplete groups by first arrival, then complete groups in FIFO order.
        :meth:`restore` of this list into an empty buffer rebuilds the same queue."""
        return [(list(g.members), g.served) for g in (*self._incomplete.values(), *self._complete.values())]

    def restore(self, groups: list[tuple[list[ScoredRollout], int]]) -> None:
        """Re-admit recovered groups, in order, with their serve counts.

        Members go through :meth:`add` (so dedup, grouping and the bounds
        apply) without an ``ACCEPTED`` ledger event or counting as inserted:
        they were counted when first accepted. Groups the bounds evict (a
        smaller capacity than before) are reported as ``evicted``. A restored
        incomplete group's timeout starts now.
        """
        hook = self.on_event
        if hook is not None:
            self.on_event = lambda event, ids: None if event is BufferEvent.ACCEPTED else hook(event, ids)
        try:
            for members, served in groups:
                for item in members:
                    if self.add(item) is AddOutcome.ACCEPTED:
                        self.inserted_total -= 1
                group = self._complete.get(members[0].rollout.group_id) if members else None
                if group is not None:
                    group.served = served
        finally:
            self.on_event = hook

    # ------------------------------------------------------------------ internals

    def _reject(self, outcome: AddOutcome) -> AddOutcome:
        self.rejected_total[outcome.value] += 1
        return outcome

    def _discard(self, group: _Group, *, evict: bool) -> list[str]:
        """Count a group already unlinked from its dict as evicted or dropped; returns its ids."""
        n = len(group.members)
        self._held -= n
        if len(group.members) < group.size:
            self._closed_groups.add(group.group_id, AddOutcome.GROUP_DISCARDED)
        if evict:
            self.evicted_total += n
            self._pending_evicted += n
        else:
            self.dropped_stale_total += n
            self._pending_dropped += n
        return group.ids()

    def _push(self, heap: list, groups: dict[str, _Group], group: _Group) -> None:
        heapq.heappush(heap, (group.version, group.seq, group))
        if len(heap) > 2 * len(groups) + 64:
            heap[:] = [e for e in heap if self._live(e, groups)]
            heapq.heapify(heap)

    @staticmethod
    def _live(entry: tuple[int, int, _Group], groups: dict[str, _Group]) -> bool:
        version, _, group = entry
        return groups.get(group.group_id) is group and group.version == version

    def _pop_oldest(self, heap: list, groups: dict[str, _Group], below: int | None) -> _Group | None:
        """Unlink and return the live group with the smallest (version, seq), if its
        version < ``below`` (any version when ``below`` is None); else None."""
        while heap:
            entry = heap[0]
            if not self._live(entry, groups):
                heapq.heappop(heap)
                continue
            if below is not None and entry[0] >= below:
                return None
            heapq.heappop(heap)
            group = entry[2]
            del groups[group.group_id]
            return group
        return None

    def _emit(self, event: BufferEvent, rollout_ids: list[str]) -> None:
        if self.on_event is not None and rollout_ids:
            self.on_event(event, rollout_ids)
