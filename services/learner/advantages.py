"""Advantage estimation and reward shaping: GAE, V-trace, GRPO / RLOO group baselines,
InstructGPT per-token rewards (masked whitening is ``streamrl.common.tensors.masked_whiten``).

Masks are ``[B, T]`` bool or float tensors, non-zero = real completion token;
completions are right-padded (positions ``0 .. len-1`` of a row are real).
Padded positions may hold garbage (NaN/inf); it is replaced through
``torch.where`` before any arithmetic, so it never reaches an output.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from streamrl.common.modes import AdvantageEstimator, RewardScale
from streamrl.common.tensors import bool_mask, check_right_padded, fill_padding

__all__ = ["gae", "group_advantages", "per_token_rewards", "vtrace"]


@torch.no_grad()
def gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    *,
    gamma: float,
    lam: float,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, "High-Dimensional
    Continuous Control Using GAE", eq. 16)::

        delta_t = r_t + gamma * V_{t+1} - V_t
        A_t     = delta_t + gamma * lam * A_{t+1}
        R_t     = A_t + V_t            (the value targets, TD(lambda) returns)

    The episode ends after a row's last real token: ``V`` and ``A`` past it are 0
    (no bootstrap). Loops backwards over ``T``, vectorised over ``B``.

    Args:
        rewards: ``[B, T]`` float per-token rewards (e.g. from :func:`per_token_rewards`).
        values: ``[B, T]`` float value predictions ``V(s_t)``.
        mask: ``[B, T]`` bool or float, non-zero = real token, right-padded.
            Garbage in padded rewards/values is ignored.
        gamma: discount in ``[0, 1]``.
        lam: GAE lambda in ``[0, 1]``.

    Returns:
        ``(advantages, returns)``, both ``[B, T]`` in the dtype of ``rewards``,
        detached, exactly 0 at padded positions.

    Raises:
        ValueError: shape mismatch, mask not right-padded, gamma/lam outside [0, 1].
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, T], got shape {tuple(rewards.shape)}")
    if values.shape != rewards.shape:
        raise ValueError(f"values has shape {tuple(values.shape)} but rewards has {tuple(rewards.shape)}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    m = bool_mask(mask, rewards.shape)
    check_right_padded(m)
    r = fill_padding(rewards.detach(), m)
    v = fill_padding(values.detach().to(r.dtype), m)
    batch, length = r.shape
    advantages = torch.zeros_like(r)
    last = torch.zeros(batch, dtype=r.dtype, device=r.device)
    next_value = torch.zeros(batch, dtype=r.dtype, device=r.device)
    for t in range(length - 1, -1, -1):
        delta = r[:, t] + gamma * next_value - v[:, t]
        last = torch.where(m[:, t], delta + gamma * lam * last, torch.zeros_like(last))
        advantages[:, t] = last
        next_value = v[:, t]  # 0 at padded positions: no bootstrap past the end
    returns = fill_padding(advantages + v, m)
    return advantages, returns


@torch.no_grad()
def vtrace(
    rewards: Tensor,
    values: Tensor,
    log_rhos: Tensor,
    mask: Tensor,
    *,
    gamma: float,
    lam: float = 1.0,
    rho_bar: float = 1.0,
    c_bar: float = 1.0,
    bootstrap: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """V-trace off-policy value targets and policy-gradient advantages (Espeholt et al.
    2018, "IMPALA", sec. 4, eqs. 1-3, with the lambda of its remark 3)::

        rho_t     = min(rho_bar, pi_t / mu_t),   c_t = lam * min(c_bar, pi_t / mu_t)
        delta_t V = rho_t (r_t + gamma V(x_{t+1}) - V(x_t))
        v_s       = V(x_s) + sum_{t >= s} gamma^(t-s) (prod_{i=s}^{t-1} c_i) delta_t V    (eq. 1)
                  = V(x_s) + delta_s V + gamma c_s (v_{s+1} - V(x_{s+1}))               (the recursion)
        A_s       = rho_s (r_s + gamma v_{s+1} - V(x_s))                               (the policy gradient)

    ``v_s`` are the critic's regression targets, ``A_s`` the advantages of the policy loss
    (which then needs no other importance weight). Each row is one trajectory ending after
    its last real token, where ``V(x_n) = v_n = bootstrap`` (0: a terminal end). On-policy
    (``pi = mu``, ``rho_bar, c_bar >= 1``, ``lam = 1``) ``v_s`` is the n-step return
    ``sum_{t>=s} gamma^(t-s) r_t + gamma^(n-s) bootstrap``. Loops backwards over ``T``,
    vectorised over ``B``.

    Args:
        rewards: ``[B, T]`` float per-token rewards.
        values: ``[B, T]`` float critic values ``V(x_t)``.
        log_rhos: ``[B, T]`` float ``log(pi_t / mu_t)``, pi the policy being evaluated
            (the learner's pi_old), mu the behaviour policy; ``-inf`` allowed (pi = 0:
            rho = c = 0).
        mask: ``[B, T]`` bool or float, non-zero = real token, right-padded. Garbage in
            padded entries is ignored.
        gamma: discount in ``[0, 1]``.
        lam: trace-cutting lambda in ``[0, 1]`` (multiplies every ``c_t``).
        rho_bar: truncation of rho (> 0); the fixed point is the value of a policy between
            mu and pi (pi itself when ``rho_bar`` is infinite).
        c_bar: truncation of the traces c (> 0); sets how fast the targets contract.
        bootstrap: ``[B]`` value of the state after each row's last token, or None (0).

    Returns:
        ``(vs, advantages)``, both ``[B, T]`` in the dtype of ``rewards``, detached, 0 at
        padded positions.

    Raises:
        ValueError: shape mismatch, mask not right-padded, gamma/lam outside [0, 1],
            ``rho_bar <= 0`` or ``c_bar <= 0``.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [B, T], got shape {tuple(rewards.shape)}")
    for name, given in (("values", values), ("log_rhos", log_rhos)):
        if given.shape != rewards.shape:
            raise ValueError(f"{name} has shape {tuple(given.shape)} but rewards has {tuple(rewards.shape)}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must be in [0, 1], got {lam}")
    if not rho_bar > 0:
        raise ValueError(f"rho_bar must be > 0, got {rho_bar}")
    if not c_bar > 0:
        raise ValueError(f"c_bar must be > 0, got {c_bar}")
    m = bool_mask(mask, rewards.shape)
    check_right_padded(m)
    r = fill_padding(rewards.detach(), m)
    v = fill_padding(values.detach().to(r.dtype), m)
    log_rho = fill_padding(log_rhos.detach().to(r.dtype), m)
    rho = torch.exp(log_rho.clamp(max=math.log(rho_bar)))  # exp(-inf) = 0
    c = lam * torch.exp(log_rho.clamp(max=math.log(c_bar)))
    batch, length = r.shape
    boot = torch.zeros(batch, dtype=r.dtype, device=r.device) if bootstrap is None else bootstrap.detach().to(r.dtype)
    if boot.shape != (batch,):
        raise ValueError(f"bootstrap has shape {tuple(boot.shape)}, expected ({batch},)")
    vs = torch.zeros_like(r)
    advantages = torch.zeros_like(r)
    next_value, next_vs = boot.clone(), boot.clone()  # V(x_{t+1}) and v_{t+1}; past a row's end: the bootstrap
    for t in range(length - 1, -1, -1):
        real = m[:, t]
        delta = rho[:, t] * (r[:, t] + gamma * next_value - v[:, t])
        vs_t = v[:, t] + delta + gamma * c[:, t] * (next_vs - next_value)
        adv_t = rho[:, t] * (r[:, t] + gamma * next_vs - v[:, t])
        vs[:, t] = torch.where(real, vs_t, 0.0)
        advantages[:, t] = torch.where(real, adv_t, 0.0)
        next_value = torch.where(real, v[:, t], next_value)
        next_vs = torch.where(real, vs_t, next_vs)
    return vs, advantages


