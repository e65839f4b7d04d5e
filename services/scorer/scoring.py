"""The scorer's pure logic: which endpoint a replica binds, and scoring one micro-batch."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from streamrl.common.messages import Rollout, ScoredRollout

MAX_BATCH = 64
"""Rollouts scored together at most (whatever has arrived, up to this many), so a reward model runs batched."""

RewardFn = Callable[[list[str], list[str], list[dict]], tuple[Sequence[float], Sequence[dict]]]
"""``reward(prompts, completions, metadata) -> (totals, parts)``, e.g. a
:class:`streamrl.services.scorer.rewards.CompositeReward`."""


def scorer_endpoint(endpoints: Sequence[str], index: int) -> str:
    """The PULL endpoint scorer replica ``index`` binds: ``endpoints.scorers[index]``.

    Raises:
        ValueError: ``index`` has no endpoint (the message names the key and the fix).
    """
    if not 0 <= index < len(endpoints):
        raise ValueError(f"scorer index {index} has no endpoint: endpoints.scorers lists "
                         f"{len(endpoints)}; fix: add one per scorer replica")
    return endpoints[index]


def score_batch(reward: RewardFn, batch: Sequence[Rollout], scorer_id: str) -> list[ScoredRollout]:
    """Score a micro-batch: one :class:`ScoredRollout` per rollout, in order.

    Args:
        reward: the reward function (see :data:`RewardFn`).
        batch: the rollouts, each scored on its ``prompt_text``, ``completion_text`` and ``metadata``.
        scorer_id: this scorer's identity (``sender`` and ``scorer_id`` of each result).

    Raises:
        ValueError: the reward returned a number of totals or parts other than ``len(batch)``
            (nothing of the batch is returned: a partial result would lose rollouts silently).
        Exception: whatever the reward function raises.
    """
    totals, parts = reward([r.prompt_text for r in batch], [r.completion_text for r in batch],
                           [r.metadata for r in batch])
    if len(totals) != len(batch) or len(parts) != len(batch):
        raise ValueError(f"the reward returned {len(totals)} totals and {len(parts)} parts for "
                         f"{len(batch)} rollouts")
    return [ScoredRollout(sender=scorer_id, rollout=rollout, reward=float(total), reward_parts=dict(part),
                          scorer_id=scorer_id)
            for rollout, total, part in zip(batch, totals, parts)]
