"""One PPO learner step on a batch of (possibly stale) rollouts. No sockets here.

A step (Ouyang et al. 2022 "InstructGPT" sec. 3.5; Schulman et al. 2017 PPO):

1. one no-grad pass computes pi_old (the policy before this update), the
   frozen reference's log-probs (unless the scorers sent them with the rollouts,
   ``TrainBatch.ref_logprobs``) and, for ``gae``, the old values; with
   ``learner.reuse_first_pass`` the first minibatch's own forward pass (nothing is
   updated yet) supplies pi_old for its rows and the no-grad pass covers the rest;
2. rewards are normalised with running statistics and clipped;
3. advantages: ``gae`` uses per-token rewards ``-beta * KL_t`` plus the score
   on the last token (InstructGPT eq. 2) and the value head; ``grpo`` / ``rloo``
   use group baselines on the score (minus ``beta * sum_t KL_t`` when the KL
   penalty is in the reward);
4. ``ppo_epochs`` passes over ``minibatches`` shuffled minibatches, each one
   optimizer update of the policy loss (with the configured staleness
   correction), value loss, entropy bonus, KL loss term and PPO-ptx term. The KL
   loss term's tokens were sampled from mu, while the gradient identities of its
   estimators hold for samples of pi (Tang & Munos 2025): each token's term is
   weighted by ``min(pi_old / mu, C)`` (detached; ``C`` = ``is_cap``, or rho-bar
   for ``vtrace``), decoupled PPO's per-token weight, whatever the correction.

The policy version is the learner's step count: one step = one published
version, however many optimizer updates it made.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TypedDict

import torch
from torch import Tensor

from streamrl.common.config import LearnerSection
from streamrl.common.lora import is_lora
from streamrl.common.models import adamw, use_bf16_autocast
from streamrl.common.modes import AdvantageEstimator, Correction, KLPenaltyMode, LossAggregation
from streamrl.common.tensors import fill_padding, masked_mean, masked_var, masked_whiten
from streamrl.services.learner.advantages import gae, group_advantages, per_token_rewards, vtrace
from streamrl.services.learner.batch import ModelOutput, TrainBatch, forward_completions
from streamrl.services.learner.kl_control import make_kl_controller, per_sequence_kl
from streamrl.services.learner.losses import (
    aggregate_tokens,
    kl_to_reference,
    policy_loss,
    sft_loss,
    truncated_token_weights,
    value_loss,
)
from streamrl.services.learner.normalization import RunningMeanStd


class _Aggregation(TypedDict):
    """How every per-token loss term is reduced (the keywords of :func:`aggregate_tokens`)."""

    aggregation: LossAggregation
    max_tokens: int | None


@dataclass
class PtxBatch:
    """A pretraining / SFT minibatch for PPO-ptx.

    Attributes:
        input_ids: ``[B, L]`` int64, right-padded.
        attention_mask: ``[B, L]`` int64.
    """

    input_ids: Tensor
    attention_mask: Tensor


@dataclass
class Targets:
    """What one learner step trains towards, computed once per batch without gradients.

    Attributes:
        old: pi_old outputs (log-probs, values) of the policy before the step, ``[B, T]``.
        ref_logprobs: ``[B, T]`` frozen reference log-probs (nats).
        advantages: ``[B, T]`` float32, 0 on padding.
        returns: ``[B, T]`` value targets (``gae`` only, else None).
        kl_mean: mean per-token KL(pi_old || pi_ref) estimate, nats per token.
        kl_per_sequence: mean over sequences of the summed estimates, nats per sequence
            (what the adaptive controller targets).
        kl_coef: the KL coefficient beta used for this step.
    """

    old: ModelOutput
    ref_logprobs: Tensor
    advantages: Tensor
    returns: Tensor | None
    kl_mean: float
    kl_per_sequence: float
    kl_coef: float


def _kl_tokens(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, estimator) -> tuple[Tensor, Tensor]:
    """Per-token KL estimates to the reference and the mask of the tokens they count on:
    real tokens where both log-probs are finite (under top_p < 1 a token outside the
    nucleus has probability 0 and carries no gradient). Inputs are sanitised *before* the
    estimator, so no inf/NaN reaches a value or a gradient."""
    valid = (mask > 0) & torch.isfinite(logprobs.detach()) & torch.isfinite(ref_logprobs)
    kl = kl_to_reference(fill_padding(logprobs, valid), fill_padding(ref_logprobs, valid), estimator=estimator)
    return kl, valid


def disable_dropout(model: torch.nn.Module) -> None:
    """Make ``model`` deterministic for RL: every ``nn.Dropout`` gets ``p = 0`` (as TRL's
    ``disable_dropout_in_model``) and the model is put in eval mode, which also turns off
    functional dropout keyed on ``module.training`` (e.g. Llama's ``attention_dropout``).

    The learner computes pi_old in a no-grad pass and pi in the update's pass; with dropout
    active in either, pi != pi_old at the same weights and every step would start with a
    spurious ratio (GPT-2 ships dropout 0.1). The trainer never calls ``.train()``:
    gradients flow in eval mode.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    model.eval()


class StatSums:
    """Sums of per-update diagnostics kept as detached device tensors: nothing is copied
    to the host until :meth:`means`, once per learner step (each ``.item()`` would be a
    device sync on a GPU)."""

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}

    def add(self, values: dict[str, Tensor]) -> None:
        """Add each 0-d tensor (detached here) to its running sum."""
        for key, value in values.items():
            value = value.detach().to(torch.float64)
            self._sums[key] = self._sums[key] + value if key in self._sums else value

    def means(self, count: int, extra: dict[str, Tensor] | None = None) -> dict[str, float]:
        """Every sum divided by ``count``, plus the ``extra`` tensors as they are, as python
        floats converted in one transfer."""
        names = list(self._sums) + list(extra or {})
        values = [v / max(count, 1) for v in self._sums.values()] + [
            v.detach().to(torch.float64) for v in (extra or {}).values()
        ]
        if not values:
            return {}
        return dict(zip(names, torch.stack(values).tolist()))


