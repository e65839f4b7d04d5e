"""Turn scored rollouts into padded training tensors, and score them with a model.

Layout: each row is ``prompt + completion`` right-padded to ``L``; completion
token ``t`` of row ``b`` is predicted by the logits at position
``prompt_len[b] - 1 + t``. Completion-aligned tensors are ``[B, T]`` with
``T`` the longest completion, right-padded, ``mask`` = 1 on real tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from streamrl.common.messages import ScoredRollout
from streamrl.services.learner.losses import entropy_from_logits, token_logprobs


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

    @property
    def size(self) -> int:
        """Number of rows B."""
        return self.input_ids.shape[0]

    def select(self, rows: Tensor) -> "TrainBatch":
        """The sub-batch of ``rows`` (``[b]`` int64 indices), trimmed of all-pad columns."""
        sub = {name: getattr(self, name)[rows] for name in self.__dataclass_fields__}
        width = int(sub["attention_mask"].sum(1).max())
        t = max(int(sub["mask"].sum(1).max()), 1)
        for name in ("input_ids", "attention_mask"):
            sub[name] = sub[name][:, :width]
        for name in ("positions", "tokens", "mask", "behaviour_logprobs"):
            sub[name] = sub[name][:, :t]
        return TrainBatch(**sub)

    def to(self, device: torch.device) -> "TrainBatch":
        """A copy with every tensor on ``device``."""
        return TrainBatch(**{name: getattr(self, name).to(device) for name in self.__dataclass_fields__})


def collate(rollouts: list[ScoredRollout], *, pad_id: int) -> TrainBatch:
    """Pack scored rollouts into a :class:`TrainBatch` (groups keep their ids).

    Raises:
        ValueError: an empty list.
    """
    if not rollouts:
        raise ValueError("cannot collate an empty batch")
    b = len(rollouts)
    lengths = [len(s.rollout.prompt_tokens) + len(s.rollout.completion_tokens) for s in rollouts]
    width = max(lengths)
    t = max(len(s.rollout.completion_tokens) for s in rollouts)
    input_ids = torch.full((b, width), pad_id, dtype=torch.long)
    attention = torch.zeros((b, width), dtype=torch.long)
    positions = torch.zeros((b, t), dtype=torch.long)
    tokens = torch.full((b, t), pad_id, dtype=torch.long)
    mask = torch.zeros((b, t), dtype=torch.float32)
    behaviour = torch.zeros((b, t), dtype=torch.float32)
    group_index: dict[str, int] = {}
    for i, scored in enumerate(rollouts):
        r = scored.rollout
        p, n = len(r.prompt_tokens), len(r.completion_tokens)
        input_ids[i, :p] = torch.from_numpy(r.prompt_tokens.astype("int64"))
        input_ids[i, p : p + n] = torch.from_numpy(r.completion_tokens.astype("int64"))
        attention[i, : p + n] = 1
        positions[i, :n] = torch.arange(p - 1, p - 1 + n)
        tokens[i, :n] = input_ids[i, p : p + n]
        mask[i, :n] = 1
        behaviour[i, :n] = torch.from_numpy(r.behaviour_logprobs.copy())
        group_index.setdefault(r.group_id, len(group_index))
    return TrainBatch(
        input_ids=input_ids,
        attention_mask=attention,
        positions=positions,
        tokens=tokens,
        mask=mask,
        behaviour_logprobs=behaviour,
        scores=torch.tensor([s.reward for s in rollouts], dtype=torch.float32),
        group_ids=torch.tensor([group_index[s.rollout.group_id] for s in rollouts], dtype=torch.long),
        versions=torch.tensor([s.rollout.policy_version for s in rollouts], dtype=torch.long),
    )


@dataclass
class ModelOutput:
    """Per-completion-token outputs of one forward pass.

    Attributes:
        logprobs: ``[B, T]`` log pi(token) at temperature ``temperature`` (nats).
        entropy: ``[B, T]`` entropy of pi at each position (nats), or None if not asked.
        values: ``[B, T]`` value-head predictions, or None without a value head.
    """

    logprobs: Tensor
    entropy: Tensor | None
    values: Tensor | None


def forward_completions(
    model: torch.nn.Module,
    batch: TrainBatch,
    *,
    temperature: float,
    value_head: torch.nn.Module | None = None,
    with_entropy: bool = False,
) -> ModelOutput:
    """Run ``model`` over ``batch`` and gather completion-aligned outputs.

    The logits are divided by ``temperature`` so pi is the distribution the
    generators sample from before top-p (top-p's truncation is what the
    importance ratio pi_old/mu then corrects).
    """
    # Run the transformer body, then the vocabulary projection only at completion
    # positions: prompt positions never need [V]-sized logits (V = 49k for SmolLM2).
    hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    index = batch.positions.unsqueeze(-1)
    hidden = hidden.gather(1, index.expand(-1, -1, hidden.shape[-1]))  # [B, T, H]
    logits = model.get_output_embeddings()(hidden).float() / temperature  # [B, T, V]
    values = value_head(hidden.float()).squeeze(-1) if value_head is not None else None
    return ModelOutput(
        logprobs=token_logprobs(logits, batch.tokens),
        entropy=entropy_from_logits(logits) if with_entropy else None,
        values=values,
    )
