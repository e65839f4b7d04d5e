"""The learner service's socket loop: request batches from the buffer, train, publish versioned weights.

Per step: ask the buffer for ``groups_per_step`` complete groups (DEALER ->
ROUTER; the request is re-sent when the buffer stays silent, e.g. after a
restart), run one :class:`PPOTrainer` step, bump the version, append the
rollout ids trained on to ``trained.jsonl`` (the learner's ledger),
checkpoint every ``checkpoint_every`` steps, publish the new weights, and log
diagnostics (``metrics.jsonl`` + console + Prometheus).

Crash safety. On start the learner resumes from the newest complete
checkpoint in ``<output_dir>/checkpoints`` (weights, optimizer, RNG, step,
version). The checkpoint is written *before* its version is published, and
``published_version`` records the newest version ever published; a learner
that resumes behind it (killed between checkpoints) continues at
``published + 1``, so versions never go backwards anywhere. Each batch request
states the version of the newest checkpoint (``durable_version``) and the version
this process started at (``resumed_at``): the buffer holds every batch served
since that checkpoint and serves the ones a killed learner trained but never
checkpointed again (restamped) before new data, so nothing trained is lost with
any ``checkpoint_every``. A resumed learner moves the ``trained.jsonl`` lines of
its rolled-back steps to ``rolled_back.jsonl`` (durable-ledger rules in
``records.py``), so ``trained.jsonl`` holds each step once.

The pure parts live beside this module: the version rules in ``versions.py``,
the vocabulary check of a received batch in ``intake.py``, the per-step record,
ledger line and log line in ``records.py``, the metrics in ``metrics.py``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
import zmq

from streamrl.common.fingerprint import model_fingerprint
from streamrl.common.human import beta_at, human_terms
from streamrl.common.liveness import Waits
from streamrl.common.lora import adapter_spec, is_lora, wire_state
from streamrl.common.messages import Batch, BatchRequest
from streamrl.common.models import configure_torch, select_device
from streamrl.common.modes import HumanCombination
from streamrl.common.service import ServiceContext, ServiceLoop
from streamrl.common.tracking import Tracker
from streamrl.common.transport import try_send
from streamrl.common.weights import WeightServer
from streamrl.services.learner.batch import collate, split_by_sampling
from streamrl.services.learner.build import build_trainer
from streamrl.services.learner.checkpoint import latest_checkpoint, save_checkpoint
from streamrl.services.learner.diagnosis import data_wait_reason
from streamrl.services.learner.distributed import init_distributed
from streamrl.services.learner.intake import split_in_vocabulary, split_same_model
from streamrl.services.learner.metrics import LearnerMetrics
from streamrl.services.learner.records import append_line, ledger_line, roll_back_ledger, step_log_line, step_record
from streamrl.services.learner.versions import continue_at, read_published_version, write_published_version

log = logging.getLogger(__name__)


class LearnerService(ServiceLoop):
    """The single learner process."""

    def __init__(self, ctx: ServiceContext):
        super().__init__(ctx)
        cfg = ctx.config
        lc = cfg.learner
        self.cfg = cfg
        configure_torch(lc.threads, seed=cfg.run.seed)
        # learner.world_size > 1: rank 0 of a data-parallel learner (distributed.py; the others launch.run_worker)
        self.dist, self.device = init_distributed(lc, select_device(lc.device))
        self.output = Path(cfg.run.output_dir)
        self.checkpoints = self.output / "checkpoints"
        resume = latest_checkpoint(self.checkpoints)
        self.trainer, self.tokenizer, state = build_trainer(cfg, self.device, resume, dist=self.dist)
        if self.dist is not None:
            self.closing(self.trainer.close)  # the other ranks stop after the final checkpoint
        policy = self.trainer.policy
        self.step = 0
        self.version = 0
        if resume is not None:
            self.step, self.version = int(state["step"]), int(state["version"])
            log.info("resumed from %s at step %d, version %d", resume, self.step, self.version)
        self.durable_version = self.version  # the newest checkpoint's (0: the initial weights)
        self.published_path = self.output / "published_version"
        published = read_published_version(self.published_path)
        version = continue_at(self.version, published)
        if version != self.version:
            log.warning(
                "version %d was published after the newest checkpoint (version %d): continuing at "
                "version %d so that versions never go backwards",
                published,
                self.version,
                version,
            )
            self.version = version
        self.resumed_at = self.version  # names this process in batch requests (durable_version rules)
        self.trained_path = self.output / "trained.jsonl"
        rolled_back = roll_back_ledger(self.trained_path, self.step)
        if rolled_back:
            log.warning(
                "steps %s were trained after the newest checkpoint (step %d) and are lost with the killed "
                "learner: their ledger lines moved to rolled_back.jsonl, the buffer serves their batches "
                "again (durable_version)",
                rolled_back,
                self.step,
            )
        t = cfg.transport
        self.weights = WeightServer(
            ctx.zmq,
            announce_endpoint=cfg.endpoints.bind_address("weights_announce"),
            fetch_endpoint=cfg.endpoints.bind_address("weights"),
            metrics=ctx.metrics,
            sender=ctx.instance,
            announce_interval_s=t.announce_interval_s,
            dtype=t.weight_dtype,
            chunk_bytes=t.weight_chunk_bytes,
            peer_max_bytes=2 * t.weight_credit * t.weight_chunk_bytes,
            **ctx.socket_limits,
        )
        self.closing(self.weights.close)
        self.dealer = self.socket(zmq.DEALER, connect=[cfg.endpoints.batches])
        self.inbox = ctx.inbox([Batch], "batches")
        self.fingerprint = model_fingerprint(policy.config, self.tokenizer)  # in every announcement
        self.weights.model_fingerprint = self.fingerprint  # with learner.lora: the base's (PEFT forwards .config)
        self.weights.adapter = adapter_spec(policy) if is_lora(policy) else None  # then only adapters are sent
        self.metrics = LearnerMetrics(ctx.metrics)
        self.refusals_logged: set[str] = set()
        self.waits = Waits(ctx.metrics, warn_after_s=cfg.transport.request_timeout_s * 3)
        self.log_path = self.output / "metrics.jsonl"
        self.tracker = Tracker.for_run(cfg, self.step)  # TensorBoard (+ W&B): docs/metrics.md, "Tracking"
        self.closing(self.tracker.close)

    # ------------------------------------------------------------------ main

    def run(self) -> None:
        """Train until ``total_steps`` or a stop signal; checkpoint at the end."""
        super().run()
        log.info("learner finished at step %d, version %d", self.step, self.version)

    def starting(self) -> None:
        self.output.mkdir(parents=True, exist_ok=True)
        self.publish()

    def more(self) -> bool:
        return self.step < self.cfg.learner.total_steps and super().more()

    def turn(self) -> None:
        """Wait for a batch (None: stopped while waiting) and train one step on it."""
        waited_from = time.perf_counter()
        batch = self.fetch_batch()
        if batch is not None:
            self.train_on(batch, time.perf_counter() - waited_from)

    def finishing(self) -> None:
        """The final checkpoint (unless this step has one)."""
        if self.step > 0 and not (self.checkpoints / f"step-{self.step:06d}").exists():
            self.save()

    def train_on(self, batch: Batch, wait_s: float) -> dict:
        """One learner step on ``batch``: train, ledger, checkpoint (when due), publish, log.

        Returns:
            The record appended to ``metrics.jsonl``.
        """
        started = time.perf_counter()
        tb = collate(batch.rollouts, pad_id=self.tokenizer.pad_token_id)
        human = self._human_terms(batch, tb)  # before the step: shaped rewards and control-sharing weights
        trained_at = self.version
        stats = self.trainer.step(tb, trained_at)
        self.step += 1
        self.version += 1
        stats.update(human)
        train_s = time.perf_counter() - started
        # the ledger is on disk before the checkpoint that makes the step permanent
        append_line(self.trained_path, ledger_line(self.step, self.version, batch), fsync=True)
        if self.step % self.cfg.learner.checkpoint_every == 0:
            self.save()
        publish_s = self.publish()
        record = step_record(
            step=self.step,
            version=self.version,
            now=time.time(),
            stats=stats,
            batch=batch,
            behaviour_versions=tb.versions.tolist(),
            wait_s=wait_s,
            train_s=train_s,
            publish_s=publish_s,
        )
        self.metrics.observe_step(record, staleness=(trained_at - tb.versions).tolist())
        append_line(self.log_path, json.dumps(record))
        log.info("%s", step_log_line(record, self.cfg.learner.total_steps))
        self.tracker.log(record)
        return record

    def _human_terms(self, batch: Batch, tb) -> dict:
        """TAMER+RL (``streamrl.common.human``): add beta_t * E * H-hat to the rewards under reward shaping
        or to the advantages under Q-augmentation (beta_t = beta * beta_decay^step) and weight rollouts
        selected among K candidates (action biasing, control sharing) by 1/rho; returns the
        ``human/*`` statistics for the step record (none when no human terms exist)."""
        fb = self.cfg.feedback
        terms = human_terms(
            batch.rollouts, combination=fb.combination, beta_t=beta_at(fb.beta, fb.beta_decay, self.step)
        )
        if not fb.enabled and terms.stats["human/selected_fraction"] == 0:
            return {}
        terms.stats["human/env_reward_mean"] = float(tb.scores.mean())
        tb.scores = tb.scores + torch.from_numpy(terms.shaping)
        tb.weights = torch.from_numpy(terms.weights)
        if fb.combination is HumanCombination.Q_AUGMENTATION:
            tb.advantage_bonus = torch.from_numpy(terms.bonus)
        return terms.stats

    def fetch_batch(self) -> Batch | None:
        """Ask the buffer for a batch and wait; None when stopped.

        Raises:
            RuntimeError: no batch within ``learner.batch_timeout_s`` seconds.
        """
        request = BatchRequest(
            sender=self.ctx.instance,
            learner_version=self.version,
            num_groups=self.cfg.learner.groups_per_step,
            durable_version=self.durable_version,
            resumed_at=self.resumed_at,
        )
        start = time.perf_counter()
        sent = self._request(request)
        try:
            return self._await_batch(request, start, sent)
        finally:
            self.metrics.wait.inc(time.perf_counter() - start)
            self.waits.done("data")

    def _await_batch(self, request: BatchRequest, start: float, sent: bool) -> Batch | None:
        lc, t = self.cfg.learner, self.cfg.transport
        last_sent = start
        while not self.ctx.stop.is_set():
            if self.wait_for(self.dealer, 0.5 if sent else 0.1):
                msg = self.inbox.decode(self.dealer.recv_multipart(copy=False))
                if msg is None or not msg.rollouts:
                    continue
                if msg.learner_version != self.version:
                    self.metrics.unexpected.inc()
                    log.info(
                        "ignoring a batch for version %d (now %d): a late answer to a re-sent request",
                        msg.learner_version,
                        self.version,
                    )
                    continue
                received = msg.rollouts
                msg.rollouts = self._one_sampling(self._in_vocabulary(msg.rollouts))
                if len(msg.rollouts) < len(received):  # the ledger of what was accepted but never trained
                    kept = {s.rollout.rollout_id for s in msg.rollouts}
                    append_line(
                        self.output / "refused.jsonl",
                        json.dumps(
                            {
                                "version": self.version,
                                "rollout_ids": [
                                    s.rollout.rollout_id for s in received if s.rollout.rollout_id not in kept
                                ],
                            }
                        ),
                        fsync=True,
                    )
                if not msg.rollouts:  # every rollout refused: the buffer forgets that batch; ask again
                    request.refused_batch = msg.msg_id
                    sent = self._request(request)
                    last_sent = time.perf_counter()
                    continue
                return msg
            now = time.perf_counter()
            self.waits.waiting("data", lambda: data_wait_reason(self.cfg))  # names a failing reward
            if now - start > lc.batch_timeout_s:
                raise RuntimeError(
                    f"gave up after learner.batch_timeout_s = {lc.batch_timeout_s:.0f}s: {data_wait_reason(self.cfg)}"
                )
            if not sent or now - last_sent > t.request_timeout_s:
                if sent:
                    log.info(
                        "waiting %.0fs for a batch of %d groups (version %d); re-sending the request",
                        now - start,
                        lc.groups_per_step,
                        self.version,
                    )
                sent = self._request(request)  # not connected yet: tried again in 0.1 s
                last_sent = now
        return None

    def _request(self, request: BatchRequest) -> bool:
        """Send (or re-send) the batch request without blocking; False while the buffer is not connected."""
        request.sent_at = time.time()
        return try_send(self.dealer, request)

    def _in_vocabulary(self, rollouts: list) -> list:
        """The rollouts of this model (fingerprint) whose token ids all index the policy's embedding.
        A rollout from a generator with another model config or tokenizer is counted in
        ``messages_rejected_total{reason="model_mismatch"}``; the decoder cannot know the vocabulary,
        and a larger id would crash the step, so such a rollout is counted under ``bad_value``; both
        are left out (each reason logged, rate-limited)."""
        rollouts, foreign = split_same_model(rollouts, self.fingerprint)
        for s in foreign:
            self.inbox.reject(
                "model_mismatch",
                f"rollout {s.rollout.rollout_id} of generator {s.rollout.generator_id}: "
                f"model fingerprint {s.rollout.model_fingerprint} != the learner's {self.fingerprint} "
                "(another model config or tokenizer); fix: give every service the same model.path",
            )
        vocab = self.trainer.policy.get_input_embeddings().num_embeddings
        kept, refused = split_in_vocabulary(rollouts, vocab)
        for s in refused:
            self.inbox.reject("bad_value", f"rollout {s.rollout.rollout_id}: a token id >= vocabulary size {vocab}")
        return kept

    def _one_sampling(self, rollouts: list) -> list:
        """The rollouts that share the batch's most common sampling distribution (see
        ``split_by_sampling``); the others are counted in ``rollouts_refused_total{reason}``
        and each reason is logged once."""
        if not rollouts:
            return rollouts
        kept, refused = split_by_sampling(rollouts)
        for reason, items in refused.items():
            self.metrics.refused.labels(reason=reason).inc(len(items))
            if reason not in self.refusals_logged:
                self.refusals_logged.add(reason)
                log.warning(
                    "refused %d rollouts sampled with %s (first: generator %s); the learner trains one "
                    "sampling distribution per batch, here %s (logged once per reason)",
                    len(items),
                    items[0].rollout.sampling,
                    items[0].rollout.generator_id,
                    kept[0].rollout.sampling,
                )
        return kept

    def publish(self) -> float:
        """Publish the current weights as ``self.version``; returns the seconds the loop was blocked.

        ``published_version`` is updated (atomically) before the weights leave the process.
        Only the snapshot (a copy into a reused blob) runs here; hashing, announcing and
        serving run in the weight server's threads while the next step trains.
        """
        start = time.perf_counter()
        write_published_version(self.published_path, self.version)
        self.weights.publish_state_dict(wire_state(self.trainer.policy), self.version)
        seconds = time.perf_counter() - start
        self.metrics.publish_seconds.observe(seconds)
        self.metrics.version.set(self.version)
        return seconds

    def save(self) -> Path:
        """Write a checkpoint of the current step and version; returns its folder. The next batch
        request tells the buffer that everything trained so far is durable (``durable_version``)."""
        folder = save_checkpoint(
            self.checkpoints,
            step=self.step,
            version=self.version,
            policy=self.trainer.policy,
            tokenizer=self.tokenizer,
            trainer_state=self.trainer.state_dict(),
            keep=self.cfg.learner.keep_checkpoints,
        )
        self.durable_version = self.version
        return folder
