"""Hostile multipart messages for the fuzz tests: a deterministic (seeded) stream per socket.

:func:`hostile` yields :class:`Case` objects forever for a socket that accepts one
message kind; take as many as needed with ``itertools.islice``. Each case is a list
of frames (``bytes``) built from valid encoded messages of every kind
(:func:`samples`) by one of the mutators in :data:`CATEGORIES`, and says what the
decoder must answer when that is known in advance (``expect``):

* a :class:`~streamrl.common.messages.RejectReason`: ``decode`` must reject it for that reason;
* :data:`ACCEPTED`: ``decode`` must accept it (a newer schema minor, or a value only
  the service can judge, such as a chunk request for a version that is not held);
* ``None``: a random mutation (bit flips, inserted bytes, ...) whose outcome is not
  known, but ``decode`` must still either return a message or raise ``ProtocolError``.
"""

from __future__ import annotations

import dataclasses
import math
import random
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any

import msgpack
import numpy as np

from streamrl.common import messages as m
from streamrl.common.messages import DEFAULT_MAX_FRAMES, MAX_MAP_DEPTH, RejectReason

ACCEPTED = "accepted"
"""``Case.expect`` for a case the decoder must accept."""

R = RejectReason

UNREADABLE = "unreadable"
"""Reason of a value msgpack itself cannot read (an int map key, a bad extension, nesting past
msgpack's stack): ``malformed`` whatever the message kind, since the header never parses."""


@dataclass
class Case:
    """One hostile message.

    Attributes:
        category: the mutator that made it (a key of :data:`CATEGORIES`).
        frames: the multipart message, one ``bytes`` per frame (may be empty).
        expect: ``RejectReason``, :data:`ACCEPTED`, or ``None`` (outcome unknown).
    """

    category: str
    frames: list[bytes]
    expect: RejectReason | str | None


SENT_AT = 1_700_000_000.0


def samples(tag: str = "fuzz") -> list[m.Message]:
    """One valid message of every kind (two rollouts in the batch); ids start with ``tag``,
    the same arguments give the same messages (``msg_id`` and ``sent_at`` included)."""

    def rollout(i: int) -> m.Rollout:
        return m.Rollout(
            sender=f"{tag}-gen",
            prompt_id=f"{tag}-p{i}",
            group_id=f"{tag}-g{i}",
            rollout_id=f"{tag}-r{i}",
            generator_id=f"{tag}-gen",
            group_size=2,
            prompt_tokens=np.array([3, 4, 5, 6], dtype=np.int32),
            completion_tokens=np.array([7, 8, 2], dtype=np.int32),
            behaviour_logprobs=np.array([-0.25, -2.0, -0.125], dtype=np.float32),
            policy_version=1,
            finish_reason=m.FinishReason.STOP,
            sampling=m.SamplingParams(temperature=0.7, top_p=0.95, max_new_tokens=3),
            prompt_text="abcd",
            completion_text="ef",
            metadata={"answer": [1, 2.5, "x", None, True]},
        )

    def scored(i: int) -> m.ScoredRollout:
        return m.ScoredRollout(
            sender=f"{tag}-scorer",
            rollout=rollout(i),
            reward=0.5,
            reward_parts={"count": 1, "vader": -0.25},
            scorer_id=f"{tag}-scorer",
        )

    messages = [
        rollout(0),
        scored(0),
        m.BatchRequest(sender=f"{tag}-learner", learner_version=2, num_groups=1),
        m.Batch(
            sender=f"{tag}-buffer",
            learner_version=2,
            rollouts=[scored(1), scored(2)],
            dropped_stale=1,
            evicted=0,
            buffered_groups=3,
        ),
        m.WeightsAnnounce(
            sender=f"{tag}-learner",
            version=3,
            total_bytes=40,
            chunk_bytes=16,
            num_chunks=3,
            sha256="0f" * 32,
            manifest=[
                m.TensorSpec(name="w", dtype="float32", shape=[2, 4], offset=0, nbytes=32),
                m.TensorSpec(name="b", dtype="bfloat16", shape=[4], offset=32, nbytes=8),
            ],
        ),
        m.WeightsChunkRequest(sender=f"{tag}-gen", version=3, chunk_index=1),
        m.WeightsChunk(sender=f"{tag}-learner", version=3, chunk_index=1, data=bytes(range(16))),
        m.Error(sender=f"{tag}-learner", code=m.ErrorCode.OUT_OF_RANGE, message="chunk 9 past the end"),
        m.HumanModel(
            sender=f"{tag}-feedback",
            version=2,
            active=True,
            feature="mean_last_hidden",
            mean=np.zeros(3, np.float32),
            scale=np.ones(3, np.float32),
            weight=np.array([0.5, -1.0, 2.0], np.float32),
            bias=0.25,
            anchors=np.ones((2, 3), np.float32),
            anchor_times=np.array([10.0, 20.0]),
            labels=4,
        ),
    ]
    for i, msg in enumerate(messages):
        for j, inner in enumerate([msg, *getattr(msg, "rollouts", []), getattr(msg, "rollout", None)]):
            for one in (inner, getattr(inner, "rollout", None)):
                if isinstance(one, m.Message):
                    one.msg_id, one.sent_at = f"{tag}-{i}-{j}-{one.KIND}", SENT_AT
    return messages


