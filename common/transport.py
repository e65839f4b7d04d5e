"""ZeroMQ sockets with streamrl's limits, and receiving with rejection accounting.

Every socket is created by :func:`make_socket`, which applies the transport
limits in one place: ``ZMQ_MAXMSGSIZE`` (a peer sending a larger frame is
disconnected by libzmq before the bytes reach Python), high-water marks
(bounded queues: a full queue blocks the sender, which is how backpressure
travels from the buffer back to the generators), ``LINGER`` (close never
hangs) and ``IMMEDIATE`` on connecting sockets (messages are not queued for
peers that are not connected) and TCP keepalive (a vanished peer's
connection is closed and re-dialled instead of hanging).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence
from typing import Generic, TypeVar

import zmq
from prometheus_client import Counter

from streamrl.common.errors import StartupRefused
from streamrl.common.messages import Message, ProtocolError, decode, encode
from streamrl.common.metrics import ServiceMetrics
from streamrl.common.resolve import ResolvingSocket
from streamrl.common.security import RedialingSocket, Security
from streamrl.common.throttle import should_log

M = TypeVar("M", bound=Message)

log = logging.getLogger(__name__)

LARGE_FRAME_BYTES = 64 * 1024
"""Frames at least this large are sent zero-copy."""
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_PROBES = 10, 5, 3
"""TCP keepalive on every connection: a peer whose host vanished without closing
the connection (crash, partition) is dropped after about 10 + 5 * 3 = 25 s, and
connecting sockets re-dial. (ZMTP heartbeats, ZMQ_HEARTBEAT_IVL, would notice
sooner, but with libzmq 4.3 they tripped an assertion, ``!_io_error`` in
stream_engine_base.cpp, when a process with restarted peers shut down; the
application-level pulses in :mod:`streamrl.common.liveness` cover the fast path.)"""
STOP_CHECK_S = 0.1
"""Longest a wait polls a socket before it looks at its service's stop request again, seconds
(:func:`poll_unless_stopped`): SIGTERM ends any wait within about this long."""


class ResolvingRedialingSocket(ResolvingSocket, RedialingSocket):
    """A CURVE client that connects every address of its peers' names and dials again after a refused handshake."""


class BindError(StartupRefused):
    """A socket could not bind its endpoint; the message names the address and the fix."""


def make_socket(
    ctx: zmq.Context,
    kind: int,
    *,
    bind: str | None = None,
    connect: Sequence[str] = (),
    max_message_bytes: int,
    hwm: int,
    identity: bytes | None = None,
    subscribe: bytes | None = None,
    security: Security | None = None,
    resolve_every_s: float | None = None,
) -> zmq.Socket:
    """Create a socket with the transport limits applied.

    Args:
        ctx: the process's ZeroMQ context.
        kind: ``zmq.PUSH``, ``zmq.PULL``, ``zmq.ROUTER``, ...
        bind: endpoint to bind, e.g. ``tcp://127.0.0.1:5560``.
        connect: endpoints to connect to.
        max_message_bytes: ``ZMQ_MAXMSGSIZE``, in bytes (applies per frame).
        hwm: send and receive high-water marks, in messages.
        identity: ``ZMQ_ROUTING_ID`` for DEALER sockets.
        subscribe: topic prefix for SUB sockets (``b""`` = everything).
        security: CURVE keys and ZAP of this process (:mod:`streamrl.common.security`); None = no
            authentication or encryption. A connecting socket with it is a
            :class:`~streamrl.common.security.RedialingSocket` (it dials again after a refused handshake).
        resolve_every_s: connect to every address the ``connect`` host names resolve to, looked up
            again this often, seconds (a :class:`~streamrl.common.resolve.ResolvingSocket`); None = the
            names as given (libzmq reaches one address per name).

    Raises:
        BindError: the endpoint cannot be bound (e.g. address in use); the socket is closed.
        streamrl.common.security.SecurityError: ``security`` lacks the key file this socket's role needs.
    """
    redialing = security is not None and bind is None and bool(connect)  # see RedialingSocket
    socket_class = {
        (True, True): ResolvingRedialingSocket,
        (True, False): ResolvingSocket,
        (False, True): RedialingSocket,
    }.get((bool(resolve_every_s), redialing))
    sock = ctx.socket(kind, socket_class=socket_class)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, KEEPALIVE_IDLE_S)
    sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, KEEPALIVE_INTERVAL_S)
    sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, KEEPALIVE_PROBES)
    if identity is not None:
        sock.setsockopt(zmq.ROUTING_ID, identity)
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
    if subscribe is not None:
        sock.setsockopt(zmq.SUBSCRIBE, subscribe)
    if connect and kind in (zmq.PUSH, zmq.DEALER):
        sock.setsockopt(zmq.IMMEDIATE, 1)
    if security is not None:
        security.secure(sock, bind=bind, connect=connect)
    if bind is not None:
        try:
            sock.bind(bind)
        except zmq.ZMQError as err:
            sock.close(linger=0)  # an open socket would keep zmq_ctx_term waiting forever
            fix = (
                "stop the process that holds it (another run?) or choose another endpoint in the config"
                if err.errno == zmq.EADDRINUSE
                else "check the endpoint's address in the config"
            )
            raise BindError(f"cannot bind {bind}: {err.strerror}; fix: {fix}") from None
    if resolve_every_s:
        sock.start_resolving(connect, resolve_every_s)
        return sock
    for endpoint in connect:
        sock.connect(endpoint)
    return sock


