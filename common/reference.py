"""Per-token log-probabilities of rollouts under the frozen reference model, outside the learner.

The reference model (the initial policy, ``model.path``) never changes, so it needs no weight
sync and its log-probs can be computed by any stage that scales like the generators (issue 11
item 2): the scorers attach them to each :class:`~streamrl.common.messages.ScoredRollout`
(``reference_logprobs``) and the learner computes the per-token KL penalty from them instead of
running its own reference pass.

The computation is the learner's (``services/learner/batch.py``: ``collate`` then
``forward_completions``) for the same rows: ``prompt + completion`` right-padded, the
transformer body once, the vocabulary projection only at the completion positions, the logits
divided by the rollout's recorded temperature, ``log_softmax`` read at the sampled token
(computed as ``logit - logsumexp``). With right padding and a causal mask, a row's values do
not depend on the other rows of its micro-batch, so they equal the learner's within float
tolerance.

Only for ``top_p = 1``: with a nucleus the learner reads the reference under pi_old's nucleus,
which only the learner knows; :func:`reference_logprobs` returns None for such rollouts and the
learner falls back to its own pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from streamrl.common.messages import Rollout
from streamrl.common.tensors import pad_right


def computable(rollout: Rollout) -> bool:
    """True when the reference log-probs of ``rollout`` do not depend on the policy (``top_p = 1``)."""
    return rollout.sampling.top_p >= 1.0


@torch.no_grad()
def reference_logprobs(model: torch.nn.Module, rollouts: Sequence[Rollout], *, pad_id: int,
                       micro_batch: int = 16, autocast_bf16: bool = False) -> list[np.ndarray | None]:
    """Log pi_ref(completion token t | prompt, completion[:t]) for every rollout.

    Args:
        model: the frozen reference causal LM (eval mode), on any device.
        rollouts: the rollouts; rows of one forward pass share a temperature.
        pad_id: the tokenizer's pad id (padding only; it never reaches a real position's output).
        micro_batch: rows per forward pass.
        autocast_bf16: run the passes under bf16 autocast (``scorer.autocast_bf16``), as the learner's
            own reference pass does under ``learner.autocast_bf16``; the log-softmax stays float32.

    Returns:
        One ``[T]`` float32 array (nats, T = the completion's length) per rollout, in order;
        None for a rollout sampled with ``top_p < 1`` (see module docstring).
    """
    out: list[np.ndarray | None] = [None] * len(rollouts)
    device = next(model.parameters()).device
    by_temperature: dict[float, list[int]] = {}
    for i, r in enumerate(rollouts):
        if computable(r) and len(r.completion_tokens):
            by_temperature.setdefault(float(r.sampling.temperature), []).append(i)
        elif computable(r):
            out[i] = np.zeros(0, np.float32)
    for temperature, rows in by_temperature.items():
        for start in range(0, len(rows), micro_batch):
            chunk = rows[start:start + micro_batch]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
                values = _forward(model, [rollouts[i] for i in chunk], temperature, pad_id, device)
            for i, v in zip(chunk, values):
                out[i] = v
    return out


def _forward(model, rollouts: Sequence[Rollout], temperature: float, pad_id: int, device) -> list[np.ndarray]:
    prompts = [r.prompt_tokens.astype("int64") for r in rollouts]
    completions = [r.completion_tokens.astype("int64") for r in rollouts]
    input_ids, attention = pad_right([np.concatenate(pc) for pc in zip(prompts, completions)], value=pad_id)
    tokens, mask = pad_right(completions, value=pad_id)
    lengths = torch.tensor([len(p) for p in prompts])
    positions = (lengths.unsqueeze(1) - 1 + torch.arange(tokens.shape[1])) * mask  # as the learner's collate
    hidden = model.base_model(input_ids=input_ids.to(device),
                              attention_mask=attention.long().to(device)).last_hidden_state
    index = positions.to(device).unsqueeze(-1)
    hidden = hidden.gather(1, index.expand(-1, -1, hidden.shape[-1]))  # [B, T, H]
    logits = model.get_output_embeddings()(hidden).float() / temperature  # [B, T, V]
    tokens = tokens.to(device)
    logprobs = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    logprobs = logprobs.cpu().numpy().astype(np.float32)
    return [logprobs[b, :len(c)].copy() for b, c in enumerate(completions)]
