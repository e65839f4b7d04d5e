"""Reward-model inference: one scalar per ``prompt + response`` text, read at the last real token.

Shared by the scorer (a trained RM as a reward component), the learner (a value model
initialised from the RM, InstructGPT sec. 3.5: "we initialize the value function from
the RM") and ``streamrl rm`` (which trains and evaluates the RM with these functions, so
training and scoring see the same tokens).

A streamrl reward model is a Hugging Face folder that
``AutoModelForSequenceClassification`` loads (one label: a linear ``score`` head on the
transformer, no bias), plus a table ``streamrl_reward`` in its ``config.json``
(:class:`RewardModelInfo`): the normalisation ``bias`` added to the head's output so that
the SFT demonstrations score 0 on average (Ouyang et al. 2022, "Training language models
to follow instructions with human feedback", sec. 3.5), the token budget and truncation
used in training, and whether prompts were wrapped in the tokenizer's chat template.
A folder without that table (any Hugging Face sequence classifier) scores with bias 0,
512 tokens, left truncation; a classifier with several outputs (e.g. a sentiment model
used as a reward) is read at the output named by ``label``.

Text layout. The text scored is ``prompt + response`` as one string (the prompt exactly as
the policy saw it, chat template included; the response without end-of-turn tokens, as
the generators decode it), tokenized once with the tokenizer's defaults and truncated on
the **left** to ``max_length`` tokens: the score is read at the last token, so the
response end must survive truncation. Batches are right-padded and the score is taken at
the last position whose attention mask is 1 (not by searching for the pad id, so a pad id
that also occurs in the text, e.g. SmolLM2's ``<|im_end|>``, cannot move it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:  # transformers is imported only where a model is built
    from transformers import PreTrainedModel

__all__ = [
    "REWARD_INFO_KEY",
    "RewardModelInfo",
    "RewardModel",
    "encode_texts",
    "last_token_index",
    "pad_right",
    "pool_last",
    "score_head",
    "sequence_scores",
    "token_scores",
]

REWARD_INFO_KEY = "streamrl_reward"
"""Key of the :class:`RewardModelInfo` table in a reward model's ``config.json``."""


@dataclass(frozen=True)
class RewardModelInfo:
    """What a reward model folder records about how to score with it.

    Attributes:
        bias: added to the head's raw output (reward units); set after training so the
            SFT demonstrations average 0 (InstructGPT sec. 3.5).
        max_length: tokens per text; longer texts keep their last ``max_length`` tokens.
        chat_template: prompts were wrapped in the tokenizer's chat template in training.
        system_prompt: the system message used with the chat template (None: the template's).
        extra: anything else the trainer recorded (statistics, data, base model).
    """

    bias: float = 0.0
    max_length: int = 512
    chat_template: bool = False
    system_prompt: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form stored under :data:`REWARD_INFO_KEY` in ``config.json``."""
        return asdict(self)

    @classmethod
    def from_config(cls, config: Any) -> RewardModelInfo:
        """Read the table from a model config (defaults when the model has none).

        Raises:
            ValueError: the table is not a dict, or its bias or max_length is invalid.
        """
        raw = getattr(config, REWARD_INFO_KEY, None)
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise ValueError(f"config.json: {REWARD_INFO_KEY} must be a table, got {type(raw).__name__}")
        known = {k: raw[k] for k in ("bias", "max_length", "chat_template", "system_prompt", "extra") if k in raw}
        info = cls(**known)
        if not isinstance(info.bias, (int, float)) or not math.isfinite(info.bias):
            raise ValueError(f"config.json: {REWARD_INFO_KEY}.bias must be a finite number, got {info.bias!r}")
        if not isinstance(info.max_length, int) or info.max_length < 1:
            raise ValueError(
                f"config.json: {REWARD_INFO_KEY}.max_length must be a positive int, got {info.max_length!r}"
            )
        return info


def encode_texts(tokenizer: Any, texts: Sequence[str], *, max_length: int) -> list[list[int]]:
    """Token ids of each text (tokenizer defaults), keeping the last ``max_length`` tokens.

    Raises:
        ValueError: ``max_length`` < 1 or a text that encodes to no tokens.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    out = []
    for i, ids in enumerate(tokenizer(list(texts))["input_ids"]):
        if not ids:
            raise ValueError(f"text {i} ({texts[i]!r:.60}) encodes to no tokens; a reward needs at least one")
        out.append(list(ids[-max_length:]))
    return out