def group_advantages(
    scores: Tensor,
    group_ids: Tensor,
    *,
    estimator: AdvantageEstimator,
    scale: RewardScale = RewardScale.GROUP,
    std_floor: float = 1e-3,
) -> Tensor:
    """Sequence-level advantages from a per-group baseline.

    Members of a group are completions of the same prompt. Groups may come in any
    order, interleaved, and with different sizes.

    - ``AdvantageEstimator.GRPO`` (Shao et al. 2024, "DeepSeekMath", sec. 4.1.2,
      outcome supervision: ``A_i = (r_i - mean(r)) / std(r)``)::

          A_i = (s_i - mean_g) / max(std_g, f)     scale="group"
          A_i = (s_i - mean_g) / max(std_B, f)     scale="batch" (TRL: the std of all
                                                    the batch's scores)
          A_i =  s_i - mean_g                      scale="none" (Dr. GRPO, Liu et al. 2025)

      Standard deviations are *population* ones (``unbiased=False``, divide by the
      count). ``f = std_floor`` replaces the usual ``std + 1e-6``: a group whose scores
      differ by float noise (a spread of 1e-6 gave +-0.33 .. +-1 advantages) now gets
      advantages of order ``noise / f``, near 0; a group of equal scores gets exactly 0.

    - ``AdvantageEstimator.RLOO`` (REINFORCE leave-one-out: Kool et al. 2019,
      "Buy 4 REINFORCE samples, get a baseline for free!"; Ahmadian et al. 2024,
      "Back to Basics", the RLOO estimator)::

          A_i = s_i - (sum_{j in g, j != i} s_j) / (n_g - 1)

      ``scale`` and ``std_floor`` are ignored.

    Statistics are computed in float64.

    Args:
        scores: ``[B]`` float sequence scores.
        group_ids: ``[B]`` integer group labels (any values; equal = same group).
        estimator: ``GRPO`` or ``RLOO`` (an :class:`AdvantageEstimator` or its value).
        scale: GRPO only: a :class:`RewardScale` (or its value).
        std_floor: GRPO only: the smallest std divided by (> 0; scores' units).

    Returns:
        ``[B]`` advantages, dtype of ``scores``, detached.

    Raises:
        ValueError: shapes are not matching 1-D ``[B]``; ``group_ids`` not integer;
            non-finite scores; ``estimator`` is ``GAE`` (needs a critic: use
            :func:`gae`); RLOO with a group of fewer than 2 members; ``std_floor <= 0``.
    """
    estimator = AdvantageEstimator(estimator)
    scale = RewardScale(scale)
    if not std_floor > 0:
        raise ValueError(f"std_floor must be > 0, got {std_floor}")
    if scores.dim() != 1:
        raise ValueError(f"scores must be [B], got shape {tuple(scores.shape)}")
    if group_ids.shape != scores.shape:
        raise ValueError(f"group_ids has shape {tuple(group_ids.shape)} but scores has {tuple(scores.shape)}")
    if group_ids.dtype.is_floating_point or group_ids.dtype == torch.bool:
        raise ValueError(f"group_ids must be an integer tensor, got {group_ids.dtype}")
    if estimator is AdvantageEstimator.GAE:
        raise ValueError(
            "group_advantages computes grpo or rloo advantages; for estimator 'gae' "
            "call gae() with per-token rewards and values"
        )
    if scores.numel() == 0:
        return scores.detach().clone()
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores contain NaN or inf; drop or fix those samples before the learner")

    s = scores.detach().to(torch.float64)
    unique_ids, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    n_groups = unique_ids.numel()
    sums = torch.zeros(n_groups, dtype=torch.float64, device=s.device).index_add_(0, inverse, s)
    n = counts.to(torch.float64)

    if estimator is AdvantageEstimator.RLOO:
        small = counts < 2
        if bool(small.any()):
            bad = unique_ids[small].tolist()
            raise ValueError(
                f"rloo needs at least 2 completions per group (leave-one-out baseline); "
                f"groups {bad[:10]} have 1. Sample more completions per prompt or use grpo"
            )
        baseline = (sums[inverse] - s) / (n[inverse] - 1)
        return (s - baseline).to(scores.dtype)

    mean = sums / n
    centred = s - mean[inverse]
    if scale is RewardScale.NONE:
        return centred.to(scores.dtype)
    if scale is RewardScale.BATCH:
        std = s.std(unbiased=False)
    else:
        var = torch.zeros(n_groups, dtype=torch.float64, device=s.device).index_add_(0, inverse, centred * centred) / n
        std = var.sqrt()[inverse]
    return (centred / std.clamp(min=std_floor)).to(scores.dtype)


