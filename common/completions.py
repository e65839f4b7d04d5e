"""The completion-aligned forward pass that the learner and the reference pass share.

A rollout becomes one row ``prompt + completion``, right-padded into ``[B, L]``; the logits that
predict completion token ``t`` come from position ``prompt_len - 1 + t``. The learner
(:func:`streamrl.services.learner.batch.collate` and
:func:`~streamrl.services.learner.batch.forward_completions`) and the scorers' reference pass
(:func:`streamrl.common.reference.reference_logprobs`) both lay rows out with
:func:`completion_rows` and run the model with :func:`completion_logits` (the transformer body,
then the vocabulary projection in float32 at the completion positions only), so they compute the
same log-probs for the same rollout (within float tolerance: with right padding and a causal mask
a row does not depend on the other rows of its batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
from torch import Tensor

from streamrl.common.lora import is_lora
from streamrl.common.tensors import linear_fp32, pad_right

if TYPE_CHECKING:  # transformers is imported only where a model is built
    from peft import PeftModel
    from transformers import PreTrainedModel

__all__ = ["CompletionRows", "completion_hidden", "completion_logits", "completion_rows"]


@dataclass(frozen=True)
class CompletionRows:
    """Rollouts laid out for one forward pass (CPU tensors).

    Attributes:
        input_ids: ``[B, L]`` int64, ``prompt + completion`` of each row, right-padded with the pad id.
        attention_mask: ``[B, L]`` bool, True on real tokens.
        tokens: ``[B, T]`` int64, the completion tokens, right-padded with the pad id.
        mask: ``[B, T]`` bool, True on real completion tokens.
        positions: ``[B, T]`` int64, the index into ``L`` of the hidden state that predicts
            completion token ``t`` (``prompt_len - 1 + t``; 0 on padding).
    """

    input_ids: Tensor
    attention_mask: Tensor
    tokens: Tensor
    mask: Tensor
    positions: Tensor


def completion_rows(prompts: Sequence[np.ndarray], completions: Sequence[np.ndarray], *, pad_id: int) -> CompletionRows:
    """Lay out ``B`` rollouts as :class:`CompletionRows`.

    Args:
        prompts: ``B`` 1-D integer arrays of prompt token ids (each non-empty).
        completions: ``B`` 1-D integer arrays of completion token ids.
        pad_id: token id written into padded positions.
    """
    prompts = [p.astype("int64") for p in prompts]
    completions = [c.astype("int64") for c in completions]
    input_ids, attention = pad_right([np.concatenate(pc) for pc in zip(prompts, completions)], value=pad_id)
    tokens, mask = pad_right(completions, value=pad_id)
    prompt_lengths = torch.tensor([len(p) for p in prompts])
    positions = (prompt_lengths.unsqueeze(1) - 1 + torch.arange(tokens.shape[1])) * mask
    return CompletionRows(input_ids=input_ids, attention_mask=attention, tokens=tokens, mask=mask, positions=positions)


def completion_hidden(
    model: PreTrainedModel | PeftModel, input_ids: Tensor, attention_mask: Tensor, positions: Tensor
) -> Tensor:
    """The transformer body's last hidden states at the completion positions.

    Only the body runs over all ``L`` positions; :func:`completion_logits` applies the vocabulary
    projection to the ``[B, T, H]`` result alone, so prompt positions never get ``[V]``-sized
    logits (V = 49k for SmolLM2).

    Args:
        model: a Hugging Face causal LM (``base_model`` returns ``last_hidden_state``), or a PEFT
            ``PeftModel`` of one (LoRA: the adapted body, or the base under ``disable_adapter()``).
        input_ids: ``[B, L]`` int64 on the model's device.
        attention_mask: ``[B, L]`` int64 (1 = real token) on the model's device.
        positions: ``[B, T]`` int64 on the model's device (:attr:`CompletionRows.positions`).

    Returns:
        ``[B, T, H]`` hidden states, in the model's (or autocast's) dtype.
    """
    # PEFT wraps the LM (and types it as a plain nn.Module): its body carries the adapters
    lm = cast("PreTrainedModel", model.get_base_model()) if is_lora(model) else model
    hidden = lm.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    index = positions.unsqueeze(-1)
    return hidden.gather(1, index.expand(-1, -1, hidden.shape[-1]))


def completion_logits(
    model: PreTrainedModel | PeftModel, input_ids: Tensor, attention_mask: Tensor, positions: Tensor
) -> tuple[Tensor, Tensor]:
    """:func:`completion_hidden`, then the vocabulary projection at those positions, in float32.

    Under bf16 autocast the body runs in bf16 but the output projection runs in float32
    (:func:`~streamrl.common.tensors.linear_fp32`): the logits are those of a float32 head on the
    bf16 hidden states, so the log-probs, ratios and KL read from them keep float32 precision.

    Args:
        model: a Hugging Face causal LM (``base_model`` and ``get_output_embeddings()``).
        input_ids: ``[B, L]`` int64 on the model's device, right-padded.
        attention_mask: ``[B, L]`` int64 (1 = real token) on the model's device.
        positions: ``[B, T]`` int64 on the model's device (:attr:`CompletionRows.positions`).

    Returns:
        ``(hidden, logits)``: ``[B, T, H]`` hidden states (the body's dtype, for a value head) and
        ``[B, T, V]`` float32 logits (before any temperature).
    """
    hidden = completion_hidden(model, input_ids, attention_mask, positions)
    return hidden, linear_fp32(model.get_output_embeddings(), hidden)
