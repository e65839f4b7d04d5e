"""Reward sources for the scorer service.

Reward function contract
========================
A reward function is any callable (referenced in the config as
``"package.module:function"``) with the signature::

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
  :func:`functools.partial`).
* The function is called from one thread at a time per scorer process; it may
  keep lazily-created state (models, analysers) in module globals.

Built-in functions: :func:`vader_sentiment`, :func:`gsm8k_exact_match`,
:func:`count_char`. A local sequence-classification reward model is wrapped by
:class:`RewardModelScorer`. Several sources are combined by
:class:`CompositeReward`, built from config dicts by :func:`build_reward`.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import re
import threading
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Sequence

import torch

__all__ = [
    "RewardFn",
    "vader_sentiment",
    "gsm8k_exact_match",
    "extract_final_number",
    "count_char",
    "load_function",
    "RewardModelScorer",
    "RewardComponent",
    "CompositeReward",
    "build_reward",
]

RewardFn = Callable[[list[str], list[str], list[dict]], list[float]]

_SPEC_EXAMPLE = "streamrl.services.scorer.rewards:vader_sentiment"


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
_NUMBER_RE = re.compile(
    r"(?:(?<![\w.])-)?\$?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|(?:(?<![\w.])-)?\$?\.\d+"
)


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
        raise ValueError(
            f"gsm8k_exact_match: got {len(completions)} completions but {len(metadata)} metadata dicts"
        )
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


def count_char(
    prompts: list[str],
    completions: list[str],
    metadata: list[dict],
    *,
    char: str = "a",
    max_count: int | None = None,
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
        ValueError: if ``char`` is not a single character or ``max_count`` is
            not a positive int.
    """
    if not isinstance(char, str) or len(char) != 1:
        raise ValueError(f"count_char: 'char' must be a single character, got {char!r}")
    if max_count is not None and (isinstance(max_count, bool) or not isinstance(max_count, int) or max_count < 1):
        raise ValueError(f"count_char: 'max_count' must be a positive int or None, got {max_count!r}")
    scores: list[float] = []
    for text in completions:
        count = text.count(char)
        if max_count is None:
            scores.append(count / max(1, len(text)))
        else:
            scores.append(min(count, max_count) / max_count)
    return scores


# ---------------------------------------------------------------------------
# User functions
# ---------------------------------------------------------------------------


