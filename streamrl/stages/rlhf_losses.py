"""Pure loss and metric functions of the SFT and reward-model stages (no models, no I/O).

- :func:`response_nll` / :func:`sft_loss`: causal-LM negative log-likelihood of the
  response tokens only (the prompt is context, not a target), the supervised fine-tuning
  objective of InstructGPT (Ouyang et al. 2022, sec. 3.5 "Supervised fine-tuning").
- :func:`pairwise_loss`: the Bradley-Terry preference loss of a reward model,
  ``-log sigma(r(x, y_w) - r(x, y_l))`` (Stiennon et al. 2020, "Learning to summarize from
  human feedback", eq. 1).
- :func:`kwise_ranking_loss`: InstructGPT's K-wise form (Ouyang et al. 2022, eq. 1): all
  C(K, 2) comparisons of one prompt's K ranked responses in one batch element, the sum
  divided by C(K, 2); with K = 2 it is :func:`pairwise_loss`.
- :func:`ranking_accuracy`: fraction of held-out comparisons ranked right, its binomial
  standard error and the mean reward margin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["RankingAccuracy", "kwise_ranking_loss", "pairwise_loss", "ranking_accuracy", "response_nll", "sft_loss"]


def response_nll(logits: Tensor, input_ids: Tensor, target_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Summed next-token negative log-likelihood over the target (response) tokens.

    Position ``t`` of ``logits`` predicts token ``t + 1``; token ``t`` is a target when
    ``target_mask[b, t]`` is non-zero. Prompt and padding tokens have mask 0: they are
    context only, never predicted (InstructGPT sec. 3.5 trains on the demonstrations).

    Args:
        logits: ``[B, L, V]`` float, the model's output on ``input_ids``.
        input_ids: ``[B, L]`` int64 tokens.
        target_mask: ``[B, L]`` bool/int/float, non-zero on response tokens. Position 0
            can never be a target (nothing precedes it) and is ignored.

    Returns:
        ``(total, count)``: 0-d float32 sum of ``-log p(token)`` over targets (nats) and
        0-d float32 number of targets. Sums (not means) so held-out losses over many
        batches average per token exactly.

    Raises:
        ValueError: shapes that do not line up.
    """
    if logits.dim() != 3 or input_ids.shape != logits.shape[:2] or target_mask.shape != input_ids.shape:
        raise ValueError(
            f"expected logits [B, L, V] and input_ids, target_mask [B, L]; got "
            f"{tuple(logits.shape)}, {tuple(input_ids.shape)}, {tuple(target_mask.shape)}"
        )
    targets = target_mask[:, 1:] != 0
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = log_probs.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    nll = torch.where(targets, -picked, torch.zeros((), dtype=picked.dtype, device=picked.device))
    return nll.sum(), targets.sum().to(torch.float32)


def sft_loss(logits: Tensor, input_ids: Tensor, target_mask: Tensor) -> Tensor:
    """Token-mean response NLL: ``response_nll`` total / max(count, 1) (0-d float32, nats/token)."""
    total, count = response_nll(logits, input_ids, target_mask)
    return total / count.clamp(min=1.0)


def pairwise_loss(chosen: Tensor, rejected: Tensor) -> Tensor:
    """Mean Bradley-Terry loss ``-log sigma(r_w - r_l)`` (Stiennon et al. 2020, eq. 1).

    Args:
        chosen: ``[B]`` float rewards r(x, y_w) of the preferred responses.
        rejected: ``[B]`` float rewards r(x, y_l) of the others.

    Returns:
        0-d loss (nats), mean over the B pairs; ``log 2`` when the two rewards are equal.

    Raises:
        ValueError: shapes differ, are not 1-D, or B = 0.
    """
    if chosen.dim() != 1 or chosen.shape != rejected.shape or chosen.numel() == 0:
        raise ValueError(
            f"chosen and rejected must be non-empty [B] tensors of one shape, got "
            f"{tuple(chosen.shape)} and {tuple(rejected.shape)}"
        )
    return -F.logsigmoid(chosen - rejected).mean()


