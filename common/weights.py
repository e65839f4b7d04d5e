"""Versioned weight push from the learner to the generators, at close to wire speed.

The learner's policy ``state_dict`` travels as one contiguous blob of raw
tensors (dtype configurable: float32, bfloat16, float16; never pickled)
described by a manifest of ``(name, dtype, shape, offset, nbytes)``, cut into
``chunk_bytes`` chunks.

Integrity. Every chunk has an XXH3-128 digest (:func:`chunk_digests`); the
announcement's ``sha256`` is the sha256 of those digests in chunk order
(:func:`digest_root`), so it binds every byte of the blob, its position and
its version. A generator hashes each chunk as it lands (XXH3 runs at about
10 GB/s, so verification overlaps the transfer instead of following it) and
compares the root once the last chunk is in: a corrupted, truncated, missing,
swapped or other-version chunk changes the root and the version is never
loaded (:class:`WeightSyncError`). XXH3 guards against accidents and races,
not forgery: an attacker who can inject chunks can also forge the
announcement, which is what CURVE (:mod:`streamrl.common.security`) is for.

* :class:`WeightServer` (learner side). :meth:`WeightServer.publish_state_dict`
  copies the tensors into a preallocated blob (the only work on the learner's
  critical path: a memcpy, with the dtype cast) and returns; a background
  packer thread hashes the chunks and installs the version, and the server
  thread announces it at once (a wake-up socket, no poll delay) on PUB and
  serves chunks of the ``keep_versions`` newest versions on ROUTER, zero-copy
  from the blob. Blobs come from a pool of ``keep_versions + 1`` buffers reused
  across versions (double buffering: version v is served while v + 1 is packed
  into another buffer; no page faults after the first versions). The newest
  version is re-announced every ``announce_interval_s`` seconds, so a generator
  that starts late or restarts learns it with nothing special done.
* Bounded memory per peer. Chunks are sent zero-copy from the pool, so a reply
  queued for a generator that does not read costs no memory beyond the pool
  (before, each queued reply kept its whole version's blob alive), and the
  server tracks each peer's chunks until libzmq has written them: a peer may
  have at most ``peer_max_bytes`` queued. Past it, its requests are dropped
  (``weight_replies_dropped_total{reason="peer_full"}``) and it counts as
  stalled (``weight_stalled_peers``) until a reply gets through again; the
  learner's memory does not grow with stalled peers or versions.
* :class:`WeightClient` (generator side) keeps the newest announcement it has
  seen and fetches a version chunk by chunk over a DEALER socket with
  credit-based flow control (at most ``credit`` chunks in flight), receiving
  each chunk straight into a receive buffer reused across versions, retrying
  lost chunks after a timeout, and returns tensors ready to load (views of
  that buffer, valid until the next fetch).
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
import xxhash
import zmq

from streamrl.common.messages import (
    Error,
    ErrorCode,
    Message,
    TensorSpec,
    WeightsAnnounce,
    WeightsChunk,
    WeightsChunkRequest,
    encode,
)
from streamrl.common.metrics import ServiceMetrics
from streamrl.common.modes import WeightDtype
from streamrl.common.security import Security
from streamrl.common.transport import Inbox, make_socket, poll_unless_stopped, send, try_send

log = logging.getLogger(__name__)

_TORCH_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}

DIGEST_BYTES = 16
"""Bytes of one chunk digest (XXH3-128)."""
DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024
STALLED_PEER_FORGET_S = 60.0
"""A stalled peer that sends nothing for this long is no longer counted in ``weight_stalled_peers``."""


class WeightSyncError(RuntimeError):
    """A weight fetch failed (timeout, digest mismatch, version retired)."""


class FetchStopped(WeightSyncError):
    """The process was asked to stop (its ``stop`` event was set) before a fetch completed."""


# ---------------------------------------------------------------------- blobs and digests


def allocate_blob(nbytes: int) -> np.ndarray:
    """A ``[nbytes]`` uint8 array whose pages are mapped up front (``MAP_POPULATE`` on Linux).

    Touching freshly allocated memory page by page costs a page fault per 4 KiB (on
    the 2-core VM of ``bench/RESULTS.md``, about 2 s per GB); populating the mapping
    in one call is several times faster, and the blob is then reused across versions.
    """
    if nbytes <= 0:
        return np.zeros(0, dtype=np.uint8)
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    if not flags:
        return np.empty(nbytes, dtype=np.uint8)  # no anonymous mmap flags here (Windows)
    return np.frombuffer(mmap.mmap(-1, nbytes, flags=flags | getattr(mmap, "MAP_POPULATE", 0)), dtype=np.uint8)


def chunk_digests(blob: np.ndarray | memoryview | bytes | bytearray, chunk_bytes: int) -> bytes:
    """XXH3-128 digest of every ``chunk_bytes`` chunk of ``blob``, concatenated (16 bytes per chunk)."""
    view = memoryview(blob).cast("B")
    return b"".join(xxhash.xxh3_128_digest(view[i : i + chunk_bytes]) for i in range(0, view.nbytes, chunk_bytes))


def digest_root(digests: bytes | bytearray) -> str:
    """The announcement's ``sha256``: hex sha256 of the per-chunk digests in chunk order."""
    return hashlib.sha256(digests).hexdigest()


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