def frames_of(message: m.Message) -> list[bytes]:
    """``encode(message)`` with every frame as ``bytes``."""
    return [bytes(f) for f in m.encode(message)]


def unpack_header(frame: bytes) -> dict:
    """The header map of a valid message, extensions kept as ``msgpack.ExtType``."""
    return msgpack.unpackb(frame, raw=False, ext_hook=msgpack.ExtType)


@dataclass
class Raw:
    """Bytes spliced verbatim into a packed header by :func:`pack` (e.g. a nesting deeper
    than ``msgpack.packb`` allows, or a length header with no data after it)."""

    data: bytes


def pack(value: Any) -> bytes:
    """``msgpack.packb`` of a header map whose values may include :class:`Raw` pieces."""
    raws: dict[str, bytes] = {}

    def swap(v: Any) -> Any:
        if isinstance(v, Raw):
            key = f"\x00raw{len(raws)}\x00"
            raws[key] = v.data
            return key
        if isinstance(v, dict):
            return {k: swap(x) for k, x in v.items()}
        if isinstance(v, list):
            return [swap(x) for x in v]
        return v

    out = msgpack.packb(swap(value), use_bin_type=True)
    for key, data in raws.items():
        out = out.replace(msgpack.packb(key), data)
    return out


def array_ref(index: Any, dtype: Any, shape: Any) -> msgpack.ExtType:
    """A hand-made array extension (``streamrl.common.messages.codec._EXT_ARRAY``) as ``encode`` writes them."""
    return msgpack.ExtType(1, msgpack.packb([index, dtype, shape]))


# ------------------------------------------------------------------ field paths


@dataclass
class _Field:
    path: tuple  # keys (str) and list indexes (int) from the header map
    tp: Any  # the declared type (a class, list[...], dict) or "array" / "bytes"
    required: bool