def pad_right(sequences: Sequence[Sequence[int]], *, pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-pad token lists into ``input_ids`` ``[B, L]`` int64 and ``attention_mask`` ``[B, L]`` int64.

    Raises:
        ValueError: no sequences, or an empty one.
    """
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("pad_right needs at least one sequence and no empty sequence")
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        input_ids[i, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        attention[i, : len(seq)] = 1
    return input_ids, attention


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of the last position whose mask is non-zero, per row.

    Args:
        attention_mask: ``[B, L]`` (any padding side), non-zero = real token.

    Returns:
        ``[B]`` int64 indices.

    Raises:
        ValueError: a row without any real token.
    """
    real = attention_mask != 0
    if not bool(real.any(dim=1).all()):
        raise ValueError("a row of attention_mask has no real token; it has no last token to score")
    positions = torch.arange(real.shape[1], device=real.device).expand_as(real)
    return torch.where(real, positions, torch.full_like(positions, -1)).max(dim=1).values


def pool_last(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Hidden state of each row's last real token: ``[B, L, H]`` -> ``[B, H]``."""
    last = last_token_index(attention_mask)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def score_head(model: torch.nn.Module) -> torch.nn.Linear:
    """The linear ``score`` head of a decoder sequence classifier (Llama, Qwen, Mistral, ... in
    transformers' ``GenericForSequenceClassification``: ``[H] -> [num_labels]``, read at the last token).

    Raises:
        ValueError: the model has no ``score`` linear layer.
    """
    head = getattr(model, "score", None)
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(
            f"{type(model).__name__} has no linear `score` head read at the last token (a decoder "
            "model loaded by AutoModelForSequenceClassification, e.g. a Llama, Qwen or Mistral)"
        )
    return head


def token_scores(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, *, label: int = 0) -> Tensor:
    """The raw head output (column ``label``) at every position: the score of each prefix ``text[: t + 1]``.

    With causal attention position ``t`` sees tokens ``0..t`` only, so ``out[b, t]`` is the
    score the model gives the text made of the first ``t + 1`` tokens (without the bias).

    Args:
        model: a decoder sequence classifier (see :func:`score_head`).
        input_ids: ``[B, L]`` int64, right-padded.
        attention_mask: ``[B, L]`` int64.
        label: the output column read.

    Returns:
        ``[B, L]`` float32 (padded positions hold garbage).
    """
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return score_head(model)(hidden)[..., label].float()


def sequence_scores(model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, *, label: int = 0) -> Tensor:
    """The raw output (column ``label``, no bias) for each row's whole text.

    A decoder classifier (with a ``score`` head) is read at the last position whose
    attention mask is 1 (what HF's classifier returns for an unpadded text, whatever the
    pad id); any other classifier (BERT-like) pools as its own forward does.

    Args:
        model: a sequence classifier.
        input_ids: ``[B, L]`` int64 (any padding side for decoders).
        attention_mask: ``[B, L]`` int64.
        label: the output column read.

    Returns:
        ``[B]`` float32.
    """
    if not isinstance(getattr(model, "score", None), torch.nn.Linear):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, label].float()
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return score_head(model)(pool_last(hidden, attention_mask))[:, label].float()


class RewardModel:
    """A reward model folder loaded for scoring, normalised by its stored bias.

    Args:
        path: local folder (``AutoModelForSequenceClassification`` + ``AutoTokenizer``).
        device: where to run it.
        batch_size: texts per forward pass.
        max_length: token budget per text; None = the one stored with the model.
        label: the output read as the score, an index or a name of ``id2label``; None for a
            one-label model (a reward model), required when it has more labels (e.g. a
            sentiment classifier used as a reward).

    Raises:
        ValueError: bad ``batch_size``/``max_length``, a missing or unknown ``label``, a
            tokenizer with neither pad nor eos token, or a bad stored table.
        OSError: the folder holds no loadable model or tokenizer.
    """

    def __init__(
        self,
        path: str,
        *,
        device: torch.device,
        batch_size: int = 8,
        max_length: int | None = None,
        label: int | str | None = None,
    ):
        from transformers import AutoModelForSequenceClassification

        from streamrl.common.models import load_tokenizer

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"reward model {path}: batch_size must be a positive int, got {batch_size!r}")
        self.path = str(path)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.tokenizer = load_tokenizer(self.path)
        self.model = AutoModelForSequenceClassification.from_pretrained(self.path, dtype=torch.float32)
        self.label = _label_index(self.model.config, label, self.path)
        self.info = RewardModelInfo.from_config(self.model.config)
        self.max_length = self.info.max_length if max_length is None else max_length
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 1:
            raise ValueError(f"reward model {path}: max_length must be a positive int, got {self.max_length!r}")
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(self.device).eval()

    @torch.inference_mode()
    def score_texts(self, texts: Sequence[str]) -> list[float]:
        """Normalised reward (raw score + bias) of each text, in input order.

        Texts are sorted by token length before batching (less padding), which does not
        change any score: each row only attends to its own real tokens.
        """
        if not texts:
            return []
        encoded = encode_texts(self.tokenizer, texts, max_length=self.max_length)
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        scores = [0.0] * len(encoded)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            ids, mask = pad_right([encoded[i] for i in rows], pad_id=self.tokenizer.pad_token_id)
            values = sequence_scores(self.model, ids.to(self.device), mask.to(self.device), label=self.label)
            for i, value in zip(rows, values.cpu().tolist()):
                scores[i] = value + self.info.bias
        return scores

    def render_prompt(self, prompt: str) -> str:
        """``prompt`` as the user turn of this model's chat template (with the system message
        stored at training, if any) followed by the assistant header: what a generator with
        ``model.chat_template`` sends.

        Raises:
            ValueError: the tokenizer has no chat template.
        """
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"reward model {self.path}: its tokenizer has no chat template to render prompts with")
        messages = [{"role": "user", "content": prompt}]
        if self.info.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.info.system_prompt})
        return str(self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))

    def score(self, prompts: Sequence[str], responses: Sequence[str], *, chat_template: bool = False) -> list[float]:
        """Normalised reward of each ``prompts[i] + responses[i]``.

        Args:
            prompts: prompts as the policy saw them.
            responses: the completions.
            chat_template: render each prompt with :meth:`render_prompt` first (for a
                reward model trained on chat-formatted prompts scoring a policy that sees
                raw text).

        Raises:
            ValueError: the lists differ in length.
        """
        if len(prompts) != len(responses):
            raise ValueError(f"reward model: got {len(prompts)} prompts but {len(responses)} responses")
        if chat_template:
            prompts = [self.render_prompt(p) for p in prompts]
        return self.score_texts([p + r for p, r in zip(prompts, responses)])


def _label_index(config: Any, label: int | str | None, path: str) -> int:
    count = config.num_labels
    names = dict(getattr(config, "label2id", None) or {})
    if label is None:
        if count == 1:
            return 0
        raise ValueError(
            f"reward model {path} has {count} labels ({', '.join(map(str, names))}); fix: choose the "
            "one read as the reward with `label` (an index or a name)"
        )
    if isinstance(label, str):
        if label not in names:
            raise ValueError(f"reward model {path} has no label {label!r}; its labels: {', '.join(map(str, names))}")
        return int(names[label])
    if isinstance(label, bool) or not 0 <= label < count:
        raise ValueError(f"reward model {path}: label {label!r} is not an index in 0..{count - 1}")
    return label
