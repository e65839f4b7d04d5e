"""The replay buffer service's socket loop: scored rollouts in (PULL), batches out to the learner (ROUTER).

While the store is full (overflow ``block``) the service stops reading its
PULL socket; ZeroMQ's bounded queues then fill and the scorers' and
generators' sends block, so data never piles up without bound. A batch
request that cannot be served yet (too few complete groups) is kept and
answered as soon as enough groups arrive.

Durability (``buffer.journal``, on by default; ``services/buffer/journal.py``):
every accepted rollout, removal and served batch is written to the journal
before it is counted or sent, and a restarted buffer recovers what it held.
Every batch served stays *held* until the learner's requests state a
checkpoint that covers it (``durable_version``): a batch lost in transit, or
trained by a learner killed before its next checkpoint, is served again
(restamped) instead of new data, so a crash of either side loses no batch with
any ``learner.checkpoint_every`` and serves none twice beyond ``max_reuse``.
That logic, without sockets, is
:class:`streamrl.services.buffer.durable.DurableBuffer`.

A scorer whose reward raised on a rollout drops that rollout's group and says so
(``group_dropped``, on the scored-rollout socket): the buffer evicts what it holds of the
group (other scorers may have passed members on), refuses its later members, and counts the
group as arrived for the generator's credits, so the generator samples another at once
instead of waiting for the credit to expire.

Generation credits (``services/buffer/credits.py``): generators ask on
the same ROUTER (``credit_request``) before sampling, and the buffer grants at
most what can still be trained within ``max_staleness`` counting what it holds
and what is granted but not arrived, so little is generated only to be dropped.
Batches served again (lost in transit, or with a learner process that died
before checkpointing them) count like new ones: those waiting to be served
again are ahead of the learner, and one served again counts for the version it
is restamped with.
"""

from __future__ import annotations

import logging
import time
import uuid

import zmq

from streamrl.common.liveness import Waits
from streamrl.common.messages import BatchRequest, CreditGrant, CreditRequest, GroupDropped, ScoredRollout
from streamrl.common.service import ServiceContext, ServiceLoop
from streamrl.common.transport import Inbox, send
from streamrl.services.buffer.credits import CreditLedger, awaiting_groups, batch_generators
from streamrl.services.buffer.durable import DurableBuffer, admission_capacity, open_journal
from streamrl.services.buffer.metrics import BufferMetrics
from streamrl.services.buffer.store import AddOutcome, ReplayBuffer

log = logging.getLogger(__name__)

EXPIRE_EVERY_S = 1.0


