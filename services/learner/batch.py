"""Turn scored rollouts into padded training tensors, and score them with a model.

Layout: each row is ``prompt + completion`` right-padded to ``L``; completion
token ``t`` of row ``b`` is predicted by the logits at position
``prompt_len[b] - 1 + t``. Completion-aligned tensors are ``[B, T]`` with
``T`` the longest completion, right-padded, ``mask`` = 1 on real tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from streamrl.common.completions import completion_logits, completion_rows
from streamrl.common.messages import SamplingParams, ScoredRollout
from streamrl.common.tensors import linear_fp32, pad_right
from streamrl.services.learner.losses import entropy_from_logits, nucleus_mask, token_logprobs

if TYPE_CHECKING:  # transformers is imported only where a model is built
    from peft import PeftModel
    from transformers import PreTrainedModel

SAMPLING_FIELDS = ("temperature", "top_p")
"""The :class:`SamplingParams` fields that change the distribution a token was drawn
from; rollouts that differ in one of them cannot share a batch's log-prob pass."""


class MixedSamplingError(ValueError):
    """Rollouts of one batch were sampled with different distributions.

    Attributes:
        reason: ``mixed_<field>`` for the first :data:`SAMPLING_FIELDS` entry that differs.
    """

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def sampling_key(params: SamplingParams) -> tuple[float, ...]:
    """The values of :data:`SAMPLING_FIELDS` (equal keys = the same sampling distribution
    for the same weights)."""
    return tuple(float(getattr(params, name)) for name in SAMPLING_FIELDS)


def split_by_sampling(rollouts: list[ScoredRollout]) -> tuple[list[ScoredRollout], dict[str, list[ScoredRollout]]]:
    """Keep the rollouts that share the batch's most common sampling distribution.

    The learner computes pi and pi_old with the temperature and top-p recorded in the
    rollouts (the truth, whatever the learner's own config says), one setting per batch.
    Rollouts sampled with another setting are refused rather than trained on with the
    wrong distribution. The most common setting (by rollout count; ties: the first seen)
    is kept, so a batch is never refused whole: the buffer re-serves an unacknowledged
    batch, and refusing all of it would loop. A group comes from one generator, so its
    members share one setting and groups stay whole.

    Returns:
        ``(kept, refused)``: ``kept`` in input order; ``refused`` maps a reason
        ``mixed_<field>`` (the first differing field of :data:`SAMPLING_FIELDS`) to
        the rollouts refused for it.
    """
    keys = [sampling_key(s.rollout.sampling) for s in rollouts]
    counts: dict[tuple[float, ...], int] = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    best = max(counts, key=lambda k: counts[k])  # max keeps the first of equal counts
    kept: list[ScoredRollout] = []
    refused: dict[str, list[ScoredRollout]] = {}
    for s, key in zip(rollouts, keys):
        if key == best:
            kept.append(s)
            continue
        field = next(name for name, a, b in zip(SAMPLING_FIELDS, key, best) if a != b)
        refused.setdefault(f"mixed_{field}", []).append(s)
    return kept, refused


