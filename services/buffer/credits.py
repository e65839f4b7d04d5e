"""Generation credits: admission before generation, without sockets.

A generator samples a group only while it holds a credit, and the buffer grants
credits so that every admitted group can still be trained within ``max_staleness``
(eta). This is AReaL's bound (Fu et al. 2025, "AReaL", sec. 4: the number of samples
generated never exceeds ``(i + eta + 1) x B`` at learner version i) applied to
groups (B = ``groups_per_step``):

    outstanding + served_for(L) <= (eta + 1 - lag) x B

* ``L``: the version of the learner's latest batch request (the version it trains now;
  lower than before after a learner restarted from an older checkpoint);
* ``served_for(L)``: groups already served for version L (the learner's batch of L,
  a batch served again and restamped L included; a batch sent twice counts once);
* ``outstanding``: groups held by the store (complete or not), groups in served batches
  waiting to be served again (lost with a learner process that died before
  checkpointing them: they are served before any new data), plus every generator's
  groups granted and not yet arrived (in flight, or not yet sampled);
* ``lag = max(0, L - w)`` for a generator whose weights are version ``w``: a group
  sampled with older weights is older by ``lag`` versions before it waits at all,
  so it must be trained ``lag`` versions sooner.

With FIFO serving (the store's rule), a group granted at position p (< the bound)
is trained at version ``L + floor((served_for(L) + p) / B) <= w + eta``: within eta.
In sync mode (eta = 0) a generator gets no credit once the batch of L is served,
nor while its weights are older than L: it waits for the new version.

Fairness: with n active generators none may hold more than ``ceil((eta + 1) x B / n)``
outstanding credits, so one fast generator cannot starve the others.

Restarts:
* a restarted learner (``services/buffer/durable.py``) is served the batches its dead
  process trained after its checkpoint again, restamped with its new versions, before
  any new data. Those waiting count in ``outstanding``, the one served for L in
  ``served_for(L)``; a request for an older version than the ledger's moves L back
  (``served_for`` restarts at 0). Counting neither (before this rule) over-granted after
  a restart at version R (``continue_at``: R > L_old): at the k-th request of the new
  process (k = 0 .. n - 1, n re-served batches) the ledger saw ``served_for(R + k) = 0``
  and none of the n - 1 - k still waiting, so it let up to (n - k) x B groups more
  than (eta + 1) x B ahead of the learner, and groups sampled with weights R + k could
  then be dropped as too stale; and a learner that went back to a version <= L_old
  left ``served_for(L_old)`` and the lag against L_old in place, so once it asked new
  data for a version <= L_old the generators got nothing (sync mode: a deadlock);
* a restarted buffer has no ledger: it re-grants from what the store holds (the
  journal) and the next requests (credits granted by the old process and not yet
  sampled may overshoot once; their groups are still counted when they arrive);
* a request from a new generator id with a known ``instance`` (the process
  restarted) expires the old id's unspent credits; so does silence longer than
  ``ttl_s``. Groups sent but never arrived (lost with a scorer) stop counting
  ``ttl_s`` after the request that reported them sent.

Counts are cumulative per generator id (``groups_sent`` in each request, groups seen
arriving here), so a lost or repeated request changes nothing. Time is injected
(``clock``: seconds, monotonic).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from streamrl.common.messages import Batch, CreditRequest
from streamrl.services.buffer.journal import LOST, HeldBatch

SEEN_GROUPS = 100_000
"""Group ids remembered per generator (to count each group's arrival once)."""


def batch_generators(batch: Batch) -> list[str]:
    """Who sampled each group of ``batch``: one generator id per group, in the batch's order
    (what :meth:`CreditLedger.served` takes)."""
    return list({s.rollout.group_id: s.rollout.generator_id for s in batch.rollouts}.values())


def awaiting_groups(held: Iterable[HeldBatch]) -> int:
    """Groups in ``held`` batches lost with a learner process that died before checkpointing
    them (``owner`` :data:`~streamrl.services.buffer.journal.LOST`): they are served again,
    before any new data, so they are ahead of the learner like the groups in the store."""
    return sum(len(batch_generators(h.batch)) for h in held if h.owner == LOST)


@dataclass
class _Generator:
    """The ledger of one generator process (id)."""

    instance: str
    authorized: int = 0  # groups_sent at its last request + the credits then granted
    sent: int = 0  # groups_sent at its last request
    arrived: int = 0  # distinct groups of it seen arriving (or written off as lost)
    trained: int = 0  # its groups served to the learner
    last_seen: float = 0.0
    superseded: bool = False  # its instance restarted under a new id (it asks no more)
    reports: deque = field(default_factory=deque)  # (time, groups_sent) of its requests, oldest first
    seen: OrderedDict = field(default_factory=OrderedDict)

    def outstanding(self) -> int:
        """Groups granted to it and not arrived: in flight or not yet sampled."""
        return max(0, self.authorized - self.arrived)


@dataclass
class Grant:
    """What :meth:`CreditLedger.grant` decided."""

    credits: int
    reason: str = ""
    trained_groups: int = 0


class CreditLedger:
    """The buffer's credit accounting (module docstring).

    Args:
        groups_per_step: B, groups the learner trains per version (>= 1).
        max_staleness: eta (>= 0).
        ttl_s: seconds after which a silent generator's credits, and groups reported sent
            but never arrived, stop counting (> 0).
        clock: monotonic seconds.

    Raises:
        ValueError: a bad argument.
    """

    def __init__(
        self,
        groups_per_step: int,
        max_staleness: int,
        *,
        ttl_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if groups_per_step < 1 or max_staleness < 0 or ttl_s <= 0:
            raise ValueError(
                f"groups_per_step {groups_per_step} must be >= 1, max_staleness {max_staleness} >= 0, ttl_s {ttl_s} > 0"
            )
        self.groups_per_step, self.max_staleness, self.ttl_s, self.clock = groups_per_step, max_staleness, ttl_s, clock
        self.learner_version: int | None = None
        self.served_for_version = 0
        self._served_batches: set[str] = set()  # msg_ids counted in served_for_version
        self.generators: dict[str, _Generator] = {}
        self.granted_total = 0  # credits granted (cumulative)
        self.expired_total = 0  # credits or in-flight groups written off (restart, silence, lost)
        self.arrived_total = 0  # distinct groups seen arriving from a generator with credits

    # ------------------------------------------------------------------ learner side

    @property
    def window(self) -> int:
        """(eta + 1) x B: groups admitted ahead of the learner at most."""
        return (self.max_staleness + 1) * self.groups_per_step

    def learner_asked(self, learner_version: int) -> None:
        """The learner asked a batch for ``learner_version``.

        Another version resets what was served for it, an older one too: only a learner
        process that restarted from an older checkpoint (or a new learner) asks for an older
        version, and from then on it is the learner the bound is measured from (module
        docstring, "Restarts"). The same version again (a request repeated after a lost
        reply) changes nothing.
        """
        if learner_version != self.learner_version:
            self.learner_version = learner_version
            self.served_for_version = 0
            self._served_batches.clear()

    def served(
        self, learner_version: int, generator_ids: list[str], *, batch_id: str = "", again: bool = False
    ) -> None:
        """A batch was served for ``learner_version``: one entry of ``generator_ids`` per group (who sampled it).

        ``batch_id`` (the batch's ``msg_id``): a batch sent again for the same version (its reply
        was lost) counts once. ``again``: the batch was served before (its reply was lost, or its
        learner process died before checkpointing it and it is restamped for ``learner_version``):
        it counts toward what is served for that version, not again toward its generators'
        trained groups.
        """
        if self.learner_version is None or learner_version > self.learner_version:
            self.learner_asked(learner_version)
        if learner_version == self.learner_version and not (batch_id and batch_id in self._served_batches):
            self.served_for_version += len(generator_ids)
            if batch_id:
                self._served_batches.add(batch_id)
        if again:
            return
        for gid in generator_ids:
            if (g := self.generators.get(gid)) is not None:
                g.trained += 1

    # ------------------------------------------------------------------ producer side

    def arrived(self, generator_id: str, group_id: str) -> None:
        """A rollout of ``group_id`` from ``generator_id`` reached the buffer (each group counts once)."""
        g = self.generators.get(generator_id)
        if g is None or group_id in g.seen:
            return
        g.seen[group_id] = True
        if len(g.seen) > SEEN_GROUPS:
            g.seen.popitem(last=False)
        g.arrived += 1
        self.arrived_total += 1

    def outstanding(self) -> int:
        """Credits granted and not arrived, over every generator."""
        return sum(g.outstanding() for g in self.generators.values())

    def grant(self, request: CreditRequest, held_groups: int) -> Grant:
        """Answer ``request`` given the ``held_groups`` ahead of the learner in the buffer: in the
        store (complete + incomplete) and in served batches waiting to be served again
        (:func:`awaiting_groups`).

        The new grant replaces the generator's previous one: its authorisation becomes
        ``request.groups_sent + credits``.
        """
        now = self.clock()
        self.expire(now)
        g = self.generators.get(request.sender)
        if g is None:
            for gid, other in list(self.generators.items()):
                if other.instance == request.instance:  # that process restarted
                    self._write_off(other, other.authorized - max(other.sent, other.arrived))
                    other.authorized = max(other.sent, other.arrived)
                    other.superseded = True  # what it sent still counts until it arrives or expires
                    if not other.outstanding():
                        del self.generators[gid]
            g = self.generators[request.sender] = _Generator(instance=request.instance)
            g.arrived = g.sent = g.authorized = request.groups_sent  # a restarted buffer: nothing known in flight
        if request.groups_sent < g.sent:
            return Grant(0, f"groups_sent {request.groups_sent} went backwards (was {g.sent})")
        g.sent = request.groups_sent
        g.last_seen = now
        g.reports.append((now, request.groups_sent))
        g.authorized = max(g.sent, g.arrived)  # the previous grant's unspent credits are replaced
        credits, reason = self._available(request, held_groups, g)
        g.authorized += credits
        self.granted_total += credits
        return Grant(credits, reason, trained_groups=g.trained)

    def _available(self, request: CreditRequest, held_groups: int, g: _Generator) -> tuple[int, str]:
        learner = self.learner_version if self.learner_version is not None else request.policy_version
        lag = max(0, learner - request.policy_version)
        bound = (self.max_staleness + 1 - lag) * self.groups_per_step - self.served_for_version
        if bound <= 0:
            if lag:
                return 0, (
                    f"weights version {request.policy_version} are {lag} behind the learner's {learner} "
                    f"(max_staleness {self.max_staleness}): load newer weights"
                )
            return 0, f"the batch of version {learner} is served: waiting for the learner's next version"
        used = held_groups + self.outstanding()
        free = bound - used
        if free <= 0:
            return 0, f"{used} groups held or in flight fill the bound of {bound}"
        active = sum(not other.superseded for other in self.generators.values())  # silent ones expire (ttl_s)
        fair = math.ceil(self.window / max(1, active)) - g.outstanding()
        if fair <= 0:
            return 0, f"holds its fair share ({g.outstanding()} of {self.window} among {active} generators)"
        credits = min(request.want, free, fair)
        return (
            credits,
            ""
            if credits == request.want
            else f"{credits} of {request.want}: bound {bound}, {used} held or in flight, fair share {fair}",
        )

    def expire(self, now: float | None = None) -> None:
        """Write off silent generators' credits and groups reported sent ``ttl_s`` ago that never arrived."""
        now = self.clock() if now is None else now
        for gid, g in list(self.generators.items()):
            while g.reports and now - g.reports[0][0] > self.ttl_s:
                _, sent_then = g.reports.popleft()
                if g.arrived < sent_then:  # lost on the way (a scorer died with them)
                    self._write_off(g, sent_then - g.arrived)
                    g.arrived = sent_then
            if now - g.last_seen > self.ttl_s:
                self._write_off(g, g.outstanding())
                del self.generators[gid]

    def _write_off(self, g: _Generator, n: int) -> None:
        if n > 0:
            self.expired_total += n
