"""The reward scorer's socket loop: rollouts in (PULL), scored rollouts out to the buffer (PUSH).

Rollouts are scored in micro-batches (whatever has arrived, up to
``MAX_BATCH``; :mod:`streamrl.services.scorer.scoring`) so a reward model runs
batched. When the reward raises on a micro-batch, each of its rollouts is scored
alone (``score_each``): only the rollouts whose reward raised are lost, each with
its reason, and their groups are dropped whole (``drop_failed_groups``: a group
cannot be trained without all its members), which the buffer is told (``group_dropped``)
so it evicts what it holds of them and returns their credits to the generators.
Failures are counted and reported (:mod:`streamrl.services.scorer.health`: the
failure fraction, REWARD FAILING) and the scorer keeps going.
"""

from __future__ import annotations

import logging
import time

import zmq

from streamrl.common.human import HumanModelSubscription
from streamrl.common.messages import GroupDropped, Rollout, ScoredRollout
from streamrl.common.models import configure_torch, select_device
from streamrl.common.service import ServiceContext, ServiceLoop
from streamrl.common.transport import send_when_ready, try_send
from streamrl.services.scorer.health import RewardHealth
from streamrl.services.scorer.human import add_human_scores
from streamrl.services.scorer.metrics import ScorerMetrics
from streamrl.services.scorer.reference import ReferencePass
from streamrl.services.scorer.rewards import build_reward
from streamrl.services.scorer.scoring import (
    MAX_BATCH,
    DroppedGroups,
    Scoring,
    drop_failed_groups,
    score_each,
    scorer_endpoint,
)

log = logging.getLogger(__name__)


class ScorerService(ServiceLoop):
    """One scorer process; binds ``endpoints.scorers[index]``."""

    def __init__(self, ctx: ServiceContext):
        super().__init__(ctx)
        cfg = ctx.config
        try:
            self.endpoint = cfg.endpoints.scorer_bind(ctx.local_index) or scorer_endpoint(
                cfg.endpoints.scorers, ctx.local_index
            )
        except ValueError as err:
            raise SystemExit(str(err)) from None
        configure_torch(cfg.scorer.threads, seed=cfg.run.seed)
        self.reward = build_reward(cfg.scorer.rewards, device=select_device(cfg.scorer.device), stop=ctx.stop)
        self.pull = self.socket(zmq.PULL, bind=self.endpoint)
        self.push = self.socket(zmq.PUSH, connect=[cfg.endpoints.buffer])
        self.inbox = ctx.inbox([Rollout], "rollouts")
        self.metrics = ScorerMetrics(ctx.metrics)
        fb = cfg.feedback
        # people in the loop: the feed to the feedback service (a PUB: never blocks, drops when nobody
        # listens) and, for reward shaping, the newest H-hat from it
        self.feed = self.socket(zmq.PUB, connect=[cfg.endpoints.feedback]) if fb.enabled else None
        self.human = None
        if fb.enabled and fb.combination.scores_rollouts:
            self.human = HumanModelSubscription(ctx.zmq, cfg, ctx.metrics, ctx.security)
            self.closing(self.human.close)
        self.reference = ReferencePass(cfg) if cfg.scorer.reference_logprobs else None
        sc = cfg.scorer
        self.health = RewardHealth(
            self.metrics,
            failing_after=sc.failing_after,
            names=self.reward.names,
            failing_fraction=sc.failing_fraction,
            failing_window=sc.failing_window,
        )
        self.dropped_groups = DroppedGroups()
        for reason in ("reward_raised", "group_member_raised"):
            self.metrics.dropped.labels(reason=reason)

    def starting(self) -> None:
        log.info("%s scoring on %s with %s", self.ctx.instance, self.endpoint, ", ".join(self.reward.names))

    def turn(self) -> None:
        """Score the micro-batch that arrived (waiting up to 0.5 s for one)."""
        batch = self._receive_batch()
        if batch:
            self.score_and_send(batch)

    def _receive_batch(self) -> list[Rollout]:
        batch: list[Rollout] = []
        if not self.wait_for(self.pull, 0.5):
            return batch
        while len(batch) < MAX_BATCH and self.pull.poll(0):
            msg = self.inbox.decode(self.pull.recv_multipart(copy=False))
            if msg is not None:
                batch.append(msg)
        return batch

    def score_and_send(self, batch: list[Rollout]) -> None:
        """Score a micro-batch, drop the groups whose reward raised on a member (telling the buffer), and
        push each scored rollout of the others to the buffer (blocking on backpressure)."""
        metrics = self.metrics
        start = time.perf_counter()
        batch, skipped = self.dropped_groups.split(batch)  # members of groups dropped in earlier micro-batches
        scoring = score_each(self.reward, batch, self.ctx.instance) if batch else Scoring()
        if batch:
            self.health.record(batch, scoring.failures, scoring.raised)
        results, notices = drop_failed_groups(batch, scoring, self.ctx.instance)
        mates = len(skipped) + len(scoring.results) - len(results)
        metrics.dropped.labels(reason="reward_raised").inc(len(scoring.failures))
        metrics.dropped.labels(reason="group_member_raised").inc(mates)
        metrics.lost.inc(len(scoring.failures) + mates)
        self.ctx.ledger.add("dropped", len(scoring.failures) + mates)  # measured ledger: survives kill -9
        for notice in notices:
            self.dropped_groups.add(notice.group_id)
            if not self._send(notice):
                self.ctx.ledger.add("unsent", len(results))
                return
        if not results:
            return
        if self.human is not None:
            if (version := self.human.receive()) is not None:
                metrics.human_version.set(version)
            if self.human.view.message is not None:
                try:
                    add_human_scores(self.human.view, results, time.time())
                    metrics.human_scored.inc(len(results))
                except (RuntimeError, ValueError) as err:  # scored without H-hat rather than lost
                    log.warning("H-hat could not score this micro-batch: %s", err)
        metrics.seconds.observe(time.perf_counter() - start)
        if self.reference is not None:  # the learner's reference pass, done here
            metrics.reference_seconds.observe(self.reference.fill(results))
        for sent, scored in enumerate(results):
            if not self._send(scored):
                metrics.lost.inc(len(results) - sent)
                self.ctx.ledger.add("unsent", len(results) - sent)
                log.info("stopped while the buffer was full: %d scored rollouts not sent", len(results) - sent)
                return
            metrics.scored.inc()
            self.ctx.ledger.add("scored")
            metrics.rewards.observe(scored.reward)
            if self.feed is not None and try_send(self.feed, scored):
                metrics.feed_sent.inc()

    def _send(self, message: ScoredRollout | GroupDropped) -> bool:
        """Push ``message`` to the buffer, waiting while it is full (backpressure); False when stopped first."""
        return send_when_ready(
            self.push,
            message,
            stop=self.ctx.stop,
            blocked_seconds=self.metrics.blocked,
            warn_after_s=self.ctx.config.transport.request_timeout_s,
            peer="the buffer",
        )
