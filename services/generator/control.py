"""H-hat picks among K sampled candidates (TAMER+RL, Knox & Stone 2010): action biasing and
control sharing.

For each of a group's G completions the generator samples K candidates from mu and keeps one:

* control sharing (:func:`streamrl.common.human.control_share`): with probability
  p = min(beta_t * E, 1) the candidate H-hat rates highest, else a uniformly drawn one; E is the
  eligibility module's largest value over the K candidates (1 when the module is off);
* action biasing (:func:`streamrl.common.human.bias_actions`): candidate j with probability
  softmax_j(beta_t * E_j * H-hat_j), E_j its own eligibility.

beta_t = beta * beta_decay^version. Each kept completion records its
:class:`~streamrl.common.messages.Selection` (K, the probability, whether it is H-hat's best, rho),
and the learner weights it by 1/rho, the exact correction back to mu.
"""

from __future__ import annotations

import numpy as np

from streamrl.common.human import HumanModelView, bias_actions, bias_actions_law, control_share, control_share_law
from streamrl.common.messages import Selection
from streamrl.common.modes import HumanCombination
from streamrl.services.generator.sampling import Completion


def _sharing_probability(eligibilities: np.ndarray, beta_t: float) -> float:
    return min(beta_t * float(np.max(eligibilities)), 1.0)


def _control_sharing(
    values: np.ndarray, eligibilities: np.ndarray, beta_t: float, rng: np.random.Generator
) -> tuple[int, bool, float, float]:
    probability = _sharing_probability(eligibilities, beta_t)
    index, by_model, rho = control_share(values, probability, rng)
    return index, by_model, probability, rho


def _action_biasing(
    values: np.ndarray, eligibilities: np.ndarray, beta_t: float, rng: np.random.Generator
) -> tuple[int, bool, float, float]:
    index, probability, rho = bias_actions(values, eligibilities, beta_t, rng)
    return index, bool(values[index] == values.max()), probability, rho


RULES = {HumanCombination.CONTROL_SHARING: _control_sharing, HumanCombination.ACTION_BIASING: _action_biasing}
"""How each combination keeps one of K candidates: ``(values [K], eligibilities [K], beta_t, rng)`` ->
``(index, by_model, probability, rho)``."""


def candidate_law(
    combination: HumanCombination, values: np.ndarray, eligibilities: np.ndarray, beta_t: float
) -> np.ndarray:
    """The law of the candidate :data:`RULES` keeps for ``combination``: ``[K]`` float64 P(J = j | the K
    candidates), summing to 1 (control sharing: :func:`~streamrl.common.human.control_share_law` with
    p = min(beta_t * max E, 1); action biasing: :func:`~streamrl.common.human.bias_actions_law`). The
    expected value of any score of the kept completion is ``law @ scores``: what an evaluation of the agent
    would reach averaging over infinitely many draws.

    Args:
        values: ``[K]`` H-hat of the candidates; eligibilities: ``[K]`` in [0, 1]; beta_t: >= 0.

    Raises:
        ValueError: a combination that does not select candidates, or the law's own errors.
    """
    if combination is HumanCombination.CONTROL_SHARING:
        return control_share_law(values, _sharing_probability(eligibilities, beta_t))
    if combination is HumanCombination.ACTION_BIASING:
        return bias_actions_law(values, eligibilities, beta_t)
    raise ValueError(f"candidate_law: feedback.combination {combination.value!r} does not select among candidates")


def select_candidates(
    view: HumanModelView,
    candidates: list[list[Completion]],
    *,
    group_size: int,
    k: int,
    beta_t: float,
    rng: np.random.Generator,
    now: float,
    combination: HumanCombination = HumanCombination.CONTROL_SHARING,
) -> tuple[list[list[Completion]], list[list[Selection]]]:
    """Keep ``group_size`` of the ``group_size * k`` candidates of each prompt.

    Args:
        view: the newest H-hat (must hold a model).
        candidates: per prompt, ``group_size * k`` completions sampled from mu; slot j's
            candidates are ``[j * k, (j + 1) * k)``.
        group_size: G.
        k: K >= 2.
        beta_t: the decayed combination weight.
        rng: the generator's random stream.
        now: Unix seconds (the eligibility's clock).
        combination: ``control_sharing`` or ``action_biasing`` (:data:`RULES`).

    Returns:
        ``(kept, selections)``: per prompt, G completions and their G selections. A selection's
        ``probability`` is p (control sharing) or P(J = j | the K candidates) (action biasing).

    Raises:
        ValueError: a prompt without ``group_size * k`` candidates, or a combination that does not
            select candidates.
    """
    if combination not in RULES:
        raise ValueError(
            f"select_candidates: feedback.combination {combination.value!r} does not select among "
            f"candidates (use one of {[c.value for c in RULES]})"
        )
    if any(len(c) != group_size * k for c in candidates):
        raise ValueError(f"select_candidates: every prompt needs {group_size} x {k} candidates")
    rule = RULES[combination]
    flat = [c for per_prompt in candidates for c in per_prompt]
    values, eligibilities = view.score([c.prompt_tokens for c in flat], [c.completion_tokens for c in flat], now)
    kept: list[list[Completion]] = []
    selections: list[list[Selection]] = []
    for p_index, per_prompt in enumerate(candidates):
        kept.append([])
        selections.append([])
        for slot in range(group_size):
            start = (p_index * group_size + slot) * k
            slot_values = np.asarray(values[start : start + k], np.float64)
            index, by_model, probability, rho = rule(
                slot_values, np.asarray(eligibilities[start : start + k]), beta_t, rng
            )
            kept[-1].append(per_prompt[slot * k + index])
            selections[-1].append(
                Selection(
                    candidates=k,
                    probability=probability,
                    by_model=by_model,
                    density_ratio=rho,
                    human_value=float(slot_values[index]),
                    model_version=view.version,
                )
            )
    return kept, selections
