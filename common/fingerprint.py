"""The model fingerprint: one short digest of a model's architecture config and its tokenizer.

Weights travel as a manifest of named tensors; a generator whose tokenizer maps ids to
other strings (a permuted vocabulary of the same size, another revision of a tokenizer)
loads them without any shape error and samples token ids that the learner reads as other
text: the run trains on garbage and nothing fails. So the learner puts
its fingerprint in every :class:`~streamrl.common.messages.WeightsAnnounce`, a generator
puts its own in every :class:`~streamrl.common.messages.Rollout`, the generator refuses
weights whose fingerprint differs from its own, and the learner refuses rollouts whose
fingerprint differs from its own. An empty fingerprint (a sender from before schema 1.2)
is not compared.

What goes in (JSON, keys sorted, SHA-256, first :data:`FINGERPRINT_HEX` hex digits):

* the model config (``PretrainedConfig.to_dict()``) without what does not change the
  function computed: keys starting with ``_`` (``_name_or_path``, attention
  implementation), ``transformers_version``, ``torch_dtype``/``dtype``, ``use_cache``,
  ``architectures`` (``save_pretrained`` fills it in; every service loads a causal LM);
* the tokenizer's vocabulary in id order (``convert_ids_to_tokens`` over ``len(tokenizer)``,
  added tokens included) and its special tokens with their ids (``bos``, ``eos``, ``pad``,
  ``unk``): a permutation, a renamed special token or a moved EOS all change it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

FINGERPRINT_HEX = 16
"""Hex digits kept (64 bits: collisions between two real models are not a concern)."""

_VOLATILE_KEYS = frozenset({"transformers_version", "torch_dtype", "dtype", "use_cache", "architectures"})


def config_identity(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a model config dict that determines the function the model computes (module docstring)."""
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in _VOLATILE_KEYS}


def tokenizer_identity(tokenizer) -> dict[str, Any]:
    """The tokenizer's vocabulary in id order and its special tokens with their ids.

    Args:
        tokenizer: a ``transformers`` tokenizer (``len``, ``convert_ids_to_tokens``, ``*_token``).
    """
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = {
        name: [getattr(tokenizer, f"{name}_token", None), getattr(tokenizer, f"{name}_token_id", None)]
        for name in ("bos", "eos", "pad", "unk")
    }
    return {"vocab": vocab, "special": special}


def model_fingerprint(config: Any, tokenizer) -> str:
    """The fingerprint of a model config and a tokenizer (module docstring).

    Args:
        config: a ``transformers`` ``PretrainedConfig`` (or its ``to_dict()``).
        tokenizer: the tokenizer the service encodes and decodes with.

    Returns:
        :data:`FINGERPRINT_HEX` lowercase hex digits.
    """
    data = config if isinstance(config, dict) else config.to_dict()
    identity = {"config": config_identity(data), "tokenizer": tokenizer_identity(tokenizer)}
    text = json.dumps(identity, sort_keys=True, default=str, ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()[:FINGERPRINT_HEX]


def same_model(mine: str, theirs: str) -> bool:
    """True unless both fingerprints are stated and differ (an empty one is an older sender: not compared)."""
    return not mine or not theirs or mine == theirs
