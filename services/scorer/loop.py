"""The reward scorer: rollouts in (PULL), scored rollouts out to the buffer (PUSH).

Rollouts are scored in micro-batches (whatever has arrived, up to
``MAX_BATCH``) so a reward model runs batched. A reward function that raises
loses only that micro-batch: it is logged, counted in
``scoring_errors_total`` and ``rollouts_lost_total``, and the scorer keeps going.
"""

from __future__ import annotations

import logging
import time

import zmq

from streamrl.common.messages import Rollout, ScoredRollout
from streamrl.common.metrics import REWARD_BUCKETS
from streamrl.common.models import configure_torch, select_device
from streamrl.common.service import ServiceContext
from streamrl.common.transport import Inbox, make_socket, send_when_ready
from streamrl.services.scorer.rewards import build_reward

log = logging.getLogger(__name__)

MAX_BATCH = 64


class Scorer:
    """One scorer process; binds ``endpoints.scorers[index]``."""

    def __init__(self, ctx: ServiceContext):
        cfg = ctx.config
        if ctx.index >= len(cfg.endpoints.scorers):
            raise SystemExit(
                f"scorer index {ctx.index} has no endpoint: endpoints.scorers lists "
                f"{len(cfg.endpoints.scorers)}; fix: add one per scorer replica"
            )
        configure_torch(cfg.scorer.threads, seed=cfg.run.seed)
        self.ctx = ctx
        self.reward = build_reward([r.as_dict() for r in cfg.scorer.rewards],
                                   device=select_device(cfg.scorer.device))
        t = cfg.transport
        self.pull = make_socket(ctx.zmq, zmq.PULL, bind=cfg.endpoints.scorers[ctx.index],
                                max_message_bytes=t.max_message_bytes, hwm=t.hwm, security=ctx.security)
        self.push = make_socket(ctx.zmq, zmq.PUSH, connect=[cfg.endpoints.buffer],
                                max_message_bytes=t.max_message_bytes, hwm=t.hwm, security=ctx.security)
        self.inbox = Inbox(ctx.metrics, [Rollout], max_bytes=t.max_message_bytes, socket_name="rollouts")
        m = ctx.metrics
        self.scored = m.counter("rollouts_scored_total", "Rollouts scored and sent to the buffer")
        self.lost = m.counter("rollouts_lost_total", "Rollouts lost (reward errors; stopped while the buffer was full)")
        self.errors = m.counter("scoring_errors_total", "Reward computations that raised")
        self.rewards = m.histogram("reward", "Reward of each scored rollout", buckets=REWARD_BUCKETS)
        self.seconds = m.histogram("scoring_seconds", "Seconds to score one micro-batch")
        self.blocked = m.counter("send_blocked_seconds_total", "Seconds blocked sending to the buffer")

    def run(self) -> None:
        """Score until stopped."""
        log.info("%s scoring on %s with %s", self.ctx.instance, self.ctx.config.endpoints.scorers[self.ctx.index],
                 ", ".join(self.reward.names))
        try:
            while not self.ctx.stop.is_set():
                batch = self._receive_batch()
                if batch:
                    self.score_and_send(batch)
        finally:
            self.pull.close(0)
            self.push.close(0)

    def _receive_batch(self) -> list[Rollout]:
        batch: list[Rollout] = []
        if not self.pull.poll(500):
            return batch
        while len(batch) < MAX_BATCH and self.pull.poll(0):
            msg = self.inbox.decode(self.pull.recv_multipart(copy=False))
            if msg is not None:
                batch.append(msg)
        return batch

    def score_and_send(self, batch: list[Rollout]) -> None:
        """Score a micro-batch and push each scored rollout to the buffer (blocking on backpressure)."""
        start = time.perf_counter()
        try:
            totals, parts = self.reward([r.prompt_text for r in batch], [r.completion_text for r in batch],
                                        [r.metadata for r in batch])
        except Exception:
            log.exception("reward computation failed; %d rollouts lost", len(batch))
            self.errors.inc()
            self.lost.inc(len(batch))
            return
        self.seconds.observe(time.perf_counter() - start)
        for sent, (rollout, total, part) in enumerate(zip(batch, totals, parts)):
            scored = ScoredRollout(sender=self.ctx.instance, rollout=rollout, reward=total,
                                   reward_parts=part, scorer_id=self.ctx.instance)
            if not send_when_ready(self.push, scored, stop=self.ctx.stop, blocked_seconds=self.blocked,
                                   warn_after_s=self.ctx.config.transport.request_timeout_s, peer="the buffer"):
                self.lost.inc(len(batch) - sent)
                log.info("stopped while the buffer was full: %d scored rollouts not sent", len(batch) - sent)
                return
            self.scored.inc()
            self.rewards.observe(total)
