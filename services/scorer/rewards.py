"""Reward sources for the scorer service.

Reward function contract
========================
A reward function is any callable (referenced in the config as
``"package.module:function"``, or by its short name for the built-ins below) with
the signature::

    fn(prompts: list[str], completions: list[str], metadata: list[dict], **kwargs) -> list[float]

* ``prompts[i]`` is the prompt text exactly as it was given to the generator
  (after any chat-template formatting), ``completions[i]`` the generated text
  for it (without the prompt), ``metadata[i]`` the per-prompt extras carried
  by the prompt source (e.g. ``{"answer": "... #### 72"}`` for GSM8K; ``{}``
  when the source has none). The three lists have the same length ``n``.
* It must return exactly ``n`` finite numbers, one per completion, in the same
  order. Larger is better. The scale is up to the function; the composite
  reward multiplies it by the component ``weight``.
* Extra keyword arguments come from the ``kwargs`` table of the reward spec in
  the config and are passed on every call (they are bound once with
  :func:`functools.partial`). ``streamrl check`` and the scorer's start-up check
  that the function imports and that ``kwargs`` bind to its signature; when the
  function declares its argument types with ``pydantic.validate_call`` (as the
  built-ins do), the ``kwargs`` values are checked against them too.
* The function is called from one thread at a time per scorer process; it may
  keep lazily-created state (models, analysers) in module globals.

Built-in functions (config short names ``vader_sentiment``, ``gsm8k_exact_match``,
``count_char``): :func:`vader_sentiment`, :func:`gsm8k_exact_match`,
:func:`count_char`. A local sequence-classification reward model is wrapped by
:class:`RewardModelScorer`. Several sources are combined by
:class:`CompositeReward`, built from the validated ``scorer.rewards`` sections
(:class:`streamrl.common.config.RewardSpec`) by :func:`build_reward`.
"""

from __future__ import annotations

import functools
import math
import re
import threading
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import FiniteFloat, PositiveInt, StringConstraints, validate_call
from pydantic.dataclasses import dataclass

from streamrl.common.config import STRICT_ARGS, RewardSpec

__all__ = [
    "RewardFn",
    "vader_sentiment",
    "gsm8k_exact_match",
    "extract_final_number",
    "count_char",
    "RewardModelScorer",
    "RewardComponent",
    "CompositeReward",
    "build_reward",
]

RewardFn = Callable[[list[str], list[str], list[dict]], list[float]]


# ---------------------------------------------------------------------------
# Built-in reward functions
# ---------------------------------------------------------------------------

_VADER_LOCK = threading.Lock()
_VADER: Any = None


def _vader_analyzer() -> Any:
    """Return the process-wide VADER analyser, creating it on first use."""
    global _VADER
    if _VADER is None:
        with _VADER_LOCK:
            if _VADER is None:
                from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

                _VADER = SentimentIntensityAnalyzer()
    return _VADER


def vader_sentiment(prompts: list[str], completions: list[str], metadata: list[dict]) -> list[float]:
    """VADER compound sentiment of each completion.

    Args:
        prompts: prompt texts (unused; only the completion is scored).
        completions: generated texts.
        metadata: per-prompt extras (unused).

    Returns:
        One float per completion: VADER's ``compound`` score, in [-1, 1]
        (positive text > 0, negative < 0, empty/neutral text 0.0).

    The ``vaderSentiment.SentimentIntensityAnalyzer`` is created once per
    process on the first call and reused.
    """
    analyzer = _vader_analyzer()
    return [float(analyzer.polarity_scores(text)["compound"]) for text in completions]


# A number: optional minus (not when glued to a preceding word/digit, e.g. the
# "-" in "3-4"), optional "$", then either comma-grouped thousands or plain
# digits, with an optional decimal part; or a bare ".5".
_NUMBER_RE = re.compile(r"(?:(?<![\w.])-)?\$?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|(?:(?<![\w.])-)?\$?\.\d+")