@torch.no_grad()
def per_token_rewards(
    scores: Tensor,
    kl: Tensor | None,
    mask: Tensor,
    *,
    kl_coef: float,
) -> Tensor:
    """Per-token rewards with a KL penalty in the reward (Ziegler et al. 2019,
    eq. 2; InstructGPT, Ouyang et al. 2022, eq. 2)::

        r_t = -kl_coef * kl_t                  on every real token
        r_t += score                           on the last real token

    Args:
        scores: ``[B]`` float sequence-level scores from the reward model(s).
        kl: ``[B, T]`` per-token KL estimates to the reference (e.g.
            :func:`losses.kl_to_reference`), or ``None`` for no penalty. Garbage
            in padded positions is ignored.
        mask: ``[B, T]`` bool or float, non-zero = real token, right-padded.
        kl_coef: the penalty coefficient beta (>= 0).

    Returns:
        ``[B, T]`` rewards, dtype of ``scores`` (float32 for integer scores),
        detached, 0 at padded positions.

    Raises:
        ValueError: shape mismatch, ``kl_coef < 0``, mask not right-padded, or a
            row with no real token (its score would have nowhere to go).
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}")
    m = bool_mask(mask, mask.shape)
    if scores.shape != (m.shape[0],):
        raise ValueError(f"scores has shape {tuple(scores.shape)}, expected ({m.shape[0]},)")
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    check_right_padded(m)
    lengths = m.sum(dim=1)
    if bool((lengths == 0).any()):
        empty = torch.nonzero(lengths == 0).flatten().tolist()
        raise ValueError(f"rows {empty[:10]} have no real token; cannot place their score")
    dtype = scores.dtype if scores.dtype.is_floating_point else torch.float32
    if kl is None:
        rewards = torch.zeros(m.shape, dtype=dtype, device=m.device)
    else:
        if kl.shape != m.shape:
            raise ValueError(f"kl has shape {tuple(kl.shape)}, expected {tuple(m.shape)}")
        rewards = fill_padding(-kl_coef * fill_padding(kl.detach().to(dtype), m), m)
    last = (lengths - 1).unsqueeze(1)
    rewards.scatter_add_(1, last, scores.detach().to(dtype).unsqueeze(1))
    return rewards
