"""The replay buffer service: scored rollouts in (PULL), batches out to the learner (ROUTER).

While the store is full (overflow ``block``) the service stops reading its
PULL socket; ZeroMQ's bounded queues then fill and the scorers' and
generators' sends block, so data never piles up without bound. A batch
request that cannot be served yet (too few complete groups) is kept and
answered as soon as enough groups arrive.
"""

from __future__ import annotations

import logging
import time

import zmq

from common.messages import Batch, BatchRequest, ScoredRollout
from common.metrics import STALENESS_BUCKETS
from common.service import ServiceContext
from common.transport import Inbox, make_socket, send
from services.buffer.store import REJECT_OUTCOMES, AddOutcome, ReplayBuffer

log = logging.getLogger(__name__)

EXPIRE_EVERY_S = 1.0


def admission_capacity(capacity_groups: int, groups_per_step: int, max_staleness: int) -> int:
    """Groups the buffer may hold: never more than the learner consumes within
    ``max_staleness + 1`` versions (AReaL's admission control), so a full buffer
    does not just age into stale drops while producers keep sampling."""
    return max(groups_per_step, min(capacity_groups, groups_per_step * (max_staleness + 1)))


class BufferService:
    """The single buffer process."""

    def __init__(self, ctx: ServiceContext):
        cfg = ctx.config
        b = cfg.buffer
        self.ctx = ctx
        capacity = admission_capacity(b.capacity_groups, cfg.learner.groups_per_step, cfg.run.max_staleness)
        if capacity < b.capacity_groups:
            log.info("admission control: holding at most %d groups (learner takes %d per version, max_staleness %d)",
                     capacity, cfg.learner.groups_per_step, cfg.run.max_staleness)
        self.store = ReplayBuffer(capacity_groups=capacity, overflow=b.overflow, max_reuse=b.max_reuse,
                                  max_staleness=cfg.run.max_staleness, group_timeout_s=b.group_timeout_s)
        t = cfg.transport
        self.pull = make_socket(ctx.zmq, zmq.PULL, bind=cfg.endpoints.buffer,
                                max_message_bytes=t.max_message_bytes, hwm=t.hwm)
        self.router = make_socket(ctx.zmq, zmq.ROUTER, bind=cfg.endpoints.batches,
                                  max_message_bytes=t.max_message_bytes, hwm=t.hwm)
        self.rollout_inbox = Inbox(ctx.metrics, [ScoredRollout], max_bytes=t.max_message_bytes,
                                   socket_name="scored_rollouts")
        self.request_inbox = Inbox(ctx.metrics, [BatchRequest], max_bytes=t.max_message_bytes,
                                   socket_name="batches")
        self.pending: tuple[bytes, BatchRequest] | None = None
        m = ctx.metrics
        self.m_items = m.gauge("rollouts", "Rollouts held")
        self.m_groups = m.gauge("groups", "Complete groups held")
        self.m_incomplete = m.gauge("incomplete_groups", "Groups still waiting for members")
        self.m_inserted = m.counter("inserted_total", "Rollouts accepted")
        self.m_sampled = m.counter("sampled_total", "Rollouts served to the learner (reuse counted)")
        self.m_stale = m.counter("dropped_stale_total", "Rollouts dropped for staleness > max_staleness")
        self.m_evicted = m.counter("evicted_total", "Rollouts evicted (capacity, incomplete-group timeout)")
        self.m_batches = m.counter("batches_total", "Batches served")
        self.m_staleness = m.histogram("staleness", "Staleness (versions) of served rollouts",
                                       buckets=STALENESS_BUCKETS)
        self.m_blocked = m.counter("producers_blocked_seconds_total",
                                   "Seconds the buffer stopped reading producers because it was full")
        for outcome in REJECT_OUTCOMES:  # admission reasons exported at 0 next to the decoder's
            m.rejected.labels(reason=outcome.value)
        self._synced = (0, 0, 0, 0)

    def run(self) -> None:
        """Serve until stopped."""
        log.info("%s accepting on %s, serving batches on %s", self.ctx.instance,
                 self.ctx.config.endpoints.buffer, self.ctx.config.endpoints.batches)
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        reading = False
        next_expire = time.monotonic() + EXPIRE_EVERY_S
        blocked_since: float | None = None
        try:
            while not self.ctx.stop.is_set():
                full = self.store.is_full()
                if full and reading:
                    poller.unregister(self.pull)
                    reading, blocked_since = False, time.monotonic()
                elif not full and not reading:
                    poller.register(self.pull, zmq.POLLIN)
                    reading = True
                    if blocked_since is not None:
                        self.m_blocked.inc(time.monotonic() - blocked_since)
                        blocked_since = None
                events = dict(poller.poll(200))
                if self.pull in events:
                    self._drain_rollouts()
                if self.router in events:
                    self._take_request()
                if time.monotonic() >= next_expire:
                    self.store.expire()
                    next_expire = time.monotonic() + EXPIRE_EVERY_S
                self._serve_pending()
                self._update_metrics()
        finally:
            self.pull.close(0)
            self.router.close(0)

    def _drain_rollouts(self) -> None:
        for _ in range(256):
            if self.store.is_full() or not self.pull.poll(0):
                return
            msg = self.rollout_inbox.decode(self.pull.recv_multipart(copy=False))
            if msg is None:
                continue
            outcome = self.store.add(msg)
            if outcome is not AddOutcome.ACCEPTED:
                self.rollout_inbox.reject(outcome.value, f"rollout {msg.rollout.rollout_id}: {outcome.value}")

    def _take_request(self) -> None:
        frames = self.router.recv_multipart(copy=False)
        if len(frames) < 2:
            self.request_inbox.reject("malformed", "no routing id")
            return
        msg = self.request_inbox.decode(frames[1:])
        if msg is None:
            return
        if msg.num_groups > self.store.capacity_groups:
            self.request_inbox.reject("bad_value", f"{msg.num_groups} groups > capacity {self.store.capacity_groups}")
            return
        self.pending = (frames[0].bytes, msg)  # a newer request replaces an older unanswered one

    def _serve_pending(self) -> None:
        if self.pending is None:
            return
        route, request = self.pending
        sample = self.store.sample(request.num_groups, request.learner_version)
        if sample is None:
            return
        self.pending = None
        batch = Batch(sender=self.ctx.instance, learner_version=request.learner_version, rollouts=sample.rollouts,
                      dropped_stale=sample.dropped_stale, evicted=sample.evicted,
                      buffered_groups=sample.buffered_groups)
        send(self.router, batch, prefix=[route])
        self.m_batches.inc()
        for s in sample.staleness:
            self.m_staleness.observe(s)

    def _update_metrics(self) -> None:
        s = self.store
        self.m_items.set(s.held_rollouts)
        self.m_groups.set(s.complete_groups)
        self.m_incomplete.set(s.incomplete_groups)
        now = (s.inserted_total, s.sampled_total, s.dropped_stale_total, s.evicted_total)
        for counter, before, after in zip((self.m_inserted, self.m_sampled, self.m_stale, self.m_evicted),
                                          self._synced, now):
            if after > before:
                counter.inc(after - before)
        self._synced = now