def _parse_number(token: str) -> Decimal | None:
    cleaned = token.replace(",", "").replace("$", "")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def extract_final_number(text: str) -> Decimal | None:
    """Extract the final numeric answer from a solution text.

    If the text contains ``####`` (GSM8K convention), the first number after
    the *last* ``####`` is the answer; if there is no number there, or no
    ``####`` at all, the last number anywhere in the text is used. Commas and
    ``$`` are stripped (``"$1,234.50"`` -> ``Decimal("1234.50")``).

    Args:
        text: solution or completion text.

    Returns:
        The number as a :class:`decimal.Decimal` (so ``18.0 == 18`` compares
        equal exactly), or ``None`` when the text contains no number.
    """
    if "####" in text:
        tail = text.rsplit("####", 1)[1]
        match = _NUMBER_RE.search(tail)
        if match is not None:
            value = _parse_number(match.group(0))
            if value is not None:
                return value
    for match in reversed(list(_NUMBER_RE.finditer(text))):
        value = _parse_number(match.group(0))
        if value is not None:
            return value
    return None


def gsm8k_exact_match(prompts: list[str], completions: list[str], metadata: list[dict]) -> list[float]:
    """GSM8K-style exact match of the final number.

    Args:
        prompts: prompt texts (unused).
        completions: generated solutions.
        metadata: per-prompt dicts with key ``"answer"``: either the full GSM8K
            answer (``"... #### 72"``) or just the number (``"72"``, ``72``).

    Returns:
        One float per completion: 1.0 if the completion's final number (see
        :func:`extract_final_number`) equals the reference's final number
        numerically (``"18.0"`` == ``"18"``, ``"1,234"`` == ``"1234"``), else
        0.0 (also 0.0 when the completion has no number).

    Raises:
        ValueError: if the lengths differ, a metadata dict has no ``"answer"``,
            or a reference answer contains no number.
    """
    if len(completions) != len(metadata):
        raise ValueError(f"gsm8k_exact_match: got {len(completions)} completions but {len(metadata)} metadata dicts")
    scores: list[float] = []
    for i, (completion, meta) in enumerate(zip(completions, metadata)):
        if not isinstance(meta, dict) or "answer" not in meta:
            raise ValueError(
                f"gsm8k_exact_match: metadata[{i}] has no 'answer' key (got {meta!r}); "
                "use a prompt source that carries the reference answer, e.g. kind='gsm8k'"
            )
        reference = extract_final_number(str(meta["answer"]))
        if reference is None:
            raise ValueError(f"gsm8k_exact_match: reference answer of item {i} contains no number: {meta['answer']!r}")
        predicted = extract_final_number(completion)
        scores.append(1.0 if predicted is not None and predicted == reference else 0.0)
    return scores


@validate_call(config=STRICT_ARGS)
def count_char(
    prompts: list[str],
    completions: list[str],
    metadata: list[dict],
    *,
    char: Annotated[str, StringConstraints(min_length=1, max_length=1)] = "a",
    max_count: PositiveInt | None = None,
) -> list[float]:
    """Reward for emitting a target character (the test-suite learning task).

    Args:
        prompts: prompt texts (unused).
        completions: generated texts.
        metadata: per-prompt extras (unused).
        char: the target character (exactly one character; case-sensitive).
        max_count: ``None`` (default): the reward is the *fraction* of
            characters equal to ``char``, ``count / max(1, len(completion))``.
            A positive int: the reward is the saturating *count*
            ``min(count, max_count) / max_count``, independent of length.

    Returns:
        One float per completion, in [0, 1] (0.0 for an empty completion).

    Raises:
        pydantic.ValidationError: ``char`` is not a single character, ``max_count``
            not a positive int or None, or the lists are not lists of str / dict.
    """
    scores: list[float] = []
    for text in completions:
        count = text.count(char)
        if max_count is None:
            scores.append(count / max(1, len(text)))
        else:
            scores.append(min(count, max_count) / max_count)
    return scores


# ---------------------------------------------------------------------------
# Reward model
# ---------------------------------------------------------------------------