def poll_unless_stopped(
    sock: zmq.Socket, timeout_s: float, stop: threading.Event | None = None, flags: int = zmq.POLLIN
) -> bool:
    """Wait up to ``timeout_s`` seconds for ``sock`` to be ready for ``flags``, giving up as soon as
    ``stop`` is set (it is looked at every :data:`STOP_CHECK_S` seconds; None = never stopped).

    Every blocking wait of a service goes through here (or checks ``ctx.stop`` as often), so a
    stop request (SIGTERM, SIGINT) ends the wait within :data:`STOP_CHECK_S` seconds, never only
    after a long timeout and its retries.

    Returns:
        True when the socket is ready; False after ``timeout_s`` or once ``stop`` is set (look at
        ``stop`` to tell the two apart).
    """
    deadline = time.monotonic() + timeout_s
    while stop is None or not stop.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        wait_s = left if stop is None else min(left, STOP_CHECK_S)
        if sock.poll(max(1, math.ceil(wait_s * 1000)), flags):
            return True
    return False


def send(sock: zmq.Socket, message: Message, *, prefix: Sequence[bytes] = (), flags: int = 0) -> None:
    """Encode and send ``message``; ``prefix`` frames (ROUTER routing ids) go first.

    Raises:
        zmq.Again: with ``flags=zmq.NOBLOCK`` when the peer queue is full.
    """
    frames = [*prefix, *encode(message)]
    large = any(memoryview(f).nbytes >= LARGE_FRAME_BYTES for f in frames)
    sock.send_multipart(frames, flags=flags, copy=not large)


def try_send(sock: zmq.Socket, message: Message, *, prefix: Sequence[bytes] = ()) -> bool:
    """Send ``message`` without blocking; False when no peer can take it now.

    For request sockets (DEALER with ``IMMEDIATE``) whose peer may be down: a
    blocking send would wait, silently and without limit, for the peer to
    come back. Callers re-send on their own timer instead.
    """
    try:
        send(sock, message, prefix=prefix, flags=zmq.NOBLOCK)
        return True
    except zmq.Again:
        return False


def send_when_ready(
    sock: zmq.Socket,
    message: Message,
    *,
    stop: threading.Event,
    blocked_seconds: Counter,
    warn_after_s: float,
    peer: str,
) -> bool:
    """Send ``message`` on a PUSH socket, waiting while every peer's queue is full.

    The wait is how backpressure reaches a producer: the receiver stopped reading
    and its bounded queue filled. The seconds waited are added to
    ``blocked_seconds``; a warning is logged every ``warn_after_s`` seconds of waiting.

    Returns:
        True when sent, False when ``stop`` was set before the peers took it.
    """
    start = last_warning = time.perf_counter()
    try:
        while not stop.is_set():
            # never a blocking send: a peer that vanishes between poll and send would
            # block it with no timeout, and SIGTERM could not stop the process
            if poll_unless_stopped(sock, 1.0, stop, zmq.POLLOUT) and try_send(sock, message):
                return True
            now = time.perf_counter()
            if now - last_warning > warn_after_s:
                log.warning("%s has not taken a message for %.0fs (down, or full downstream)", peer, now - start)
                last_warning = now
        return False
    finally:
        blocked_seconds.inc(time.perf_counter() - start)


class Inbox(Generic[M]):
    """Decodes received frames for one socket, counting and logging rejections.

    A rejected message is logged at WARNING the first time its reason is seen
    and then at counts 10, 100, 1000, ... (so a flood cannot fill the log), and
    counted in ``streamrl_<service>_messages_rejected_total{reason}``.

    Args:
        metrics: the service's metrics.
        expected: message classes this socket accepts.
        max_bytes: the decoder's message size limit, in bytes.
        socket_name: used in log lines.
    """

    def __init__(
        self,
        metrics: ServiceMetrics,
        expected: Sequence[type[M]],
        *,
        max_bytes: int,
        socket_name: str,
    ):
        self.metrics = metrics
        self.expected = tuple(expected)
        self.max_bytes = max_bytes
        self.socket_name = socket_name
        self.rejected_counts: dict[str, int] = {}

    def decode(self, frames: Sequence) -> M | None:
        """Return the message, or ``None`` when it was rejected (and counted)."""
        try:
            return decode(frames, expected=self.expected, max_bytes=self.max_bytes)
        except ProtocolError as err:
            self.reject(err.reason.value, err.detail)
            return None

    def reject(self, reason: str, detail: str) -> None:
        """Count and (rate-limited) log a rejection with ``reason`` (a metric label)."""
        self.metrics.rejected.labels(reason=reason).inc()
        n = self.rejected_counts.get(reason, 0) + 1
        self.rejected_counts[reason] = n
        if should_log(n):
            log.warning(
                "%s rejected a message on %s (%s, %d so far): %s",
                self.metrics.instance,
                self.socket_name,
                reason,
                n,
                detail,
            )