def blob_layout(state_dict: dict[str, torch.Tensor], dtype: WeightDtype) -> tuple[list[TensorSpec], int]:
    """Where each tensor of ``state_dict`` lies in the blob: floating-point tensors in ``dtype``,
    others in their own dtype, tied duplicates (:func:`tied_duplicates`) left out, packed
    back to back in ``state_dict`` order.

    Returns:
        The manifest and the blob size in bytes.

    Raises:
        ValueError: a tensor dtype that cannot be sent.
    """
    wire = _TORCH_DTYPES[dtype.value]
    specs: list[TensorSpec] = []
    offset = 0
    skip = tied_duplicates(state_dict)
    for name, tensor in state_dict.items():
        if name in skip:
            continue
        t_dtype = wire if tensor.is_floating_point() else tensor.dtype
        name_dtype = str(t_dtype).removeprefix("torch.")
        if name_dtype not in _TORCH_DTYPES:
            raise ValueError(f"{name}: dtype {tensor.dtype} cannot be sent as weights")
        nbytes = tensor.numel() * torch.empty(0, dtype=t_dtype).element_size()
        specs.append(TensorSpec(name=name, dtype=name_dtype, shape=list(tensor.shape), offset=offset, nbytes=nbytes))
        offset += nbytes
    return specs, offset


def _snapshot(state_dict: dict[str, torch.Tensor], specs: list[TensorSpec], blob: np.ndarray) -> None:
    """Copy (and cast) every tensor named in ``specs`` into its place in ``blob``."""
    raw = torch.from_numpy(blob)
    with torch.no_grad():
        for spec in specs:
            dtype = _TORCH_DTYPES[spec.dtype]
            source = state_dict[spec.name].detach()
            target = raw[spec.offset : spec.offset + spec.nbytes]
            if source.device.type == "cpu" and source.dtype == dtype:
                # a plain memcpy on this thread (torch's copy_ would fan out to its intra-op
                # pool, which on a loaded machine costs several times the copy itself)
                np.copyto(blob[spec.offset : spec.offset + spec.nbytes],
                          source.reshape(-1).view(torch.uint8).numpy())
            elif spec.offset % torch.empty(0, dtype=dtype).element_size() == 0:
                target.view(dtype).view(spec.shape).copy_(source)  # cast while copying, no temporary
            else:  # an unaligned offset (a 2-byte tensor before a 4-byte one): go through bytes
                target.copy_(source.to(device="cpu", dtype=dtype).contiguous().reshape(-1).view(torch.uint8))