@dataclass
class TrainBatch:
    """A batch of rollouts as tensors (CPU or device).

    Attributes:
        input_ids: ``[B, L]`` int64 prompt + completion, right-padded with ``pad_id``.
        attention_mask: ``[B, L]`` int64, 1 on real tokens.
        positions: ``[B, T]`` int64 index into ``L`` of the logits predicting completion token t.
        tokens: ``[B, T]`` int64 completion tokens (pad where ``mask`` is 0).
        mask: ``[B, T]`` float32, 1 on real completion tokens.
        behaviour_logprobs: ``[B, T]`` float32 mu log-probs from the generators (nats).
        scores: ``[B]`` float32 rewards from the scorers.
        group_ids: ``[B]`` int64 group index (rows of one group share it).
        versions: ``[B]`` int64 behaviour policy version of each row.
        sampling: the sampling parameters every row was drawn with (one setting per
            batch, see :func:`split_by_sampling`); the learner's log-probs use them.
        weights: ``[B]`` float32 per-rollout loss weights, or None (all 1): mu/q = 1/rho of
            rollouts a generator selected among K candidates (``streamrl.common.human.bias_actions``,
            ``control_share``); the trainer multiplies each row's advantages by it.
        ref_logprobs: ``[B, T]`` float32 reference log-probs the scorers computed
            (``ScoredRollout.reference_logprobs``, ``streamrl.common.reference``; 0 on padding), or
            None when a rollout lacks them: the trainer then runs its own reference pass.
        advantage_bonus: ``[B]`` float32 added to every token's advantage of a row after the
            baseline and normalisation (Q-augmentation: beta_t * E * H-hat,
            ``streamrl.common.human.human_terms``), or None (no bonus).
    """

    input_ids: Tensor
    attention_mask: Tensor
    positions: Tensor
    tokens: Tensor
    mask: Tensor
    behaviour_logprobs: Tensor
    scores: Tensor
    group_ids: Tensor
    versions: Tensor
    sampling: SamplingParams
    weights: Tensor | None = None
    ref_logprobs: Tensor | None = None
    advantage_bonus: Tensor | None = None

    @property
    def size(self) -> int:
        """Number of rows B."""
        return self.input_ids.shape[0]

    def _tensors(self) -> dict[str, Tensor]:
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name != "sampling" and getattr(self, f.name) is not None
        }

    def select(self, rows: Tensor) -> TrainBatch:
        """The sub-batch of ``rows`` (``[b]`` int64 indices), trimmed of all-pad columns."""
        sub = {name: t[rows] for name, t in self._tensors().items()}
        width = int(sub["attention_mask"].sum(1).max())
        t = max(int(sub["mask"].sum(1).max()), 1)
        for name in ("input_ids", "attention_mask"):
            sub[name] = sub[name][:, :width]
        for name in ("positions", "tokens", "mask", "behaviour_logprobs", "ref_logprobs"):
            if name in sub:
                sub[name] = sub[name][:, :t]
        return TrainBatch(**sub, sampling=self.sampling)

    def to(self, device: torch.device) -> TrainBatch:
        """A copy with every tensor on ``device``."""
        return TrainBatch(**{name: t.to(device) for name, t in self._tensors().items()}, sampling=self.sampling)


TRAIN_BATCH_DTYPES: dict[str, torch.dtype] = {
    "input_ids": torch.int64,
    "attention_mask": torch.int64,
    "positions": torch.int64,
    "tokens": torch.int64,
    "mask": torch.float32,
    "behaviour_logprobs": torch.float32,
    "scores": torch.float32,
    "group_ids": torch.int64,
    "versions": torch.int64,
    "weights": torch.float32,
    "ref_logprobs": torch.float32,
    "advantage_bonus": torch.float32,
}
"""The dtype of each tensor field of :class:`TrainBatch` (its Attributes): what :func:`collate` makes and
what the data-parallel learner broadcasts and allocates on the other ranks (``distributed.py``)."""