def _fields(cls: type, prefix: tuple = ()) -> list[_Field]:
    """Every field of ``cls`` and of its nested dataclasses (first list item included)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = ("optional_array" if f.metadata.get("optional") else "array") if f.metadata.get("dtype") else hints[f.name]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        path = (*prefix, f.name)
        out.append(_Field(path, tp, required))
        if dataclasses.is_dataclass(tp):
            out += _fields(tp, path)
        elif typing.get_origin(tp) is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            out += _fields(typing.get_args(tp)[0], (*path, 0))
    return out


def _get(header: dict, path: tuple) -> Any:
    for key in path:
        header = header[key]
    return header


def _set(header: dict, path: tuple, value: Any) -> None:
    _get(header, path[:-1])[path[-1]] = value


def _nested(depth: int) -> Raw:
    """``{"a": {"a": ... 1}}`` with ``depth`` maps."""
    return Raw(b"\x81\xa1a" * depth + b"\x01")


_TIMESTAMP = msgpack.Timestamp(1, 0)


def _wrong_values(tp: Any) -> list[tuple[Any, RejectReason]]:
    """Values of the wrong type for a field declared ``tp``, with the reason each gets."""
    if tp in ("array", "optional_array"):  # None is a valid optional array (absent)
        return [
            ("x", R.BAD_ARRAY),
            (5, R.BAD_ARRAY),
            ([1, 2], R.BAD_ARRAY),
            (msgpack.ExtType(2, msgpack.packb([1])), R.BAD_ARRAY),
        ] + ([(None, R.BAD_ARRAY)] if tp == "array" else [])
    f = R.BAD_FIELD
    if tp is int:
        return [
            ("7", f),
            (1.5, f),
            (None, f),
            ([1], f),
            ({"a": 1}, f),
            (True, f),
            (2**64 - 1, f),
            (b"\x01", f),
            (array_ref(1, "int32", [1]), f),
        ]
    if tp is float:
        return [("x", f), (None, f), ([1.0], f), (True, f), (b"", f), (_TIMESTAMP, f)]
    if tp is str:
        return [(5, f), (None, f), (b"bytes", f), (["a"], f), (1.5, f), ({"a": "b"}, f)]
    if tp is bool:
        return [(1, f), (0, f), ("true", f), (None, f), (1.5, f), ([True], f)]
    if tp is bytes:
        return [("x", f), (5, f), (b"raw", f), (array_ref(1, "uint8", [4]), f)]
    if isinstance(tp, type) and issubclass(tp, Enum):
        return [("bogus", f), (3, f), (None, f), ([], f), ({"a": 1}, f)]
    if tp is dict:
        return [
            ([], f),
            ("x", f),
            (5, f),
            ({"a": b"bin"}, f),
            ({"a": _TIMESTAMP}, f),
            ({"a": msgpack.ExtType(2, msgpack.packb([1]))}, f),
            ({"a": 2**64 - 1}, f),
            (_nested(MAX_MAP_DEPTH + 2), f),
            (_nested(900), f),
            ({1: "int key"}, UNREADABLE),
            ({b"k": 1}, f),
            (_nested(2000), UNREADABLE),
        ]
    if typing.get_origin(tp) is list:
        return [("x", f), (5, f), ({}, f), (None, f)]
    if dataclasses.is_dataclass(tp):
        return [("x", f), (5, f), ([], f), ({}, f), (None, f)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # optional field: None is valid
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return [(value, reason) for value, reason in _wrong_values(inner) if value is not None]
    raise AssertionError(f"no wrong values for {tp!r}")


# ------------------------------------------------------------------ huge length claims

HUGE_CLAIMS = [
    b"\xdd\xff\xff\xff\xff",  # array32 of 2**32-1 items
    b"\xdf\xff\xff\xff\xff",  # map32 of 2**32-1 pairs
    b"\xdb\xff\xff\xff\xff",  # str32 of 4 GiB
    b"\xc6\xff\xff\xff\xff",  # bin32 of 4 GiB
    b"\xc9\xff\xff\xff\xff\x01",  # ext32 of 4 GiB
    b"\xdc\xff\xff",  # array16 of 65535 items
    b"\xde\xff\xff",  # map16 of 65535 pairs
    b"\xda\xff\xff",  # str16
]
"""msgpack headers that claim far more data than follows them."""


# ------------------------------------------------------------------ the generator


class _Fuzzer:
    def __init__(self, expected: type[m.Message] | None, seed: int, max_bytes: int, max_frames: int, version_held: int):
        self.rng = random.Random(seed)
        self.expected = expected
        self.max_bytes = max_bytes
        self.max_frames = max_frames
        self.all = samples(f"fuzz{seed}")
        own = [s for s in self.all if expected is None or isinstance(s, expected)]
        self.own = own
        self.version_held = version_held

    # helpers
    def base(self) -> m.Message:
        """A valid message: of the socket's kind 4 times in 5, else any kind."""
        return self.rng.choice(self.own if self.rng.random() < 0.8 else self.all)

    def outcome(self, message: m.Message, reason: RejectReason | str) -> RejectReason | str:
        """``reason`` for a header-level mutation of a message of ``message``'s kind."""
        if reason == UNREADABLE:
            return R.MALFORMED
        if self.expected is not None and not isinstance(message, self.expected):
            return R.UNEXPECTED_KIND
        return reason

    def random_bytes(self, n: int) -> bytes:
        return self.rng.randbytes(n)

    # mutators: each returns (frames, expect)
    def random_frames(self):
        n = self.rng.randint(1, 4)
        return [self.random_bytes(self.rng.randint(0, 96)) for _ in range(n)], None

    def truncated_header(self):
        frames = frames_of(self.base())
        frames[0] = frames[0][: self.rng.randrange(len(frames[0]))]
        return frames, R.MALFORMED

    def truncated_payload(self):
        msg = self.rng.choice([s for s in self.own if len(frames_of(s)) > 1] or self.all[:2])
        frames = frames_of(msg)
        i = self.rng.randrange(1, len(frames))
        frames[i] = frames[i][: self.rng.randrange(len(frames[i]))]
        # array frames of every sample are read in frame order; bytes frames take any length
        return frames, (ACCEPTED if isinstance(msg, m.WeightsChunk) else self.outcome(msg, R.BAD_ARRAY))

    def bit_flips(self):
        frames = frames_of(self.base())
        i = 0 if self.rng.random() < 0.8 or len(frames) == 1 else self.rng.randrange(1, len(frames))
        data = bytearray(frames[i])
        for _ in range(self.rng.randint(1, 8)):
            if data:
                data[self.rng.randrange(len(data))] ^= 1 << self.rng.randrange(8)
        frames[i] = bytes(data)
        return frames, None

    def inserted_bytes(self):
        frames = frames_of(self.base())
        h = frames[0]
        at = self.rng.randrange(len(h) + 1)
        frames[0] = h[:at] + self.random_bytes(self.rng.randint(1, 16)) + h[at:]
        return frames, None

    def deleted_bytes(self):
        frames = frames_of(self.base())
        h = frames[0]
        at = self.rng.randrange(len(h))
        frames[0] = h[:at] + h[at + self.rng.randint(1, 8) :]
        return frames, None

    def frame_count(self):
        msg = self.base()
        frames = frames_of(msg)
        choice = self.rng.randrange(3)
        if choice == 0:  # one frame too many: nothing references it
            return [*frames, self.random_bytes(self.rng.randint(0, 8))], self.outcome(msg, R.MALFORMED)
        if choice == 1 and len(frames) > 1:  # the last payload frame is missing
            return frames[:-1], None
        self.rng.shuffle(frames)
        return frames, None

    def wrong_type(self):
        msg = self.base()
        frames = frames_of(msg)
        header = unpack_header(frames[0])
        fields = [f for f in _fields(type(msg)) if _has(header, f.path)]
        target = self.rng.choice(fields)
        value, reason = self.rng.choice(_wrong_values(target.tp))
        _set(header, target.path, value)
        return [pack(header), *frames[1:]], self.outcome(msg, reason)

    def missing_field(self):
        msg = self.base()
        frames = frames_of(msg)
        header = unpack_header(frames[0])
        choices = [f.path for f in _fields(type(msg)) if f.required and _has(header, f.path)]
        choices += [("kind",), ("schema",)]
        path = self.rng.choice(choices)
        del _get(header, path[:-1])[path[-1]]
        if path == ("kind",):
            return [pack(header), *frames[1:]], R.UNKNOWN_KIND
        if path == ("schema",):
            return [pack(header), *frames[1:]], R.MALFORMED
        # a missing array or bytes field leaves its payload frame unreferenced, after BAD_FIELD
        return [pack(header), *frames[1:]], self.outcome(msg, R.BAD_FIELD)

    def huge_length(self):
        claim = self.rng.choice(HUGE_CLAIMS) + self.random_bytes(self.rng.randint(0, 8))
        if self.rng.random() < 0.3:
            return [claim], R.MALFORMED
        msg = self.base()
        frames = frames_of(msg)
        header = unpack_header(frames[0])
        key = self.rng.choice([k for k in header if k not in ("kind", "schema")])
        header[key] = Raw(claim)
        return [pack(header), *frames[1:]], R.MALFORMED

    def bad_array_ref(self):
        msg = self.rng.choice([s for s in self.own if isinstance(s, (m.Rollout, m.ScoredRollout))] or self.all[:2])
        frames = frames_of(msg)
        header = unpack_header(frames[0])
        path = ("prompt_tokens",) if isinstance(msg, m.Rollout) else ("rollout", "prompt_tokens")
        index = msgpack.unpackb(_get(header, path).data)[0]
        n = 4  # prompt_tokens of every sample: [4] int32
        variants = [
            (array_ref(index, "float64", [n]), R.BAD_ARRAY),
            (array_ref(index, "object", [n]), R.BAD_ARRAY),
            (array_ref(index, "<i4", [n]), R.BAD_ARRAY),
            (array_ref(index, "complex64", [n]), R.BAD_ARRAY),
            (array_ref(index, 5, [n]), R.BAD_ARRAY),
            (array_ref(index, None, [n]), R.BAD_ARRAY),
            (array_ref(index, "int32", [2, 2]), R.BAD_ARRAY),
            (array_ref(index, "int32", [-4]), R.BAD_ARRAY),
            (array_ref(index, "int32", [4.0]), R.BAD_ARRAY),
            (array_ref(index, "int32", [True]), R.BAD_ARRAY),
            (array_ref(index, "int32", [2**40]), R.BAD_ARRAY),
            (array_ref(index, "int32", [2**39]), R.BAD_ARRAY),  # claims 2 TiB; the frame has 16 bytes
            (array_ref(index, "int32", 4), R.BAD_ARRAY),
            (array_ref(index, "int32", [n + 1]), R.BAD_ARRAY),
            (array_ref(index, "int32", []), R.BAD_ARRAY),
            (msgpack.ExtType(1, msgpack.packb([index, "int32"])), R.BAD_ARRAY),
            (msgpack.ExtType(1, msgpack.packb([index, "int32", [n], 0])), R.BAD_ARRAY),
            (msgpack.ExtType(2, msgpack.packb([index])), R.BAD_ARRAY),
            (array_ref(0, "int32", [n]), R.MALFORMED),
            (array_ref(-1, "int32", [n]), R.MALFORMED),
            (array_ref(99, "int32", [n]), R.MALFORMED),
            (array_ref(2**40, "int32", [n]), R.MALFORMED),
            (array_ref("1", "int32", [n]), R.MALFORMED),
            (array_ref(True, "int32", [n]), R.MALFORMED),
            (msgpack.ExtType(1, msgpack.packb(7)), UNREADABLE),
            (msgpack.ExtType(1, b"\xdd\xff\xff\xff\xff"), UNREADABLE),
            (msgpack.ExtType(1, b""), UNREADABLE),
            (msgpack.ExtType(7, msgpack.packb([index, "int32", [n]])), UNREADABLE),
        ]
        if self.rng.random() < 0.15:  # the completion tokens reference the prompt's frame too
            _set(header, (*path[:-1], "completion_tokens"), array_ref(index, "int32", [n]))
            reason = R.MALFORMED
        else:
            value, reason = self.rng.choice(variants)
            _set(header, path, value)
        return [pack(header), *frames[1:]], self.outcome(msg, reason)

    def unknown_kind(self):
        msg = self.base()
        frames = frames_of(msg)
        header = unpack_header(frames[0])
        header["kind"] = self.rng.choice(
            [
                "rollout2",
                "",
                "ROLLOUT",
                "__class__",
                "message",
                5,
                None,
                [1],
                {"kind": "rollout"},
                b"rollout",
                1.5,
                True,
            ]
        )
        return [pack(header), *frames[1:]], R.UNKNOWN_KIND

    def bad_schema(self):
        msg = self.base()
        frames = frames_of(msg)
        header = unpack_header(frames[0])
        schema, reason = self.rng.choice(
            [
                ([2, 0], R.SCHEMA_VERSION),
                ([0, 0], R.SCHEMA_VERSION),
                ([99, 1], R.SCHEMA_VERSION),
                ([-1, 0], R.SCHEMA_VERSION),
                ([2**63, 0], R.SCHEMA_VERSION),
                ("1.0", R.MALFORMED),
                ([1], R.MALFORMED),
                ([1, 0, 0], R.MALFORMED),
                ([1.0, 0], R.MALFORMED),
                (None, R.MALFORMED),
                ([True, 0], R.MALFORMED),
                ({"major": 1}, R.MALFORMED),
                ([1, 7], "minor"),  # a newer minor with a field this decoder does not know
            ]
        )
        header["schema"] = schema
        if reason == "minor":
            header["field_from_the_future"] = {"x": [1, 2]}
            reason = self.outcome(msg, ACCEPTED)
        return [pack(header), *frames[1:]], reason

    def not_a_map(self):
        value = self.rng.choice([[1, 2], "rollout", 5, None, 1.5, b"\x00", True, [{"kind": "rollout"}]])
        return [pack(value), *[self.random_bytes(4)] * self.rng.randint(0, 2)], R.MALFORMED

    def other_kind(self):
        others = [s for s in self.all if self.expected is not None and not isinstance(s, self.expected)]
        if not others:
            return self.absurd_value()
        return frames_of(self.rng.choice(others)), R.UNEXPECTED_KIND

    def absurd_value(self):
        msg = self.rng.choice(self.own)
        frames = frames_of(msg)
        header = unpack_header(frames[0])
        options = _absurd(msg, self.version_held)
        mutation, reason = self.rng.choice(options)
        frames = mutation(header, frames)
        return frames, reason

    def empty(self):
        return [], R.MALFORMED

    def too_many_frames(self):
        frames = frames_of(self.base())
        extra = self.max_frames + 1 - len(frames) + self.rng.randrange(4)
        return [*frames, *[b""] * extra], R.OVERSIZE

    def oversize(self):
        frames = frames_of(self.base())
        half = self.max_bytes // 2 + 1
        return [frames[0], *frames[1:], b"\x00" * half, b"\x01" * half], R.OVERSIZE