def _announce(specs: list[TensorSpec], blob: np.ndarray, *, version: int, chunk_bytes: int,
              sender: str) -> WeightsAnnounce:
    total = int(blob.size)
    return WeightsAnnounce(sender=sender, version=version, manifest=specs, total_bytes=total,
                           chunk_bytes=chunk_bytes, num_chunks=-(-total // chunk_bytes),
                           sha256=digest_root(chunk_digests(blob, chunk_bytes)))


def pack_state_dict(
    state_dict: dict[str, torch.Tensor],
    *,
    version: int,
    dtype: WeightDtype,
    chunk_bytes: int,
    sender: str,
    out: np.ndarray | None = None,
) -> PackedWeights:
    """Pack ``state_dict`` into one blob (layout: :func:`blob_layout`) and describe it.

    Args:
        state_dict: parameter name -> tensor (any device).
        version: the policy version.
        dtype: wire dtype for floating-point tensors.
        chunk_bytes: chunk size in bytes.
        sender: process identity for the announcement.
        out: a ``[total_bytes]`` uint8 array to pack into (reused across versions); None = a new one.

    Raises:
        ValueError: a tensor dtype that cannot be sent, or ``out`` of another size.
    """
    specs, total = blob_layout(state_dict, dtype)
    if out is not None and out.size != total:
        raise ValueError(f"out has {out.size} bytes, the weights need {total}")
    blob = allocate_blob(total) if out is None else out
    _snapshot(state_dict, specs, blob)
    return PackedWeights(announce=_announce(specs, blob, version=version, chunk_bytes=chunk_bytes, sender=sender),
                         blob=blob)


def _tensor_views(announce: WeightsAnnounce, blob) -> dict[str, torch.Tensor]:
    out = {}
    raw = torch.frombuffer(blob, dtype=torch.uint8) if len(blob) else torch.zeros(0, dtype=torch.uint8)
    for spec in announce.manifest:
        dtype = _TORCH_DTYPES.get(spec.dtype)
        if dtype is None:
            raise WeightSyncError(f"{spec.name}: unknown dtype {spec.dtype}")
        piece = raw[spec.offset : spec.offset + spec.nbytes]
        out[spec.name] = piece.view(dtype).reshape(spec.shape)
    return out


def unpack_state_dict(announce: WeightsAnnounce, blob: np.ndarray | bytearray | bytes) -> dict[str, torch.Tensor]:
    """Verify a whole blob and return the tensors of ``announce.manifest`` as views of it (no copies).

    The slow reference of what :meth:`WeightClient.fetch` checks chunk by chunk.

    Raises:
        WeightSyncError: the blob's size or digest does not match the announcement.
    """
    if len(blob) != announce.total_bytes:
        raise WeightSyncError(f"blob has {len(blob)} bytes, announce says {announce.total_bytes}")
    if digest_root(chunk_digests(blob, announce.chunk_bytes)) != announce.sha256:
        raise WeightSyncError(f"sha256 of the chunk digests does not match for version {announce.version}")
    return _tensor_views(announce, blob)


# ---------------------------------------------------------------------- learner side


@dataclass
class PublishTiming:
    """Where one published version's time went (learner side).

    Attributes:
        version: policy version.
        snapshot_s: seconds the publishing thread was blocked (waiting for the previous
            version's digests, if any, plus copying the tensors into the blob).
        digest_s: seconds the packer thread spent hashing the chunks.
        sealed_at: wall-clock time (``time.time()``) the version became fetchable.
        announced_at: wall-clock time its first announcement was sent (None before).
    """

    version: int
    snapshot_s: float = 0.0
    digest_s: float = 0.0
    sealed_at: float = 0.0
    announced_at: float | None = None


class _BlobPool:
    """Blobs of one size reused across versions: at most ``capacity`` kept when free."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.free: list[np.ndarray] = []
        self.allocated = 0

    def take(self, nbytes: int) -> np.ndarray:
        self.free = [b for b in self.free if b.size == nbytes]  # another size (a new model): let them go
        if self.free:
            return self.free.pop()
        self.allocated += 1
        return allocate_blob(nbytes)

    def give(self, blob: np.ndarray) -> None:
        if len(self.free) < self.capacity:
            self.free.append(blob)


class WeightServer:
    """Announces versions and serves weight chunks from background threads (learner side).

    Args:
        ctx: ZeroMQ context.
        announce_endpoint: PUB bind endpoint.
        fetch_endpoint: ROUTER bind endpoint.
        metrics: the learner's metrics: rejections and the ``weight_*`` metrics below are added there.
        sender: process identity.
        announce_interval_s: seconds between re-announcements of the newest version.
        max_message_bytes: socket and decoder size limit, in bytes.
        hwm: high-water mark of the PUB socket, in messages.
        keep_versions: how many newest versions stay fetchable.
        security: CURVE keys of this process (:mod:`streamrl.common.security`); None = none.
        dtype: wire dtype of :meth:`publish_state_dict`.
        chunk_bytes: chunk size of :meth:`publish_state_dict`, bytes; also the largest chunk
            :meth:`publish` accepts.
        peer_max_bytes: chunk bytes one peer may have queued (sent, not yet written to its
            connection by libzmq, as zero-copy trackers report); past it the peer's requests
            wait, and past ``peer_max_bytes // chunk_bytes`` waiting ones they are dropped.
            None = ``8 * chunk_bytes`` (twice the default credit of 4: a client that re-sends
            its requests after a timeout still fits). The learner passes
            ``2 * transport.weight_credit * transport.weight_chunk_bytes``.

    Metrics (``streamrl_<service>_``): ``weight_chunks_served_total``, ``weight_bytes_served_total``,
    ``weight_replies_dropped_total{reason}`` (``peer_full``: the peer had ``peer_max_bytes`` of
    chunks queued and as many requests waiting, or 64 replies queued; ``peer_gone``:
    disconnected), ``weight_stalled_peers``, ``weight_queued_bytes`` (updated with each
    announcement).

    Raises:
        streamrl.common.transport.BindError: an endpoint cannot be bound.
    """

    model_fingerprint: str = ""
    """Set by the learner: sent in every announcement (``streamrl.common.fingerprint``; generators
    refuse weights of another model config or tokenizer)."""

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
        dtype: WeightDtype = WeightDtype.FLOAT32,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        peer_max_bytes: int | None = None,
    ):
        if keep_versions < 1 or chunk_bytes < 1:
            raise ValueError("keep_versions and chunk_bytes must be >= 1")
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
        self.dtype = dtype
        self.chunk_bytes = chunk_bytes
        self.peer_max_bytes = peer_max_bytes if peer_max_bytes is not None else 8 * chunk_bytes
        if self.peer_max_bytes < chunk_bytes:
            raise ValueError(f"peer_max_bytes {self.peer_max_bytes} < chunk_bytes {chunk_bytes}: no chunk could be sent")
        self._versions: dict[int, PackedWeights] = {}
        self._pool = _BlobPool(keep_versions + 1)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._packer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="weight-packer")
        self._pending: Future | None = None
        self.timings: dict[int, PublishTiming] = {}
        """Per published version (the newest 16): where its time went."""
        self.chunks_served = 0
        self.stalled: dict[bytes, float] = {}
        """Routing id -> monotonic time of the last reply dropped because its queue was full."""
        self.queues: dict[bytes, _PeerQueue] = {}
        """Routing id -> its chunk replies not yet written to the connection."""
        self.peer_chunks = max(1, self.peer_max_bytes // chunk_bytes)
        self.backlogs: dict[bytes, deque[WeightsChunkRequest]] = {}
        """Routing id -> requests waiting for its chunk queue to drain (at most ``peer_chunks``)."""
        self.m_served = metrics.counter("weight_chunks_served_total", "Weight chunks sent to generators")
        self.m_bytes = metrics.counter("weight_bytes_served_total", "Weight bytes sent to generators")
        self.m_dropped = metrics.counter("weight_replies_dropped_total", "Weight replies not sent: the peer's "
                                         "queue was full (peer_full) or it disconnected (peer_gone)", ["reason"])
        self.m_stalled = metrics.gauge("weight_stalled_peers", "Generators whose weight reply queue is full")
        self.m_queued = metrics.gauge("weight_queued_bytes", "Weight chunk bytes queued to generators, not yet "
                                      "written to their connections")
        for reason in ("peer_full", "peer_gone"):
            self.m_dropped.labels(reason=reason)
        self._wake_endpoint = f"inproc://streamrl-weights-wake-{id(self):x}"
        self._thread = threading.Thread(target=self._run, name="weight-server", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            self._packer.shutdown(wait=False)
            raise self._error
        self._wake = ctx.socket(zmq.PAIR)
        self._wake.setsockopt(zmq.LINGER, 0)
        self._wake.connect(self._wake_endpoint)
        self._wake_lock = threading.Lock()

    # ------------------------------------------------------------------ publishing

    def publish_state_dict(self, state_dict: dict[str, torch.Tensor], version: int) -> float:
        """Snapshot ``state_dict`` as ``version`` and return; it is hashed and announced in the background.

        Only the copy into a pooled blob (with the cast to ``dtype``) runs on the caller's
        thread, so the caller may change the tensors as soon as this returns. When the
        previous version's digests are still being computed, this waits for them first
        (at most two versions are ever in the packer's hands).

        Returns:
            Seconds the caller was blocked.

        Raises:
            ValueError: a tensor dtype that cannot be sent.
            Exception: whatever failed while sealing the previous version.
        """
        start = time.perf_counter()
        self._wait_sealed()
        specs, total = blob_layout(state_dict, self.dtype)
        with self._lock:
            blob = self._pool.take(total)
        try:
            _snapshot(state_dict, specs, blob)
        except BaseException:
            with self._lock:
                self._pool.give(blob)
            raise
        timing = PublishTiming(version=version, snapshot_s=time.perf_counter() - start)
        self._pending = self._packer.submit(self._seal, specs, blob, version, timing)
        return timing.snapshot_s

    def publish(self, packed: PackedWeights) -> None:
        """Make an already packed version the newest and announce it now.

        The blob is copied into a pooled buffer (the server never serves memory it does
        not own, so what stalled peers hold stays bounded).

        Raises:
            ValueError: ``packed`` uses larger chunks than ``chunk_bytes`` (the per-peer bound
                is counted in chunks).
        """
        if packed.announce.chunk_bytes > self.chunk_bytes:
            raise ValueError(f"chunks of {packed.announce.chunk_bytes} bytes > this server's chunk_bytes "
                             f"{self.chunk_bytes}")
        self._wait_sealed()
        start = time.perf_counter()
        with self._lock:
            blob = self._pool.take(int(packed.blob.size))
        np.copyto(blob, packed.blob)
        timing = PublishTiming(version=packed.announce.version, snapshot_s=time.perf_counter() - start)
        self._install(PackedWeights(announce=packed.announce, blob=blob), timing)

    def wait_published(self, timeout_s: float | None = None) -> None:
        """Block until the last :meth:`publish_state_dict` is fetchable (tests, shutdown)."""
        self._wait_sealed(timeout_s)

    def _wait_sealed(self, timeout_s: float | None = None) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result(timeout_s)

    def _seal(self, specs: list[TensorSpec], blob: np.ndarray, version: int, timing: PublishTiming) -> None:
        start = time.perf_counter()
        announce = _announce(specs, blob, version=version, chunk_bytes=self.chunk_bytes, sender=self._sender)
        timing.digest_s = time.perf_counter() - start
        self._install(PackedWeights(announce=announce, blob=blob), timing)

    def _install(self, packed: PackedWeights, timing: PublishTiming) -> None:
        timing.sealed_at = time.time()
        with self._lock:
            self._versions[packed.announce.version] = packed
            for old in sorted(self._versions)[: -self._keep]:
                self._pool.give(self._versions.pop(old).blob)
            self.timings[timing.version] = timing
            for old in sorted(self.timings)[:-16]:
                del self.timings[old]
        self._poke()

    def _poke(self) -> None:
        """Wake the server thread (it announces a new version at once, or sees the stop)."""
        with self._wake_lock:
            if self._wake.closed:
                return
            try:
                self._wake.send(b"", zmq.NOBLOCK)
            except zmq.Again:
                pass  # wake-ups already queued: the thread is about to run anyway

    def close(self) -> None:
        """Stop the threads and close the sockets (waits at most 5 s for each thread)."""
        self._packer.shutdown(wait=True, cancel_futures=True)
        self._stop.set()
        self._poke()
        self._thread.join(5)
        with self._wake_lock:
            self._wake.close(0)

    # ------------------------------------------------------------------ server thread

    def _run(self) -> None:
        sockets: list[zmq.Socket] = []
        try:
            wake = self._ctx.socket(zmq.PAIR)
            sockets.append(wake)
            wake.setsockopt(zmq.LINGER, 0)
            wake.bind(self._wake_endpoint)
            pub = make_socket(self._ctx, zmq.PUB, bind=self._announce_endpoint,
                              max_message_bytes=self._max_bytes, hwm=self._hwm, security=self._security)
            sockets.append(pub)
            router = make_socket(self._ctx, zmq.ROUTER, bind=self._fetch_endpoint, max_message_bytes=self._max_bytes,
                                 hwm=max(self._hwm, 64), security=self._security)
            sockets.append(router)
            router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a full peer queue raises EAGAIN instead of dropping silently
        except BaseException as exc:  # surfaced to the constructor
            for sock in sockets:
                sock.close(0)
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        inbox = Inbox(self._metrics, [WeightsChunkRequest], max_bytes=self._max_bytes, socket_name="weights")
        poller = zmq.Poller()
        poller.register(wake, zmq.POLLIN)
        poller.register(router, zmq.POLLIN)
        next_announce = 0.0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                wait_ms = max(0, int((next_announce - now) * 1000))
                events = dict(poller.poll(min(wait_ms, 2) if self.backlogs else wait_ms))
                if wake in events:
                    while wake.poll(0):
                        wake.recv()
                    next_announce = 0.0  # a new version: announce it now
                if self._stop.is_set():
                    break
                if time.monotonic() >= next_announce:
                    self._announce(pub)
                    next_announce = time.monotonic() + self._interval
                if router in events:
                    for _ in range(64):  # a burst, then back to the poller (announcements are never starved)
                        try:
                            frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._answer(router, frames, inbox)
                if self.backlogs:
                    self._serve_backlogs(router, inbox)
        finally:
            wake.close(0)
            pub.close(0)
            router.close(0)

    def _announce(self, pub: zmq.Socket) -> None:
        with self._lock:
            if not self._versions:
                return
            latest = self._versions[max(self._versions)].announce
            timing = self.timings.get(latest.version)
        latest.sent_at = time.time()
        latest.model_fingerprint = self.model_fingerprint
        send(pub, latest)
        if timing is not None and timing.announced_at is None:
            timing.announced_at = latest.sent_at
        self._settle_peers()

    def _settle_peers(self) -> None:
        """Forget peers with nothing queued and stalls long past; export the queued bytes."""
        horizon = time.monotonic() - STALLED_PEER_FORGET_S
        for route in [r for r, at in self.stalled.items() if at < horizon]:
            del self.stalled[route]
        for route in [r for r, q in self.queues.items() if not q.settle() and r not in self.backlogs]:
            del self.queues[route]
        self.m_stalled.set(len(self.stalled))
        self.m_queued.set(sum(q.queued for q in self.queues.values()))

    def _answer(self, router: zmq.Socket, frames: list, inbox: Inbox) -> None:
        if len(frames) < 2:
            inbox.reject("malformed", "no routing id")
            return
        route = frames[0].bytes
        request = inbox.decode(frames[1:])
        if request is None:
            self._reply(router, [route], Error(sender=self._sender, code=ErrorCode.BAD_REQUEST, message="rejected"))
        elif self.backlogs.get(route) or not self._serve(router, route, request, inbox):
            self._defer(route, request)  # behind its earlier requests, or its chunk queue is full

    def _serve(self, router: zmq.Socket, route: bytes, request: WeightsChunkRequest, inbox: Inbox) -> bool:
        """Answer one request; False when the peer already has ``peer_max_bytes`` of chunks queued."""
        with self._lock:
            packed = self._versions.get(request.version)
        if packed is None:
            code, detail = ErrorCode.UNKNOWN_VERSION, f"version {request.version} not served"
        elif request.chunk_index >= packed.announce.num_chunks:
            code, detail = ErrorCode.OUT_OF_RANGE, f"chunk {request.chunk_index} past the end"
        else:
            data = packed.chunk(request.chunk_index)
            queue = self.queues.setdefault(route, _PeerQueue())
            if queue.settle() + data.nbytes > self.peer_max_bytes:
                return False
            self.chunks_served += 1  # before the send: a test may read it the moment the chunk lands
            tracker = self._reply(router, [route], WeightsChunk(sender=self._sender, version=request.version,
                                                                chunk_index=request.chunk_index, data=data), track=True)
            if tracker is None:
                self.chunks_served -= 1
            else:
                queue.add(tracker, data.nbytes)
                self.m_served.inc()
                self.m_bytes.inc(data.nbytes)
            return True
        inbox.reject(code.value, detail)  # refused after decoding: counted under the error code
        self._reply(router, [route], Error(sender=self._sender, code=code, message=detail, reply_to=request.msg_id))
        return True

    def _defer(self, route: bytes, request: WeightsChunkRequest) -> None:
        """Queue a request until the peer's chunks drain; past ``peer_chunks`` waiting ones, drop it."""
        backlog = self.backlogs.setdefault(route, deque())
        if len(backlog) < self.peer_chunks:
            backlog.append(request)
        else:
            self._stall(route, f"{self.queues[route].queued} bytes of chunks queued and {len(backlog)} "
                               "requests waiting")

    def _serve_backlogs(self, router: zmq.Socket, inbox: Inbox) -> None:
        for route, backlog in list(self.backlogs.items()):
            while backlog and self._serve(router, route, backlog[0], inbox):
                backlog.popleft()
            if not backlog:
                del self.backlogs[route]

    def _reply(self, router: zmq.Socket, route: list[bytes], message: Message,
               track: bool = False) -> zmq.MessageTracker | None:
        """Send without blocking; None (counted) when the peer's queue is full or it is gone.

        With ``track``, every frame goes zero-copy and the returned tracker says when
        libzmq has written the message to the connection (frames under pyzmq's copy
        threshold are copied and tracked as done at once)."""
        try:
            frames = [*route, *encode(message)]
            if track:
                tracker = router.send_multipart(frames, flags=zmq.NOBLOCK, copy=False, track=True)
            else:
                send(router, message, prefix=route, flags=zmq.NOBLOCK)
                tracker = _SENT
        except zmq.Again:
            self._stall(route[0], f"{max(self._hwm, 64)} replies queued")
            return None
        except zmq.ZMQError as err:
            if err.errno != zmq.EHOSTUNREACH:
                raise
            self.m_dropped.labels(reason="peer_gone").inc()
            return None
        if self.stalled.pop(route[0], None) is not None:
            self.m_stalled.set(len(self.stalled))
        return tracker

    def _stall(self, route: bytes, why: str) -> None:
        self.m_dropped.labels(reason="peer_full").inc()
        if route not in self.stalled:
            log.warning("weights peer %s is not reading (%s, the bound is %d bytes); dropping its requests until "
                        "it reads again", route.hex(), why, self.peer_max_bytes)
        self.stalled[route] = time.monotonic()
        self.m_stalled.set(len(self.stalled))


_SENT = zmq.MessageTracker()
"""A tracker that is already done (a reply sent as a copy)."""


class _PeerQueue:
    """Chunk replies of one peer that libzmq has not yet written to its connection."""

    def __init__(self) -> None:
        self.sent: deque[tuple[zmq.MessageTracker, int]] = deque()
        self.queued = 0

    def add(self, tracker: zmq.MessageTracker, nbytes: int) -> None:
        self.sent.append((tracker, nbytes))
        self.queued += nbytes

    def settle(self) -> int:
        """Drop the replies written since the last call (a peer's queue drains in order); returns the bytes left."""
        while self.sent and self.sent[0][0].done:
            self.queued -= self.sent.popleft()[1]
        return self.queued


# ---------------------------------------------------------------------- generator side


@dataclass
class FetchedWeights:
    """Result of :meth:`WeightClient.fetch`.

    Attributes:
        version: policy version.
        tensors: name -> tensor, views of one of the client's receive buffers: valid until
            the next :meth:`WeightClient.fetch` (load them before fetching again, best with
            :meth:`WeightClient.load_into`).
        nbytes: blob size in bytes.
        transfer_s: seconds from the first request to the last chunk (hashing included).
        verify_s: seconds to compare the digest root and build the tensor views.
        hash_s: seconds of ``transfer_s`` spent hashing chunks.
        slot: which receive buffer holds the tensors (0 or 1).
    """

    version: int
    tensors: dict[str, torch.Tensor]
    nbytes: int
    transfer_s: float
    verify_s: float
    hash_s: float = 0.0
    slot: int = 0


@dataclass
class _Fetch:
    """State of one fetch in progress."""

    announce: WeightsAnnounce
    view: memoryview
    digests: bytearray
    pending: dict[int, float] = field(default_factory=dict)
    next_index: int = 0
    received: int = 0
    hash_s: float = 0.0


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
        stop: the service's stop request (``ServiceContext.stop``): once set, a fetch and the wait
            for announcements end within :data:`~streamrl.common.transport.STOP_CHECK_S` seconds
            (a fetch raises :class:`FetchStopped`) instead of running out their timeouts and
            retries; None = never stopped.
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
        stop: threading.Event | None = None,
    ):
        self.sender = sender
        self.stop = stop
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
        self._buffers: list[np.ndarray | None] = [None, None]
        self._adopted: int | None = None  # the receive buffer a model's parameters live in (load_into)
        self.buffers_allocated = 0
        """Receive buffers allocated so far: 1 (2 once :meth:`load_into` lets a model keep one) while the
        blob size stays the same."""

    def seconds_since_announce(self) -> float | None:
        """Seconds since the last valid announcement (None before the first): the learner's pulse."""
        return None if self.last_announce is None else time.monotonic() - self.last_announce

    def poll_announcements(self, timeout_s: float = 0.0) -> WeightsAnnounce | None:
        """Drain announcements (waiting up to ``timeout_s`` for the first); return the newest seen."""
        wait_s = timeout_s
        while poll_unless_stopped(self.sub, wait_s, self.stop) if wait_s > 0 else self.sub.poll(0):
            wait_s = 0.0
            msg = self.announce_inbox.decode(self.sub.recv_multipart(copy=False))
            if msg is not None:
                self.last_announce = time.monotonic()
            if msg is not None and (self.latest is None or msg.version > self.latest.version):
                self.latest = msg
        return self.latest

    def _receive_buffer(self, nbytes: int) -> tuple[int, np.ndarray]:
        """The buffer to receive into: never the one a model's parameters live in (:meth:`load_into`)."""
        slot = 1 if self._adopted == 0 else 0
        buffer = self._buffers[slot]
        if buffer is None or buffer.size != nbytes:
            self._buffers[slot] = None  # let the old one go before mapping the new one
            buffer = self._buffers[slot] = allocate_blob(nbytes)
            self.buffers_allocated += 1
        return slot, buffer

    def load_into(self, model: torch.nn.Module, fetched: FetchedWeights) -> tuple[list[str], list[str]]:
        """Load fetched weights into ``model``, zero-copy where possible.

        A parameter or buffer on the CPU with the wire dtype and shape, at an aligned offset,
        becomes a view of the receive buffer (``tensor.data = view``: no copy, and the model's
        own storage is freed); the receive buffer then belongs to the model, and the next
        fetch goes into the other one. Anything else (another device or dtype) is copied, as
        ``load_state_dict`` would. Tied parameters (one tensor under two names) follow the
        name that was sent.

        Args:
            model: the model to load into (its parameters stay the same ``Parameter`` objects).
            fetched: the newest :meth:`fetch` result.

        Returns:
            ``(missing, unexpected)`` as ``model.load_state_dict(fetched.tensors, strict=False)``
            reports them.

        Raises:
            RuntimeError: a tensor whose shape does not fit (nothing is loaded then).
        """
        own = model.state_dict(keep_vars=True)
        unexpected = [name for name in fetched.tensors if name not in own]
        missing = [name for name in own if name not in fetched.tensors]
        for name, source in fetched.tensors.items():
            if name in own and tuple(own[name].shape) != tuple(source.shape):
                raise RuntimeError(f"{name}: shape {tuple(source.shape)} does not fit the model's "
                                   f"{tuple(own[name].shape)}")
        adopted = False
        with torch.no_grad():
            for name, source in fetched.tensors.items():
                target = own.get(name)
                if target is None:
                    continue
                if target.device.type == "cpu" and target.dtype == source.dtype:
                    target.data = source
                    adopted = True
                else:
                    target.copy_(source)
        if adopted:
            self._adopted = fetched.slot
        return missing, unexpected

    def fetch(self, announce: WeightsAnnounce) -> FetchedWeights:
        """Fetch, verify and unpack one version.

        Each chunk is received straight into its place in the receive buffer and hashed
        there while later chunks are in flight; the digest root is compared at the end.
        The returned tensors are views of the receive buffer (valid until the next fetch).

        Raises:
            WeightSyncError: version retired by the learner, too many timeouts, a chunk of
                the wrong size, or a digest mismatch (nothing of the version may be loaded).
            FetchStopped: ``stop`` was set before the fetch completed (a :class:`WeightSyncError`).
        """
        start = time.perf_counter()
        slot, buffer = self._receive_buffer(announce.total_bytes)
        state = _Fetch(announce=announce, view=memoryview(buffer).cast("B"),
                       digests=bytearray(DIGEST_BYTES * announce.num_chunks))
        retries = 0
        self._request_more(state)
        while state.received < announce.num_chunks:
            if not poll_unless_stopped(self.dealer, self.timeout_s, self.stop):
                if self.stop is not None and self.stop.is_set():
                    raise FetchStopped(f"version {announce.version}: stopped with {state.received} of "
                                       f"{announce.num_chunks} chunks received")
                retries += 1
                if retries > self.max_retries:
                    raise WeightSyncError(
                        f"version {announce.version}: no chunk for {self.timeout_s}s, "
                        f"{self.max_retries} retries; is the learner up?"
                    )
                log.warning("weight fetch of version %d timed out; re-sending %d requests",
                            announce.version, len(state.pending))
                for index in state.pending:
                    self._request(announce.version, index)
                continue
            self._receive(state)
        transfer_s = time.perf_counter() - start
        if digest_root(state.digests) != announce.sha256:
            raise WeightSyncError(f"version {announce.version}: the sha256 of the chunk digests does not match "
                                  "the announcement (a corrupted or mixed-version chunk); not loaded")
        tensors = _tensor_views(announce, buffer)
        return FetchedWeights(version=announce.version, tensors=tensors, nbytes=announce.total_bytes,
                              transfer_s=transfer_s, verify_s=time.perf_counter() - start - transfer_s,
                              hash_s=state.hash_s, slot=slot)

    def _request_more(self, state: _Fetch) -> None:
        n = state.announce.num_chunks
        while state.next_index < n and len(state.pending) < self.credit:
            self._request(state.announce.version, state.next_index)
            state.pending[state.next_index] = time.monotonic()
            state.next_index += 1

    def _receive(self, state: _Fetch) -> None:
        """Receive one reply; a chunk of the fetch goes straight into its place and is hashed there.

        A :class:`WeightsChunk` is a header frame and one payload frame (frame 1, see
        :mod:`streamrl.common.messages`): the header is decoded and validated with an empty
        stand-in payload, then the payload frame is received into the buffer slice.
        """
        announce = state.announce
        head = self.dealer.recv(copy=False)
        if not head.more:
            msg = self.chunk_inbox.decode([head])
            if isinstance(msg, Error):
                if msg.code is ErrorCode.UNKNOWN_VERSION:
                    raise WeightSyncError(f"version {announce.version} retired: {msg.message}")
                log.warning("weight server error: %s %s", msg.code.value, msg.message)
            return
        msg = self.chunk_inbox.decode([head, b""])
        index = msg.chunk_index if isinstance(msg, WeightsChunk) else -1
        if msg is None or msg.version != announce.version or index not in state.pending:
            self._discard_rest()  # rejected, or a late duplicate of a re-sent request
            return
        begin = index * announce.chunk_bytes
        expected = min(announce.chunk_bytes, announce.total_bytes - begin)
        target = state.view[begin : begin + expected]
        got = self.dealer.recv_into(target)
        if self.dealer.getsockopt(zmq.RCVMORE):
            self._discard_rest()
            self.chunk_inbox.reject("malformed", f"chunk {index}: frames after the payload")
            return  # stays pending: re-requested after the timeout
        if got != expected:
            raise WeightSyncError(f"chunk {index} has {got} bytes, expected {expected}")
        del state.pending[index]
        state.received += 1
        self._request_more(state)  # keep the pipe full while this chunk is hashed
        hashing = time.perf_counter()
        state.digests[index * DIGEST_BYTES : (index + 1) * DIGEST_BYTES] = xxhash.xxh3_128_digest(target)
        state.hash_s += time.perf_counter() - hashing

    def _discard_rest(self) -> None:
        while self.dealer.getsockopt(zmq.RCVMORE):
            self.dealer.recv(copy=False)

    def _request(self, version: int, index: int) -> None:
        # never block: with the learner unreachable the request is dropped here, the poll
        # times out, and the retry logic re-sends it or gives up with WeightSyncError
        try_send(self.dealer, WeightsChunkRequest(sender=self.sender, version=version, chunk_index=index))

    def close(self) -> None:
        self.sub.close(0)
        self.dealer.close(0)
