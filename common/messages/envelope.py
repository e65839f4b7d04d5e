"""The envelope every message shares, the wire's limits and errors, and the ``error`` reply.

Part of :mod:`streamrl.common.messages` (its docstring describes the wire format); import the
names from there.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar

SCHEMA_VERSION: tuple[int, int] = (1, 4)
"""(major, minor) of the wire schema. Bump major for incompatible changes.

1.1 added the optional ``Rollout.selection`` and ``ScoredRollout.human`` fields and the
``human_model`` message (people in the loop); a 1.0 receiver ignores them.
1.2 added the ``credit_request`` / ``credit_grant`` messages (generation credits) and the
optional ``ScoredRollout.reference_logprobs`` (reference pass in the scorers).
1.3 added the ``group_dropped`` message (a scorer dropped a group whose reward raised on a member;
a 1.2 buffer rejects it as an unknown kind and the group times out there as before).
1.4 added the optional ``WeightsAnnounce.adapter`` (:class:`AdapterSpec`): the blob holds LoRA adapter
tensors, not the whole policy (``learner.lora``). A 1.3 generator ignores the field, finds that the
tensors do not fit its model and loads nothing."""

DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
"""Largest message (all frames together) a decoder accepts, in bytes."""

DEFAULT_MAX_FRAMES = 8192
"""Largest number of frames in one message."""

MAX_MAP_DEPTH = 32
"""Deepest nesting of lists and maps inside a plain-map field (``metadata``, ``reward_parts``)."""

WIRE_DTYPES = frozenset(["bool", "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64"])
"""The array dtypes the wire carries (``array_field``, ``encode``); no object arrays, no pickles."""


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
    if dtype not in WIRE_DTYPES:
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


def require(condition: bool, detail: str) -> None:
    """Raise :class:`ProtocolError` (``BAD_VALUE``) with ``detail`` unless ``condition`` holds."""
    if not condition:
        raise ProtocolError(RejectReason.BAD_VALUE, detail)