def _has(header: dict, path: tuple) -> bool:
    try:
        _get(header, path)
        return True
    except (KeyError, IndexError, TypeError):
        return False


def _absurd(msg: m.Message, version_held: int) -> list:
    """(mutation, expected reason) pairs of well-typed but absurd values for ``msg``'s kind."""
    BV = R.BAD_VALUE

    def field(path, value):
        def apply(header, frames):
            _set(header, path, value)
            return [pack(header), *frames[1:]]

        return apply

    def array(path, values, dtype):
        """Replace the array at ``path`` by ``values`` (same frame index)."""

        def apply(header, frames):
            index = msgpack.unpackb(_get(header, path).data)[0]
            arr = np.asarray(values, dtype=dtype)
            _set(header, path, array_ref(index, dtype, list(arr.shape)))
            frames = list(frames)
            frames[index] = arr.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
            return [pack(header), *frames[1:]]

        return apply

    if isinstance(msg, (m.Rollout, m.ScoredRollout)):
        p = () if isinstance(msg, m.Rollout) else ("rollout",)
        out = [
            (array((*p, "behaviour_logprobs"), [-0.5, math.nan, -1.0], "float32"), BV),
            (array((*p, "behaviour_logprobs"), [-0.5, math.inf, -1.0], "float32"), BV),
            (array((*p, "behaviour_logprobs"), [-0.5, -math.inf, -1.0], "float32"), BV),
            (array((*p, "behaviour_logprobs"), [-0.5, 0.7, -1.0], "float32"), BV),
            (array((*p, "behaviour_logprobs"), [-0.5, -1.0], "float32"), BV),
            (array((*p, "completion_tokens"), [], "int32"), BV),
            (array((*p, "prompt_tokens"), [], "int32"), BV),
            (array((*p, "prompt_tokens"), [3, -1, 5, 6], "int32"), BV),
            (array((*p, "completion_tokens"), [7, -(2**31), 2], "int32"), BV),
            (field((*p, "policy_version"), -1), BV),
            (field((*p, "policy_version"), -(2**63)), BV),
            (field((*p, "group_size"), 0), BV),
            (field((*p, "group_size"), -3), BV),
            (field((*p, "sampling", "temperature"), 0.0), BV),
            (field((*p, "sampling", "temperature"), math.nan), BV),
            (field((*p, "sampling", "temperature"), -1.0), BV),
            (field((*p, "sampling", "top_p"), 1.5), BV),
            (field((*p, "sampling", "top_p"), 0.0), BV),
            (field((*p, "sampling", "top_p"), math.nan), BV),
        ]
        if p:
            out += [
                (field(("reward",), math.nan), BV),
                (field(("reward",), math.inf), BV),
                (field(("reward",), -math.inf), BV),
                (field(("reward_parts",), {"vader": math.nan}), BV),
                (field(("reward_parts",), {"vader": -math.inf}), BV),
                (field(("reward_parts",), {"vader": "high"}), BV),
                (field(("reward_parts",), {"vader": [1.0]}), BV),
            ]
        return out
    if isinstance(msg, m.BatchRequest):
        return [
            (field(("learner_version",), -1), BV),
            (field(("learner_version",), -(2**63)), BV),
            (field(("num_groups",), 0), BV),
            (field(("num_groups",), -5), BV),
            (field(("num_groups",), 10**9), ACCEPTED),  # more than any buffer holds: the service rejects it
            (field(("num_groups",), 2**63 - 1), ACCEPTED),
        ]
    if isinstance(msg, m.WeightsChunkRequest):
        return [
            (field(("version",), -1), BV),
            (field(("chunk_index",), -1), BV),
            (field(("chunk_index",), -(2**63)), BV),
            (field(("version",), -(2**40)), BV),
            (field(("version",), version_held + 10**6), ACCEPTED),  # a version not held: the service rejects it
            (field(("version",), 2**63 - 1), ACCEPTED),
        ]
    if isinstance(msg, m.WeightsAnnounce):
        return [
            (field(("version",), -1), BV),
            (field(("chunk_bytes",), 0), BV),
            (field(("num_chunks",), 9), BV),
            (field(("sha256",), "ab"), BV),
            (field(("total_bytes",), 8), BV),
            (field(("manifest", 1, "offset"), 8), BV),
            (field(("manifest", 0, "nbytes"), -1), BV),
        ]
    if isinstance(msg, m.Batch):
        return [
            (field(("dropped_stale",), -1), BV),
            (field(("evicted",), -2), BV),
            (field(("rollouts", 0, "reward"), math.nan), BV),
        ]
    return [(field(("msg_id",), ""), ACCEPTED)]  # WeightsChunk, Error: nothing is out of range


