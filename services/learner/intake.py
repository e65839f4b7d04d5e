"""Checks on a received batch that the wire decoder cannot make: token ids against the policy's vocabulary."""

from __future__ import annotations

from collections.abc import Sequence

from streamrl.common.messages import ScoredRollout


def split_in_vocabulary(rollouts: Sequence[ScoredRollout],
                        vocab_size: int) -> tuple[list[ScoredRollout], list[ScoredRollout]]:
    """Split rollouts by whether every prompt and completion token id indexes the embedding.

    The decoder guarantees non-empty int32 token arrays with ids >= 0 but cannot know the
    vocabulary; an id >= ``vocab_size`` would crash the training step (an index error in
    the embedding), so such a rollout is refused instead.

    Returns:
        ``(kept, refused)``, each in input order.
    """
    kept, refused = [], []
    for s in rollouts:
        r = s.rollout
        ok = max(int(r.prompt_tokens.max()), int(r.completion_tokens.max())) < vocab_size
        (kept if ok else refused).append(s)
    return kept, refused
