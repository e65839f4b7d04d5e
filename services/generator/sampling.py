"""Batched sampling of G completions per prompt with behaviour log-probs.

Generation uses Hugging Face ``generate`` (KV cache, left padding). The
behaviour log-prob of each sampled token is taken from the *processed*
scores ``generate`` sampled from (after temperature and top-p), so it is the
log-probability under the distribution the token was actually drawn from: the
behaviour policy mu that the learner's importance ratios divide by.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from streamrl.common.messages import FinishReason, SamplingParams
from streamrl.common.prompts import Prompt, format_prompt
from streamrl.common.tensors import pad_left


@dataclass
class Completion:
    """One sampled completion.

    Attributes:
        prompt_tokens: ``[P]`` int32 prompt ids (no padding, after truncation).
        completion_tokens: ``[T]`` int32 sampled ids, up to and including the first EOS.
        logprobs: ``[T]`` float32 behaviour log-probs (nats) of ``completion_tokens``.
        finish_reason: ``stop`` when EOS was sampled, else ``length``.
        text: completion decoded without special tokens.
    """

    prompt_tokens: np.ndarray
    completion_tokens: np.ndarray
    logprobs: np.ndarray
    finish_reason: FinishReason
    text: str


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], *, max_prompt_tokens: int, add_special_tokens: bool
) -> list[list[int]]:
    """Token ids of each prompt, keeping the last ``max_prompt_tokens`` tokens.

    Raises:
        ValueError: a prompt encodes to no tokens.
    """
    out = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"][-max_prompt_tokens:]
        if not ids:
            raise ValueError(f"prompt {text!r} encodes to no tokens")
        out.append(ids)
    return out


def prepare_prompts(
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[Prompt],
    *,
    chat_template: bool,
    system_prompt: str | None,
    max_prompt_tokens: int,
) -> tuple[list[str], list[list[int]]]:
    """Prompt texts as the policy sees them (chat template applied when asked) and their token ids.

    With a chat template the template already holds the special tokens, so none are
    added when encoding; without one the tokenizer's defaults (e.g. BOS) apply.

    Raises:
        ValueError: a prompt encodes to no tokens.
    """
    texts = [format_prompt(p.text, tokenizer, chat_template=chat_template, system=system_prompt) for p in prompts]
    ids = encode_prompts(tokenizer, texts, max_prompt_tokens=max_prompt_tokens, add_special_tokens=not chat_template)
    return texts, ids


@torch.no_grad()
def sample_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    *,
    group_size: int,
    sampling: SamplingParams,
) -> list[list[Completion]]:
    """Sample ``group_size`` completions for each prompt in one batched ``generate`` call.

    Args:
        model: causal LM (eval mode) on its device.
        tokenizer: its tokenizer (needs pad and eos tokens).
        prompts: token ids per prompt (from :func:`encode_prompts`).
        group_size: completions per prompt (G).
        sampling: temperature, top-p and token budget.

    Returns:
        One list of ``group_size`` :class:`Completion` per prompt, in input order.
    """
    device = model.device
    rows = [ids for ids in prompts for _ in range(group_size)]
    pad = tokenizer.pad_token_id
    input_ids, attention = pad_left(rows, value=pad, dtype=torch.long)  # generation continues at the right edge
    width = input_ids.shape[1]
    config = GenerationConfig(
        do_sample=True,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=0,
        max_new_tokens=sampling.max_new_tokens,
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
        output_scores=True,
        return_dict_in_generate=True,
    )
    out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.long().to(device),
                         generation_config=config)
    new_tokens = out.sequences[:, width:].cpu()  # [N, T']
    # one [N, V] step at a time: never materialise [N, T', V] log-probs
    sampled = out.sequences[:, width:]
    logprobs = torch.stack(
        [torch.log_softmax(step.float(), dim=-1).gather(-1, sampled[:, t : t + 1]).squeeze(-1)
         for t, step in enumerate(out.scores)],
        dim=1,
    ).cpu()  # [N, T'] behaviour log-probs of the processed (temperature, top-p) distribution
    eos = tokenizer.eos_token_id
    result: list[list[Completion]] = [[] for _ in prompts]
    for i, ids in enumerate(rows):
        tokens = new_tokens[i]
        hits = (tokens == eos).nonzero()
        length = int(hits[0]) + 1 if len(hits) else tokens.numel()
        completion = tokens[:length]
        result[i // group_size].append(
            Completion(
                prompt_tokens=np.asarray(ids, dtype=np.int32),
                completion_tokens=completion.numpy().astype(np.int32),
                logprobs=logprobs[i, :length].numpy().astype(np.float32),
                finish_reason=FinishReason.STOP if len(hits) else FinishReason.LENGTH,
                text=tokenizer.decode(completion, skip_special_tokens=True),
            )
        )
    return result