class PPOTrainer:
    """Owns the policy, optional value head, reference model and optimizer.

    Args:
        policy: causal LM being trained (on ``device``).
        reference: frozen copy of the initial policy (eval mode, no grad); None for a LoRA policy
            (:func:`streamrl.common.lora.apply_lora`): the reference is then the policy itself with its
            adapters disabled (PEFT's ``disable_adapter()``), the base weights, with no second copy.
        cfg: the learner config section.
        ptx_sampler: callable returning a :class:`PtxBatch`, required when ``cfg.ptx_coef > 0``.
        value_model: with ``gae``, a separate critic (e.g. :class:`~streamrl.services.learner.
            value_model.ValueModel` initialised from the reward model) used instead of the value
            head on the policy's trunk; trained with learning rate ``cfg.value_lr`` (else ``cfg.lr``).
    """

    def __init__(self, policy, reference, cfg: LearnerSection, *, ptx_sampler=None, value_model=None):
        self.policy = policy
        if reference is None and not is_lora(policy):
            raise ValueError("reference=None needs a LoRA policy (the base with its adapters disabled)")
        self.reference = policy if reference is None else reference
        self._reference_scope = policy.disable_adapter if reference is None else contextlib.nullcontext
        self.cfg = cfg
        self.ptx_sampler = ptx_sampler
        self.device = next(policy.parameters()).device
        self.bf16 = use_bf16_autocast(cfg.autocast_bf16, self.device, "learner.autocast_bf16")
        self.value_head: torch.nn.Linear | None = None
        params = [p for p in policy.parameters() if p.requires_grad]  # LoRA: the adapters only
        self.value_model = value_model if cfg.advantage is AdvantageEstimator.GAE else None
        if cfg.advantage is AdvantageEstimator.GAE and self.value_model is None:
            self.value_head = torch.nn.Linear(policy.config.hidden_size, 1).to(self.device)
            torch.nn.init.zeros_(self.value_head.weight)
            torch.nn.init.zeros_(self.value_head.bias)
            params += list(self.value_head.parameters())
        self.optimizer = adamw(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        if self.value_model is not None:  # its own learning rate (a param group: own Adam moments)
            self.optimizer.add_param_group(
                {"params": list(self.value_model.parameters()), "lr": cfg.value_lr or cfg.lr}
            )
        self.kl_controller = make_kl_controller(cfg.kl_coef, cfg.kl_target_per_sequence, cfg.kl_horizon)
        self.reward_stats = RunningMeanStd()
        for p in reference.parameters() if reference is not None else ():
            p.requires_grad_(False)
        for model in (policy, reference, self.value_head, self.value_model):
            if model is not None:
                disable_dropout(model)

    # ------------------------------------------------------------------ step

    def step(self, batch: TrainBatch, current_version: int) -> dict[str, float]:
        """Run one learner step on ``batch``.

        Args:
            batch: the collated rollouts (any device; moved here).
            current_version: the learner's policy version before this step
                (staleness = current_version - batch.versions).

        Returns:
            Flat dict of diagnostics: ``loss/*``, ``kl``, ``entropy``, ``clip_fraction``,
            ``importance_ratio_mean``/``_max`` (raw, before truncation), ``truncated_fraction``,
            ``ess``/``ess_fraction``, ``grad_norm``, ``reward_mean``, ``staleness_*``, ...
        """
        cfg = self.cfg
        host = batch  # per-batch statistics come from the host copy: no device sync
        batch = batch.to(self.device)
        orders = [self._order(batch) for _ in range(cfg.ppo_epochs)]
        first = None
        if cfg.reuse_first_pass:
            # nothing is updated before the first minibatch: its forward pass is pi_old for its rows
            # (exact, nucleus included), so the no-grad pass runs only over the other rows
            self.policy.eval()
            rows0 = orders[0][0]
            first = (rows0, self._forward(batch.select(rows0)))
        targets = self.targets(batch, first=first)
        old, advantages, returns, beta = targets.old, targets.advantages, targets.returns, targets.kl_coef

        sums = StatSums()  # detached tensors summed over minibatch updates, to floats once per step
        updates = 0
        skipped = 0
        ratio_max = torch.zeros((), dtype=torch.float64, device=self.device)
        self.policy.eval()  # never train mode: pi and pi_old must be the same function (no dropout)
        # every per-token term (policy, value, entropy, KL loss) is aggregated the same way; the
        # fixed-length normaliser is the generation budget (at least the longest completion)
        aggregation: _Aggregation = {
            "aggregation": cfg.loss_aggregation,
            "max_tokens": max(batch.sampling.max_new_tokens, batch.mask.shape[1]),
        }
        cap = cfg.vtrace_rho_bar if cfg.correction is Correction.VTRACE else cfg.is_cap
        for epoch, minibatches in enumerate(orders):
            for k, rows in enumerate(minibatches):
                mb = batch.select(rows)
                t = mb.mask.shape[1]
                out = first[1] if first is not None and epoch == 0 and k == 0 else self._forward(mb)
                pl, ps = policy_loss(
                    out.logprobs,
                    old.logprobs[rows, :t],
                    mb.behaviour_logprobs,
                    advantages[rows, :t],
                    mb.mask,
                    correction=cfg.correction,
                    clip_eps=cfg.clip_eps,
                    dual_clip=cfg.dual_clip,
                    is_cap=cap,
                    is_level=cfg.is_level,
                    is_mode=cfg.is_mode,
                    **aggregation,
                )
                assert out.entropy is not None  # _forward asks for it
                entropy = aggregate_tokens(out.entropy, mb.mask, **aggregation)
                loss = pl - cfg.entropy_coef * entropy
                if out.values is not None:
                    assert old.values is not None and returns is not None  # a critic: GAE targets (targets())
                    vl, vclip = value_loss(
                        out.values,
                        old.values[rows, :t],
                        returns[rows, :t],
                        mb.mask,
                        clip_range=cfg.value_clip,
                        **aggregation,
                    )
                    loss = loss + cfg.vf_coef * vl
                    sums.add({"loss/value": vl, "value_clip_fraction": vclip})
                if cfg.kl_penalty is KLPenaltyMode.LOSS and beta > 0:
                    kl, valid = _kl_tokens(out.logprobs, targets.ref_logprobs[rows, :t], mb.mask, cfg.kl_estimator)
                    weight = truncated_token_weights(old.logprobs[rows, :t], mb.behaviour_logprobs, mb.mask, cap=cap)
                    kl_term = aggregate_tokens(weight * kl, valid, **aggregation)
                    loss = loss + beta * kl_term
                    sums.add({"loss/kl": kl_term})
                if cfg.ptx_coef > 0:
                    ptx = self._ptx_loss()
                    loss = loss + cfg.ptx_coef * ptx
                    sums.add({"loss/ptx": ptx})
                self.optimizer.zero_grad(set_to_none=True)
                self._backward(loss, mb)
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    [p for g in self.optimizer.param_groups for p in g["params"]], cfg.max_grad_norm
                )
                if bool(torch.isfinite(grad_norm)):  # the one device sync per update: skip or step
                    self.optimizer.step()
                else:
                    skipped += 1
                updates += 1
                sums.add(
                    {
                        "loss/total": loss,
                        "loss/policy": pl,
                        "entropy": entropy,
                        "grad_norm": grad_norm,
                        "clip_fraction": ps.clip_fraction,
                        "approx_kl": ps.approx_kl,
                        "importance_ratio_mean": ps.importance_ratio_mean,
                        "truncated_fraction": ps.truncated_fraction,
                        "ess": ps.effective_sample_size,
                        "ess_fraction": ps.ess_fraction,
                        "outside_nucleus_fraction": ps.outside_nucleus_fraction,
                        "dual_clip_fraction": ps.dual_clip_fraction,
                        "masked_fraction": ps.masked_fraction,
                    }
                )
                ratio_max = torch.maximum(ratio_max, ps.importance_ratio_max)
        out_stats = sums.means(updates, extra={"importance_ratio_max": ratio_max})
        out_stats["skipped_updates"] = float(skipped)
        self.kl_controller.update(targets.kl_per_sequence, batch.size)
        staleness = (current_version - host.versions.cpu()).float()
        scores, mask = host.scores.cpu(), host.mask.cpu()
        out_stats.update(
            {
                "kl": targets.kl_mean,
                "kl_per_sequence": targets.kl_per_sequence,
                "kl_coef": beta,
                "reward_mean": float(scores.mean()),
                "reward_std": float(scores.std(unbiased=False)),
                "completion_tokens_mean": float(mask.sum(1).mean()),
                "staleness_min": float(staleness.min()),
                "staleness_mean": float(staleness.mean()),
                "staleness_max": float(staleness.max()),
                "optimizer_updates": float(updates),
                "samples": float(batch.size),
                "tokens": float(mask.sum()),
            }
        )
        return out_stats

    def _amp(self):
        """bf16 autocast of the model passes when ``learner.autocast_bf16`` (opt-in; log-probs, losses and
        the optimizer stay float32: ``forward_completions`` upcasts the logits)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _backward(self, loss: Tensor, mb: TrainBatch) -> None:
        """Backpropagate one minibatch's loss (the data-parallel learner rescales it first:
        ``streamrl.services.learner.distributed``)."""
        loss.backward()

    def _forward(self, mb: TrainBatch) -> ModelOutput:
        """The policy's (and critic's) outputs on a minibatch, with gradients and entropy."""
        with self._amp():
            out = forward_completions(self.policy, mb, value_head=self.value_head, with_entropy=True)
            if self.value_model is not None:
                out.values = self.value_model(mb)
        return out

    def _order(self, batch: TrainBatch) -> list[Tensor]:
        """One epoch's minibatches (row indices): a random permutation split into ``minibatches``
        parts; with ``bucket_by_length``, rows sorted by length (prompt + completion) are split
        instead and the parts shuffled, so each minibatch carries little padding."""
        parts = min(self.cfg.minibatches, batch.size)  # no empty minibatch
        order = torch.randperm(batch.size, device=self.device)
        if not self.cfg.bucket_by_length or parts == 1:
            return list(order.tensor_split(parts))
        lengths = batch.attention_mask.sum(1)[order]
        by_length = order[torch.sort(lengths, stable=True).indices]  # ties in random order
        chunks = list(by_length.tensor_split(parts))
        return [chunks[i] for i in torch.randperm(parts).tolist()]

    @torch.no_grad()
    def _old_outputs(self, batch: TrainBatch, first: tuple[Tensor, ModelOutput] | None) -> ModelOutput:
        """pi_old (and old values) of every row: the first minibatch's outputs for its rows, one
        no-grad pass over the others (over all rows without ``first``). ``[B, T]``, 0 on padding."""
        with self._amp():
            return self._old_outputs_amp(batch, first)

    def _old_outputs_amp(self, batch: TrainBatch, first: tuple[Tensor, ModelOutput] | None) -> ModelOutput:
        if first is None:
            old = forward_completions(self.policy, batch, value_head=self.value_head)
            if self.value_model is not None:
                old.values = self.value_model(batch)
            if old.values is not None:
                old.values = old.values.float()
            return old
        rows0, out0 = first
        rest = torch.ones(batch.size, dtype=torch.bool, device=rows0.device)
        rest[rows0] = False
        parts = [(rows0, out0)]
        if bool(rest.any()):
            rows1 = rest.nonzero().squeeze(1)
            mb = batch.select(rows1)
            out1 = forward_completions(self.policy, mb, value_head=self.value_head)
            if self.value_model is not None:
                out1.values = self.value_model(mb)
            parts.append((rows1, out1))
        shape = batch.mask.shape
        logprobs = torch.zeros(shape, device=batch.mask.device)
        values = torch.zeros(shape, device=batch.mask.device) if out0.values is not None else None
        for rows, out in parts:
            t = out.logprobs.shape[1]
            logprobs[rows, :t] = out.logprobs.detach().float()
            if values is not None and out.values is not None:  # every part has values, or none
                values[rows, :t] = out.values.detach().float()
        return ModelOutput(logprobs=logprobs, entropy=None, values=values)

    @torch.no_grad()
    def targets(self, batch: TrainBatch, *, first: tuple[Tensor, ModelOutput] | None = None) -> Targets:
        """pi_old, reference log-probs and advantages for ``batch`` (already on the device).

        Rewards are normalised (running mean/std) and clipped first. ``gae``: per-token
        rewards ``-beta * KL_t`` plus the score on the last token (InstructGPT eq. 2),
        then GAE with the value head (or, with ``correction = "vtrace"``, V-trace targets
        and advantages from pi_old / mu), whitened if configured. ``grpo``/``rloo``: group
        baselines on the score, minus ``beta * sum_t KL_t`` when the penalty is in the
        reward; no whitening (it would mix groups). Then ``advantage_bonus`` (Q-augmentation)
        is added to each row's advantages, and each row is multiplied by its ``weights``.

        Whitening V-trace advantages only divides them by their masked standard deviation;
        it never subtracts their mean. A V-trace advantage ``rho_s (r_s + gamma v_{s+1} -
        V(x_s))`` (Espeholt et al. 2018, IMPALA, sec. 4.2) already carries its baseline
        ``V(x_s)`` inside the importance weight, and its policy gradient is an expectation
        over the behaviour policy mu with no further weight. Subtracting the batch mean ``b``
        adds ``-b E_mu[grad log pi]``, which is not 0 when mu != pi: in a one-step bandit
        (pi_old = (.5, .5), mu = (.9, .1), rewards (1, 0), V = -0.5, rho-bar = 10) it turns
        the better action's logit gradient from +0.25 to -0.30. Dividing by a positive
        number keeps the direction of every batch's gradient. (The other corrections apply
        their weight ``pi_old / mu`` in the loss, after whitening: there the batch mean is a
        baseline under pi_old and ``E_pi_old[grad log pi] = 0`` at the first update.)

        ``first``: ``(rows, outputs)`` of the first minibatch's forward pass with the current
        weights (``learner.reuse_first_pass``): pi_old of those rows.

        The KL penalty compares pi_old as it samples (truncated to its nucleus when
        ``top_p < 1``) with the untruncated reference at the rollouts' temperature: k1
        estimates KL(pi_old,top-p || pi_ref), the divergence of the distribution that wrote
        the completions. With a nucleus it is at least ``-log ref(nucleus)`` per token, so
        even at pi = ref it is ``-log Z_t`` (``Z_t`` the nucleus mass, at least ``top_p``):
        at most ``-log top_p`` nats per token (0.105 at top_p 0.9), which a
        ``kl_target_per_sequence`` must leave room for.
        """
        cfg, mask = self.cfg, batch.mask
        self.policy.eval()
        old = self._old_outputs(batch, first)
        if batch.ref_logprobs is not None:  # the scorers' reference pass
            ref_logprobs = batch.ref_logprobs
        else:  # the untruncated reference, as the scorers compute it
            with self._amp(), self._reference_scope():
                ref_logprobs = forward_completions(self.reference, batch, truncate=False).logprobs
        kl_tokens = fill_padding(*_kl_tokens(old.logprobs, ref_logprobs, mask, cfg.kl_estimator))
        beta = self.kl_controller.value
        scores = batch.scores
        if cfg.normalize_rewards:
            self.reward_stats.update(scores)
            scores = self.reward_stats.normalize(scores, clip=cfg.reward_clip)
        elif cfg.reward_clip is not None:
            scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
        in_reward = cfg.kl_penalty is KLPenaltyMode.REWARD
        returns = None
        if cfg.advantage is AdvantageEstimator.GAE:
            assert old.values is not None  # GAE comes with a critic: a value head or learner.value_model
            token_rewards = per_token_rewards(scores, kl_tokens if in_reward else None, mask, kl_coef=beta)
            if cfg.correction is Correction.VTRACE:  # off-policy targets: IMPALA eqs. 1-3 on pi_old / mu
                returns, advantages = vtrace(
                    token_rewards,
                    old.values,
                    old.logprobs - batch.behaviour_logprobs,
                    mask,
                    gamma=cfg.gamma,
                    lam=cfg.lam,
                    rho_bar=cfg.vtrace_rho_bar,
                    c_bar=cfg.vtrace_c_bar,
                )
            else:
                advantages, returns = gae(token_rewards, old.values, mask, gamma=cfg.gamma, lam=cfg.lam)
            if cfg.whiten_advantages and cfg.correction is Correction.VTRACE:
                advantages = fill_padding(advantages, mask) * torch.rsqrt(masked_var(advantages, mask) + 1e-8)
            elif cfg.whiten_advantages:
                advantages = masked_whiten(advantages, mask)
        else:
            seq_scores = scores - beta * kl_tokens.sum(1) if in_reward else scores
            seq_adv = group_advantages(
                seq_scores,
                batch.group_ids,
                estimator=cfg.advantage,
                scale=cfg.scale_rewards,
                std_floor=cfg.scale_std_floor,
            )
            advantages = seq_adv.unsqueeze(1).expand_as(mask).clone()
        advantages = fill_padding(advantages, mask)
        if batch.advantage_bonus is not None:  # Q-augmentation: A' = Q + beta_t E H-hat - V; R's critic untouched
            advantages = fill_padding(advantages + batch.advantage_bonus.to(advantages.dtype).unsqueeze(1), mask)
        if batch.weights is not None:  # control-shared rollouts: the loss of row b is weighted by mu/q (1/rho)
            advantages = advantages * batch.weights.to(advantages.dtype).unsqueeze(1)
        return Targets(
            old=old,
            ref_logprobs=ref_logprobs,
            advantages=advantages,
            returns=returns,
            kl_mean=float(masked_mean(kl_tokens, mask)),
            kl_per_sequence=float(per_sequence_kl(kl_tokens, mask)),
            kl_coef=beta,
        )

    def _ptx_loss(self) -> Tensor:
        ptx = self.ptx_sampler()
        ids = ptx.input_ids.to(self.device)
        attention = ptx.attention_mask.to(self.device)
        logits = self.policy(input_ids=ids, attention_mask=attention).logits[:, :-1]
        return sft_loss(logits, ids[:, 1:], attention[:, 1:])

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """Optimizer, value head, KL controller and reward statistics (for checkpoints)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "value_head": self.value_head.state_dict() if self.value_head is not None else None,
            "value_model": self.value_model.state_dict() if self.value_model is not None else None,
            "kl_controller": self.kl_controller.state_dict(),
            "reward_stats": self.reward_stats.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved (the policy weights are loaded separately)."""
        self.optimizer.load_state_dict(state["optimizer"])
        if self.value_head is not None and state.get("value_head") is not None:
            self.value_head.load_state_dict(state["value_head"])
        if self.value_model is not None and state.get("value_model") is not None:
            self.value_model.load_state_dict(state["value_model"])
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.reward_stats.load_state_dict(state["reward_stats"])