class RewardModelScorer:
    """Scores ``prompt + completion`` with a local reward model (sequence classifier).

    Args:
        path: local folder loadable by ``AutoModelForSequenceClassification`` (one label)
            and ``AutoTokenizer``, e.g. one written by ``streamrl rm``. Nothing is downloaded.
        batch_size: texts per forward pass (>= 1).
        device: torch device to run on (keyword-only, required).
        max_length: tokens per text; None = the length the model was trained with
            (``streamrl_reward.max_length`` in its ``config.json``, else 512).
        label: the output read as the score (index or ``id2label`` name); None for a
            one-label reward model, required for a classifier with more labels.
        chat_template: wrap each prompt as a user turn in the reward model's chat template
            first (for an RM trained on chat-formatted prompts scoring a policy that sees
            raw prompts; when the generators already apply the template, leave it off).

    Scoring is :class:`streamrl.common.reward_model.RewardModel`, the code ``streamrl rm``
    trains and evaluates with: the text is ``prompt + completion`` (the prompt as the
    generator rendered it, chat template included), truncated on the left (the end, where
    the score is read, always survives), right-padded, scored at the last real token, and
    the normalisation bias stored with the model is added (so the SFT demonstrations score
    0 on average). Batches are sorted by length; a text's score does not depend on its batch.

    Raises:
        ValueError: a model with more than one label and no ``label``, an unknown ``label``,
            or a tokenizer with neither a pad nor an eos token.
        pydantic.ValidationError: ``batch_size`` or ``max_length`` is not a positive int.
        OSError: if the folder does not hold a loadable model/tokenizer.
    """

    @validate_call(config=STRICT_ARGS)
    def __init__(
        self,
        path: str | Path,
        *,
        batch_size: PositiveInt = 8,
        device: torch.device | str,
        max_length: PositiveInt | None = None,
        label: int | str | None = None,
        chat_template: bool = False,
    ) -> None:
        from streamrl.common.reward_model import RewardModel

        self.reward_model = RewardModel(
            str(path), device=torch.device(device), batch_size=batch_size, max_length=max_length, label=label
        )
        self.chat_template = chat_template
        self.model, self.tokenizer, self.info = (
            self.reward_model.model,
            self.reward_model.tokenizer,
            self.reward_model.info,
        )
        self.path, self.batch_size, self.max_length = self.reward_model.path, batch_size, self.reward_model.max_length

    def __call__(self, prompts: list[str], completions: list[str], metadata: list[dict]) -> list[float]:
        """Score each ``prompts[i] + completions[i]``.

        Args:
            prompts: prompt texts (as the generator rendered them).
            completions: generated texts, same length as ``prompts``.
            metadata: per-prompt extras (unused).

        Returns:
            One float per completion: the model's score plus its stored bias.

        Raises:
            ValueError: if ``prompts`` and ``completions`` differ in length.
        """
        return self.reward_model.score(prompts, completions, chat_template=self.chat_template)


# ---------------------------------------------------------------------------
# Composition
# ---------------------------------------------------------------------------


@dataclass(config=STRICT_ARGS)
class RewardComponent:
    """One weighted reward source.

    Attributes:
        name: key of this component in the per-sample parts dict (non-empty).
        weight: multiplier applied to the component's values (dimensionless, finite).
        fn: callable with the reward function contract (see module docstring),
            with any config kwargs already bound.

    Raises:
        pydantic.ValidationError: an empty name, a non-finite or non-numeric weight,
            or an ``fn`` that is not callable.
    """

    name: Annotated[str, StringConstraints(min_length=1)]
    weight: FiniteFloat
    fn: Callable[[list[str], list[str], list[dict]], Sequence[float]]


