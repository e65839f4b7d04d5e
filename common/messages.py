"""The wire protocol: every message type streamrl sends, and its codec.

This module is the only place that knows the wire format (one module owns it,
as in jupyter_client). A message is a multipart ZeroMQ message:

* frame 0: a msgpack map with the envelope (``kind``, ``schema``, ``msg_id``,
  ``sender``, ``sent_at``) and the message's named fields;
* frames 1..n: raw payloads. Every ``numpy.ndarray`` field travels as raw
  little-endian bytes in its own frame, referenced from frame 0 by a msgpack
  extension ``(frame index, dtype name, shape)``; every ``bytes`` field travels
  the same way with ``(frame index,)``. Large payloads are therefore never
  copied into the msgpack buffer and can be sent with ``copy=False``.

Never pickle: only msgpack primitives, declared dtypes and declared shapes are
accepted. The schema version ``(major, minor)`` is independent of the package
version. A receiver accepts any minor version of its major version: fields it
does not know are ignored (a newer minor may add fields), fields it needs
must be present. ``decode`` raises :class:`ProtocolError` with a
:class:`RejectReason` for anything it rejects; services count those by reason
and keep running.
"""

from __future__ import annotations

import dataclasses
import math
import time
import types
import typing
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar, TypeVar, overload

import msgpack
import numpy as np

SCHEMA_VERSION: tuple[int, int] = (1, 3)
"""(major, minor) of the wire schema. Bump major for incompatible changes.

1.1 added the optional ``Rollout.selection`` and ``ScoredRollout.human`` fields and the
``human_model`` message (people in the loop); a 1.0 receiver ignores them.
1.2 added the ``credit_request`` / ``credit_grant`` messages (generation credits) and the
optional ``ScoredRollout.reference_logprobs`` (reference pass in the scorers).
1.3 added the ``group_dropped`` message (a scorer dropped a group whose reward raised on a member;
a 1.2 buffer rejects it as an unknown kind and the group times out there as before)."""

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
"""Largest message (all frames together) a decoder accepts, in bytes."""

DEFAULT_MAX_FRAMES = 8192
"""Largest number of frames in one message."""

MAX_MAP_DEPTH = 32
"""Deepest nesting of lists and maps inside a plain-map field (``metadata``, ``reward_parts``)."""

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

_EXT_ARRAY = 1
_EXT_BYTES = 2

_ALLOWED_DTYPES = frozenset(["bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64"])


class RejectReason(str, Enum):
    """Why a receiver rejected a message; the label of ``messages_rejected_total``."""

    MALFORMED = "malformed"  # not msgpack, not a map, bad extension
    UNKNOWN_KIND = "unknown_kind"
    UNEXPECTED_KIND = "unexpected_kind"  # a known kind this socket does not take
    SCHEMA_VERSION = "schema_version"  # another major version
    BAD_FIELD = "bad_field"  # missing field or wrong type
    BAD_ARRAY = "bad_array"  # wrong dtype, shape or byte length
    BAD_VALUE = "bad_value"  # well-typed but absurd (NaN reward, negative version)
    OVERSIZE = "oversize"  # too many bytes or frames


class ProtocolError(ValueError):
    """A message that cannot be accepted.

    Attributes:
        reason: the :class:`RejectReason` (a metric label).
        detail: one human-readable line saying what was wrong.
    """

    def __init__(self, reason: RejectReason, detail: str):
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


class FinishReason(str, Enum):
    """Why a completion ended: the EOS token (``stop``) or ``max_new_tokens`` (``length``)."""

    STOP = "stop"
    LENGTH = "length"


class ErrorCode(str, Enum):
    """Codes carried by an :class:`Error` reply."""

    BAD_REQUEST = "bad_request"
    UNKNOWN_VERSION = "unknown_version"  # weights version no longer (or not yet) served
    OUT_OF_RANGE = "out_of_range"  # chunk index past the end
    UNAVAILABLE = "unavailable"  # nothing to serve yet
    INTERNAL = "internal"


def array_field(dtype: str, ndim: int, *, optional: bool = False) -> Any:
    """A dataclass field holding a ``numpy.ndarray`` of ``dtype`` with ``ndim`` dims
    (``optional``: or None, the default; a receiver gets None when it is absent or null)."""
    if dtype not in _ALLOWED_DTYPES:
        raise ValueError(f"dtype {dtype!r} is not allowed on the wire")
    if optional:
        return field(default=None, metadata={"dtype": dtype, "ndim": ndim, "optional": True})
    return field(metadata={"dtype": dtype, "ndim": ndim})


