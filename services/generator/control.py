"""Control sharing (TAMER+RL, Knox & Stone 2010): H-hat picks among K sampled candidates.

For each of a group's G completions the generator samples K candidates from mu and keeps one
(:func:`streamrl.common.human.control_share`): with probability p = min(beta_t * E, 1) the
candidate H-hat rates highest, else a uniformly drawn one. E is the eligibility module's largest
value over the K candidates (1 when the module is off); beta_t = beta * beta_decay^version.
Each kept completion records its :class:`~streamrl.common.messages.Selection` (K, p, whether
H-hat chose it, rho), and the learner weights it by 1/rho.
"""

from __future__ import annotations

import numpy as np

from streamrl.common.human import HumanModelView, control_share
from streamrl.common.messages import Selection
from streamrl.services.generator.sampling import Completion


def share_control(view: HumanModelView, candidates: list[list[Completion]], *, group_size: int, k: int,
                  beta_t: float, rng: np.random.Generator, now: float) -> tuple[list[list[Completion]],
                                                                            list[list[Selection]]]:
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

    Returns:
        ``(kept, selections)``: per prompt, G completions and their G selections.

    Raises:
        ValueError: a prompt without ``group_size * k`` candidates.
    """
    if any(len(c) != group_size * k for c in candidates):
        raise ValueError(f"share_control: every prompt needs {group_size} x {k} candidates")
    flat = [c for per_prompt in candidates for c in per_prompt]
    values, eligibilities = view.score([c.prompt_tokens for c in flat], [c.completion_tokens for c in flat], now)
    kept: list[list[Completion]] = []
    selections: list[list[Selection]] = []
    for p_index, per_prompt in enumerate(candidates):
        kept.append([])
        selections.append([])
        for slot in range(group_size):
            start = (p_index * group_size + slot) * k
            slot_values = values[start:start + k]
            probability = min(beta_t * float(eligibilities[start:start + k].max()), 1.0)
            index, by_model, rho = control_share(slot_values, probability, rng)
            kept[-1].append(per_prompt[slot * k + index])
            selections[-1].append(Selection(candidates=k, probability=probability, by_model=by_model,
                                            density_ratio=rho, human_value=float(slot_values[index]),
                                            model_version=view.version))
    return kept, selections
