"""Pure tensor math for the learner's losses.

Conventions shared by every function here:

- ``B`` = batch of completions, ``T`` = completion length (right-padded),
  ``V`` = vocabulary size.
- A mask is a ``[B, T]`` tensor, ``bool`` or floating point; a non-zero entry
  (``True`` / ``1.0``) marks a real completion token. Completions are right
  padded: positions ``0 .. len-1`` of a row are real.
- Aggregation is a masked token mean over the whole batch,
  ``sum(x * mask) / clamp(sum(mask), min=1)``; an all-padding batch gives 0.
- Padded positions may hold garbage (NaN, inf, huge numbers). Every function
  that takes a mask replaces padded entries with a harmless constant through
  ``torch.where`` *before* any arithmetic (multiplying by the mask would not do:
  ``NaN * 0 == NaN``), so garbage never changes an output or a gradient, and
  the gradient reaching a padded position is exactly 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from streamrl.common.modes import Correction, ISLevel, ISMode, KLEstimator, LossAggregation
from streamrl.common.tensors import bool_mask, fill_padding, masked_mean

__all__ = [
    "PolicyLossStats",
    "aggregate_tokens",
    "entropy_from_logits",
    "kl_to_reference",
    "nucleus_mask",
    "policy_loss",
    "sft_loss",
    "token_logprobs",
    "truncated_token_weights",
    "value_loss",
]


LOG_STAT_MAX = 700.0
"""Log-space statistics are clamped here before ``exp`` (e^700 ~ 1e304 < float64 max)."""

LOG_RATIO_CLAMP = 20.0
"""Log-ratios are clamped to ``[-20, 20]`` before ``exp`` (as veRL does): a ratio of
e^20 ~ 5e8 is already far outside any clip range, and ``exp`` of a larger log-ratio
overflows (NaN or inf loss, a skipped minibatch)."""


# --------------------------------------------------------------------------- helpers


def _member(enum: type[Enum], value: Any, name: str) -> Any:
    try:
        return enum(value)
    except ValueError:
        raise ValueError(f"{name} must be one of {[e.value for e in enum]}, got {value!r}") from None


def _check_same_shape(**tensors: Tensor) -> torch.Size:
    """Check every tensor is 2-D ``[B, T]`` and all shapes agree; return the shape."""
    items = list(tensors.items())
    first_name, first = items[0]
    if first.dim() != 2:
        raise ValueError(f"{first_name} must be [B, T], got shape {tuple(first.shape)}")
    for name, t in items[1:]:
        if t.shape != first.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but {first_name} has {tuple(first.shape)}; "
                "all per-token inputs must be [B, T] with the same B and T"
            )
    return first.shape


def aggregate_tokens(
    x: Tensor, mask: Tensor, aggregation: LossAggregation = LossAggregation.TOKEN_MEAN, *, max_tokens: int | None = None
) -> Tensor:
    """Reduce per-token losses ``[B, T]`` to one number (a :class:`LossAggregation`)::

        token_mean        sum_{b,t} m x / sum_{b,t} m               (DAPO, Yu et al. 2025)
        sequence_mean     mean_{b: len_b > 0} (sum_t m x / len_b)   (GRPO, Shao et al. 2024 eq. 3)
        fixed_length_sum  sum_{b,t} m x / (B * max_tokens)          (Dr. GRPO, Liu et al. 2025)

    Args:
        x: ``[B, T]`` float per-token values (may carry grad); garbage in padding is ignored.
        mask: ``[B, T]`` bool or float, non-zero = real token.
        aggregation: a :class:`LossAggregation` (or its string value).
        max_tokens: the generation budget ``max_new_tokens`` (``fixed_length_sum`` only).

    Returns:
        0-d tensor, dtype of ``x``; 0 when no token is real.

    Raises:
        ValueError: unknown aggregation; ``fixed_length_sum`` without a positive ``max_tokens``;
            ``mask`` not of ``x``'s shape.
    """
    mode = _member(LossAggregation, aggregation, "aggregation")
    m = bool_mask(mask, x.shape)
    if mode is LossAggregation.TOKEN_MEAN:
        return masked_mean(x, m)
    if mode is LossAggregation.SEQUENCE_MEAN:
        has_tokens = m.any(dim=1)
        return masked_mean(masked_mean(x, m, dim=1), has_tokens)
    if max_tokens is None or max_tokens < 1:
        raise ValueError(f"fixed_length_sum needs max_tokens >= 1 (the generation budget), got {max_tokens}")
    return fill_padding(x, m).sum() / (max(x.shape[0], 1) * max_tokens)


# --------------------------------------------------------------------------- policy loss


@dataclass(frozen=True)
class PolicyLossStats:
    """Diagnostics of one :func:`policy_loss` call.

    Each field is a detached 0-d float64 tensor on the loss's device, so computing
    them costs no device sync; :meth:`floats` converts them all at once (one sync).
    All statistics are over real (masked-in) tokens of the whole batch.

    Attributes:
        clip_fraction: fraction of tokens with ``|r - 1| > clip_eps`` where ``r``
            is the ratio that gets clipped (``pi/mu`` for ``none``, ``pi/pi_old``
            otherwise); CleanRL's ``clipfrac``.
        approx_kl: mean k3 estimate of KL(pi_old || pi):
            ``(rho - 1) - log rho`` with ``rho = pi / pi_old`` (CleanRL's ``approx_kl``),
            ``log rho`` clamped to ``+-LOG_RATIO_CLAMP``; 0 on tokens with ``pi_old = 0``.
        importance_ratio_mean: mean of the raw importance weight ``pi_old / mu``
            *before* truncation. For ``tis`` at sequence level this is the sequence
            weight ``prod_t pi_old/mu`` broadcast to each token of its sequence (the
            weight ``tis`` actually truncates); otherwise the per-token ratio.
        importance_ratio_max: max of the same raw weight. Both are 1.0 when
            there are no tokens; both are computed in log space and saturate at
            ``exp(LOG_STAT_MAX)`` (~1e304) instead of overflowing.
        truncated_fraction: fraction of tokens whose raw weight exceeds
            ``is_cap`` and was therefore truncated (``is_mode = "truncate"``). Always
            0.0 for ``none``, which truncates nothing.
        effective_sample_size: ``(sum w)^2 / sum w^2`` over tokens, ``w`` the
            truncated weights actually applied (``tis``: sequence weight per
            token; ``decoupled``: per-token weight; ``none``: ``pi/mu``
            detached, unclipped). 0.0 when there are no tokens.
        ess_fraction: ``effective_sample_size / n_tokens`` in ``(0, 1]``
            (0.0 when there are no tokens).
        outside_nucleus_fraction: fraction of tokens with ``pi_old = 0``: sampled by mu
            outside pi_old's nucleus (``top_p < 1`` only); their weight is 0, which
            the ratio statistics and the ESS include.
        dual_clip_fraction: fraction of tokens where the dual clip bound ``c A`` was
            active (``A < 0`` and the clipped objective below it); 0 without dual clip.
        masked_fraction: fraction of tokens whose weight exceeded ``is_cap`` and was set
            to 0 (``is_mode = "mask"``, AReaL); 0 in ``truncate`` mode.
    """

    clip_fraction: Tensor
    approx_kl: Tensor
    importance_ratio_mean: Tensor
    importance_ratio_max: Tensor
    truncated_fraction: Tensor
    effective_sample_size: Tensor
    ess_fraction: Tensor
    outside_nucleus_fraction: Tensor
    dual_clip_fraction: Tensor
    masked_fraction: Tensor

    def tensors(self) -> dict[str, Tensor]:
        """The statistics by field name (detached 0-d tensors)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def floats(self) -> dict[str, float]:
        """The statistics as python floats, converted in one device transfer."""
        named = self.tensors()
        return dict(zip(named, torch.stack(list(named.values())).tolist()))


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    behaviour_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    correction: Correction,
    clip_eps: float,
    is_cap: float,
    dual_clip: float | None = None,
    is_level: ISLevel = ISLevel.SEQUENCE,
    is_mode: ISMode = ISMode.TRUNCATE,
    aggregation: LossAggregation = LossAggregation.TOKEN_MEAN,
    max_tokens: int | None = None,
) -> tuple[Tensor, PolicyLossStats]:
    """Clipped policy-gradient loss with a staleness correction.

    Notation per token ``t``: ``pi`` = ``exp(logprobs)`` (current policy, carries
    the gradient), ``pi_old`` = ``exp(old_logprobs)`` (learner policy before this
    update), ``mu`` = ``exp(behaviour_logprobs)`` (the generator that sampled the
    token), ``A`` = advantage, ``e`` = ``clip_eps``, ``C`` = ``is_cap``,
    ``clip(r) = clamp(r, 1-e, 1+e)``. The loss is the masked token mean of ``L_t``:

    - ``Correction.NONE`` -- PPO-clip with the behaviour policy as theta'
      (Schulman et al. 2017, "Proximal Policy Optimization Algorithms", eq. 7)::

          r = pi / mu,   L = -min(r A, clip(r) A)

    - ``Correction.TIS`` -- truncated importance sampling applied to PPO anchored at
      pi_old. ``is_level = "sequence"`` (default)::

          r = pi / pi_old,
          w = min(prod_{t in seq} pi_old_t / mu_t, C)    (one weight per sequence)
          L = -min(w r A, w clip(r) A)

      The product is taken in log space, ``exp(min(sum_t (old - behaviour), log C))``,
      so it never overflows. Every token of a sequence shares its weight: the
      correction treats the whole completion as one action, which is unbiased for
      sequence-level rewards but has higher variance than per-token weights.
      ``is_level = "token"`` truncates per step, as IMPALA's rho-bar (Espeholt et al.
      2018, eq. 1): ``w_t = min(pi_old_t / mu_t, C)``, the same objective as
      ``decoupled``.

    - ``Correction.DECOUPLED`` -- decoupled PPO with a *per-token* weight
      (Hilton et al. 2022, "Batch size-invariance for policy optimization", sec. 3,
      the decoupled clipped objective with pi_old as the proximal policy; AReaL,
      Fu et al. 2025, its decoupled PPO objective)::

          r = pi / pi_old,   w_t = min(pi_old_t / mu_t, C),
          L = -w_t min(r A, clip(r) A)

    - ``Correction.VTRACE`` -- the advantages are IMPALA's V-trace policy-gradient
      advantages ``rho_s (r_s + gamma v_{s+1} - V(x_s))`` (:func:`~streamrl.services.
      learner.advantages.vtrace`), which already carry the truncated weight
      ``rho_s = min(rho_bar, pi_old/mu)``; the loss is PPO anchored at pi_old with no
      further weight: ``r = pi / pi_old, L = -min(r A, clip(r) A)``. Pass
      ``is_cap = rho_bar`` so that the statistics report rho's truncation.

    Since ``w >= 0``, ``min(w r A, w clip(r) A) = w min(r A, clip(r) A)``: ``tis`` and
    ``decoupled`` differ only in whether ``w`` is per sequence or per token.

    ``is_mode = "mask"`` (AReaL, Fu et al. 2025, its cap on the behaviour importance
    weight) replaces truncation: a weight above ``C`` becomes 0, dropping the token (a
    sequence-level ``tis`` weight: the whole sequence) from the loss instead of keeping it
    at weight ``C``; ``masked_fraction`` reports how many tokens that dropped.

    Every log-ratio (``log pi - log mu`` or ``log pi - log pi_old``) is clamped to
    ``+-LOG_RATIO_CLAMP`` before ``exp``, so a huge ratio cannot overflow into a NaN or
    inf loss (its gradient is 0: far outside the clip range anyway). With
    ``dual_clip = c`` (Ye et al. 2020, "Mastering Complex Control in MOBA Games with
    Deep Reinforcement Learning", dual-clip PPO; veRL's ``clip_ratio_c``), tokens with
    ``A < 0`` use ``max(min(r A, clip(r) A), c A)``: a huge ratio on a negative advantage
    no longer gives an unbounded loss (at most ``w c |A|``, and no gradient there).
    ``w`` is detached; so are ``old_logprobs``, ``behaviour_logprobs`` and
    ``advantages`` -- the gradient flows only through ``logprobs``.

    Log-probs under a truncated (top-p) distribution may be ``-inf`` on real tokens:
    ``old_logprobs = -inf`` (pi_old = 0) gives the token weight 0 (its sequence's
    weight for ``tis``), ``logprobs = -inf`` gives ``r = 0`` and no gradient.

    Args:
        logprobs: ``[B, T]`` float32, log pi of the sampled tokens, requires grad.
        old_logprobs: ``[B, T]`` float32, log pi_old (``-inf`` allowed: pi_old = 0).
        behaviour_logprobs: ``[B, T]`` float32, log mu (from the generator).
        advantages: ``[B, T]`` float32.
        mask: ``[B, T]`` bool or float, non-zero = real completion token
            (right-padded). Padded positions may hold any garbage.
        correction: a :class:`Correction` (or its string value).
        clip_eps: PPO clip range ``e > 0``.
        is_cap: truncation ``C > 0`` of the importance weight (unused by ``none``; ``vtrace``: rho-bar,
            for the statistics).
        dual_clip: ``c > 1`` of dual-clip PPO, or ``None`` for plain clipping.
        is_level: ``tis`` only: one weight per ``sequence`` or per ``token`` (an
            :class:`ISLevel` or its value).
        is_mode: ``truncate`` or ``mask`` a weight above ``is_cap`` (an :class:`ISMode`
            or its value; unused by ``none``).
        aggregation: how ``L_t`` becomes the loss (:func:`aggregate_tokens`).
        max_tokens: the generation budget, for ``fixed_length_sum``.

    Returns:
        ``(loss, stats)``: ``loss`` a 0-d tensor (0 for an all-padding batch),
        ``stats`` a :class:`PolicyLossStats`.

    Raises:
        ValueError: shapes differ or are not ``[B, T]``; ``clip_eps <= 0``;
            ``is_cap <= 0``; ``dual_clip <= 1``; unknown ``correction``,
            ``is_level`` or ``is_mode``.
    """
    shape = _check_same_shape(
        logprobs=logprobs,
        old_logprobs=old_logprobs,
        behaviour_logprobs=behaviour_logprobs,
        advantages=advantages,
    )
    m = bool_mask(mask, shape)
    correction = Correction(correction)
    if not clip_eps > 0:
        raise ValueError(f"clip_eps must be > 0, got {clip_eps}")
    if not is_cap > 0:
        raise ValueError(f"is_cap must be > 0, got {is_cap}")
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip must be > 1 or None, got {dual_clip}")
    is_level, is_mode = _member(ISLevel, is_level, "is_level"), _member(ISMode, is_mode, "is_mode")

    lp = fill_padding(logprobs, m)
    beh = fill_padding(behaviour_logprobs.detach(), m)
    adv = fill_padding(advantages.detach(), m)
    n_tokens = m.sum()
    # pi_old = 0 (log -inf): a token mu sampled outside pi_old's nucleus (top_p < 1). Its
    # importance weight pi_old/mu is 0; pi_old is replaced by pi there (r = 1, no NaN).
    outside = m & ~torch.isfinite(old_logprobs.detach())
    lp_d = lp.detach()
    old = torch.where(m & ~outside, old_logprobs.detach(), torch.where(torch.isfinite(lp_d), lp_d, 0.0))

    # Raw log importance weight log(pi_old/mu) of the correction, before truncation.
    token_log_w = torch.where(outside, -math.inf, (old - beh).to(torch.float64))
    if correction is Correction.TIS and is_level is ISLevel.SEQUENCE:
        raw_log_w = token_log_w.sum(dim=1, keepdim=True).expand(shape)  # [B, 1] -> one weight per sequence
    else:
        raw_log_w = token_log_w

    truncated = masked = torch.zeros_like(m)
    if correction is Correction.NONE:
        log_ratio = (lp - beh).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        w = None
    elif correction is Correction.VTRACE:  # rho is inside the advantages; report it, apply nothing more
        log_ratio = (lp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        w = None
        truncated = m & (raw_log_w > math.log(is_cap))
    else:
        log_ratio = (lp - old).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        over = m & (raw_log_w > math.log(is_cap))
        if is_mode is ISMode.MASK:  # AReaL: a weight above C drops its token (sequence) from the loss
            masked = over
            w = torch.where(over, 0.0, torch.exp(raw_log_w.clamp(max=math.log(is_cap))))
        else:
            truncated = over
            w = torch.exp(raw_log_w.clamp(max=math.log(is_cap)))
    ratio = torch.exp(log_ratio)
    objective = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    dual_clipped = torch.zeros_like(m)
    if dual_clip is not None:  # A < 0: the objective is at least c * A, so -L <= c |A|
        floor = dual_clip * adv
        dual_clipped = m & (adv < 0) & (objective < floor)
        objective = torch.where(adv < 0, torch.maximum(objective, floor), objective)
    if w is None:
        per_token = -objective
        w_stats = ratio.detach().to(torch.float64)
        if correction is Correction.VTRACE:
            w_stats = torch.exp(raw_log_w.clamp(max=math.log(is_cap)))
    else:
        per_token = -w.to(lp.dtype) * objective
        w_stats = w

    loss = aggregate_tokens(per_token, m, aggregation, max_tokens=max_tokens)

    with torch.no_grad():
        n = n_tokens.to(torch.float64)
        d = n.clamp(min=1)
        has_tokens = n > 0
        one = torch.ones((), dtype=torch.float64, device=lp.device)
        clip_fraction = (((ratio.detach() - 1).abs() > clip_eps) & m).sum() / d
        # log(pi/pi_old), 0 where pi_old = 0, clamped: pi = 0 would make the estimate inf
        rho = torch.where(outside, 0.0, lp_d - old).to(torch.float64).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        approx_kl = fill_padding(torch.expm1(rho) - rho, m).sum() / d
        # in log space, saturating below the float64 maximum: exp of a long sequence's summed
        # log-ratio overflows (sum 1000 -> inf), the statistics stay finite
        real_log_w = torch.cat([torch.where(m, raw_log_w, -math.inf).flatten(), -one.unsqueeze(0) * math.inf])
        log_mean = torch.logsumexp(real_log_w, dim=0) - torch.log(d)
        ratio_mean = torch.where(has_tokens, torch.exp(log_mean.clamp(max=LOG_STAT_MAX)), one)
        ratio_max = torch.where(has_tokens, torch.exp(real_log_w.max().clamp(max=LOG_STAT_MAX)), one)
        ws = fill_padding(w_stats, m)
        sum_w, sum_w2 = ws.sum(), (ws * ws).sum()
        ess = torch.where(sum_w2 > 0, sum_w * sum_w / sum_w2.clamp(min=torch.finfo(torch.float64).tiny), 0 * one)

    stats = PolicyLossStats(
        clip_fraction=clip_fraction,
        approx_kl=approx_kl,
        importance_ratio_mean=ratio_mean,
        importance_ratio_max=ratio_max,
        truncated_fraction=truncated.sum() / d,
        effective_sample_size=ess,
        ess_fraction=ess / d,
        outside_nucleus_fraction=outside.sum() / d,
        dual_clip_fraction=dual_clipped.sum() / d,
        masked_fraction=masked.sum() / d,
    )
    return loss, stats


def truncated_token_weights(old_logprobs: Tensor, behaviour_logprobs: Tensor, mask: Tensor, *, cap: float) -> Tensor:
    """Per-token truncated importance weights ``w_t = min(pi_old_t / mu_t, C)`` (IMPALA's
    rho-bar truncation, Espeholt et al. 2018 eq. 1; the weight of decoupled PPO), for a loss
    term whose tokens were sampled from mu but whose expectation is meant under pi_old: the
    KL loss term (``E_mu[w k(x)] = E_pi_old[k(x)]`` below the cap).

    Args:
        old_logprobs: ``[B, T]`` float log pi_old (``-inf`` allowed: pi_old = 0 gives weight 0).
        behaviour_logprobs: ``[B, T]`` float log mu.
        mask: ``[B, T]`` bool or float, non-zero = real token; garbage in padding is ignored.
        cap: ``C > 0``.

    Returns:
        ``[B, T]`` detached weights in ``[0, C]``, dtype of ``old_logprobs``; 0 on padding.

    Raises:
        ValueError: shapes differ; ``cap <= 0``.
    """
    shape = _check_same_shape(old_logprobs=old_logprobs, behaviour_logprobs=behaviour_logprobs)
    if not cap > 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    m = bool_mask(mask, shape)
    old, beh = old_logprobs.detach(), fill_padding(behaviour_logprobs.detach(), m)
    log_w = torch.where(m & torch.isfinite(old), old - beh, -math.inf)  # pi_old = 0 or padding: weight 0
    return torch.exp(log_w.clamp(max=math.log(cap)))


# --------------------------------------------------------------------------- value loss


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    *,
    clip_range: float | None,
    aggregation: LossAggregation = LossAggregation.TOKEN_MEAN,
    max_tokens: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Clipped value loss (OpenAI baselines PPO2 ``vf_loss``; studied as "value
    function loss clipping" by Andrychowicz et al. 2021, "What Matters in
    On-Policy Reinforcement Learning?")::

        v_clip = old + clamp(v - old, -c, c)
        L = 0.5 * max((v - R)^2, (v_clip - R)^2)

    aggregated over the batch's real tokens. ``clip_range=None`` gives the plain
    ``0.5 * (v - R)^2``.

    Args:
        values: ``[B, T]`` float32, current value predictions, requires grad.
        old_values: ``[B, T]`` float32, values at rollout / before the update (detached).
        returns: ``[B, T]`` float32, regression targets (detached).
        mask: ``[B, T]`` bool or float, non-zero = real token. Garbage in padded
            positions is ignored.
        clip_range: ``c > 0`` or ``None`` for no clipping.
        aggregation: how per-token losses become the loss (:func:`aggregate_tokens`;
            default the token mean).
        max_tokens: the generation budget, for ``fixed_length_sum``.

    Returns:
        ``(loss, value_clip_fraction)``: ``loss`` a 0-d tensor;
        ``value_clip_fraction`` (detached 0-d float64 tensor) the fraction of real tokens where
        the clipped term is strictly larger, i.e. where clipping zeroes the
        gradient (TRL's ``vf_clipfrac``); 0.0 when unclipped.

    Raises:
        ValueError: shapes differ or are not ``[B, T]``; ``clip_range <= 0``.
    """
    shape = _check_same_shape(values=values, old_values=old_values, returns=returns)
    m = bool_mask(mask, shape)
    if clip_range is not None and not clip_range > 0:
        raise ValueError(f"clip_range must be > 0 or None, got {clip_range}")
    v = fill_padding(values, m)
    ret = fill_padding(returns.detach(), m)
    unclipped = (v - ret) ** 2
    if clip_range is None:
        per_token = unclipped
        clip_fraction = torch.zeros((), dtype=torch.float64, device=v.device)
    else:
        old = fill_padding(old_values.detach(), m)
        v_clip = old + (v - old).clamp(-clip_range, clip_range)
        clipped = (v_clip - ret) ** 2
        per_token = torch.maximum(unclipped, clipped)
        with torch.no_grad():
            clip_fraction = ((clipped > unclipped) & m).sum() / m.sum().clamp(min=1).to(torch.float64)
    loss = 0.5 * aggregate_tokens(per_token, m, aggregation, max_tokens=max_tokens)
    return loss, clip_fraction


# --------------------------------------------------------------------------- logits helpers


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the softmax distribution at every position.

    ``H = -sum_v p_v log p_v`` with ``log p = logits - logsumexp(logits)`` (never
    ``log(softmax)``), computed in float32 (or float64 if given), so huge logits
    do not overflow; ``-inf`` logits (banned tokens) contribute 0.

    Args:
        logits: ``[B, T, V]`` float (bf16/fp16 are upcast to float32).

    Returns:
        ``[B, T]`` entropies in nats, float32 (float64 for float64 input);
        differentiable.

    Raises:
        ValueError: if ``logits`` is not 3-D.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    x = logits if logits.dtype == torch.float64 else logits.float()
    logp = x - torch.logsumexp(x, dim=-1, keepdim=True)
    p = torch.exp(logp)
    # where() on logp itself, not on p * logp: for a -inf logit p = 0 and
    # logp = -inf, and the backward of p * logp would give 0 * -inf = NaN.
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    safe_logp = torch.where(p > 0, logp, zero)
    return -(p * safe_logp).sum(dim=-1)


def nucleus_mask(logits: Tensor, top_p: float) -> Tensor:
    """The tokens nucleus (top-p) sampling keeps at each position (Holtzman et al. 2020,
    "The Curious Case of Neural Text Degeneration", sec. 3.1), computed exactly as Hugging
    Face's ``TopPLogitsWarper`` does in the generators: sort ascending, drop the tokens
    whose cumulative probability is ``<= 1 - top_p``, always keep the most probable one.
    The kept set is the smallest set of most probable tokens whose mass reaches ``top_p``.

    Args:
        logits: ``[..., V]`` float logits *after* temperature scaling.
        top_p: nucleus mass in ``(0, 1]``; 1 keeps every token.

    Returns:
        ``[..., V]`` bool, True on kept tokens (no gradient).

    Raises:
        ValueError: ``top_p`` outside ``(0, 1]``.
    """
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_p >= 1:
        return torch.ones(logits.shape, dtype=torch.bool, device=logits.device)
    with torch.no_grad():
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove[..., -1] = False
        return ~remove.scatter(-1, order, remove)


def token_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """Log-probability of each given token: ``log_softmax(logits)[b, t, tokens[b, t]]``.

    Computed as ``logits.gather(tokens) - logsumexp(logits)`` so no ``[B, T, V]``
    log-softmax tensor is materialised (beyond the float32 upcast of bf16/fp16).

    Args:
        logits: ``[B, T, V]`` float; position ``t`` holds the logits that predict
            ``tokens[:, t]`` (the caller shifts).
        tokens: ``[B, T]`` int64 token ids, every entry in ``[0, V)`` (fill padded
            positions with any valid id, e.g. the pad id).

    Returns:
        ``[B, T]`` float32 (float64 for float64 input) log-probs; differentiable
        w.r.t. ``logits``.

    Raises:
        ValueError: wrong ranks, mismatched ``[B, T]``, non-integer tokens, or a
            token id outside ``[0, V)``.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    if tokens.shape != logits.shape[:2]:
        raise ValueError(
            f"tokens has shape {tuple(tokens.shape)}, expected {tuple(logits.shape[:2])} (the [B, T] of logits)"
        )
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be an integer tensor, got {tokens.dtype}")
    vocab = logits.shape[-1]
    if tokens.numel() > 0 and bool(((tokens < 0) | (tokens >= vocab)).any()):  # one device sync
        raise ValueError(
            f"token ids must lie in [0, {vocab}), got min {int(tokens.min())} max {int(tokens.max())}; "
            "replace ignore-index/padding labels with a valid id before calling"
        )
    x = logits if logits.dtype == torch.float64 else logits.float()
    picked = x.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(x, dim=-1)


def kl_to_reference(logprobs: Tensor, ref_logprobs: Tensor, *, estimator: KLEstimator) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi
    (Schulman 2020, "Approximating KL divergence")::

        k1 = log pi - log pi_ref                      (unbiased, can be negative)
        k2 = (log pi - log pi_ref)^2 / 2              (biased, always >= 0)
        k3 = (rho - 1) - log rho,  rho = pi_ref / pi  (unbiased, always >= 0)

    k1 is the penalty InstructGPT puts in the reward (Ouyang et al. 2022, eq. 2);
    k3 is the loss term of GRPO (Shao et al. 2024, eq. 4).

    Used as a *loss* term (differentiated through ``logprobs``, the samples not
    differentiated), the expected gradients over ``x ~ pi`` are (Tang & Munos 2025,
    "On a few pitfalls in KL divergence gradient estimation for RL")::

        E[grad k1] = E[grad log pi] = 0                              (noise only)
        E[grad k2] = E[(log pi - log pi_ref) grad log pi] = grad KL(pi || pi_ref)
        E[grad k3] = E[(1 - pi_ref/pi) grad log pi]   = grad KL(pi_ref || pi)

    so k2 is the estimator whose loss gradient is that of the KL it estimates, and k3 as a
    loss minimises the reverse KL(pi_ref || pi) (GRPO's behaviour). The learner refuses k1
    as a loss.

    Args:
        logprobs: ``[B, T]`` float, log pi of the sampled tokens (may carry grad).
        ref_logprobs: ``[B, T]`` float, log pi_ref of the same tokens (detached).
        estimator: a :class:`KLEstimator` (or its string value).

    Returns:
        ``[B, T]`` per-token estimates, same dtype as ``logprobs``. Padded
        positions are not masked here: reduce with ``streamrl.common.tensors.masked_mean``
        (or pass through a function that takes a mask), which ignores them.

    Raises:
        ValueError: shapes differ; unknown estimator.
    """
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(f"ref_logprobs has shape {tuple(ref_logprobs.shape)} but logprobs has {tuple(logprobs.shape)}")
    estimator = KLEstimator(estimator)
    diff = ref_logprobs.detach() - logprobs  # log rho
    if estimator is KLEstimator.K1:
        return -diff
    if estimator is KLEstimator.K2:
        return 0.5 * diff * diff
    return torch.expm1(diff) - diff


def sft_loss(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Token-mean negative log-likelihood, the pretraining/SFT term of PPO-ptx
    (InstructGPT, Ouyang et al. 2022, eq. 2: ``gamma * E_{x~D_pretrain}[log pi(x)]``;
    the caller multiplies by gamma)::

        L = -sum_{b,t} mask * log pi(labels[b,t] | ...) / clamp(sum mask, 1)

    Args:
        logits: ``[B, T, V]`` float; position ``t`` predicts ``labels[:, t]``.
        labels: ``[B, T]`` int64 targets. Padded positions may hold anything
            (e.g. -100); they are replaced before the gather.
        mask: ``[B, T]`` bool or float, non-zero = token that counts. Garbage in
            padded logits does not change the loss, and their gradient is 0.

    Returns:
        0-d float32 loss (0 for an all-padding batch).

    Raises:
        ValueError: wrong shapes or a real label outside ``[0, V)``.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    m = bool_mask(mask, logits.shape[:2])
    if labels.shape != m.shape:
        raise ValueError(f"labels has shape {tuple(labels.shape)}, expected {tuple(m.shape)}")
    safe_labels = torch.where(m, labels, torch.zeros((), dtype=labels.dtype, device=labels.device))
    safe_logits = torch.where(m.unsqueeze(-1), logits, torch.zeros((), dtype=logits.dtype, device=logits.device))
    return -masked_mean(token_logprobs(safe_logits, safe_labels), m)
