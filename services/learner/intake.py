"""Checks on a received batch that the wire decoder cannot make: token ids against the policy's vocabulary,
and the generator's model fingerprint against the learner's."""

from __future__ import annotations

from collections.abc import Sequence

from streamrl.common.fingerprint import same_model
from streamrl.common.messages import ScoredRollout


def split_in_vocabulary(
    rollouts: Sequence[ScoredRollout], vocab_size: int
) -> tuple[list[ScoredRollout], list[ScoredRollout]]:
    """Split rollouts by whether every prompt and completion token id indexes the embedding.

    The decoder guarantees non-empty int32 token arrays with ids >= 0 but cannot know the
    vocabulary; an id >= ``vocab_size`` would crash the training step (an index error in
    the embedding), so such a rollout is refused instead.

    Returns:
        ``(kept, refused)``, each in input order.
    """
    kept: list[ScoredRollout] = []
    refused: list[ScoredRollout] = []
    for s in rollouts:
        r = s.rollout
        ok = max(int(r.prompt_tokens.max()), int(r.completion_tokens.max())) < vocab_size
        (kept if ok else refused).append(s)
    return kept, refused


def split_same_model(
    rollouts: Sequence[ScoredRollout], fingerprint: str
) -> tuple[list[ScoredRollout], list[ScoredRollout]]:
    """Split rollouts by whether their generator's model fingerprint (``Rollout.model_fingerprint``,
    ``streamrl.common.fingerprint``) matches the learner's ``fingerprint``. A generator with another
    tokenizer of the same size (a permuted vocabulary) sends in-vocabulary ids that mean other text:
    training on them is training on garbage. An empty fingerprint (an older generator) is kept.

    Returns:
        ``(kept, refused)``, each in input order.
    """
    kept: list[ScoredRollout] = []
    refused: list[ScoredRollout] = []
    for s in rollouts:
        (kept if same_model(fingerprint, s.rollout.model_fingerprint) else refused).append(s)
    return kept, refused
