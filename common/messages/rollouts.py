"""What a generator samples and a scorer scores: rollouts, scored rollouts, dropped groups.

Part of :mod:`streamrl.common.messages` (its docstring describes the wire format); import the
names from there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import ClassVar

import numpy as np

from streamrl.common.messages.envelope import Message, array_field, require


class FinishReason(str, Enum):
    """Why a completion ended: the EOS token (``stop``) or ``max_new_tokens`` (``length``)."""

    STOP = "stop"
    LENGTH = "length"


@dataclass(kw_only=True)
class SamplingParams:
    """Sampling parameters a completion was drawn with.

    Attributes:
        temperature: softmax temperature (> 0).
        top_p: nucleus mass in (0, 1].
        max_new_tokens: generation budget in tokens.
    """

    temperature: float
    top_p: float
    max_new_tokens: int


@dataclass(kw_only=True)
class Selection:
    """How a generator chose this completion among K candidates by H-hat (TAMER+RL action
    biasing, ``streamrl.common.human.bias_actions``, or control sharing,
    ``streamrl.common.human.control_share``).

    The K candidates were drawn i.i.d. from mu. Control sharing kept H-hat's best with
    probability ``probability``, else a uniformly drawn candidate; action biasing kept candidate
    j with probability softmax_j(beta_t * E_j * H-hat_j). The kept completion was therefore drawn
    from q, not mu, and its ``behaviour_logprobs`` (mu's) do not describe how it was chosen.

    Attributes:
        candidates: K, the completions sampled for this slot (>= 2).
        probability: control sharing: p = min(beta_t * eligibility, 1), the chance H-hat's pick
            was kept; action biasing: P(this candidate kept | the K candidates).
        by_model: control sharing: True when the coin chose H-hat's pick (False: the uniform
            draw); action biasing: True when the kept candidate is one H-hat rates highest.
        density_ratio: rho = K * P(this candidate kept | the K candidates) (control sharing:
            (1 - p) + p * K * [kept is an argmax] / (number of tied argmaxes)); the learner
            weights the rollout by 1 / rho (an exactly unbiased correction whenever every
            candidate could have been kept).
        human_value: H-hat of the kept completion.
        model_version: the H-hat version that ranked the candidates.
    """

    candidates: int
    probability: float
    by_model: bool
    density_ratio: float
    human_value: float = 0.0
    model_version: int = 0


@dataclass(kw_only=True)
class HumanScore:
    """H-hat's view of a scored rollout (scorer -> buffer -> learner, for reward shaping).

    Attributes:
        value: H-hat(s, a), the predicted human reinforcement, clipped to [-1, 1].
        eligibility: the eligibility module's factor in [0, 1] (1 when it is off):
            how close the rollout is to recently labelled ones.
        model_version: the H-hat version that scored it.
        active: False while the labellers paused the human influence (the learner then
            ignores ``value``).
    """

    value: float
    eligibility: float = 1.0
    model_version: int = 0
    active: bool = True


@dataclass(kw_only=True)
class Rollout(Message):
    """One completion of one prompt, as sampled by a generator (generator -> scorer).

    Attributes:
        prompt_id: id of the prompt in its prompt source.
        group_id: id shared by the ``group_size`` completions of one prompt draw.
        rollout_id: globally unique id of this completion.
        generator_id: the generator process that sampled it.
        group_size: number of completions in the group (G).
        prompt_tokens: ``[P]`` int32 prompt token ids (no padding).
        completion_tokens: ``[T]`` int32 sampled token ids (EOS included when sampled).
        behaviour_logprobs: ``[T]`` float32 log-probabilities (nats) of each sampled
            token under the distribution it was actually sampled from (after
            temperature and top-p), i.e. the behaviour policy mu.
        policy_version: version of the weights that sampled it.
        finish_reason: :class:`FinishReason`.
        sampling: the :class:`SamplingParams` used.
        prompt_text: the prompt as text (after any chat template).
        completion_text: the completion decoded without special tokens.
        metadata: extra per-prompt values for reward functions (e.g. a reference answer).
        selection: set when a control-sharing generator chose this completion among
            candidates (:class:`Selection`); None for a plain draw from mu.
        model_fingerprint: (schema 1.2, optional) the generator's model config and tokenizer
            fingerprint (``streamrl.common.fingerprint``); "" = not stated.
    """

    KIND: ClassVar[str] = "rollout"
    prompt_id: str
    group_id: str
    rollout_id: str
    generator_id: str
    group_size: int
    prompt_tokens: np.ndarray = array_field("int32", 1)
    completion_tokens: np.ndarray = array_field("int32", 1)
    behaviour_logprobs: np.ndarray = array_field("float32", 1)
    policy_version: int
    finish_reason: FinishReason
    sampling: SamplingParams
    prompt_text: str = ""
    completion_text: str = ""
    metadata: dict = field(default_factory=dict)
    selection: Selection | None = None
    model_fingerprint: str = ""

    def check(self) -> None:
        require(self.group_size >= 1, "group_size must be >= 1")
        require(self.policy_version >= 0, "policy_version must be >= 0")
        require(len(self.prompt_tokens) >= 1, "prompt_tokens is empty")
        require(len(self.completion_tokens) >= 1, "completion_tokens is empty")
        require(
            bool(np.all(self.prompt_tokens >= 0)) and bool(np.all(self.completion_tokens >= 0)),
            "negative token id",
        )
        require(
            self.completion_tokens.shape == self.behaviour_logprobs.shape,
            f"behaviour_logprobs shape {self.behaviour_logprobs.shape} != "
            f"completion_tokens shape {self.completion_tokens.shape}",
        )
        lp = self.behaviour_logprobs
        require(bool(np.all(np.isfinite(lp))), "behaviour_logprobs has non-finite values")
        require(bool(np.all(lp <= 1e-4)), "behaviour_logprobs has positive log-probabilities")
        require(self.sampling.temperature > 0, "sampling.temperature must be > 0")
        require(0 < self.sampling.top_p <= 1, "sampling.top_p must be in (0, 1]")
        sel = self.selection
        if sel is not None:
            require(sel.candidates >= 2, "selection.candidates must be >= 2")
            require(0 <= sel.probability <= 1, "selection.probability must be in [0, 1]")
            # rho = K * P(kept | candidates) lies in [1 - p, (1 - p) + p * K]
            low, high = 1 - sel.probability, (1 - sel.probability) + sel.probability * sel.candidates
            require(
                math.isfinite(sel.density_ratio)
                and 0 < sel.density_ratio
                and low - 1e-6 <= sel.density_ratio <= high + 1e-6,
                "selection.density_ratio must be in [1 - p, 1 - p + p * K] and > 0",
            )
            require(math.isfinite(sel.human_value), "selection.human_value is not finite")


@dataclass(kw_only=True)
class ScoredRollout(Message):
    """A rollout with its reward (scorer -> buffer).

    Attributes:
        rollout: the :class:`Rollout`.
        reward: the scalar reward (weighted sum of the parts), finite.
        reward_parts: unweighted value of each reward component, by name.
        scorer_id: the scorer process that scored it.
        human: H-hat's score (:class:`HumanScore`) when a human-reinforcement model was
            active in the scorer; None otherwise.
        reference_logprobs: ``[T]`` float32 log-probs (nats) of the completion tokens under the
            frozen reference model, computed by the scorer (``streamrl.common.reference``);
            None when not computed (the learner then runs its own reference pass).
    """

    KIND: ClassVar[str] = "scored_rollout"
    rollout: Rollout
    reward: float
    reward_parts: dict = field(default_factory=dict)
    scorer_id: str = ""
    human: HumanScore | None = None
    reference_logprobs: np.ndarray | None = array_field("float32", 1, optional=True)

    def check(self) -> None:
        self.rollout.check()
        if self.reference_logprobs is not None:
            require(
                self.reference_logprobs.shape == self.rollout.completion_tokens.shape,
                "reference_logprobs must have one entry per completion token",
            )
            require(bool(np.all(np.isfinite(self.reference_logprobs))), "reference_logprobs has non-finite values")
        require(math.isfinite(self.reward), "reward is not finite")
        if self.human is not None:
            require(
                math.isfinite(self.human.value) and -1 <= self.human.value <= 1,
                "human.value must be a finite number in [-1, 1]",
            )
            require(0 <= self.human.eligibility <= 1, "human.eligibility must be in [0, 1]")
            require(self.human.model_version >= 0, "human.model_version must be >= 0")
        for name, value in self.reward_parts.items():
            require(
                isinstance(value, (int, float)) and math.isfinite(value),
                f"reward part {name!r} is not a finite number",
            )


@dataclass(kw_only=True)
class GroupDropped(Message):
    """A scorer dropped a group: the reward raised on one of its rollouts (scorer -> buffer, on the
    scored-rollout socket).

    A group is trained as a whole (group-relative advantages compare each completion with the
    others of its prompt), so a group with a rollout that has no reward cannot be trained; the
    scorer sends none of its rollouts on, and the buffer drops what it holds of the group (other
    scorers may have passed members on), refuses its later members and counts the group as
    arrived for the generator's credits, so the generator samples a replacement at once.

    Attributes:
        group_id: the dropped group.
        generator_id: the generator that sampled it (its credits are returned).
        rollout_id: the rollout whose reward raised (the first one seen).
        group_size: G of the group.
        reason: the exception's class name, e.g. ``"ValueError"``.
        error: ``"ValueError: message"``, at most 200 characters.
    """

    KIND: ClassVar[str] = "group_dropped"
    group_id: str
    generator_id: str
    rollout_id: str
    group_size: int
    reason: str
    error: str = ""

    def check(self) -> None:
        require(bool(self.group_id) and bool(self.generator_id), "group_id and generator_id must not be empty")
        require(self.group_size >= 1, "group_size must be >= 1")
        require(bool(self.reason), "reason must not be empty")
