"""Pretraining / SFT minibatches for the PPO-ptx term (InstructGPT, Ouyang et al. 2022, eq. 2).

The SFT text of a prompt is its whole demonstration: a text prompt as it is, a chat rendered
whole, and a GSM8K problem as question *and* worked answer (a question alone would teach
nothing the RL data does not already hold). Held-out prompts (the generators' evaluation
split) are removed from the SFT data, matched by normalised text, so PPO-ptx can never
train on what the evaluation measures.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from streamrl.common.config import PromptSource
from streamrl.common.prompt_text import conversation_text
from streamrl.common.prompts import Prompt, PromptStream, load_prompts
from streamrl.common.tensors import pad_right
from streamrl.services.learner.trainer import PtxBatch

log = logging.getLogger(__name__)


def _normalised(text: str) -> str:
    return " ".join(text.split()).casefold()


def demonstration_text(prompt: Prompt, kind: str, tokenizer) -> str:
    """The SFT text of one prompt: ``question + "\n" + answer`` for ``gsm8k`` (the full
    demonstration), the whole chat for chat prompts, else the text as it is.

    Raises:
        ValueError: a chat prompt and a tokenizer without a chat template.
    """
    if kind == "gsm8k":
        return f"{prompt.text}\n{prompt.metadata['answer']}"
    return conversation_text(prompt, tokenizer)


class PtxSampler:
    """Draws right-padded token batches of SFT demonstrations, cycling over the data set in
    seeded epochs.

    Args:
        source: where the texts come from (any prompt source; each text is trained on
            whole, see :func:`demonstration_text`; ``gsm8k`` demonstrations end with EOS).
        tokenizer: the policy's tokenizer.
        batch_size: texts per minibatch.
        max_tokens: texts are truncated to this many tokens.
        seed: shuffle seed.
        held_out: prompts that must never be trained on (the generators' evaluation split,
            :func:`~streamrl.common.prompts.run_split`): any SFT prompt with the same text (whitespace and
            case ignored) is removed, whatever its id or file.

    Raises:
        ValueError: an empty data set, or one with nothing left after removing the
            held-out prompts.
    """

    def __init__(
        self,
        source: PromptSource,
        tokenizer,
        *,
        batch_size: int,
        max_tokens: int,
        seed: int,
        held_out: Sequence[Prompt],
    ):
        prompts = load_prompts(source)
        banned = {_normalised(p.text) for p in held_out}
        kept = [p for p in prompts if _normalised(p.text) not in banned]
        if len(kept) < len(prompts):
            log.info(
                "PPO-ptx: %d of %d prompts of %s are held out for evaluation and never trained on",
                len(prompts) - len(kept),
                len(prompts),
                source.path,
            )
        if prompts and not kept:
            raise ValueError(
                f"learner.ptx_data: every prompt of {source.path} is a held-out evaluation prompt; "
                "fix: give SFT data that is not the evaluation split"
            )
        self.stream = PromptStream(kept, seed=seed)
        self.kind = source.kind
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_tokens = max_tokens

    def __call__(self) -> PtxBatch:
        ids = []
        for p in self.stream.next_batch(self.batch_size):
            row = self.tokenizer(demonstration_text(p, self.kind, self.tokenizer))["input_ids"]
            if self.kind == "gsm8k":  # a demonstration ends: the policy learns to stop after the answer
                row = row + [self.tokenizer.eos_token_id]
            ids.append(row[: self.max_tokens])
        input_ids, attention = pad_right(ids, value=self.tokenizer.pad_token_id, dtype=torch.long)
        return PtxBatch(input_ids=input_ids, attention_mask=attention.long())