def kwise_ranking_loss(rewards: Tensor, valid: Tensor | None = None) -> Tensor:
    """InstructGPT's reward-model loss over K ranked responses (Ouyang et al. 2022, eq. 1)::

        loss = -1 / C(K, 2) * sum_{i < j} log sigma(r_i - r_j)      (response i ranked above j)

    averaged over the batch: each prompt's C(K, 2) comparisons form one batch element, so
    a prompt with many responses weighs as much as one with two (the paper's remedy
    against overfitting when comparisons are shuffled as independent samples).

    Args:
        rewards: ``[B, K]`` float, row b holds the rewards of prompt b's responses ranked
            best first (column 0 is the most preferred).
        valid: optional ``[B, K]`` bool, False on padding columns when prompts have
            different K (a prompt with K_b responses uses C(K_b, 2)); real responses must
            come first in each row.

    Returns:
        0-d loss (nats). For K = 2 it equals :func:`pairwise_loss` of the two columns.

    Raises:
        ValueError: not ``[B, K]``, B = 0, a row with fewer than 2 valid responses, or a
            valid mask of another shape.
    """
    if rewards.dim() != 2 or rewards.shape[0] == 0:
        raise ValueError(f"rewards must be [B, K] with B >= 1, got {tuple(rewards.shape)}")
    k = rewards.shape[1]
    if valid is None:
        valid = torch.ones_like(rewards, dtype=torch.bool)
    if valid.shape != rewards.shape:
        raise ValueError(f"valid has shape {tuple(valid.shape)}, expected {tuple(rewards.shape)}")
    valid = valid.bool()
    counts = valid.sum(dim=1)
    if bool((counts < 2).any()):
        raise ValueError("every prompt needs at least 2 valid responses to compare")
    safe = torch.where(valid, rewards, torch.zeros((), dtype=rewards.dtype, device=rewards.device))
    diff = safe.unsqueeze(2) - safe.unsqueeze(1)  # [B, K, K]: r_i - r_j
    upper = torch.ones(k, k, dtype=torch.bool, device=rewards.device).triu(diagonal=1)  # i < j
    pairs = upper & valid.unsqueeze(2) & valid.unsqueeze(1)
    terms = torch.where(pairs, -F.logsigmoid(diff), torch.zeros((), dtype=diff.dtype, device=diff.device))
    per_prompt = terms.sum(dim=(1, 2)) / (counts * (counts - 1) / 2).to(terms.dtype)
    return per_prompt.mean()


@dataclass(frozen=True)
class RankingAccuracy:
    """Held-out ranking quality of a reward model.

    Attributes:
        accuracy: fraction of comparisons with r(chosen) > r(rejected) (a tie counts half).
        stderr: binomial standard error ``sqrt(acc (1 - acc) / n)``.
        margin: mean r(chosen) - r(rejected), reward units.
        margin_stderr: standard error of that mean (sample std / sqrt(n)).
        n: comparisons.
    """

    accuracy: float
    stderr: float
    margin: float
    margin_stderr: float
    n: int

    def line(self) -> str:
        """``accuracy 0.612 +- 0.022 (n 500), margin +0.31 +- 0.05``."""
        return (
            f"accuracy {self.accuracy:.3f} +- {self.stderr:.3f} (n {self.n}), "
            f"margin {self.margin:+.3f} +- {self.margin_stderr:.3f}"
        )


def ranking_accuracy(chosen: Tensor, rejected: Tensor) -> RankingAccuracy:
    """Accuracy with its standard error, and the mean margin, of ``n`` comparisons.

    Args:
        chosen: ``[n]`` rewards of the preferred responses.
        rejected: ``[n]`` rewards of the others.

    Raises:
        ValueError: shapes differ or n = 0.
    """
    if chosen.dim() != 1 or chosen.shape != rejected.shape or chosen.numel() == 0:
        raise ValueError(
            f"chosen and rejected must be non-empty [n] tensors of one shape, got "
            f"{tuple(chosen.shape)} and {tuple(rejected.shape)}"
        )
    margins = (chosen - rejected).double()
    n = margins.numel()
    wins = (margins > 0).double() + 0.5 * (margins == 0).double()
    accuracy = float(wins.mean())
    spread = float(margins.std(unbiased=True)) if n > 1 else 0.0
    return RankingAccuracy(
        accuracy=accuracy,
        stderr=math.sqrt(accuracy * (1 - accuracy) / n),
        margin=float(margins.mean()),
        margin_stderr=spread / math.sqrt(n),
        n=n,
    )
