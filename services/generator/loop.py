"""The rollout generator's socket loop: sample with the newest weights, send rollouts to the scorers.

Loop, between generation batches only (so a batch never mixes versions):

1. drain weight announcements; if a newer version exists, fetch, verify and
   load it (an atomic swap: ``load_state_dict`` runs before the next batch);
2. if the newest announced version is still more than ``max_staleness``
   ahead of the loaded one (the fetch failed), pause and retry: data that
   stale would be dropped by the buffer anyway;
3. ask the buffer for generation credits (``generator.credits``; module
   :mod:`streamrl.services.generator.credits`): it grants only groups that can
   still be trained within ``max_staleness``; with none, pause and go back to 1
   (in sync mode: until the learner's next version is loaded);
4. sample ``min(credits, prompts_per_batch)`` x ``group_size`` completions and push one
   ``rollout`` message per completion to the scorers (PUSH round-robins over
   the connected scorers; a full queue blocks here: backpressure).

The version rules live in :mod:`streamrl.services.generator.versions`, the
messages in :mod:`streamrl.services.generator.rollouts`.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence

import numpy as np
import zmq
from transformers import AutoConfig

from streamrl.common.fingerprint import model_fingerprint, same_model
from streamrl.common.human import HumanModelSubscription, beta_at
from streamrl.common.liveness import Waits
from streamrl.common.messages import SamplingParams, Selection
from streamrl.common.models import configure_torch, load_tokenizer, resolve_model_path, select_device, use_bf16_autocast
from streamrl.common.prompts import PromptStream, run_split
from streamrl.common.service import ServiceContext, ServiceLoop
from streamrl.common.transport import send_when_ready
from streamrl.common.weights import FetchStopped, WeightClient, WeightSyncError
from streamrl.services.generator.control import select_candidates
from streamrl.services.generator.credits import CreditClient
from streamrl.services.generator.engine import build_engine
from streamrl.services.generator.metrics import GeneratorMetrics
from streamrl.services.generator.rollouts import group_rollouts
from streamrl.services.generator.sampling import prepare_run_prompts
from streamrl.services.generator.versions import needs_fetch, too_stale

log = logging.getLogger(__name__)


class GeneratorService(ServiceLoop):
    """One rollout generator process (see module docstring)."""

    def __init__(self, ctx: ServiceContext):
        super().__init__(ctx)
        cfg = ctx.config
        self.cfg = cfg
        gen = cfg.generator
        configure_torch(gen.threads, seed=cfg.run.seed + 7919 * (ctx.index + 1))
        self.device = select_device(gen.device)
        path = resolve_model_path(cfg.model.path, cfg.model.cache_path)
        self.tokenizer = load_tokenizer(path)
        bf16 = use_bf16_autocast(gen.autocast_bf16, self.device, "generator.autocast_bf16")  # "auto": where native
        self.engine = build_engine(
            gen.engine,
            path,
            self.tokenizer,
            device=self.device,
            autocast_bf16=bf16,
            max_model_len=gen.max_prompt_tokens + gen.max_new_tokens,
            kv_cache_gib=gen.kv_cache_gib,
            threads=gen.threads,
            seed=cfg.run.seed + 7919 * (ctx.index + 1),
        )
        self.closing(self.engine.close)
        self.fingerprint = model_fingerprint(AutoConfig.from_pretrained(path), self.tokenizer)  # in every rollout
        self.refused_version: int | None = None  # newest announced version refused for another model
        train, _held_out = run_split(gen.prompts, cfg.run.seed)
        self.stream = PromptStream(train, seed=cfg.run.seed + ctx.index)
        self.sampling = SamplingParams(temperature=gen.temperature, top_p=gen.top_p, max_new_tokens=gen.max_new_tokens)
        self.generator_id = f"{ctx.instance}-{uuid.uuid4().hex[:8]}"
        t = cfg.transport
        self.weights = WeightClient(
            ctx.zmq,
            announce_endpoint=cfg.endpoints.weights_announce,
            fetch_endpoint=cfg.endpoints.weights,
            inbox_metrics=ctx.metrics,
            sender=self.generator_id,
            credit=t.weight_credit,
            timeout_s=t.request_timeout_s,
            stop=ctx.stop,
            **ctx.socket_limits,
        )
        self.closing(self.weights.close)
        self.push = self.socket(
            zmq.PUSH, connect=cfg.endpoints.scorers, resolve_every_s=cfg.endpoints.resolve_interval_s
        )
        self.credits = None
        if gen.credits:
            self.credits = CreditClient(
                ctx.zmq,
                endpoint=cfg.endpoints.batches,
                sender=self.generator_id,
                instance=ctx.instance,
                metrics=ctx.metrics,
                timeout_s=t.request_timeout_s,
                stop=ctx.stop,
                **ctx.socket_limits,
            )
            self.closing(self.credits.close)
        self.version: int | None = None
        self.groups_sent = 0
        self.metrics = GeneratorMetrics(ctx.metrics)
        self.waits = Waits(ctx.metrics, warn_after_s=max(5.0, t.request_timeout_s))
        self.learner_silent_after_s = max(5.0, 5 * t.announce_interval_s)
        fb = cfg.feedback
        self.human = None  # action biasing, control sharing: the newest H-hat from the feedback service
        if fb.enabled and fb.combination.selects_candidates:
            self.human = HumanModelSubscription(ctx.zmq, cfg, ctx.metrics, ctx.security)
            self.closing(self.human.close)
            self.rng = np.random.default_rng(cfg.run.seed + 104729 * (ctx.index + 1))

    def starting(self) -> None:
        log.info(
            "%s (%s) waiting for the learner's weights on %s",
            self.ctx.instance,
            self.generator_id,
            self.cfg.endpoints.weights_announce,
        )

    def turn(self) -> None:
        """Load the newest weights, ask for credits, sample and send what was granted."""
        if self.sync_weights() and (admitted := self.admit()):
            self.generate_batch(admitted)

    def _control_sharing(self) -> float:
        """beta_t of action biasing or control sharing for this batch (0: sample plainly), after taking the
        newest H-hat."""
        if self.human is None:
            return 0.0
        if (version := self.human.receive()) is not None:
            self.metrics.human_version.set(version)
        fb = self.cfg.feedback
        return beta_at(fb.beta, fb.beta_decay, self.version or 0) if self.human.view.active else 0.0

    def sync_weights(self) -> bool:
        """Load the newest announced version; return True when generation may proceed."""
        latest = self.weights.poll_announcements(timeout_s=0.0 if self.version is not None else 1.0)
        self._check_learner()
        if latest is None:
            self.waits.waiting("weights", "no weights announced yet (is the learner up?)")
            return False
        self.metrics.latest_version.set(latest.version)
        if not self._same_model(latest):
            return False
        if needs_fetch(self.version, latest.version):
            start = time.perf_counter()
            # a fetch blocks while it retries: the live gauge shows it (a frozen learner never reads 0)
            self.waits.waiting("learner", f"fetching version {latest.version} from {self.cfg.endpoints.weights}")
            try:
                fetched = self.weights.fetch(latest)
            except FetchStopped:
                return False  # the service is stopping: the loop ends
            except WeightSyncError as err:
                self.metrics.weight_errors.inc()
                log.warning("weight fetch failed: %s", err)
            else:
                self.waits.done("learner")
                loaded = time.perf_counter()
                self.engine.load_fetched(self.weights, fetched)  # in place; complete before the next batch
                self.version = fetched.version
                self.metrics.fetch_seconds.observe(loaded - start)
                self.metrics.load_seconds.observe(time.perf_counter() - loaded)
                self.metrics.weight_bytes.inc(fetched.nbytes)
                self.metrics.weight_syncs.inc()
                self.metrics.version.set(self.version)
                log.info(
                    "loaded policy version %d (%.1f MB%s, fetch %.2fs, verify %.2fs)",
                    self.version,
                    fetched.nbytes / 1e6,
                    f", LoRA adapter rank {fetched.adapter.rank} merged" if fetched.adapter else "",
                    fetched.transfer_s,
                    fetched.verify_s,
                )
        if too_stale(self.version, latest.version, self.cfg.run.max_staleness):
            self.waits.waiting(
                "weights",
                f"loaded version {self.version}, newest {latest.version}: more than "
                f"max_staleness={self.cfg.run.max_staleness} behind and the fetch failed",
            )
            wait_start = time.perf_counter()
            self.ctx.stop.wait(0.2)
            self.metrics.wait_weights.inc(time.perf_counter() - wait_start)
            return False
        self.waits.done("weights")
        return True

    def admit(self) -> int:
        """Groups this generator may sample now: its credits from the buffer (``prompts_per_batch`` at
        most; all of them when ``generator.credits`` is off); 0 after pausing briefly."""
        want = self.cfg.generator.prompts_per_batch
        if self.credits is None:
            return want
        assert self.version is not None  # sync_weights loaded one
        grant = self.credits.request(policy_version=self.version, groups_sent=self.groups_sent, want=want)
        if grant is not None and self.groups_sent:
            self.metrics.useful.set(grant.trained_groups / max(1, self.groups_sent))
        if grant is not None and grant.credits > 0:
            self.waits.done("credits")
            self.metrics.credits.inc(grant.credits)
            return min(grant.credits, want)
        reason = "the buffer does not answer credit requests" if grant is None else grant.reason
        self.waits.waiting("credits", f"no generation credit: {reason}")
        wait_start = time.perf_counter()
        self.ctx.stop.wait(0.1)
        self.metrics.wait_credits.inc(time.perf_counter() - wait_start)
        return 0

    def _same_model(self, latest) -> bool:
        """False (refuse to load, wait) when the learner announces another model config or tokenizer:
        counted once per announced version in ``messages_rejected_total{socket="weights_announce",
        reason="model_mismatch"}``, logged (rate-limited), and reported as a wait on ``weights``."""
        if same_model(self.fingerprint, latest.model_fingerprint):
            return True
        why = (
            f"the learner's model fingerprint {latest.model_fingerprint} != this generator's {self.fingerprint} "
            f"(another model config or tokenizer): weights not loaded; fix: give every service the same "
            f"model.path ({self.cfg.model.path})"
        )
        if self.refused_version != latest.version:
            self.refused_version = latest.version
            self.weights.announce_inbox.reject("model_mismatch", f"version {latest.version}: {why}")
        self.waits.waiting("weights", why)
        self.ctx.stop.wait(0.2)
        return False

    def _check_learner(self) -> None:
        """Notice a learner that went silent (announcements come every ``announce_interval_s``)."""
        silent = self.weights.seconds_since_announce()
        if silent is not None and silent > self.learner_silent_after_s:
            self.waits.waiting(
                "learner",
                f"no announcement for {silent:.0f}s; generating with version {self.version} until the learner is back",
            )
        else:
            self.waits.done("learner")

    def generate_batch(self, num_groups: int | None = None) -> None:
        """Sample ``num_groups`` groups (default ``prompts_per_batch``) with the loaded weights and send
        every rollout."""
        gen = self.cfg.generator
        prompts = self.stream.next_batch(gen.prompts_per_batch if num_groups is None else num_groups)
        texts, ids = prepare_run_prompts(self.tokenizer, prompts, self.cfg)
        version = self.version
        assert version is not None  # sync_weights loaded one
        self.metrics.in_flight.set(len(prompts))
        start = time.perf_counter()
        beta_t = self._control_sharing()
        k = self.cfg.feedback.candidates if beta_t > 0 else 1
        groups = self.engine.sample(ids, group_size=gen.group_size * k, sampling=self.sampling)
        selections: Sequence[list[Selection] | None] = [None] * len(groups)
        if k > 1:
            assert self.human is not None  # k > 1 only with an H-hat (_control_sharing)
            groups, chosen_by = select_candidates(
                self.human.view,
                groups,
                group_size=gen.group_size,
                k=k,
                beta_t=beta_t,
                rng=self.rng,
                now=time.time(),
                combination=self.cfg.feedback.combination,
            )
            selections = chosen_by
            chosen = sum(s.by_model for group in chosen_by for s in group)
            self.metrics.control_shared.inc(sum(len(group) for group in chosen_by))
            self.metrics.selected_by_model.inc(chosen)
        self.metrics.batch_seconds.observe(time.perf_counter() - start)
        self.metrics.in_flight.set(0)
        unsent = sum(len(group) for group in groups)
        for prompt, text, group, selected in zip(prompts, texts, groups, selections):
            rollouts = group_rollouts(
                generator_id=self.generator_id,
                group_number=self.groups_sent,
                prompt=prompt,
                prompt_text=text,
                completions=group,
                version=version,
                sampling=self.sampling,
                selections=selected,
            )
            self.groups_sent += 1
            for rollout in rollouts:
                rollout.model_fingerprint = self.fingerprint
                if not send_when_ready(
                    self.push,
                    rollout,
                    stop=self.ctx.stop,
                    blocked_seconds=self.metrics.blocked,
                    warn_after_s=self.cfg.transport.request_timeout_s,
                    peer="the scorers",
                ):
                    self.metrics.lost.inc(unsent)
                    log.info("stopped while the scorers were full: %d sampled rollouts not sent", unsent)
                    return
                unsent -= 1
                self.metrics.rollouts.inc()
                self.ctx.ledger.add("sent")
                self.metrics.tokens.inc(len(rollout.completion_tokens))
