"""The learner side of the weight push: :class:`WeightServer`.

:meth:`WeightServer.publish_state_dict` copies the tensors into a preallocated blob (the
only work on the learner's critical path: a memcpy, with the dtype cast) and returns; a
background packer thread hashes the chunks and installs the version, and the server
thread announces it at once (a wake-up socket, no poll delay) on PUB and serves chunks of
the ``keep_versions`` newest versions on ROUTER, zero-copy from the blob. Blobs come from
a pool of ``keep_versions + 1`` buffers reused across versions (double buffering: version
v is served while v + 1 is packed into another buffer; no page faults after the first
versions). The newest version is re-announced every ``announce_interval_s`` seconds, so a
generator that starts late or restarts learns it with nothing special done.

Bounded memory per peer. Chunks are sent zero-copy from the pool, so a reply queued for a
generator that does not read costs no memory beyond the pool (before, each queued reply
kept its whole version's blob alive), and the server tracks each peer's chunks until
libzmq has written them: a peer may have at most ``peer_max_bytes`` queued. Past it, its
requests are dropped (``weight_replies_dropped_total{reason="peer_full"}``) and it counts
as stalled (``weight_stalled_peers``) until a reply gets through again; the learner's
memory does not grow with stalled peers or versions.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
import zmq

from streamrl.common.messages import (
    AdapterSpec,
    Error,
    ErrorCode,
    Message,
    TensorSpec,
    WeightsChunk,
    WeightsChunkRequest,
    encode,
)
from streamrl.common.metrics import ServiceMetrics
from streamrl.common.modes import WeightDtype
from streamrl.common.security import Security
from streamrl.common.transport import Inbox, make_socket, send
from streamrl.common.weights.blob import (
    DEFAULT_CHUNK_BYTES,
    PackedWeights,
    _announce,
    _snapshot,
    allocate_blob,
    blob_layout,
)

log = logging.getLogger(__name__)

STALLED_PEER_FORGET_S = 60.0
"""A stalled peer that sends nothing for this long is no longer counted in ``weight_stalled_peers``."""


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
    adapter: AdapterSpec | None = None
    """Set by a LoRA learner (``learner.lora``): the published state dicts are adapter tensors
    (:func:`streamrl.common.lora.adapter_tensors`) and every announcement says so."""

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
            raise ValueError(
                f"peer_max_bytes {self.peer_max_bytes} < chunk_bytes {chunk_bytes}: no chunk could be sent"
            )
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
        self.m_dropped = metrics.counter(
            "weight_replies_dropped_total",
            "Weight replies not sent: the peer's queue was full (peer_full) or it disconnected (peer_gone)",
            ["reason"],
        )
        self.m_stalled = metrics.gauge("weight_stalled_peers", "Generators whose weight reply queue is full")
        self.m_queued = metrics.gauge(
            "weight_queued_bytes", "Weight chunk bytes queued to generators, not yet written to their connections"
        )
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
            raise ValueError(
                f"chunks of {packed.announce.chunk_bytes} bytes > this server's chunk_bytes {self.chunk_bytes}"
            )
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
            pub = make_socket(
                self._ctx,
                zmq.PUB,
                bind=self._announce_endpoint,
                max_message_bytes=self._max_bytes,
                hwm=self._hwm,
                security=self._security,
            )
            sockets.append(pub)
            router = make_socket(
                self._ctx,
                zmq.ROUTER,
                bind=self._fetch_endpoint,
                max_message_bytes=self._max_bytes,
                hwm=max(self._hwm, 64),
                security=self._security,
            )
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
        if self.adapter is not None:
            latest.adapter = self.adapter
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

    def _answer(self, router: zmq.Socket, frames: list, inbox: Inbox[WeightsChunkRequest]) -> None:
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
            tracker = self._reply(
                router,
                [route],
                # ``data`` is a view of the packed blob, sent without a copy: encode takes any buffer
                WeightsChunk(
                    sender=self._sender,
                    version=request.version,
                    chunk_index=request.chunk_index,
                    data=cast(bytes, data),
                ),
                track=True,
            )
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
            self._stall(
                route, f"{self.queues[route].queued} bytes of chunks queued and {len(backlog)} requests waiting"
            )

    def _serve_backlogs(self, router: zmq.Socket, inbox: Inbox) -> None:
        for route, backlog in list(self.backlogs.items()):
            while backlog and self._serve(router, route, backlog[0], inbox):
                backlog.popleft()
            if not backlog:
                del self.backlogs[route]

    def _reply(
        self, router: zmq.Socket, route: list[bytes], message: Message, track: bool = False
    ) -> zmq.MessageTracker | None:
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
            log.warning(
                "weights peer %s is not reading (%s, the bound is %d bytes); dropping its requests until "
                "it reads again",
                route.hex(),
                why,
                self.peer_max_bytes,
            )
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