class BufferService(ServiceLoop):
    """The single buffer process."""

    def __init__(self, ctx: ServiceContext):
        super().__init__(ctx)
        cfg = ctx.config
        b = cfg.buffer
        capacity = admission_capacity(b.capacity_groups, cfg.learner.groups_per_step, cfg.run.max_staleness)
        if capacity < b.capacity_groups:
            log.info(
                "admission control: holding at most %d groups (learner takes %d per version, max_staleness %d)",
                capacity,
                cfg.learner.groups_per_step,
                cfg.run.max_staleness,
            )
        self.store = ReplayBuffer(
            capacity_groups=capacity,
            overflow=b.overflow,
            max_reuse=b.max_reuse,
            max_staleness=cfg.run.max_staleness,
            group_timeout_s=b.group_timeout_s,
        )
        journal = open_journal(cfg) if b.journal else None
        self.state = DurableBuffer(self.store, journal, ctx.ledger)
        self.closing(self.state.close)  # fsync: a clean stop leaves everything on disk
        self.metrics = BufferMetrics(ctx.metrics)
        if journal is not None:
            self.metrics.recovered.set(self.state.recover(repair=b.journal_repair).rollouts)
        self.pull = self.socket(zmq.PULL, bind=cfg.endpoints.bind_address("buffer"))
        self.router = self.socket(zmq.ROUTER, bind=cfg.endpoints.bind_address("batches"))
        self.rollout_inbox: Inbox[ScoredRollout | GroupDropped] = ctx.inbox(
            [ScoredRollout, GroupDropped], "scored_rollouts"
        )
        self.credits = CreditLedger(cfg.learner.groups_per_step, cfg.run.max_staleness, ttl_s=b.credit_ttl_s)
        self.epoch = uuid.uuid4().hex[:12]
        self.request_inbox: Inbox[BatchRequest | CreditRequest] = ctx.inbox([BatchRequest, CreditRequest], "batches")
        self.waits = Waits(ctx.metrics, warn_after_s=cfg.transport.request_timeout_s * 3)
        self.last_request = time.monotonic()

    def starting(self) -> None:
        log.info(
            "%s accepting on %s, serving batches on %s",
            self.ctx.instance,
            self.ctx.config.endpoints.buffer,
            self.ctx.config.endpoints.batches,
        )
        self.poller = zmq.Poller()
        self.poller.register(self.router, zmq.POLLIN)
        self.reading = False
        self.next_expire = time.monotonic() + EXPIRE_EVERY_S
        self.blocked_since: float | None = None

    def turn(self) -> None:
        """Read the scored rollouts while the store has room (else leave them queued: backpressure),
        answer requests, expire once a second, serve a pending batch, update the metrics."""
        full = self.store.is_full()
        if full and self.reading:
            self.poller.unregister(self.pull)
            self.reading, self.blocked_since = False, time.monotonic()
        elif not full and not self.reading:
            self.poller.register(self.pull, zmq.POLLIN)
            self.reading = True
            if self.blocked_since is not None:
                self.metrics.blocked.inc(time.monotonic() - self.blocked_since)
                self.blocked_since = None
        events = dict(self.poller.poll(200))
        if self.pull in events:
            self._drain_rollouts()
        if self.router in events:
            self._take_request()
        if time.monotonic() >= self.next_expire:
            self._housekeeping()
            self.next_expire = time.monotonic() + EXPIRE_EVERY_S
        self._serve_pending()
        self._update_metrics()

    def _housekeeping(self) -> None:
        """Once a second: expire incomplete groups, make the journal durable, compact it, report waits."""
        self.state.housekeeping()
        self.credits.expire()
        silent = time.monotonic() - self.last_request
        if self.state.pending is None and silent > self.ctx.config.transport.request_timeout_s * 2:
            self.waits.waiting("learner", f"no batch request for {silent:.0f}s (learner down or training)")

    def _drain_rollouts(self) -> None:
        try:
            for _ in range(256):
                if self.store.is_full() or not self.pull.poll(0):
                    return
                frames = self.pull.recv_multipart(copy=False)
                msg = self.rollout_inbox.decode(frames)
                if msg is None:
                    continue
                if isinstance(msg, GroupDropped):  # its reward raised on a member: never trainable
                    self.credits.arrived(msg.generator_id, msg.group_id)  # the generator samples another
                    self.state.drop_group(msg.group_id)
                    self.metrics.groups_dropped.inc()
                    continue
                self.credits.arrived(msg.rollout.generator_id, msg.rollout.group_id)
                outcome = self.state.add(msg, frames)
                if outcome is not AddOutcome.ACCEPTED:
                    self.rollout_inbox.reject(outcome.value, f"rollout {msg.rollout.rollout_id}: {outcome.value}")
        finally:
            self.state.commit()  # before anything accepted is counted or served

    def _take_request(self) -> None:
        frames = self.router.recv_multipart(copy=False)
        if len(frames) < 2:
            self.request_inbox.reject("malformed", "no routing id")
            return
        msg = self.request_inbox.decode(frames[1:])
        if msg is None:
            return
        route = frames[0].bytes
        if isinstance(msg, CreditRequest):
            self._grant(route, msg)
            return
        try:
            again = self.state.take_request(route, msg)
        except ValueError as err:
            self.request_inbox.reject("bad_value", str(err))
            return
        self.credits.learner_asked(msg.learner_version)  # a refused request moves nothing
        self.last_request = time.monotonic()
        self.waits.done("learner")
        if again is not None:
            send(self.router, again, prefix=[route])
            self.credits.served(again.learner_version, batch_generators(again), batch_id=again.msg_id, again=True)
            self.metrics.reserved.inc()

    def _grant(self, route: bytes, request: CreditRequest) -> None:
        """Answer a generator's credit request (``services/buffer/credits.py``)."""
        held = self.store.complete_groups + self.store.incomplete_groups + awaiting_groups(self.state.held)
        grant = self.credits.grant(request, held)
        send(
            self.router,
            CreditGrant(
                sender=self.ctx.instance,
                reply_to=request.msg_id,
                credits=grant.credits,
                learner_version=-1 if self.credits.learner_version is None else self.credits.learner_version,
                epoch=self.epoch,
                reason=grant.reason,
                trained_groups=grant.trained_groups,
            ),
            prefix=[route],
        )

    def _serve_pending(self) -> None:
        served = self.state.serve_pending(self.ctx.instance)
        if served is not None:
            route, batch = served
            send(self.router, batch, prefix=[route])
            self.credits.served(batch.learner_version, batch_generators(batch), batch_id=batch.msg_id)
            self.metrics.observe_batch(batch)

    def _update_metrics(self) -> None:
        self.metrics.observe_store(self.store)
        self.metrics.observe_credits(self.credits)
        if self.state.journal is not None:
            self.metrics.observe_journal(self.state.journal)
