"""H-hat's score on scored rollouts, for reward shaping and Q-augmentation (``feedback.combination =
"reward_shaping"`` or ``"q_augmentation"``)."""

from __future__ import annotations

from collections.abc import Sequence

from streamrl.common.human import HumanModelView
from streamrl.common.messages import HumanScore, ScoredRollout


def add_human_scores(view: HumanModelView, results: Sequence[ScoredRollout], now: float) -> None:
    """Set ``human`` on each scored rollout: H-hat(x), the eligibility E(x, now), the H-hat version and
    whether the influence is on (the learner adds beta_t * E * H-hat to the reward, or to the advantage,
    when it is).

    Raises:
        RuntimeError: no H-hat version received yet.
        ValueError: H-hat's feature size differs from the reference model's.
    """
    values, eligibilities = view.score(
        [s.rollout.prompt_tokens for s in results], [s.rollout.completion_tokens for s in results], now
    )
    for scored, value, e in zip(results, values, eligibilities):
        scored.human = HumanScore(
            value=float(value), eligibility=float(e), model_version=view.version, active=view.active
        )
