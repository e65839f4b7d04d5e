"""The replay buffer service: scored rollouts in (PULL), batches out to the learner (ROUTER).

While the store is full (overflow ``block``) the service stops reading its
PULL socket; ZeroMQ's bounded queues then fill and the scorers' and
generators' sends block, so data never piles up without bound. A batch
request that cannot be served yet (too few complete groups) is kept and
answered as soon as enough groups arrive.

Durability (``buffer.journal``, on by default; ``services/buffer/journal.py``):
every accepted rollout, removal and served batch is written to the journal
before it is counted or sent, and a restarted buffer recovers what it held.
The last batch served stays *unacknowledged* until the learner asks for a
newer version (proof it trained on it): a request for the same or an older
version (the learner restarted, or the batch was lost) gets the same batch
again instead of new data, so a crash of either side loses no batch and
serves none twice beyond ``max_reuse``.
"""

from __future__ import annotations

import logging
import time

import zmq

from streamrl.common.liveness import Waits
from streamrl.common.messages import Batch, BatchRequest, ScoredRollout
from streamrl.common.metrics import STALENESS_BUCKETS
from streamrl.common.service import ServiceContext, journal_folder
from streamrl.common.transport import Inbox, make_socket, send
from streamrl.services.buffer.journal import Journal, RecoveredGroup
from streamrl.services.buffer.store import REJECT_OUTCOMES, AddOutcome, ReplayBuffer

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
                                  max_staleness=cfg.run.max_staleness, group_timeout_s=b.group_timeout_s,
                                  on_event=self._journal_event)
        self.unacked: Batch | None = None
        self._incoming: list | None = None
        self.journal: Journal | None = None
        if b.journal:
            self.journal = Journal(journal_folder(cfg), fsync=b.fsync,
                                   fsync_interval_s=b.fsync_interval_s, segment_bytes=b.segment_bytes,
                                   max_segments=b.max_segments, keep_history=b.keep_history,
                                   max_reuse=b.max_reuse)
            self._recover()
        t = cfg.transport
        self.pull = make_socket(ctx.zmq, zmq.PULL, bind=cfg.endpoints.buffer,
                                max_message_bytes=t.max_message_bytes, hwm=t.hwm, security=ctx.security)
        self.router = make_socket(ctx.zmq, zmq.ROUTER, bind=cfg.endpoints.batches,
                                  max_message_bytes=t.max_message_bytes, hwm=t.hwm, security=ctx.security)
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
        self.m_journal_bytes = m.counter("journal_written_bytes_total", "Bytes appended to the journal")
        self.m_fsync = m.counter("journal_fsync_seconds_total", "Seconds spent in fsync of the journal")
        self.m_compactions = m.counter("journal_compactions_total", "Journal compactions (snapshot + delete)")
        self.m_recovered = m.gauge("recovered_rollouts", "Rollouts recovered from the journal at start")
        self.m_reserved = m.counter("batches_reserved_total",
                                    "Unacknowledged batches served again (learner restarted or lost a batch)")
        self.waits = Waits(m, warn_after_s=cfg.transport.request_timeout_s * 3)
        self.last_request = time.monotonic()
        self._synced = (0, 0, 0, 0)
        self._journal_synced = (0, 0.0, 0)
        if self.journal is not None:
            self.m_recovered.set(self.recovered_rollouts)

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
                    self._housekeeping()
                    next_expire = time.monotonic() + EXPIRE_EVERY_S
                self._serve_pending()
                self._update_metrics()
        finally:
            if self.journal is not None:
                self.journal.close()  # fsync: a clean stop leaves everything on disk
                log.info("journal flushed: %d rollouts held in %s", self.store.held_rollouts,
                         self.journal.directory)
            self.pull.close(0)
            self.router.close(0)

    def _housekeeping(self) -> None:
        """Once a second: expire incomplete groups, make the journal durable, compact it, report waits."""
        self.store.expire()
        if self.journal is not None:
            self.journal.commit()
            if self.journal.needs_compaction():
                self._compact()
        silent = time.monotonic() - self.last_request
        if self.pending is None and silent > self.ctx.config.transport.request_timeout_s * 2:
            self.waits.waiting("learner", f"no batch request for {silent:.0f}s (learner down or training)")

    def _recover(self) -> None:
        """Rebuild the store from the journal, then compact it into one snapshot segment."""
        recovered = self.journal.recover(repair=self.ctx.config.buffer.journal_repair)
        self.store.restore([(g.members, g.served) for g in recovered.groups])
        self.unacked = recovered.unacknowledged
        self.recovered_rollouts = recovered.rollouts
        if recovered.records:
            log.info("recovered %d rollouts in %d groups from %s (%d records, %d bad)%s",
                     recovered.rollouts, len(recovered.groups), self.journal.directory, recovered.records,
                     recovered.bad_records,
                     f"; batch for version {self.unacked.learner_version} awaits acknowledgement"
                     if self.unacked else "")
        self._compact()

    def _compact(self) -> None:
        groups = [RecoveredGroup(members=members, served=served) for members, served in self.store.snapshot()]
        self.journal.compact(groups, self.unacked)

    def _journal_event(self, event: str, rollout_ids: list[str]) -> None:
        """The store's ledger hook: write accepted rollouts and removals to the journal."""
        if self.journal is None:
            return
        if event == "accepted":
            self.journal.accept(self._incoming)
        elif event in ("dropped_stale", "evicted"):
            self.journal.remove(event, rollout_ids)
        # "sampled" is journaled with the whole batch in _serve_pending

    def _drain_rollouts(self) -> None:
        try:
            for _ in range(256):
                if self.store.is_full() or not self.pull.poll(0):
                    return
                frames = self.pull.recv_multipart(copy=False)
                msg = self.rollout_inbox.decode(frames)
                if msg is None:
                    continue
                self._incoming = frames
                outcome = self.store.add(msg)
                if outcome is not AddOutcome.ACCEPTED:
                    self.rollout_inbox.reject(outcome.value, f"rollout {msg.rollout.rollout_id}: {outcome.value}")
        finally:
            self._incoming = None
            if self.journal is not None:
                self.journal.commit()  # before anything accepted is counted or served

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
        self.last_request = time.monotonic()
        self.waits.done("learner")
        route = frames[0].bytes
        if self.unacked is not None:
            if msg.learner_version <= self.unacked.learner_version:
                self._serve_again(route, msg)
                return
            self._acknowledge()
        self.pending = (route, msg)  # a newer request replaces an older unanswered one

    def _acknowledge(self) -> None:
        """The learner asked for a newer version: it trained on the unacknowledged batch."""
        if self.journal is not None:
            self.journal.ack(self.unacked.learner_version)
        self.unacked = None

    def _serve_again(self, route: bytes, request: BatchRequest) -> None:
        """Answer a request for the same or an older version with the unacknowledged batch."""
        batch = self.unacked
        log.info("learner asked again for version %d; serving the unacknowledged batch of version %d again",
                 request.learner_version, batch.learner_version)
        if batch.learner_version != request.learner_version:
            batch.learner_version = request.learner_version
            if self.journal is not None:
                self.journal.restamp(request.learner_version)
        if self.journal is not None:
            self.journal.commit()
        batch.sent_at = time.time()
        send(self.router, batch, prefix=[route])
        self.m_reserved.inc()

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
        if self.journal is not None:
            self.journal.serve(batch)
            self.journal.commit()
        self.unacked = batch
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
        if self.journal is not None:
            j = self.journal
            now_j = (j.bytes_written, j.fsync_seconds, j.compactions)
            for counter, before, after in zip((self.m_journal_bytes, self.m_fsync, self.m_compactions),
                                              self._journal_synced, now_j):
                if after > before:
                    counter.inc(after - before)
            self._journal_synced = now_j
