"""The codec: :func:`encode` a message into frames, :func:`decode` and validate frames into a message.

Part of :mod:`streamrl.common.messages` (its docstring describes the wire format); import the
names from there.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any, TypeVar, overload

import msgpack
import numpy as np

from streamrl.common.messages.batches import Batch, BatchRequest, CreditGrant, CreditRequest
from streamrl.common.messages.envelope import (
    DEFAULT_MAX_FRAMES,
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_MAP_DEPTH,
    SCHEMA_VERSION,
    WIRE_DTYPES,
    Error,
    Message,
    ProtocolError,
    RejectReason,
)
from streamrl.common.messages.human import HumanModel
from streamrl.common.messages.rollouts import GroupDropped, Rollout, ScoredRollout
from streamrl.common.messages.weights import WeightsAnnounce, WeightsChunk, WeightsChunkRequest

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

_EXT_ARRAY = 1
_EXT_BYTES = 2

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
        if value.dtype.kind == "O" or value.dtype.name not in WIRE_DTYPES:
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
