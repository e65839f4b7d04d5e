"""A critic with its own transformer, initialised from the reward model.

InstructGPT (Ouyang et al. 2022, sec. 3.5, "Reinforcement learning (RL)"): "we initialize
the value function from the RM". With ``learner.value_model = "<RM folder>"`` (and
``advantage = "gae"``) the learner loads the RM folder (one-label
``AutoModelForSequenceClassification``, as ``streamrl rm`` writes it) as a separate value
model, trained with its own learning rate (``learner.value_lr``) beside the policy, instead
of the default value head on the policy's trunk.

The value of state ``s_t`` (the prompt and the first ``t`` completion tokens) is the RM's
head applied to the hidden state at the position that predicts completion token ``t``
(``TrainBatch.positions``), plus the RM's stored normalisation bias as a trainable scalar.
Attention is causal, so before any update ``V(s_t)`` equals the RM's score of exactly the
text ``s_t`` (tested), the score the scorer would give it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from streamrl.common.reward_model import RewardModelInfo, score_head

if TYPE_CHECKING:  # transformers is imported only where a model is built
    from transformers import PreTrainedModel
from streamrl.common.tensors import linear_fp32
from streamrl.services.learner.batch import TrainBatch

__all__ = ["ValueModel"]


class ValueModel(torch.nn.Module):
    """Per-token values from a reward model's transformer and head.

    Args:
        classifier: a one-label decoder sequence classifier (its ``score`` head is the value head).
        bias: initial value of the additive scalar (the RM's normalisation bias).
    """

    def __init__(self, classifier: PreTrainedModel, *, bias: float = 0.0):
        super().__init__()
        if classifier.config.num_labels != 1:
            raise ValueError(f"a value model needs a one-label reward model, got {classifier.config.num_labels} labels")
        self.classifier = classifier
        self.head = score_head(classifier)
        self.bias = torch.nn.Parameter(torch.tensor(float(bias)))

    @classmethod
    def from_reward_model(cls, path: str, *, device: torch.device, tokenizer=None) -> ValueModel:
        """Load the RM folder ``path`` as a value model on ``device``.

        Args:
            path: reward-model folder (``streamrl rm`` output or any one-label decoder classifier).
            device: where the learner trains.
            tokenizer: the policy's tokenizer; when given, the RM's vocabulary must be the same
                (the value model reads the policy's token ids).

        Raises:
            ValueError: more than one label, no decoder ``score`` head, or another vocabulary.
            OSError: not a loadable model folder.
        """
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        classifier = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32)
        if tokenizer is not None and AutoTokenizer.from_pretrained(path).get_vocab() != tokenizer.get_vocab():
            raise ValueError(
                f"learner.value_model: {path} has another vocabulary than the policy, so it cannot "
                "read the policy's tokens; fix: train the reward model from the policy's base model "
                "(`streamrl rm` with rm.base_model = the SFT model) or unset learner.value_model"
            )
        info = RewardModelInfo.from_config(classifier.config)
        return cls(classifier, bias=info.bias).to(device)

    def forward(self, batch: TrainBatch) -> Tensor:
        """``[B, T]`` float32 values ``V(s_t)`` at the completion positions of ``batch``
        (padding positions hold garbage; the value loss masks them)."""
        hidden = self.classifier.base_model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).last_hidden_state
        index = batch.positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
        return linear_fp32(self.head, hidden.gather(1, index)).squeeze(-1) + self.bias  # fp32 under autocast
