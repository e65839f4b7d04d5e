"""Versioned weight push from the learner to the generators.

The learner packs its policy's ``state_dict`` into one contiguous blob of raw
tensors (dtype configurable: float32, bfloat16, float16; never pickled) with a
manifest of ``(name, dtype, shape, offset, nbytes)`` and a sha256 digest.

* :class:`WeightServer` (learner, one background thread) announces every
  version on a PUB socket and re-announces the newest one every
  ``announce_interval_s`` seconds, so a generator that starts late or
  restarts learns it with nothing special done; it serves chunks of the two
  newest versions on a ROUTER socket.
* :class:`WeightClient` (generator) keeps the newest announcement it has
  seen and fetches a version chunk by chunk over a DEALER socket with
  credit-based flow control (at most ``credit`` chunks in flight, so a large
  model never floods the learner's send queue), retries lost chunks after a
  timeout, verifies the digest, and returns tensors ready to load.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
import zmq

from streamrl.common.messages import (
    Error,
    ErrorCode,
    TensorSpec,
    WeightsAnnounce,
    WeightsChunk,
    WeightsChunkRequest,
)
from streamrl.common.metrics import ServiceMetrics
from streamrl.common.modes import WeightDtype
from streamrl.common.security import Security
from streamrl.common.transport import Inbox, make_socket, send, try_send

log = logging.getLogger(__name__)

_TORCH_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class WeightSyncError(RuntimeError):
    """A weight fetch failed (timeout, digest mismatch, version retired)."""


@dataclass
class PackedWeights:
    """One version's weights on the learner side.

    Attributes:
        announce: the :class:`WeightsAnnounce` describing the blob.
        blob: ``[total_bytes]`` uint8 numpy array of raw little-endian tensors.
    """

    announce: WeightsAnnounce
    blob: np.ndarray

    def chunk(self, index: int) -> memoryview:
        """Bytes of chunk ``index`` (a view, not a copy)."""
        size = self.announce.chunk_bytes
        return memoryview(self.blob[index * size : (index + 1) * size])


def tied_duplicates(state_dict: dict[str, torch.Tensor]) -> set[str]:
    """Names of tensors that share storage with an earlier entry (tied weights such as
    ``lm_head.weight`` = ``embed_tokens.weight``); they are sent once, under the first name."""
    seen: set[tuple[int, int, tuple]] = set()
    duplicates = set()
    for name, t in state_dict.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            duplicates.add(name)
        seen.add(key)
    return duplicates


def pack_state_dict(
    state_dict: dict[str, torch.Tensor],
    *,
    version: int,
    dtype: WeightDtype,
    chunk_bytes: int,
    sender: str,
) -> PackedWeights:
    """Pack ``state_dict`` into one blob: floating-point tensors in ``dtype``, tied
    duplicates (:func:`tied_duplicates`) left out.

    Args:
        state_dict: parameter name -> tensor (any device).
        version: the policy version.
        dtype: wire dtype for floating-point tensors.
        chunk_bytes: chunk size in bytes.
        sender: process identity for the announcement.

    Raises:
        ValueError: a tensor dtype that cannot be sent.
    """
    wire = _TORCH_DTYPES[dtype.value]
    specs: list[TensorSpec] = []
    parts: list[torch.Tensor] = []
    offset = 0
    skip = tied_duplicates(state_dict)
    for name, tensor in state_dict.items():
        if name in skip:
            continue
        t = tensor.detach()
        if t.is_floating_point():
            t = t.to(wire)
        name_dtype = str(t.dtype).removeprefix("torch.")
        if name_dtype not in _TORCH_DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} cannot be sent as weights")
        raw = t.cpu().contiguous().reshape(-1).view(torch.uint8)
        specs.append(
            TensorSpec(name=name, dtype=name_dtype, shape=list(t.shape), offset=offset, nbytes=raw.numel())
        )
        parts.append(raw)
        offset += raw.numel()
    blob = torch.cat(parts).numpy() if parts else np.zeros(0, dtype=np.uint8)
    announce = WeightsAnnounce(
        sender=sender,
        version=version,
        manifest=specs,
        total_bytes=int(blob.size),
        chunk_bytes=chunk_bytes,
        num_chunks=-(-int(blob.size) // chunk_bytes),
        sha256=hashlib.sha256(blob).hexdigest(),
    )
    return PackedWeights(announce=announce, blob=blob)


def unpack_state_dict(announce: WeightsAnnounce, blob: bytearray | bytes) -> dict[str, torch.Tensor]:
    """Tensors described by ``announce.manifest`` as views of ``blob`` (no copies).

    Raises:
        WeightSyncError: the blob's digest or size does not match the announcement.
    """
    if len(blob) != announce.total_bytes:
        raise WeightSyncError(f"blob has {len(blob)} bytes, announce says {announce.total_bytes}")
    if hashlib.sha256(blob).hexdigest() != announce.sha256:
        raise WeightSyncError(f"sha256 mismatch for version {announce.version}")
    out = {}
    raw = torch.frombuffer(blob, dtype=torch.uint8) if len(blob) else torch.zeros(0, dtype=torch.uint8)
    for spec in announce.manifest:
        dtype = _TORCH_DTYPES.get(spec.dtype)
        if dtype is None:
            raise WeightSyncError(f"{spec.name}: unknown dtype {spec.dtype}")
        piece = raw[spec.offset : spec.offset + spec.nbytes]
        out[spec.name] = piece.view(dtype).reshape(spec.shape)
    return out


class WeightServer:
    """Announces versions and serves weight chunks from a background thread (learner side).

    Args:
        ctx: ZeroMQ context.
        announce_endpoint: PUB bind endpoint.
        fetch_endpoint: ROUTER bind endpoint.
        metrics: the learner's metrics (rejections are counted there).
        sender: process identity.
        announce_interval_s: seconds between re-announcements of the newest version.
        max_message_bytes: socket and decoder size limit, in bytes.
        hwm: socket high-water mark, in messages.
        keep_versions: how many newest versions stay fetchable.
        security: CURVE keys of this process (:mod:`streamrl.common.security`); None = none.
    """

    def __init__(
        self,
        ctx: zmq.Context,
        *,
        announce_endpoint: str,
        fetch_endpoint: str,
        metrics: ServiceMetrics,
        sender: str,
        announce_interval_s: float,
        max_message_bytes: int,
        hwm: int,
        keep_versions: int = 2,
        security: Security | None = None,
    ):
        self._ctx = ctx
        self._announce_endpoint = announce_endpoint
        self._fetch_endpoint = fetch_endpoint
        self._metrics = metrics
        self._sender = sender
        self._interval = announce_interval_s
        self._max_bytes = max_message_bytes
        self._hwm = hwm
        self._keep = keep_versions
        self._security = security
        self._versions: dict[int, PackedWeights] = {}
        self._lock = threading.Lock()
        self._new_version = threading.Event()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.chunks_served = 0
        self._thread = threading.Thread(target=self._run, name="weight-server", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise self._error

    def publish(self, packed: PackedWeights) -> None:
        """Make ``packed`` the newest version and announce it now."""
        with self._lock:
            self._versions[packed.announce.version] = packed
            for old in sorted(self._versions)[: -self._keep]:
                del self._versions[old]
        self._new_version.set()

    def close(self) -> None:
        """Stop the thread and close its sockets (waits at most 5 s)."""
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        try:
            pub = make_socket(self._ctx, zmq.PUB, bind=self._announce_endpoint,
                              max_message_bytes=self._max_bytes, hwm=self._hwm, security=self._security)
            router = make_socket(self._ctx, zmq.ROUTER, bind=self._fetch_endpoint,
                                 max_message_bytes=self._max_bytes, hwm=max(self._hwm, 64),
                                 security=self._security)
        except BaseException as exc:  # surfaced to the constructor
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        inbox = Inbox(self._metrics, [WeightsChunkRequest], max_bytes=self._max_bytes,
                      socket_name="weights")
        next_announce = 0.0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if self._new_version.is_set() or now >= next_announce:
                    self._new_version.clear()
                    self._announce(pub)
                    next_announce = now + self._interval
                if router.poll(min(100, int(self._interval * 1000))):
                    frames = router.recv_multipart(copy=False)
                    self._answer(router, frames, inbox)
        finally:
            pub.close(0)
            router.close(0)

    def _announce(self, pub: zmq.Socket) -> None:
        with self._lock:
            if not self._versions:
                return
            latest = self._versions[max(self._versions)].announce
        latest.sent_at = time.time()
        send(pub, latest)

    def _answer(self, router: zmq.Socket, frames: list, inbox: Inbox) -> None:
        if len(frames) < 2:
            inbox.reject("malformed", "no routing id")
            return
        route = [frames[0].bytes]
        request = inbox.decode(frames[1:])
        if request is None:
            send(router, Error(sender=self._sender, code=ErrorCode.BAD_REQUEST,
                               message="rejected"), prefix=route)
            return
        with self._lock:
            packed = self._versions.get(request.version)
        if packed is None:
            code, detail = ErrorCode.UNKNOWN_VERSION, f"version {request.version} not served"
        elif request.chunk_index >= packed.announce.num_chunks:
            code, detail = ErrorCode.OUT_OF_RANGE, f"chunk {request.chunk_index} past the end"
        else:
            self.chunks_served += 1
            send(router, WeightsChunk(sender=self._sender, version=request.version, chunk_index=request.chunk_index,
                                      data=packed.chunk(request.chunk_index)), prefix=route)
            return
        inbox.reject(code.value, detail)  # refused after decoding: counted under the error code
        send(router, Error(sender=self._sender, code=code, message=detail, reply_to=request.msg_id), prefix=route)


@dataclass
class FetchedWeights:
    """Result of :meth:`WeightClient.fetch`.

    Attributes:
        version: policy version.
        tensors: name -> tensor (views of one verified blob).
        nbytes: blob size in bytes.
        transfer_s: seconds spent receiving chunks.
        verify_s: seconds spent on the digest and unpacking.
    """

    version: int
    tensors: dict[str, torch.Tensor]
    nbytes: int
    transfer_s: float
    verify_s: float


class WeightClient:
    """Tracks announced versions and fetches weights (generator side).

    Args:
        ctx: ZeroMQ context.
        announce_endpoint: learner's PUB endpoint (SUB connects).
        fetch_endpoint: learner's ROUTER endpoint (DEALER connects).
        inbox_metrics: metrics where rejected messages are counted.
        sender: process identity.
        credit: chunks in flight.
        timeout_s: seconds without any chunk before outstanding requests are re-sent.
        max_retries: re-sends before a fetch fails.
        max_message_bytes, hwm: socket limits.
        security: CURVE keys of this process (:mod:`streamrl.common.security`); None = none.
    """

    def __init__(
        self,
        ctx: zmq.Context,
        *,
        announce_endpoint: str,
        fetch_endpoint: str,
        inbox_metrics: ServiceMetrics,
        sender: str,
        credit: int,
        timeout_s: float,
        max_message_bytes: int,
        hwm: int,
        max_retries: int = 5,
        security: Security | None = None,
    ):
        self.sender = sender
        self.credit = credit
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.sub = make_socket(ctx, zmq.SUB, connect=[announce_endpoint], subscribe=b"",
                               max_message_bytes=max_message_bytes, hwm=hwm, security=security)
        self.dealer = make_socket(ctx, zmq.DEALER, connect=[fetch_endpoint],
                                  max_message_bytes=max_message_bytes, hwm=max(hwm, 64), security=security)
        self.announce_inbox = Inbox(inbox_metrics, [WeightsAnnounce], max_bytes=max_message_bytes,
                                    socket_name="weights_announce")
        self.chunk_inbox = Inbox(inbox_metrics, [WeightsChunk, Error], max_bytes=max_message_bytes,
                                 socket_name="weights")
        self.latest: WeightsAnnounce | None = None
        self.last_announce: float | None = None

    def seconds_since_announce(self) -> float | None:
        """Seconds since the last valid announcement (None before the first): the learner's pulse."""
        return None if self.last_announce is None else time.monotonic() - self.last_announce

    def poll_announcements(self, timeout_s: float = 0.0) -> WeightsAnnounce | None:
        """Drain announcements (waiting up to ``timeout_s`` for the first); return the newest seen."""
        wait_ms = int(timeout_s * 1000)
        while self.sub.poll(wait_ms):
            wait_ms = 0
            msg = self.announce_inbox.decode(self.sub.recv_multipart(copy=False))
            if msg is not None:
                self.last_announce = time.monotonic()
            if msg is not None and (self.latest is None or msg.version > self.latest.version):
                self.latest = msg
        return self.latest

    def fetch(self, announce: WeightsAnnounce) -> FetchedWeights:
        """Fetch, verify and unpack one version.

        Raises:
            WeightSyncError: version retired by the learner, too many timeouts, or bad digest.
        """
        start = time.perf_counter()
        blob = bytearray(announce.total_bytes)
        n = announce.num_chunks
        pending: dict[int, float] = {}
        next_index = 0
        received = 0
        retries = 0
        while received < n:
            while next_index < n and len(pending) < self.credit:
                self._request(announce.version, next_index)
                pending[next_index] = time.monotonic()
                next_index += 1
            if not self.dealer.poll(int(self.timeout_s * 1000)):
                retries += 1
                if retries > self.max_retries:
                    raise WeightSyncError(
                        f"version {announce.version}: no chunk for {self.timeout_s}s, "
                        f"{self.max_retries} retries; is the learner up?"
                    )
                log.warning("weight fetch of version %d timed out; re-sending %d requests",
                            announce.version, len(pending))
                for index in pending:
                    self._request(announce.version, index)
                continue
            msg = self.chunk_inbox.decode(self.dealer.recv_multipart(copy=False))
            if msg is None:
                continue
            if isinstance(msg, Error):
                if msg.code is ErrorCode.UNKNOWN_VERSION:
                    raise WeightSyncError(f"version {announce.version} retired: {msg.message}")
                log.warning("weight server error: %s %s", msg.code.value, msg.message)
                continue
            if msg.version != announce.version or msg.chunk_index not in pending:
                continue  # a late duplicate of a re-sent request
            del pending[msg.chunk_index]
            begin = msg.chunk_index * announce.chunk_bytes
            expected = min(announce.chunk_bytes, announce.total_bytes - begin)
            if len(msg.data) != expected:
                raise WeightSyncError(f"chunk {msg.chunk_index} has {len(msg.data)} bytes, expected {expected}")
            blob[begin : begin + expected] = msg.data
            received += 1
        transfer_s = time.perf_counter() - start
        tensors = unpack_state_dict(announce, blob)
        return FetchedWeights(
            version=announce.version,
            tensors=tensors,
            nbytes=announce.total_bytes,
            transfer_s=transfer_s,
            verify_s=time.perf_counter() - start - transfer_s,
        )

    def _request(self, version: int, index: int) -> None:
        # never block: with the learner unreachable the request is dropped here, the poll
        # times out, and the retry logic re-sends it or gives up with WeightSyncError
        try_send(self.dealer, WeightsChunkRequest(sender=self.sender, version=version, chunk_index=index))

    def close(self) -> None:
        self.sub.close(0)
        self.dealer.close(0)
