"""The wire protocol: every message type streamrl sends, and its codec.

This package is the only place that knows the wire format (one package owns it,
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

Its modules, by concept: :mod:`~streamrl.common.messages.envelope` (the envelope every message
shares, limits, errors), :mod:`~streamrl.common.messages.rollouts` (generator and scorer),
:mod:`~streamrl.common.messages.batches` (the buffer: batches and generation credits),
:mod:`~streamrl.common.messages.weights` (weight synchronisation),
:mod:`~streamrl.common.messages.human` (H-hat) and :mod:`~streamrl.common.messages.codec`
(encode, decode). Import every name from ``streamrl.common.messages``.
"""

from streamrl.common.messages.batches import Batch, BatchRequest, CreditGrant, CreditRequest
from streamrl.common.messages.codec import MESSAGE_TYPES, decode, encode
from streamrl.common.messages.envelope import (
    DEFAULT_MAX_FRAMES,
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_MAP_DEPTH,
    SCHEMA_VERSION,
    WIRE_DTYPES,
    Error,
    ErrorCode,
    Message,
    ProtocolError,
    RejectReason,
    array_field,
)
from streamrl.common.messages.human import HumanModel
from streamrl.common.messages.rollouts import (
    FinishReason,
    GroupDropped,
    HumanScore,
    Rollout,
    SamplingParams,
    ScoredRollout,
    Selection,
)
from streamrl.common.messages.weights import AdapterSpec, TensorSpec, WeightsAnnounce, WeightsChunk, WeightsChunkRequest

__all__ = [
    "AdapterSpec",
    "DEFAULT_MAX_FRAMES",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "MAX_MAP_DEPTH",
    "MESSAGE_TYPES",
    "SCHEMA_VERSION",
    "WIRE_DTYPES",
    "Batch",
    "BatchRequest",
    "CreditGrant",
    "CreditRequest",
    "Error",
    "ErrorCode",
    "FinishReason",
    "GroupDropped",
    "HumanModel",
    "HumanScore",
    "Message",
    "ProtocolError",
    "RejectReason",
    "Rollout",
    "SamplingParams",
    "ScoredRollout",
    "Selection",
    "TensorSpec",
    "WeightsAnnounce",
    "WeightsChunk",
    "WeightsChunkRequest",
    "array_field",
    "decode",
    "encode",
]
