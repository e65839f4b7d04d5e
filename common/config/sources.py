"""Where prompts and rewards come from: :class:`PromptSource` (read by
:func:`streamrl.common.prompts.load_prompts`) and :class:`RewardSpec` (a reward function,
reward-model folder or reward server; built by :func:`streamrl.services.scorer.rewards.build_reward`)."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field, ImportString, TypeAdapter, ValidationError, field_validator, model_validator

from streamrl.common.config.base import (
    LOCAL_PATH,
    STRICT_ARGS,
    ResourceError,
    _rule,
    _Section,
    _type_text,
)
from streamrl.common.user_code import missing_module_fix
from streamrl.deploy import DEFAULT_PROMPTS


class PromptSource(_Section):
    """Where prompts come from (read by :func:`streamrl.common.prompts.load_prompts`)."""

    kind: Literal["jsonl", "csv", "gsm8k", "datasets"] = Field(
        "jsonl",
        description="`jsonl`: one JSON object per line; `csv`: a header row and a text column; "
        "`gsm8k`: question/answer lines (the answer goes to the `gsm8k_exact_match` reward); `datasets`: read "
        "with Hugging Face `datasets`: a parquet, json, jsonl, csv or arrow file, a folder saved by "
        "`save_to_disk`, or a hub data set (`dataset`)",
    )
    path: str = Field(
        str(DEFAULT_PROMPTS),
        min_length=1,
        description="prompt file (kind `datasets`: also a `save_to_disk` folder)",
        json_schema_extra={
            **LOCAL_PATH,
            "default_text": "the review openings shipped in `streamrl.deploy` (`prompts/review_openings.jsonl`)",
        },
    )
    dataset: str | None = Field(
        None,
        min_length=1,
        description="hub data set id (`openai/gsm8k`) instead of "
        "`path`; downloaded by `datasets.load_dataset` on first use (needs the network "
        "or the Hugging Face cache)",
        json_schema_extra={"applies_to": {"kind": "datasets"}},
    )
    subset: str | None = Field(
        None,
        min_length=1,
        description="configuration (subset) of the hub data set, e.g. `main` for `openai/gsm8k`",
        json_schema_extra={"applies_to": {"kind": "datasets"}},
    )
    split: str = Field(
        "train",
        min_length=1,
        description="split to read (a file counts as split `train`)",
        json_schema_extra={"applies_to": {"kind": "datasets"}},
    )
    format: Literal["parquet", "json", "csv", "arrow"] | None = Field(
        None,
        description="file format of `path`; unset = from its extension (`.parquet`, `.json`, `.jsonl`, "
        "`.csv`, `.arrow`, optionally `.gz`)",
        json_schema_extra={"applies_to": {"kind": "datasets"}},
    )
    text_field: str = Field(
        "text",
        min_length=1,
        description="key (column) of the prompt text",
        json_schema_extra={"applies_to": {"kind": ["jsonl", "datasets"]}},
    )
    messages_field: str | None = Field(
        None,
        min_length=1,
        description="key (column) holding the prompt as "
        "a chat: a list of `{role, content}` messages, rendered with the "
        "tokenizer's chat template (and `model.system_prompt` when the list has "
        "no system message); replaces `text_field`",
        json_schema_extra={"applies_to": {"kind": ["jsonl", "datasets"]}},
    )
    id_field: str | None = Field(
        "id",
        min_length=1,
        description="key (column) of the prompt id (unset, or a row without it: `<file stem>:<row>`)",
        json_schema_extra={"applies_to": {"kind": ["jsonl", "datasets"]}},
    )
    column: str = Field(
        "review",
        min_length=1,
        description="header of the text column (HTML is stripped)",
        json_schema_extra={"applies_to": {"kind": "csv"}},
    )
    first_k_words: int | None = Field(
        None,
        ge=1,
        description="keep the first K words of each text (turns a review into an opening); unset = whole text",
        json_schema_extra={"applies_to": {"kind": "csv"}},
    )
    metadata_fields: list[str] = Field(
        default_factory=list,
        description="keys (columns) copied into each "
        "prompt's `metadata`, the dict a reward function gets beside the completion "
        "(kind `gsm8k` always carries `answer`); values must be JSON-like",
    )
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="held out by hashed prompt id, never trained on")
    split_seed: int | None = Field(
        None,
        ge=0,
        description="seed of the held-out hash; unset = `run.seed`. Set it to compare runs of several seeds on "
        "the same held-out prompts",
    )

    @model_validator(mode="after")
    def _one_text(self) -> PromptSource:
        if self.dataset is not None and "path" in self.model_fields_set:
            raise _rule(
                "give either `path` (a local file or folder) or `dataset` (a hub id), not both; fix: remove one",
                "dataset",
            )
        if self.dataset is not None and self.format is not None:
            raise _rule(
                "`format` describes a local `path`; a hub data set brings its own; fix: remove `format`", "format"
            )
        if self.messages_field is not None and "text_field" in self.model_fields_set:
            raise _rule(
                "a prompt is either text (`text_field`) or a chat (`messages_field`); fix: remove one", "messages_field"
            )
        if self.messages_field is not None and self.messages_field in self.metadata_fields:
            raise _rule(
                f"`{self.messages_field}` is the messages column and cannot also be metadata; fix: remove "
                "it from metadata_fields",
                "metadata_fields",
            )
        if len(set(self.metadata_fields)) != len(self.metadata_fields) or not all(self.metadata_fields):
            raise _rule(
                "metadata_fields must list distinct, non-empty names; fix: remove the repeats", "metadata_fields"
            )
        return self


BUILTIN_REWARDS: dict[str, str] = {
    name: f"streamrl.services.scorer.rewards:{name}" for name in ("vader_sentiment", "gsm8k_exact_match", "count_char")
}
"""Short names accepted by ``scorer.rewards[i].function`` for the built-in reward functions."""

_IMPORT = TypeAdapter(ImportString)


class RewardSpec(_Section):
    """One reward component: a function, a reward-model folder or a reward server (``url``)."""

    function: str | None = Field(
        None,
        description="reward function `package.module:function` with the contract in "
        "`streamrl.services.scorer.rewards`, or a built-in name: " + ", ".join(f"`{name}`" for name in BUILTIN_REWARDS),
    )
    model: str | None = Field(
        None,
        min_length=1,
        description="local sequence-classification reward-model folder (score = logit 0 of prompt + completion)",
        json_schema_extra=LOCAL_PATH,
    )
    weight: float = Field(1.0, description="multiplier of this component in the total reward")
    name: str | None = Field(
        None,
        min_length=1,
        description="key of this component in the per-sample "
        "reward parts (default: the function's name or `reward_model`)",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="keyword arguments passed to `function` on every call",
        json_schema_extra={"applies_to": {"source": "function"}},
    )
    url: str | None = Field(
        None,
        min_length=1,
        description="HTTP reward server: each request POSTs JSON "
        '`{prompts, completions, metadata}` and the answer is `{"rewards": [...]}` '
        "(docs/data-and-reward.md)",
    )
    batch_size: int = Field(
        8,
        ge=1,
        description="texts per reward-model forward pass, or per request to `url`",
        json_schema_extra={"applies_to": {"source": ["model", "url"]}},
    )
    max_length: int | None = Field(
        None,
        ge=1,
        description="reward-model tokens per text; a longer text loses "
        "its start; unset = the length the model was trained with (stored by "
        "`streamrl rm`), else 512",
        json_schema_extra={"applies_to": {"source": "model"}},
    )

    label: int | str | None = Field(
        None,
        description="reward-model output read as the score: an index or a "
        'label name of `id2label` (`"POSITIVE"`); required when the model has more '
        "than one label",
        json_schema_extra={"applies_to": {"source": "model"}},
    )
    chat_template: bool = Field(
        False,
        description="render each prompt as the user turn of the reward model's "
        "chat template (after the system message it was trained with) before the "
        "completion: for an RM trained on chat-formatted prompts scoring a policy that "
        "sees raw text",
        json_schema_extra={"applies_to": {"source": "model"}},
    )
    timeout_s: float = Field(
        30.0,
        gt=0,
        description="seconds one micro-batch may take: per HTTP request "
        "(connect, write, read), or for the reward model to score it (then the scorer stops "
        "waiting and counts a `RewardTimeout`)",
        json_schema_extra={"applies_to": {"source": ["model", "url"]}},
    )
    retries: int = Field(
        3,
        ge=0,
        description="times a failed request (connection error, timeout, HTTP 429 or 5xx) is tried again",
        json_schema_extra={"applies_to": {"source": "url"}},
    )
    backoff_s: float = Field(
        0.5,
        gt=0,
        description="wait before the first retry, seconds; doubled for each further one (plus up to 10% jitter)",
        json_schema_extra={"applies_to": {"source": "url"}},
    )
    headers: dict[str, str] = Field(
        default_factory=dict,
        description="HTTP headers of every request, e.g. "
        '`{Authorization = "Bearer ${REWARD_TOKEN}"}` (`${VAR}` is read from the '
        "environment)",
        json_schema_extra={"applies_to": {"source": "url"}},
    )

    @property
    def source(self) -> str | None:
        """``"function"``, ``"model"`` or ``"url"`` (None while none or several are set)."""
        given = [name for name in ("function", "model", "url") if getattr(self, name) is not None]
        return given[0] if len(given) == 1 else None

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise _rule(f'`{value}` is not an http:// or https:// URL; fix: write e.g. "http://127.0.0.1:8000/score"')
        return value

    @field_validator("function")
    @classmethod
    def _function_form(cls, value: str | None) -> str | None:
        if value is None or value in BUILTIN_REWARDS.values():
            return value
        if value in BUILTIN_REWARDS:
            return BUILTIN_REWARDS[value]
        module, sep, attr = value.partition(":")
        if not sep or not attr.isidentifier() or not all(part.isidentifier() for part in module.split(".")):
            raise _rule(
                f"`{value}` is not `package.module:function` nor a built-in reward; fix: write e.g. "
                f'"{BUILTIN_REWARDS["count_char"]}" or one of ' + ", ".join(BUILTIN_REWARDS)
            )
        return value

    @model_validator(mode="after")
    def _one_source(self) -> RewardSpec:
        if self.source is None:
            raise _rule(
                "give exactly one of `function` (package.module:function or a built-in name), "
                "`model` (a reward-model folder) or `url` (a reward server); fix: keep one of them"
            )
        return self

    def function_problems(self) -> tuple[Callable[..., Any] | None, list[ResourceError]]:
        """Import ``function`` and check that it takes ``kwargs``; needs the imports, so not run at load.

        Returns:
            ``(fn, problems)``: the imported callable (None when it cannot be imported) and every
            problem found: import failure, not callable, ``kwargs`` that do not bind to
            ``fn(prompts, completions, metadata, **kwargs)``, and, for functions whose arguments
            pydantic validates (``pydantic.validate_call``), ``kwargs`` values of the wrong type
            (checked strictly against the annotations, as :data:`STRICT_ARGS` does at call time).

        Raises:
            ValueError: this spec is a reward model or server, not a function.
        """
        if self.function is None:
            raise ValueError(f"reward spec {self.model or self.url!r} is a reward {self.source}, not a function")
        fix = (
            "fix: set it to an importable `package.module:function` (its module in the config file's folder, "
            "the current directory or on PYTHONPATH) or a built-in name: " + ", ".join(BUILTIN_REWARDS)
        )
        try:
            fn = _IMPORT.validate_python(self.function)
        except ValidationError as exc:
            reason = exc.errors()[0]["msg"].removeprefix("Invalid python path: ")
            module = self.function.partition(":")[0]
            if reason.startswith("No module named") and f"'{module.split('.')[0]}'" in reason:
                fix = missing_module_fix(module)
            return None, [ResourceError("function", f"cannot import {self.function}: {reason}; {fix}")]
        except Exception as exc:  # raised while importing the user's module
            return None, [
                ResourceError(
                    "function",
                    f"importing {self.function} raised {type(exc).__name__}: {exc}; fix: correct that module",
                )
            ]
        if not callable(fn):
            return None, [ResourceError("function", f"{self.function} is a {type(fn).__name__}, not a function; {fix}")]
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError):  # some C callables have none: nothing to check against
            return fn, []
        try:
            signature.bind([], [], [], **self.kwargs)
        except TypeError as exc:
            accepted = [
                p.name
                for p in list(signature.parameters.values())[3:]
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            ]
            hint = f"use only {', '.join(accepted)}" if accepted else "remove `kwargs`"
            return fn, [
                ResourceError(
                    "kwargs",
                    f"{self.function} cannot be called as fn(prompts, completions, "
                    f"metadata, **{self.kwargs}): {exc}; fix: {hint}",
                )
            ]
        raw = getattr(fn, "raw_function", None)  # set by pydantic.validate_call
        if raw is None or not self.kwargs:
            return fn, []
        hints = typing.get_type_hints(raw, include_extras=True)
        problems = []
        for name, value in self.kwargs.items():
            if name not in hints:
                continue
            try:
                TypeAdapter(hints[name], config=STRICT_ARGS).validate_python(value, strict=True)
            except ValidationError as exc:
                problems.append(
                    ResourceError(
                        f"kwargs.{name}",
                        f"{exc.errors()[0]['msg']} (got {value!r}); "
                        f"fix: set it to a value of type {_type_text(hints[name])}",
                    )
                )
        return fn, problems

    def resolve(self) -> Callable[..., Any]:
        """The reward function (``kwargs`` not bound), after :meth:`function_problems` found none.

        Raises:
            ResourceError: the first problem :meth:`function_problems` found (its ``key`` and fix).
            ValueError: this spec is a reward model, not a function.
        """
        fn, problems = self.function_problems()
        if problems or fn is None:  # fn is None only with a problem that says why
            raise problems[0]
        return fn