class CompositeReward:
    """Weighted sum of reward components.

    Args:
        components: non-empty sequence of :class:`RewardComponent` with unique
            names.

    Raises:
        ValueError: if ``components`` is empty or names repeat.
    """

    def __init__(self, components: Sequence[RewardComponent]) -> None:
        components = list(components)
        if not components:
            raise ValueError("CompositeReward needs at least one component")
        names = [c.name for c in components]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"CompositeReward: duplicate component names {duplicates}; give each a distinct 'name'")
        self.components = components

    @property
    def names(self) -> list[str]:
        """Component names, in order."""
        return [c.name for c in self.components]

    def __call__(
        self, prompts: list[str], completions: list[str], metadata: list[dict]
    ) -> tuple[list[float], list[dict[str, float]]]:
        """Score a batch with every component.

        Args:
            prompts, completions, metadata: equal-length lists (see the
                module docstring).

        Returns:
            ``(totals, parts)``: ``totals[i] = sum(weight_k * value_k[i])`` and
            ``parts[i] = {name_k: value_k[i]}`` (unweighted values).

        Raises:
            ValueError: if the input lengths differ, or a component returns
                the wrong number of values or a non-finite / non-numeric value
                (the message names the component).
        """
        n = len(completions)
        if len(prompts) != n or len(metadata) != n:
            raise ValueError(
                f"CompositeReward: lengths differ: {len(prompts)} prompts, {n} completions, {len(metadata)} metadata"
            )
        totals = [0.0] * n
        parts: list[dict[str, float]] = [{} for _ in range(n)]
        for comp in self.components:
            values = comp.fn(prompts, completions, metadata)
            try:
                values = list(values)
            except TypeError as exc:
                raise ValueError(
                    f"reward component {comp.name!r} returned {type(values).__name__}, expected a list of {n} floats"
                ) from exc
            if len(values) != n:
                raise ValueError(f"reward component {comp.name!r} returned {len(values)} values for {n} completions")
            for i, raw in enumerate(values):
                try:
                    value = float(raw)
                except (TypeError, ValueError) as exc:
                    raise ValueError(
                        f"reward component {comp.name!r} returned a non-numeric value {raw!r} at index {i}"
                    ) from exc
                if not math.isfinite(value):
                    raise ValueError(f"reward component {comp.name!r} returned a non-finite value {value} at index {i}")
                parts[i][comp.name] = value
                totals[i] += comp.weight * value
        return totals, parts


def build_reward(
    specs: Sequence[RewardSpec], *, device: torch.device, stop: threading.Event | None = None
) -> CompositeReward:
    """Build a :class:`CompositeReward` from validated reward specs (``config.scorer.rewards``).

    A function spec becomes its function with ``kwargs`` bound (default name: the
    function's ``__name__``); a model spec a :class:`RewardModelScorer` (default name
    ``"reward_model"``); a url spec an :class:`~streamrl.services.scorer.http_reward.HttpReward`
    (default name ``"http_reward"``). The specs' own rules (one source, finite weight, options of the
    right source) were checked when the config was loaded.

    Args:
        specs: non-empty sequence of :class:`~streamrl.common.config.RewardSpec`.
        device: torch device for reward models.
        stop: the scorer's stop request: an HTTP reward's retries end once it is set (None = never).

    Returns:
        The composite reward.

    Raises:
        ResourceError: a function that does not import or does not take its ``kwargs``
            (``streamrl check`` reports these first; see ``RewardSpec.function_problems``).
        ValueError: an empty list, duplicate names, or a spec with no function, url or model.
        OSError: a reward-model folder that does not hold a loadable model.
    """
    components: list[RewardComponent] = []
    for spec in specs:
        if spec.function is not None:
            fn = spec.resolve()
            bound = functools.partial(fn, **spec.kwargs) if spec.kwargs else fn
            default_name = getattr(fn, "__name__", None) or spec.function.rpartition(":")[2]
            components.append(RewardComponent(name=spec.name or default_name, weight=spec.weight, fn=bound))
        elif spec.url is not None:
            from streamrl.services.scorer.http_reward import HttpReward

            server = HttpReward(
                spec.url,
                batch_size=spec.batch_size,
                timeout_s=spec.timeout_s,
                retries=spec.retries,
                backoff_s=spec.backoff_s,
                headers=spec.headers,
                stop=stop,
            )
            components.append(RewardComponent(name=spec.name or "http_reward", weight=spec.weight, fn=server))
        elif spec.model is not None:
            scorer = RewardModelScorer(
                spec.model,
                batch_size=spec.batch_size,
                device=device,
                max_length=spec.max_length,
                label=spec.label,
                chat_template=spec.chat_template,
            )
            from streamrl.services.scorer.deadline import TimeLimited

            limited = TimeLimited(scorer, timeout_s=spec.timeout_s, what=f"reward model {spec.model}")
            components.append(RewardComponent(name=spec.name or "reward_model", weight=spec.weight, fn=limited))
        else:  # the schema refuses such a spec; one built by hand may still lack all three
            raise ValueError(f"reward spec {spec.name!r} has no function, url or model")
    return CompositeReward(components)
