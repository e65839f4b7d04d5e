"""Batched sampling of G completions per prompt with behaviour log-probs.

Generation uses Hugging Face ``generate`` (KV cache, left padding) with a complete,
explicit generation config (:func:`generation_config`): temperature and top-p only,
never the model's own sampling defaults. The behaviour log-prob of each sampled token is taken from the *processed*
scores ``generate`` sampled from (after temperature and top-p), so it is the
log-probability under the distribution the token was actually drawn from: the
behaviour policy mu that the learner's importance ratios divide by.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from streamrl.common.config import Config
from streamrl.common.messages import FinishReason, SamplingParams
from streamrl.common.prompt_text import format_prompt
from streamrl.common.prompts import Prompt
from streamrl.common.tensors import pad_left

log = logging.getLogger(__name__)


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
    texts = [
        format_prompt(p.text, tokenizer, chat_template=chat_template, system=system_prompt, messages=p.messages)
        for p in prompts
    ]
    templated = chat_template or any(p.messages is not None for p in prompts)  # the template holds the specials
    ids = encode_prompts(tokenizer, texts, max_prompt_tokens=max_prompt_tokens, add_special_tokens=not templated)
    return texts, ids


def prepare_run_prompts(
    tokenizer: PreTrainedTokenizerBase, prompts: list[Prompt], config: Config
) -> tuple[list[str], list[list[int]]]:
    """:func:`prepare_prompts` as the run's generators call it (``model.chat_template``,
    ``model.system_prompt``, ``generator.max_prompt_tokens``), so that evaluation and the
    benchmarks give the policy the prompts exactly as training sampled them."""
    return prepare_prompts(
        tokenizer,
        prompts,
        chat_template=config.model.chat_template,
        system_prompt=config.model.system_prompt,
        max_prompt_tokens=config.generator.max_prompt_tokens,
    )


NEUTRAL_SETTINGS: dict[str, object] = {
    "top_k": 0,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "min_length": 0,
    "guidance_scale": 1.0,
    "renormalize_logits": False,
    "remove_invalid_values": False,
    "num_beams": 1,
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
    "length_penalty": 1.0,
    "num_return_sequences": 1,
    "early_stopping": False,
}
"""``GenerationConfig`` fields that would add a logits processor (or change the search),
each set to the value that turns it off. ``generate`` fills every field left unset from
the model's own ``generation_config``; setting these explicitly keeps a checkpoint's
defaults (a hub model's ``repetition_penalty`` or ``top_k``) out of the sampling."""

HARMLESS_MODEL_SETTINGS = frozenset(
    {
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "decoder_start_token_id",
        "max_length",
        "max_new_tokens",
        "use_cache",
        "cache_implementation",
        "cache_config",
        "output_attentions",
        "output_hidden_states",
        "output_scores",
        "output_logits",
        "return_dict_in_generate",
        "compile_config",
        "disable_compile",
        "prefill_chunk_size",
        "transformers_version",
        "_from_model_config",
    }
)
"""Fields of a model's ``generation_config`` that do not change the sampled distribution
(ids the explicit config sets anyway, caching and output switches, bookkeeping)."""

_warned_overrides: set[tuple] = set()


def generation_config(
    model: PreTrainedModel, sampling: SamplingParams, *, pad_token_id: int, eos_token_id: int
) -> GenerationConfig:
    """The complete ``GenerationConfig`` a rollout is sampled with: ancestral sampling at
    ``sampling.temperature`` then nucleus ``sampling.top_p``, every other distribution
    setting explicitly neutral (:data:`NEUTRAL_SETTINGS`), so the only logits processors
    are the temperature and top-p warpers, which the learner reproduces exactly.

    A model's ``generation_config`` values for the settings of this config are overridden
    (logged once: the rollout's sampling parameters are the truth). Any other setting it
    makes that could change the distribution or cut a completion (``suppress_tokens``,
    ``bad_words_ids``, ``min_p``, ``sequence_bias``, ``forced_eos_token_id``,
    ``stop_strings``, a watermark, ...) is refused: the learner could not reproduce it.

    Raises:
        ValueError: the model's ``generation_config`` sets such a field; the message names it.
    """
    explicit = {
        "do_sample": True,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_new_tokens": sampling.max_new_tokens,
        "pad_token_id": pad_token_id,
        "eos_token_id": eos_token_id,
        "output_scores": True,
        "return_dict_in_generate": True,
        **NEUTRAL_SETTINGS,
    }
    model_settings = model.generation_config.to_diff_dict()
    refused = {
        k: v
        for k, v in model_settings.items()
        if k not in explicit and k not in HARMLESS_MODEL_SETTINGS and v is not None
    }
    if refused:
        settings = ", ".join(f"{k}={v!r}" for k, v in refused.items())
        raise ValueError(
            f"the model's generation_config sets {settings}: sampling settings the learner cannot reproduce (it "
            "computes log-probs from temperature and top_p only), so every importance ratio would be biased; "
            "fix: remove them from the model's generation_config.json"
        )
    overridden = tuple(
        sorted(
            (k, repr(v))
            for k, v in model_settings.items()
            if k in explicit and k not in HARMLESS_MODEL_SETTINGS and v != explicit[k]
        )
    )
    if overridden and overridden not in _warned_overrides:
        _warned_overrides.add(overridden)
        log.warning(
            "ignoring the model's generation_config settings %s: rollouts are sampled with the configured "
            "temperature %g and top_p %g only (the learner reproduces exactly those)",
            ", ".join(f"{k}={v}" for k, v in overridden),
            sampling.temperature,
            sampling.top_p,
        )
    return GenerationConfig(**explicit)


@torch.no_grad()
def sample_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[list[int]],
    *,
    group_size: int,
    sampling: SamplingParams,
    autocast_bf16: bool = False,
) -> list[list[Completion]]:
    """Sample ``group_size`` completions for each prompt in one batched ``generate`` call.

    Args:
        model: causal LM (eval mode) on its device.
        tokenizer: its tokenizer (needs pad and eos tokens).
        prompts: token ids per prompt (from :func:`encode_prompts`).
        group_size: completions per prompt (G).
        sampling: temperature, top-p and token budget: the only settings that shape
            the distribution (see :func:`generation_config`).
        autocast_bf16: run the model under bf16 autocast (``generator.autocast_bf16``). The
            recorded log-probs are then those of the bf16-computed logits the tokens were
            drawn from (still the exact behaviour policy mu); the learner's fp32 pi_old differs
            from them by the bf16 rounding, which its importance ratios correct.

    Returns:
        One list of ``group_size`` :class:`Completion` per prompt, in input order.

    Raises:
        ValueError: the model's ``generation_config`` asks for a logits processor the
            learner cannot reproduce (see :func:`generation_config`).
    """
    device = model.device
    rows = [ids for ids in prompts for _ in range(group_size)]
    pad = tokenizer.pad_token_id
    input_ids, attention = pad_left(rows, value=pad, dtype=torch.long)  # generation continues at the right edge
    width = input_ids.shape[1]
    config = generation_config(model, sampling, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast_bf16):
        # generate is GenerationMixin's (on every causal LM), not on PreTrainedModel's type
        out = model.generate(  # type: ignore[operator]
            input_ids=input_ids.to(device), attention_mask=attention.long().to(device), generation_config=config
        )
    new_tokens = out.sequences[:, width:].cpu()  # [N, T']
    # one [N, V] step at a time: never materialise [N, T', V] log-probs
    sampled = out.sequences[:, width:]
    logprobs = torch.stack(
        [
            torch.log_softmax(step.float(), dim=-1).gather(-1, sampled[:, t : t + 1]).squeeze(-1)
            for t, step in enumerate(out.scores)
        ],
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
                # transformers types decode as str | list[str]; of one sequence it is a str
                text=tokenizer.decode(completion, skip_special_tokens=True),  # type: ignore[arg-type]
            )
        )
    return result
