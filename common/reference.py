"""Per-token log-probabilities of rollouts under the frozen reference model, outside the learner.

The reference model (the initial policy, ``model.path``) never changes, so it needs no weight
sync and its log-probs can be computed by any stage that scales like the generators: the
scorers attach them to each :class:`~streamrl.common.messages.ScoredRollout`
(``reference_logprobs``) and the learner computes the per-token KL penalty from them instead of
running its own reference pass.

The computation is the learner's (``services/learner/batch.py``: ``collate`` then
``forward_completions(..., truncate=False)``, sharing :mod:`streamrl.common.completions`) for the
same rows: ``prompt + completion`` right-padded, the transformer body once, the vocabulary
projection only at the completion positions and in float32
(:func:`~streamrl.common.completions.completion_logits`), the logits divided by the rollout's
recorded temperature, ``log_softmax`` read at the sampled token (computed as
``logit - logsumexp``). With right padding and a causal mask, a row's values do not depend on
the other rows of its micro-batch, so they equal the learner's within float tolerance.

The reference is never truncated to a nucleus, whatever the rollout's ``top_p``: the KL penalty
compares the policy as it samples with the reference as it is. (Read under the policy's nucleus
and renormalised over it, the reference of a one-token nucleus had probability 1 and the KL was
0 whatever the reference said.) So the values depend on nothing the learner alone knows, and
every rollout gets them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from streamrl.common.completions import completion_logits, completion_rows
from streamrl.common.messages import Rollout


@torch.no_grad()
def reference_logprobs(
    model: torch.nn.Module,
    rollouts: Sequence[Rollout],
    *,
    pad_id: int,
    micro_batch: int = 16,
    autocast_bf16: bool = False,
) -> list[np.ndarray]:
    """Log pi_ref(completion token t | prompt, completion[:t]) for every rollout.

    Args:
        model: the frozen reference causal LM (eval mode), on any device.
        rollouts: the rollouts; rows of one forward pass share a temperature.
        pad_id: the tokenizer's pad id (padding only; it never reaches a real position's output).
        micro_batch: rows per forward pass.
        autocast_bf16: run the body under bf16 autocast (``scorer.autocast_bf16``), as the learner's
            own reference pass does under ``learner.autocast_bf16``; the output projection and the
            log-softmax stay float32.

    Returns:
        One ``[T]`` float32 array (nats, T = the completion's length) per rollout, in order: the
        untruncated reference at the rollout's temperature (see module docstring).
    """
    out: list[np.ndarray] = [np.zeros(0, np.float32)] * len(rollouts)
    device = next(model.parameters()).device
    by_temperature: dict[float, list[int]] = {}
    for i, r in enumerate(rollouts):
        if len(r.completion_tokens):
            by_temperature.setdefault(float(r.sampling.temperature), []).append(i)
    for temperature, rows in by_temperature.items():
        for start in range(0, len(rows), micro_batch):
            chunk = rows[start : start + micro_batch]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
                values = _forward(model, [rollouts[i] for i in chunk], temperature, pad_id, device)
            for i, v in zip(chunk, values):
                out[i] = v
    return out


def _forward(model, rollouts: Sequence[Rollout], temperature: float, pad_id: int, device) -> list[np.ndarray]:
    rows = completion_rows([r.prompt_tokens for r in rollouts], [r.completion_tokens for r in rollouts], pad_id=pad_id)
    _, logits = completion_logits(
        model, rows.input_ids.to(device), rows.attention_mask.long().to(device), rows.positions.to(device)
    )
    logits = logits / temperature  # [B, T, V]
    tokens = rows.tokens.to(device)
    logprobs = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    rows_np = logprobs.cpu().numpy().astype(np.float32)  # [B, T]
    return [rows_np[b, : len(r.completion_tokens)].copy() for b, r in enumerate(rollouts)]
