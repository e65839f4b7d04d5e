"""The scorer's reference pass: per-token reference log-probs travel with each scored rollout.

The frozen reference model (``model.path``, the learner's reference) needs no weight sync, so
the scorers, which scale like the generators, compute its log-probs
(:func:`streamrl.common.reference.reference_logprobs`) and the learner skips its own
reference pass. The reference is never truncated to a nucleus (the KL penalty compares the
policy as it samples with the reference as it is), so every rollout gets them, whatever its
``top_p``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from streamrl.common.config import Config
from streamrl.common.messages import ScoredRollout
from streamrl.common.models import load_causal_lm, load_tokenizer, resolve_model_path, select_device, use_bf16_autocast
from streamrl.common.reference import reference_logprobs


class ReferencePass:
    """Loads the reference model once and fills ``reference_logprobs`` of scored rollouts.

    Args:
        cfg: the run's config (``model.path``, ``scorer.device``, ``scorer.autocast_bf16``).
    """

    def __init__(self, cfg: Config):
        path = resolve_model_path(cfg.model.path, cfg.model.cache_path)
        self.pad_id = load_tokenizer(path).pad_token_id
        device = select_device(cfg.scorer.device)
        self.model = load_causal_lm(path, device=device).eval()
        self.bf16 = use_bf16_autocast(cfg.scorer.autocast_bf16, device, "scorer.autocast_bf16")
        for p in self.model.parameters():
            p.requires_grad_(False)

    def fill(self, scored: Sequence[ScoredRollout]) -> float:
        """Set ``reference_logprobs`` of every rollout; returns the seconds it took."""
        start = time.perf_counter()
        values = reference_logprobs(
            self.model, [s.rollout for s in scored], pad_id=self.pad_id, autocast_bf16=self.bf16
        )
        for s, v in zip(scored, values):
            s.reference_logprobs = v
        return time.perf_counter() - start