def collate(rollouts: list[ScoredRollout], *, pad_id: int) -> TrainBatch:
    """Pack scored rollouts into a :class:`TrainBatch` (groups keep their ids).

    Raises:
        ValueError: an empty list.
        MixedSamplingError: the rollouts do not share one sampling distribution
            (filter them with :func:`split_by_sampling` first).
    """
    if not rollouts:
        raise ValueError("cannot collate an empty batch")
    kept, refused = split_by_sampling(rollouts)
    if refused:
        reason = next(iter(refused))
        raise MixedSamplingError(
            reason,
            f"{len(rollouts) - len(kept)} of {len(rollouts)} rollouts were sampled "
            f"with another {reason.removeprefix('mixed_')}; split_by_sampling first",
        )
    rows = completion_rows(
        [s.rollout.prompt_tokens for s in rollouts], [s.rollout.completion_tokens for s in rollouts], pad_id=pad_id
    )
    tokens, mask = rows.tokens, rows.mask
    behaviour, _ = pad_right([s.rollout.behaviour_logprobs for s in rollouts], value=0.0, dtype=torch.float32)
    ref = None
    refs = [s.reference_logprobs for s in rollouts if s.reference_logprobs is not None]
    if len(refs) == len(rollouts):  # computed by the scorers
        ref, _ = pad_right(refs, value=0.0, dtype=torch.float32, width=tokens.shape[1])
    group_index: dict[str, int] = {}
    for s in rollouts:
        group_index.setdefault(s.rollout.group_id, len(group_index))
    return TrainBatch(
        input_ids=rows.input_ids,
        attention_mask=rows.attention_mask.long(),
        positions=rows.positions,
        tokens=tokens,
        mask=mask.float(),
        behaviour_logprobs=behaviour,
        scores=torch.tensor([s.reward for s in rollouts], dtype=torch.float32),
        group_ids=torch.tensor([group_index[s.rollout.group_id] for s in rollouts], dtype=torch.long),
        versions=torch.tensor([s.rollout.policy_version for s in rollouts], dtype=torch.long),
        sampling=rollouts[0].rollout.sampling,
        ref_logprobs=ref,
    )


@dataclass
class ModelOutput:
    """Per-completion-token outputs of one forward pass.

    Attributes:
        logprobs: ``[B, T]`` float32 log pi(token) under the batch's sampling distribution
            (temperature, then the nucleus when ``top_p < 1``), nats; ``-inf`` for a token
            outside the nucleus.
        entropy: ``[B, T]`` entropy of that distribution at each position (nats), or None if not asked.
        values: ``[B, T]`` float32 value-head predictions, or None without a value head.
    """

    logprobs: Tensor
    entropy: Tensor | None
    values: Tensor | None


def forward_completions(
    model: PreTrainedModel | PeftModel,
    batch: TrainBatch,
    *,
    value_head: torch.nn.Module | None = None,
    with_entropy: bool = False,
    truncate: bool = True,
) -> ModelOutput:
    """Run ``model`` over ``batch`` and gather completion-aligned outputs under the
    distribution the rollouts were sampled from.

    The logits are divided by the temperature recorded in the rollouts
    (``batch.sampling.temperature``, not the learner's config). With
    ``batch.sampling.top_p < 1`` and ``truncate`` they are then truncated to the
    nucleus of ``model`` itself, as the generators' sampler does
    (:func:`~streamrl.services.learner.losses.nucleus_mask`), and renormalised over it:
    the policy as it acts. A token outside the nucleus gets log-prob ``-inf``; its
    gradient is 0. ``truncate=False`` gives the untruncated distribution at the
    temperature: the reference model's, which the KL penalty compares against (read
    under the policy's nucleus and renormalised, a one-token nucleus made the KL 0
    whatever the reference said).

    The output projection and the value head run in float32 even under bf16 autocast
    (:func:`~streamrl.common.completions.completion_logits`).

    Args:
        model: causal LM.
        batch: the collated rollouts, on the model's device.
        value_head: maps ``[.., H]`` hidden states to ``[.., 1]`` values, or None.
        with_entropy: also return the per-position entropy.
        truncate: apply the nucleus of ``batch.sampling.top_p`` (no effect at ``top_p = 1``).

    Returns:
        A :class:`ModelOutput`.
    """
    hidden, logits = completion_logits(model, batch.input_ids, batch.attention_mask, batch.positions)
    logits = logits / batch.sampling.temperature  # [B, T, V] float32
    if truncate and batch.sampling.top_p < 1:
        logits = logits.masked_fill(~nucleus_mask(logits, batch.sampling.top_p), -math.inf)
    values = linear_fp32(value_head, hidden).squeeze(-1) if value_head is not None else None
    return ModelOutput(
        logprobs=token_logprobs(logits, batch.tokens),
        entropy=entropy_from_logits(logits) if with_entropy else None,
        values=values,
    )
