"""Pretraining / SFT minibatches for the PPO-ptx term (InstructGPT, Ouyang et al. 2022, eq. 2)."""

from __future__ import annotations

import torch

from streamrl.common.config import PromptSource
from streamrl.common.prompts import PromptStream, conversation_text, load_prompts
from streamrl.common.tensors import pad_right
from streamrl.services.learner.trainer import PtxBatch


class PtxSampler:
    """Draws right-padded token batches of SFT text, cycling over the data set in seeded epochs.

    Args:
        source: where the texts come from (any prompt source; the text is trained on whole).
        tokenizer: the policy's tokenizer.
        batch_size: texts per minibatch.
        max_tokens: texts are truncated to this many tokens.
        seed: shuffle seed.

    Raises:
        ValueError: an empty data set.
    """

    def __init__(self, source: PromptSource, tokenizer, *, batch_size: int, max_tokens: int, seed: int):
        self.stream = PromptStream(load_prompts(source), seed=seed)
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_tokens = max_tokens

    def __call__(self) -> PtxBatch:
        texts = [conversation_text(p, self.tokenizer) for p in self.stream.next_batch(self.batch_size)]
        ids = [self.tokenizer(t)["input_ids"][: self.max_tokens] for t in texts]
        input_ids, attention = pad_right(ids, value=self.tokenizer.pad_token_id, dtype=torch.long)
        return PtxBatch(input_ids=input_ids, attention_mask=attention.long())
