"""The scorer's pure logic: which endpoint a replica binds, and scoring one micro-batch."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from streamrl.common.messages import GroupDropped, Rollout, ScoredRollout
from streamrl.services.scorer.deadline import RewardTimeout
from streamrl.services.scorer.health import error_text
from streamrl.services.scorer.http_reward import RewardServerError

WHOLE_REWARD_FAILURES: tuple[type[BaseException], ...] = (RewardServerError, RewardTimeout)
"""Failures of the reward as a whole, not of one input: an HTTP reward server that is down or keeps
failing after its retries, a reward model past its ``timeout_s``. Scoring each rollout alone after
one of these would only repeat it (and its retries and time limit) once per rollout."""

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
        raise ValueError(
            f"scorer index {index} has no endpoint: endpoints.scorers lists "
            f"{len(endpoints)}; fix: add one per scorer replica"
        )
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
    totals, parts = reward(
        [r.prompt_text for r in batch], [r.completion_text for r in batch], [r.metadata for r in batch]
    )
    if len(totals) != len(batch) or len(parts) != len(batch):
        raise ValueError(f"the reward returned {len(totals)} totals and {len(parts)} parts for {len(batch)} rollouts")
    return [
        ScoredRollout(
            sender=scorer_id, rollout=rollout, reward=float(total), reward_parts=dict(part), scorer_id=scorer_id
        )
        for rollout, total, part in zip(batch, totals, parts)
    ]


@dataclass
class Scoring:
    """What :func:`score_each` made of one micro-batch.

    Attributes:
        results: the scored rollouts, in the batch's order, without those whose reward raised.
        failures: rollout id -> the exception its reward raised.
        raised: the exception of each reward call that raised (the micro-batch's, then each
            rollout's scored alone), in order.
    """

    results: list[ScoredRollout] = field(default_factory=list)
    failures: dict[str, BaseException] = field(default_factory=dict)
    raised: list[BaseException] = field(default_factory=list)


def score_each(reward: RewardFn, batch: Sequence[Rollout], scorer_id: str) -> Scoring:
    """Score a micro-batch; when the reward raises on it, score each rollout alone, so a reward that
    raises on some inputs loses only those rollouts, not the whole micro-batch.

    A failure of the reward as a whole (:data:`WHOLE_REWARD_FAILURES`) is not retried per rollout:
    every rollout of the batch (or every one not yet scored alone) fails with it. The cost of a
    failure is one reward call per rollout of the micro-batch (at most :data:`MAX_BATCH`).

    Args:
        reward, batch, scorer_id: as for :func:`score_batch`.

    Returns:
        The results and the failures (every rollout is in exactly one of them).
    """
    try:
        return Scoring(results=score_batch(reward, batch, scorer_id))
    except Exception as exc:  # noqa: BLE001 - whatever the user's reward raises is its failure
        if isinstance(exc, WHOLE_REWARD_FAILURES) or len(batch) <= 1:
            return Scoring(failures={r.rollout_id: exc for r in batch}, raised=[exc])
        out = Scoring(raised=[exc])
    for i, rollout in enumerate(batch):
        try:
            out.results += score_batch(reward, [rollout], scorer_id)
        except Exception as exc:  # noqa: BLE001
            out.raised.append(exc)
            if isinstance(exc, WHOLE_REWARD_FAILURES):  # the reward itself is gone: the rest would fail the same way
                out.failures.update({r.rollout_id: exc for r in batch[i:]})
                break
            out.failures[rollout.rollout_id] = exc
    return out


def drop_failed_groups(
    batch: Sequence[Rollout], scoring: Scoring, scorer_id: str
) -> tuple[list[ScoredRollout], list[GroupDropped]]:
    """Split what :func:`score_each` made of ``batch`` into what goes on to the buffer and the groups
    dropped.

    Group-relative advantages (GRPO, RLOO) compare each completion with the others of its prompt, and
    the learner trains whole groups only: a group with a rollout that has no reward cannot be trained,
    and the rest of it, trained as a smaller group, would be a biased baseline. So a group in which
    any rollout's reward raised is dropped whole: none of its rollouts goes on, and one
    :class:`GroupDropped` per group (naming its first failure) tells the buffer to evict the members
    other scorers passed on and to return the group's credit to its generator.

    Returns:
        The scored rollouts of groups with no failure (in order), and one notice per dropped group.
    """
    notices: dict[str, GroupDropped] = {}
    for rollout in batch:
        exc = scoring.failures.get(rollout.rollout_id)
        if exc is not None and rollout.group_id not in notices:
            notices[rollout.group_id] = GroupDropped(
                sender=scorer_id,
                group_id=rollout.group_id,
                generator_id=rollout.generator_id,
                rollout_id=rollout.rollout_id,
                group_size=rollout.group_size,
                reason=type(exc).__name__,
                error=error_text(exc),
            )
    kept = [s for s in scoring.results if s.rollout.group_id not in notices]
    return kept, list(notices.values())


class DroppedGroups:
    """The ids of the groups a scorer dropped (the newest ``limit``): their later members, arriving in
    another micro-batch, are dropped without calling the reward.

    Args:
        limit: ids remembered (>= 1).
    """

    def __init__(self, limit: int = 100_000):
        self.limit = limit
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, group_id: str) -> None:
        self._ids[group_id] = None
        if len(self._ids) > self.limit:
            self._ids.popitem(last=False)

    def split(self, batch: Sequence[Rollout]) -> tuple[list[Rollout], list[Rollout]]:
        """``(to score, members of dropped groups)``, each in order."""
        keep = [r for r in batch if r.group_id not in self._ids]
        return keep, [r for r in batch if r.group_id in self._ids]