CATEGORIES: dict[str, float] = {
    "random_frames": 1.0,
    "truncated_header": 1.0,
    "truncated_payload": 0.5,
    "bit_flips": 1.5,
    "inserted_bytes": 0.7,
    "deleted_bytes": 0.7,
    "frame_count": 0.7,
    "wrong_type": 1.5,
    "missing_field": 1.0,
    "huge_length": 0.8,
    "bad_array_ref": 1.0,
    "unknown_kind": 0.5,
    "bad_schema": 0.6,
    "not_a_map": 0.3,
    "other_kind": 0.5,
    "absurd_value": 1.5,
    "empty": 0.05,
    "too_many_frames": 0.02,
    "oversize": 0.01,
}
"""Mutators and their relative frequencies in :func:`hostile`."""


def hostile(
    expected: type[m.Message] | None,
    seed: int,
    *,
    max_bytes: int = m.DEFAULT_MAX_MESSAGE_BYTES,
    max_frames: int = DEFAULT_MAX_FRAMES,
    version_held: int = 0,
    weights: dict[str, float] | None = None,
) -> Iterator[Case]:
    """Endless deterministic stream of hostile messages for a socket taking ``expected``.

    Args:
        expected: the message class the socket accepts (``None``: every kind).
        seed: the stream is a function of the arguments and this seed.
        max_bytes: the receiver's message size limit (the ``oversize`` cases exceed it).
        max_frames: the receiver's frame limit (``too_many_frames`` exceeds it).
        version_held: the newest weights version the receiver holds ("version not held"
            chunk requests ask for one far past it).
        weights: relative frequency per category, overriding :data:`CATEGORIES`.
    """
    fuzzer = _Fuzzer(expected, seed, max_bytes, max_frames, version_held)
    table = dict(CATEGORIES, **(weights or {}))
    names = [k for k, v in table.items() if v > 0]
    probs = [table[k] for k in names]
    while True:
        name = fuzzer.rng.choices(names, probs)[0]
        frames, expect = getattr(fuzzer, name)()
        yield Case(name, frames, expect)
