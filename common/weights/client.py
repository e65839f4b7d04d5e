"""The generator side of the weight push: :class:`WeightClient`.

It keeps the newest announcement it has seen and fetches a version chunk by chunk over a
DEALER socket with credit-based flow control (at most ``credit`` chunks in flight),
receiving each chunk straight into a receive buffer reused across versions, hashing each
chunk as it lands (:mod:`streamrl.common.weights.blob`), retrying lost chunks after a
timeout, and returns tensors ready to load (views of that buffer, valid until the next
fetch).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import xxhash
import zmq

from streamrl.common.messages import AdapterSpec, Error, ErrorCode, WeightsAnnounce, WeightsChunk, WeightsChunkRequest
from streamrl.common.metrics import ServiceMetrics
from streamrl.common.security import Security
from streamrl.common.transport import Inbox, make_socket, poll_unless_stopped, try_send
from streamrl.common.weights.blob import (
    DIGEST_BYTES,
    FetchStopped,
    WeightSyncError,
    _tensor_views,
    allocate_blob,
    digest_root,
)

log = logging.getLogger(__name__)


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
        adapter: the announcement's :class:`AdapterSpec` when ``tensors`` are a LoRA adapter
            (``learner.lora``), not the whole policy; None for a whole policy.
    """

    version: int
    tensors: dict[str, torch.Tensor]
    nbytes: int
    transfer_s: float
    verify_s: float
    hash_s: float = 0.0
    slot: int = 0
    adapter: AdapterSpec | None = None


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
        self.sub = make_socket(
            ctx,
            zmq.SUB,
            connect=[announce_endpoint],
            subscribe=b"",
            max_message_bytes=max_message_bytes,
            hwm=hwm,
            security=security,
        )
        self.dealer = make_socket(
            ctx,
            zmq.DEALER,
            connect=[fetch_endpoint],
            max_message_bytes=max_message_bytes,
            hwm=max(hwm, 64),
            security=security,
        )
        self.announce_inbox = Inbox(
            inbox_metrics, [WeightsAnnounce], max_bytes=max_message_bytes, socket_name="weights_announce"
        )
        self.chunk_inbox: Inbox[WeightsChunk | Error] = Inbox(
            inbox_metrics, [WeightsChunk, Error], max_bytes=max_message_bytes, socket_name="weights"
        )
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
                raise RuntimeError(
                    f"{name}: shape {tuple(source.shape)} does not fit the model's {tuple(own[name].shape)}"
                )
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
        view = memoryview(buffer)  # type: ignore[arg-type]  # numpy stubs: no __buffer__ before 3.12
        state = _Fetch(announce=announce, view=view.cast("B"), digests=bytearray(DIGEST_BYTES * announce.num_chunks))
        retries = 0
        self._request_more(state)
        while state.received < announce.num_chunks:
            if not poll_unless_stopped(self.dealer, self.timeout_s, self.stop):
                if self.stop is not None and self.stop.is_set():
                    raise FetchStopped(
                        f"version {announce.version}: stopped with {state.received} of "
                        f"{announce.num_chunks} chunks received"
                    )
                retries += 1
                if retries > self.max_retries:
                    raise WeightSyncError(
                        f"version {announce.version}: no chunk for {self.timeout_s}s, "
                        f"{self.max_retries} retries; is the learner up?"
                    )
                log.warning(
                    "weight fetch of version %d timed out; re-sending %d requests", announce.version, len(state.pending)
                )
                for index in state.pending:
                    self._request(announce.version, index)
                continue
            self._receive(state)
        transfer_s = time.perf_counter() - start
        if digest_root(state.digests) != announce.sha256:
            raise WeightSyncError(
                f"version {announce.version}: the sha256 of the chunk digests does not match "
                "the announcement (a corrupted or mixed-version chunk); not loaded"
            )
        tensors = _tensor_views(announce, buffer)
        return FetchedWeights(
            version=announce.version,
            tensors=tensors,
            nbytes=announce.total_bytes,
            transfer_s=transfer_s,
            verify_s=time.perf_counter() - start - transfer_s,
            hash_s=state.hash_s,
            slot=slot,
            adapter=announce.adapter,
        )

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
        if not isinstance(msg, WeightsChunk) or msg.version != announce.version or msg.chunk_index not in state.pending:
            self._discard_rest()  # rejected, or a late duplicate of a re-sent request
            return
        index = msg.chunk_index
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