def load_function(spec: str) -> Callable[..., Any]:
    """Import a callable named ``"package.module:function"``.

    Args:
        spec: module path and attribute separated by one colon, e.g.
            ``"streamrl.services.scorer.rewards:vader_sentiment"``. The attribute may be
            dotted (``"pkg.mod:Class.method"``).

    Returns:
        The callable object.

    Raises:
        ValueError: if the spec is malformed, the module cannot be imported
            (missing, or it fails while importing), the attribute does not
            exist, or it is not callable. The message names the problem and
            the expected form.
    """
    expected = f"expected 'package.module:function', e.g. '{_SPEC_EXAMPLE}'"
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"malformed reward function spec {spec!r}: {expected}")
    module_name, attr_path = (part.strip() for part in spec.split(":"))
    if not module_name or not attr_path:
        raise ValueError(f"malformed reward function spec {spec!r}: {expected}")
    if not all(part.isidentifier() for part in module_name.split(".")) or not all(
        part.isidentifier() for part in attr_path.split(".")
    ):
        raise ValueError(f"malformed reward function spec {spec!r} (not dotted Python names): {expected}")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module_name == missing or module_name.startswith(missing + "."):
            raise ValueError(
                f"reward function spec {spec!r}: module {module_name!r} not found "
                f"(is it on PYTHONPATH?); {expected}"
            ) from exc
        raise ValueError(
            f"reward function spec {spec!r}: importing module {module_name!r} failed because "
            f"its dependency {missing!r} is not installed"
        ) from exc
    except Exception as exc:  # error raised inside the user's module
        raise ValueError(
            f"reward function spec {spec!r}: importing module {module_name!r} raised "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    obj: Any = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise ValueError(
                f"reward function spec {spec!r}: module {module_name!r} has no attribute {attr_path!r}; {expected}"
            ) from exc
    if not callable(obj):
        raise ValueError(
            f"reward function spec {spec!r}: {module_name}.{attr_path} is a {type(obj).__name__}, not callable"
        )
    return obj


# ---------------------------------------------------------------------------
# Reward model
# ---------------------------------------------------------------------------


class RewardModelScorer:
    """Scores ``prompt + completion`` with a local sequence-classification model.

    Args:
        path: local folder holding a ``transformers`` model loadable by
            ``AutoModelForSequenceClassification`` and its tokenizer
            (``AutoTokenizer``). Nothing is downloaded.
        batch_size: texts per forward pass (>= 1).
        device: torch device to run on (keyword-only, required).
        max_length: tokens per text after truncation (>= 1). The tokenizer's
            own ``truncation_side`` applies (right by default: the end of a
            very long completion is cut).

    The model is put in eval mode and run under ``torch.inference_mode``. If
    the tokenizer has no pad token, the eos token is used; the model config's
    ``pad_token_id`` is set to the tokenizer's pad id so the classifier pools
    the last non-pad token. Padding is on the right, so padded and unpadded
    runs of the same text give the same score. Note that with pad == eos,
    trailing eos tokens in a text are treated as padding.

    Raises:
        ValueError: on a bad ``batch_size``/``max_length``, or when the
            tokenizer has neither a pad nor an eos token.
        OSError: if the folder does not hold a loadable model/tokenizer.
    """

    def __init__(self, path: str, *, batch_size: int = 8, device: torch.device, max_length: int = 512) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"RewardModelScorer: batch_size must be a positive int, got {batch_size!r}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise ValueError(f"RewardModelScorer: max_length must be a positive int, got {max_length!r}")
        self.path = str(path)
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        if self.tokenizer.pad_token is None:
            if self.tokenizer.eos_token is None:
                raise ValueError(f"RewardModelScorer: tokenizer in {self.path!r} has neither a pad nor an eos token")
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        self.model = AutoModelForSequenceClassification.from_pretrained(self.path)
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(self.device)
        self.model.eval()

    def __call__(self, prompts: list[str], completions: list[str], metadata: list[dict]) -> list[float]:
        """Score each ``prompts[i] + completions[i]`` (plain concatenation).

        Args:
            prompts: prompt texts.
            completions: generated texts, same length as ``prompts``.
            metadata: per-prompt extras (unused).

        Returns:
            One float per completion: the model's logit for label 0.

        Raises:
            ValueError: if ``prompts`` and ``completions`` differ in length.
        """
        if len(prompts) != len(completions):
            raise ValueError(
                f"RewardModelScorer: got {len(prompts)} prompts but {len(completions)} completions"
            )
        texts = [p + c for p, c in zip(prompts, completions)]
        scores: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    texts[start : start + self.batch_size],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                batch = {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
                logits = self.model(**batch).logits
                scores.extend(logits[:, 0].float().cpu().tolist())
        return scores


# ---------------------------------------------------------------------------
# Composition
# ---------------------------------------------------------------------------


@dataclass
class RewardComponent:
    """One weighted reward source.

    Attributes:
        name: key of this component in the per-sample parts dict.
        weight: multiplier applied to the component's values (dimensionless).
        fn: callable with the reward function contract (see module docstring),
            with any config kwargs already bound.
    """

    name: str
    weight: float
    fn: Callable[[list[str], list[str], list[dict]], Sequence[float]]


class CompositeReward:
    """Weighted sum of reward components.

    Args:
        components: non-empty sequence of :class:`RewardComponent` with unique
            names.

    Raises:
        ValueError: if ``components`` is empty, names repeat, or a weight is
            not a finite number.
    """

    def __init__(self, components: Sequence[RewardComponent]) -> None:
        components = list(components)
        if not components:
            raise ValueError("CompositeReward needs at least one component")
        names = [c.name for c in components]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"CompositeReward: duplicate component names {duplicates}; give each a distinct 'name'")
        for c in components:
            if isinstance(c.weight, bool) or not isinstance(c.weight, (int, float)) or not math.isfinite(c.weight):
                raise ValueError(f"CompositeReward: component {c.name!r} has a non-finite or non-numeric weight {c.weight!r}")
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
                    raise ValueError(f"reward component {comp.name!r} returned a non-numeric value {raw!r} at index {i}") from exc
                if not math.isfinite(value):
                    raise ValueError(f"reward component {comp.name!r} returned a non-finite value {value} at index {i}")
                parts[i][comp.name] = value
                totals[i] += comp.weight * value
        return totals, parts


_FUNCTION_KEYS = {"function", "weight", "kwargs", "name"}
_MODEL_KEYS = {"model", "weight", "batch_size", "max_length", "name"}


def build_reward(specs: list[dict], *, device: torch.device) -> CompositeReward:
    """Build a :class:`CompositeReward` from reward spec dicts.

    Each spec is one of::

        {"function": "module:fn", "weight": 1.0, "kwargs": {...}, "name": "..."}
        {"model": "/path/to/folder", "weight": 1.0, "batch_size": 8, "max_length": 512, "name": "..."}

    ``weight`` defaults to 1.0, ``kwargs`` to ``{}``; ``name`` defaults to the
    function's ``__name__`` or ``"reward_model"``.

    Args:
        specs: non-empty list of spec dicts.
        device: torch device for reward models.

    Returns:
        The composite reward.

    Raises:
        ValueError: on an empty list, a non-dict spec, a spec with both or
            neither of ``function``/``model``, unknown keys, a bad weight,
            kwargs that are not a dict or that the function does not accept,
            a bad function spec (see :func:`load_function`), or duplicate names.
    """
    if not isinstance(specs, (list, tuple)) or not specs:
        raise ValueError(f"build_reward: expected a non-empty list of reward specs, got {specs!r}")
    components: list[RewardComponent] = []
    for i, spec in enumerate(specs):
        where = f"reward spec #{i}"
        if not isinstance(spec, dict):
            raise ValueError(f"{where}: expected a dict, got {type(spec).__name__}")
        has_fn, has_model = "function" in spec, "model" in spec
        if has_fn == has_model:
            raise ValueError(
                f"{where}: exactly one of 'function' (e.g. '{_SPEC_EXAMPLE}') or 'model' (a local folder) "
                f"is required, got keys {sorted(spec)}"
            )
        allowed = _FUNCTION_KEYS if has_fn else _MODEL_KEYS
        unknown = sorted(set(spec) - allowed)
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}; allowed: {sorted(allowed)}")
        weight = spec.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"{where}: 'weight' must be a finite number, got {weight!r}")
        name = spec.get("name")
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"{where}: 'name' must be a non-empty string, got {name!r}")
        if has_fn:
            fn = load_function(spec["function"])
            kwargs = spec.get("kwargs", {})
            if kwargs is None:
                kwargs = {}
            if not isinstance(kwargs, dict):
                raise ValueError(f"{where}: 'kwargs' must be a table/dict, got {type(kwargs).__name__}")
            try:
                signature = inspect.signature(fn)
            except (TypeError, ValueError):
                signature = None
            if signature is not None:
                try:
                    signature.bind([], [], [], **kwargs)
                except TypeError as exc:
                    raise ValueError(
                        f"{where}: {spec['function']} cannot be called as fn(prompts, completions, metadata"
                        f"{''.join(', ' + k + '=...' for k in kwargs)}): {exc}"
                    ) from exc
            bound = functools.partial(fn, **kwargs) if kwargs else fn
            default_name = getattr(fn, "__name__", None) or spec["function"].split(":")[1]
            components.append(RewardComponent(name=name or default_name, weight=float(weight), fn=bound))
        else:
            path = spec["model"]
            if not isinstance(path, str) or not path:
                raise ValueError(f"{where}: 'model' must be a local folder path, got {path!r}")
            scorer = RewardModelScorer(
                path,
                batch_size=spec.get("batch_size", 8),
                device=device,
                max_length=spec.get("max_length", 512),
            )
            components.append(RewardComponent(name=name or "reward_model", weight=float(weight), fn=scorer))
    return CompositeReward(components)