def _new_msg_id() -> str:
    return uuid.uuid4().hex


@dataclass(kw_only=True)
class Message:
    """Envelope shared by every message.

    Attributes:
        msg_id: random 128-bit hex id, unique per message.
        sender: identity of the sending process, e.g. ``generator-host-1234``.
        sent_at: Unix time in seconds when the message object was created.
    """

    KIND: ClassVar[str] = ""
    msg_id: str = field(default_factory=_new_msg_id)
    sender: str = ""
    sent_at: float = field(default_factory=time.time)

    def check(self) -> None:
        """Raise :class:`ProtocolError` (``BAD_VALUE``) for well-typed but invalid values."""


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
        _require(self.group_size >= 1, "group_size must be >= 1")
        _require(self.policy_version >= 0, "policy_version must be >= 0")
        _require(len(self.prompt_tokens) >= 1, "prompt_tokens is empty")
        _require(len(self.completion_tokens) >= 1, "completion_tokens is empty")
        _require(
            bool(np.all(self.prompt_tokens >= 0)) and bool(np.all(self.completion_tokens >= 0)),
            "negative token id",
        )
        _require(
            self.completion_tokens.shape == self.behaviour_logprobs.shape,
            f"behaviour_logprobs shape {self.behaviour_logprobs.shape} != "
            f"completion_tokens shape {self.completion_tokens.shape}",
        )
        lp = self.behaviour_logprobs
        _require(bool(np.all(np.isfinite(lp))), "behaviour_logprobs has non-finite values")
        _require(bool(np.all(lp <= 1e-4)), "behaviour_logprobs has positive log-probabilities")
        _require(self.sampling.temperature > 0, "sampling.temperature must be > 0")
        _require(0 < self.sampling.top_p <= 1, "sampling.top_p must be in (0, 1]")
        sel = self.selection
        if sel is not None:
            _require(sel.candidates >= 2, "selection.candidates must be >= 2")
            _require(0 <= sel.probability <= 1, "selection.probability must be in [0, 1]")
            # rho = K * P(kept | candidates) lies in [1 - p, (1 - p) + p * K]
            low, high = 1 - sel.probability, (1 - sel.probability) + sel.probability * sel.candidates
            _require(
                math.isfinite(sel.density_ratio)
                and 0 < sel.density_ratio
                and low - 1e-6 <= sel.density_ratio <= high + 1e-6,
                "selection.density_ratio must be in [1 - p, 1 - p + p * K] and > 0",
            )
            _require(math.isfinite(sel.human_value), "selection.human_value is not finite")


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
            _require(
                self.reference_logprobs.shape == self.rollout.completion_tokens.shape,
                "reference_logprobs must have one entry per completion token",
            )
            _require(bool(np.all(np.isfinite(self.reference_logprobs))), "reference_logprobs has non-finite values")
        _require(math.isfinite(self.reward), "reward is not finite")
        if self.human is not None:
            _require(
                math.isfinite(self.human.value) and -1 <= self.human.value <= 1,
                "human.value must be a finite number in [-1, 1]",
            )
            _require(0 <= self.human.eligibility <= 1, "human.eligibility must be in [0, 1]")
            _require(self.human.model_version >= 0, "human.model_version must be >= 0")
        for name, value in self.reward_parts.items():
            _require(
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
        _require(bool(self.group_id) and bool(self.generator_id), "group_id and generator_id must not be empty")
        _require(self.group_size >= 1, "group_size must be >= 1")
        _require(bool(self.reason), "reason must not be empty")


@dataclass(kw_only=True)
class BatchRequest(Message):
    """The learner asks the buffer for a batch (learner -> buffer).

    Attributes:
        learner_version: the learner's current policy version; the buffer drops
            items with ``learner_version - policy_version > max_staleness``.
        num_groups: number of complete groups wanted.
        durable_version: (schema 1.2, optional) the version of the learner's newest checkpoint:
            every batch it was served for an older version is durably trained and may be
            forgotten; -1 (an older learner): a request for a newer version acknowledges.
        resumed_at: (schema 1.2, optional) the version this learner process started at (names
            the process: batches served to an earlier process and not covered by
            ``durable_version`` were lost with it and are served again); -1: not stated.
        refused_batch: (schema 1.2, optional) ``msg_id`` of a batch the learner refused entirely
            (no rollout passed its checks: another model's fingerprint, an id past the
            vocabulary, another sampling distribution): the buffer forgets it, journaled as
            removed with event ``refused``, instead of serving it again; "" = none.
    """

    KIND: ClassVar[str] = "batch_request"
    learner_version: int
    num_groups: int
    durable_version: int = -1
    resumed_at: int = -1
    refused_batch: str = ""

    def check(self) -> None:
        _require(self.learner_version >= 0, "learner_version must be >= 0")
        _require(self.num_groups >= 1, "num_groups must be >= 1")
        _require(self.durable_version >= -1 and self.resumed_at >= -1, "durable_version, resumed_at must be >= -1")
        _require(
            self.durable_version <= self.learner_version and self.resumed_at <= self.learner_version,
            "durable_version and resumed_at cannot be newer than learner_version",
        )


@dataclass(kw_only=True)
class CreditRequest(Message):
    """A generator asks the buffer for generation credits before sampling (generator -> buffer,
    DEALER -> the buffer's batch ROUTER; the reply is a :class:`CreditGrant`).

    Admission before generation (AReaL, Fu et al. 2025, sec. 4): a generator samples
    a group only while it holds a credit. Counts are cumulative per ``sender`` (the generator id,
    unique per process start), so a lost or repeated request changes nothing.

    Attributes:
        instance: the generator's stable name (``generator-0``); a request from a new ``sender``
            with the same instance means the old process restarted: its unspent credits expire.
        policy_version: version of the weights the generator will sample with (its behaviour policy).
        groups_sent: groups this process has sampled so far (sent, or lost while stopping).
        want: groups it would sample next (its ``prompts_per_batch``).
    """

    KIND: ClassVar[str] = "credit_request"
    instance: str
    policy_version: int
    groups_sent: int
    want: int

    def check(self) -> None:
        _require(self.policy_version >= 0, "policy_version must be >= 0")
        _require(self.groups_sent >= 0, "groups_sent must be >= 0")
        _require(self.want >= 1, "want must be >= 1")
        _require(bool(self.instance), "instance must not be empty")


@dataclass(kw_only=True)
class CreditGrant(Message):
    """The buffer's answer to a :class:`CreditRequest` (buffer -> generator).

    Attributes:
        reply_to: ``msg_id`` of the request.
        credits: groups the generator may sample now with ``policy_version`` weights, beyond its
            ``groups_sent`` (0: wait; ask again after loading newer weights or a short pause).
            It replaces whatever an earlier grant allowed (unspent credits never accumulate).
        learner_version: newest version the learner asked a batch for (-1: none seen yet).
        epoch: random id of the buffer process (a new one after a restart).
        reason: why fewer credits than wanted were granted ("" when all were).
        trained_groups: groups of this generator id the buffer has served to the learner so far
            (trained / generated is the generator's useful ratio).
    """

    KIND: ClassVar[str] = "credit_grant"
    reply_to: str
    credits: int
    learner_version: int = -1
    epoch: str = ""
    reason: str = ""
    trained_groups: int = 0

    def check(self) -> None:
        _require(self.credits >= 0 and self.trained_groups >= 0, "credits and trained_groups must be >= 0")
        _require(self.learner_version >= -1, "learner_version must be >= -1")


@dataclass(kw_only=True)
class Batch(Message):
    """A batch of complete groups (buffer -> learner).

    Attributes:
        learner_version: echo of the request's version.
        rollouts: the scored rollouts, groups contiguous.
        dropped_stale: rollouts dropped as too stale since the previous batch.
        evicted: rollouts evicted (capacity or incomplete-group timeout) since the previous batch.
        buffered_groups: complete groups still held after this batch.
    """

    KIND: ClassVar[str] = "batch"
    learner_version: int
    rollouts: list[ScoredRollout]
    dropped_stale: int = 0
    evicted: int = 0
    buffered_groups: int = 0

    def check(self) -> None:
        for item in self.rollouts:
            item.check()
        _require(self.dropped_stale >= 0 and self.evicted >= 0, "negative counts")


@dataclass(kw_only=True)
class TensorSpec:
    """Where one tensor lies in a weights blob.

    Attributes:
        name: parameter name in the model's ``state_dict``.
        dtype: wire dtype name (``float32``, ``bfloat16``, ``float16``).
        shape: tensor shape.
        offset: byte offset in the blob.
        nbytes: byte length in the blob.
    """

    name: str
    dtype: str
    shape: list[int]
    offset: int
    nbytes: int


@dataclass(kw_only=True)
class WeightsAnnounce(Message):
    """A new policy version is available (learner -> all, PUB; repeated periodically).

    Attributes:
        version: the policy version.
        manifest: one :class:`TensorSpec` per tensor.
        total_bytes: blob size in bytes.
        chunk_bytes: size of each chunk in bytes (the last may be shorter).
        num_chunks: number of chunks.
        sha256: hex digest of the whole blob.
        model_fingerprint: (schema 1.2, optional) the learner's model config and tokenizer
            fingerprint (``streamrl.common.fingerprint``); "" = not stated.
    """

    KIND: ClassVar[str] = "weights_announce"
    version: int
    manifest: list[TensorSpec]
    total_bytes: int
    chunk_bytes: int
    num_chunks: int
    sha256: str
    model_fingerprint: str = ""

    def check(self) -> None:
        _require(self.version >= 0, "version must be >= 0")
        _require(self.chunk_bytes > 0, "chunk_bytes must be > 0")
        _require(
            self.num_chunks == -(-self.total_bytes // self.chunk_bytes),
            "num_chunks does not match total_bytes / chunk_bytes",
        )
        end = 0
        for spec in self.manifest:
            _require(spec.offset >= end and spec.nbytes >= 0, f"manifest entry {spec.name} overlaps")
            end = spec.offset + spec.nbytes
        _require(end <= self.total_bytes, "manifest runs past total_bytes")
        _require(len(self.sha256) == 64, "sha256 must be 64 hex digits")


@dataclass(kw_only=True)
class WeightsChunkRequest(Message):
    """Ask for one chunk of a version's blob (generator -> learner, DEALER -> ROUTER).

    Attributes:
        version: the policy version wanted.
        chunk_index: 0-based chunk index.
    """

    KIND: ClassVar[str] = "weights_chunk_request"
    version: int
    chunk_index: int

    def check(self) -> None:
        _require(self.version >= 0 and self.chunk_index >= 0, "negative version or chunk_index")


@dataclass(kw_only=True)
class WeightsChunk(Message):
    """One chunk of a version's blob (learner -> generator).

    Attributes:
        version: policy version.
        chunk_index: 0-based chunk index.
        data: the chunk's bytes.
    """

    KIND: ClassVar[str] = "weights_chunk"
    version: int
    chunk_index: int
    data: bytes


@dataclass(kw_only=True)
class HumanModel(Message):
    """A version of H-hat, the learned model of the labellers' reinforcement (feedback -> scorers
    and generators, PUB; re-sent periodically so late joiners get it).

    H-hat(x) = clip(weight . ((phi(x) - mean) / scale) + bias, -1, 1), with phi(x) the
    ``feature`` of the frozen reference model (``streamrl.common.human.reference_features``).

    Attributes:
        version: H-hat version (>= 1), incremented by every refit.
        active: False while the labellers paused the human influence.
        feature: feature name (``streamrl.common.human.FEATURE``); a consumer with
            another feature refuses the model.
        mean: ``[D]`` float32 feature mean used for standardisation.
        scale: ``[D]`` float32 feature scale (> 0).
        weight: ``[D]`` float32 linear head.
        bias: the head's bias.
        anchors: ``[N, D]`` float32 standardised features of the most recently labelled
            rollouts (the eligibility module's anchors), N >= 0.
        anchor_times: ``[N]`` float64 Unix times (seconds) of those labels.
        labels: number of labels the fit used.
    """

    KIND: ClassVar[str] = "human_model"
    version: int
    active: bool
    feature: str
    mean: np.ndarray = array_field("float32", 1)
    scale: np.ndarray = array_field("float32", 1)
    weight: np.ndarray = array_field("float32", 1)
    bias: float
    anchors: np.ndarray = array_field("float32", 2)
    anchor_times: np.ndarray = array_field("float64", 1)
    labels: int

    def check(self) -> None:
        _require(self.version >= 1, "version must be >= 1")
        _require(self.labels >= 0, "labels must be >= 0")
        dim = self.weight.shape[0]
        _require(dim >= 1, "weight is empty")
        _require(
            self.mean.shape == (dim,) and self.scale.shape == (dim,), "mean, scale and weight must have the same length"
        )
        _require(self.anchors.shape[1] == dim or self.anchors.shape[0] == 0, f"anchors must be [N, {dim}]")
        _require(self.anchor_times.shape == (self.anchors.shape[0],), "anchor_times must be [N]")
        for name in ("mean", "scale", "weight", "anchors", "anchor_times"):
            _require(bool(np.all(np.isfinite(getattr(self, name)))), f"{name} has non-finite values")
        _require(bool(np.all(self.scale > 0)), "scale must be > 0")
        _require(math.isfinite(self.bias), "bias is not finite")


@dataclass(kw_only=True)
class Error(Message):
    """A reply saying a request failed.

    Attributes:
        code: :class:`ErrorCode`.
        message: one human-readable line.
        reply_to: ``msg_id`` of the request.
    """

    KIND: ClassVar[str] = "error"
    code: ErrorCode
    message: str
    reply_to: str = ""


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.KIND: cls
    for cls in (
        Rollout,
        ScoredRollout,
        GroupDropped,
        BatchRequest,
        Batch,
        CreditRequest,
        CreditGrant,
        WeightsAnnounce,
        WeightsChunkRequest,
        WeightsChunk,
        HumanModel,
        Error,
    )
}


def _require(condition: bool, detail: str) -> None:
    if not condition:
        raise ProtocolError(RejectReason.BAD_VALUE, detail)


# --------------------------------------------------------------------- encode


def encode(message: Message) -> list[bytes | memoryview]:
    """Encode a message into frames for ``socket.send_multipart``.

    Args:
        message: any :class:`Message` subclass instance.

    Returns:
        ``[header, payload...]``: the msgpack header (bytes) followed by one
        raw buffer per array or bytes field (memoryviews of the arrays, not
        copies, when they are already little-endian and contiguous).

    Raises:
        TypeError: a field holds a value the wire cannot carry (e.g. an object array).
    """
    payloads: list[bytes | memoryview] = []
    body = _encode_value(message, payloads, None)
    body["kind"] = message.KIND
    body["schema"] = list(SCHEMA_VERSION)
    return [msgpack.packb(body, use_bin_type=True), *payloads]


def _encode_value(value: Any, payloads: list, spec: Mapping[str, Any] | None) -> Any:
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "O" or value.dtype.name not in _ALLOWED_DTYPES:
            raise TypeError(f"array dtype {value.dtype} cannot go on the wire")
        if spec is not None and value.dtype.name != spec["dtype"]:
            raise TypeError(f"array must be {spec['dtype']}, got {value.dtype.name}")
        wire = np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<"))
        view = memoryview(wire)  # type: ignore[arg-type]  # numpy stubs: no __buffer__ before 3.12
        payloads.append(view.cast("B") if wire.size else b"")
        ref = [len(payloads), value.dtype.name, list(value.shape)]
        return msgpack.ExtType(_EXT_ARRAY, msgpack.packb(ref))
    if isinstance(value, (bytes, bytearray, memoryview)):
        payloads.append(value)
        return msgpack.ExtType(_EXT_BYTES, msgpack.packb([len(payloads)]))
    if isinstance(value, Enum):
        return value.value
    if dataclasses.is_dataclass(value):
        out = {}
        for f in dataclasses.fields(value):
            out[f.name] = _encode_value(getattr(value, f.name), payloads, f.metadata or None)
        if isinstance(value, Message):
            out["kind"] = value.KIND
        return out
    if isinstance(value, (list, tuple)):
        return [_encode_value(v, payloads, None) for v in value]
    if isinstance(value, dict):
        return {k: _encode_value(v, payloads, None) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{type(value).__name__} cannot go on the wire")


# --------------------------------------------------------------------- decode


class _Frames:
    """Payload frames of one message; each may be referenced exactly once."""

    def __init__(self, buffers: list[memoryview]):
        self.buffers = buffers
        self.used = [False] * len(buffers)

    def take(self, index: Any) -> memoryview:
        if type(index) is not int or not 1 <= index < len(self.buffers) + 1:
            raise ProtocolError(RejectReason.MALFORMED, f"payload frame {index!r} does not exist")
        if self.used[index - 1]:
            raise ProtocolError(RejectReason.MALFORMED, f"payload frame {index} referenced twice")
        self.used[index - 1] = True
        return self.buffers[index - 1]


def _buffer(frame: Any) -> Any:
    return frame.buffer if hasattr(frame, "buffer") else frame


M = TypeVar("M", bound=Message)


@overload
def decode(
    frames: Sequence[Any],
    *,
    expected: Sequence[type[M]],
    max_bytes: int = ...,
    max_frames: int = ...,
) -> M: ...
@overload
def decode(
    frames: Sequence[Any],
    *,
    expected: None = None,
    max_bytes: int = ...,
    max_frames: int = ...,
) -> Message: ...
def decode(
    frames: Sequence[Any],
    *,
    expected: Sequence[type[Message]] | None = None,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    max_frames: int = DEFAULT_MAX_FRAMES,
) -> Message:
    """Decode and validate one multipart message.

    Args:
        frames: the frames from ``recv_multipart`` (bytes or ``zmq.Frame``).
        expected: message classes this socket accepts; ``None`` accepts every kind.
        max_bytes: limit on the total size of all frames, in bytes.
        max_frames: limit on the number of frames.

    Returns:
        The message object, its arrays as read-only numpy views of the frames.

    Raises:
        ProtocolError: the message is rejected; ``.reason`` says why.
    """
    if not frames:
        raise ProtocolError(RejectReason.MALFORMED, "no frames")
    if len(frames) > max_frames:
        raise ProtocolError(RejectReason.OVERSIZE, f"{len(frames)} frames > limit {max_frames}")
    buffers = [memoryview(_buffer(f)) for f in frames]
    total = sum(b.nbytes for b in buffers)
    if total > max_bytes:
        raise ProtocolError(RejectReason.OVERSIZE, f"{total} bytes > limit {max_bytes}")
    payloads = _Frames(buffers[1:])
    try:
        header = msgpack.unpackb(
            buffers[0],
            raw=False,
            strict_map_key=True,
            ext_hook=_ext_hook,
        )
    except ProtocolError:
        raise
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(RejectReason.MALFORMED, f"header is not msgpack: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(RejectReason.MALFORMED, "header is not a map")
    kind = header.get("kind")
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(RejectReason.UNKNOWN_KIND, f"unknown kind {kind!r}")
    schema = header.get("schema")
    if not isinstance(schema, list) or len(schema) != 2 or not all(type(v) is int for v in schema):
        raise ProtocolError(RejectReason.MALFORMED, f"bad schema field {schema!r}")
    if schema[0] != SCHEMA_VERSION[0]:
        raise ProtocolError(
            RejectReason.SCHEMA_VERSION,
            f"schema major {schema[0]} != supported {SCHEMA_VERSION[0]}",
        )
    if expected is not None and cls not in expected:
        raise ProtocolError(RejectReason.UNEXPECTED_KIND, f"kind {kind!r} not accepted here")
    message = _build(cls, header, payloads, cls.KIND)
    if not all(payloads.used):
        raise ProtocolError(RejectReason.MALFORMED, "unreferenced payload frames")
    message.check()
    return message


class _Ref:
    """A decoded extension: a reference to a payload frame."""

    __slots__ = ("code", "args")

    def __init__(self, code: int, args: list):
        self.code = code
        self.args = args


def _ext_hook(code: int, data: bytes) -> _Ref:
    if code not in (_EXT_ARRAY, _EXT_BYTES):
        raise ProtocolError(RejectReason.MALFORMED, f"unknown msgpack extension {code}")
    try:
        args = msgpack.unpackb(data, raw=False)
    except Exception:
        raise ProtocolError(RejectReason.MALFORMED, "bad extension payload") from None
    if not isinstance(args, list):
        raise ProtocolError(RejectReason.MALFORMED, "bad extension payload")
    return _Ref(code, args)


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _build(cls: type, data: Any, payloads: _Frames, where: str) -> Any:
    if not isinstance(data, dict):
        raise ProtocolError(RejectReason.BAD_FIELD, f"{where}: expected a map")
    if issubclass(cls, Message) and data.get("kind") != cls.KIND:
        raise ProtocolError(RejectReason.BAD_FIELD, f"{where}: nested kind is not {cls.KIND!r}")
    hints = _hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        name = f"{where}.{f.name}"
        if f.name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ProtocolError(RejectReason.BAD_FIELD, f"{name} is missing")
            continue
        value = data[f.name]
        if value is None and f.metadata.get("optional"):
            kwargs[f.name] = None
        elif f.metadata.get("dtype"):
            kwargs[f.name] = _build_array(value, f.metadata, payloads, name)
        else:
            kwargs[f.name] = _convert(hints[f.name], value, payloads, name)
    return cls(**kwargs)


def _build_array(value: Any, spec: Any, payloads: _Frames, name: str) -> np.ndarray:
    if not isinstance(value, _Ref) or value.code != _EXT_ARRAY or len(value.args) != 3:
        raise ProtocolError(RejectReason.BAD_ARRAY, f"{name} is not an array reference")
    index, dtype, shape = value.args
    if dtype != spec["dtype"]:
        raise ProtocolError(RejectReason.BAD_ARRAY, f"{name} dtype {dtype!r} != {spec['dtype']!r}")
    if (
        not isinstance(shape, list)
        or len(shape) != spec["ndim"]
        or not all(type(d) is int and 0 <= d < 2**40 for d in shape)
    ):
        raise ProtocolError(RejectReason.BAD_ARRAY, f"{name} shape {shape!r} is not {spec['ndim']}-d")
    buf = payloads.take(index)
    wire_dtype = np.dtype(dtype).newbyteorder("<")
    expected = math.prod(shape) * wire_dtype.itemsize
    if buf.nbytes != expected:
        raise ProtocolError(RejectReason.BAD_ARRAY, f"{name} has {buf.nbytes} bytes, shape needs {expected}")
    return np.frombuffer(buf, dtype=wire_dtype).reshape(shape).astype(dtype, copy=False)


def _convert(tp: Any, value: Any, payloads: _Frames, name: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _convert(inner, value, payloads, name)
    if origin is list:
        if not isinstance(value, list):
            raise ProtocolError(RejectReason.BAD_FIELD, f"{name} must be a list")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, payloads, f"{name}[{i}]") for i, v in enumerate(value)]
    if tp is bytes:
        if not isinstance(value, _Ref) or value.code != _EXT_BYTES or len(value.args) != 1:
            raise ProtocolError(RejectReason.BAD_FIELD, f"{name} must be a bytes reference")
        return payloads.take(value.args[0]).tobytes()
    if isinstance(tp, type) and issubclass(tp, Enum):
        try:
            return tp(value)
        except ValueError:
            raise ProtocolError(RejectReason.BAD_FIELD, f"{name}: {value!r} is not a {tp.__name__}") from None
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value, payloads, name)
    if tp is float:
        if type(value) not in (int, float):
            raise ProtocolError(RejectReason.BAD_FIELD, f"{name} must be a number")
        return float(value)
    if tp is int:
        if type(value) is not int or not _INT64_MIN <= value <= _INT64_MAX:
            raise ProtocolError(RejectReason.BAD_FIELD, f"{name} must be a 64-bit integer")
        return value
    if tp in (str, bool):
        if type(value) is not tp:
            raise ProtocolError(RejectReason.BAD_FIELD, f"{name} must be a {tp.__name__}")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict) or not _is_plain(value, MAX_MAP_DEPTH):
            raise ProtocolError(
                RejectReason.BAD_FIELD,
                f"{name} must be a plain map (str keys; None, bool, int64, float, str, list or map "
                f"values; at most {MAX_MAP_DEPTH} levels)",
            )
        return value
    raise ProtocolError(RejectReason.BAD_FIELD, f"{name}: unsupported type {tp!r}")


def _is_plain(value: Any, depth: int) -> bool:
    """True when ``value`` is msgpack primitives only, as :func:`encode` sends a plain map:
    no bytes (encode moves those to payload frames), no extension values, str map keys,
    int64 integers and nesting of at most ``depth`` levels (encoding and walking such a
    value again never exceeds Python's recursion limit)."""
    if value is None or type(value) in (bool, float, str):
        return True
    if type(value) is int:
        return _INT64_MIN <= value <= _INT64_MAX
    if depth <= 0:
        return False
    if type(value) is dict:
        return all(type(k) is str and _is_plain(v, depth - 1) for k, v in value.items())
    if type(value) is list:
        return all(_is_plain(v, depth - 1) for v in value)
    return False
