"""CURVE encryption and ZAP authentication of every ZeroMQ socket.

With ``security.keys_dir`` set in the config, every socket streamrl creates
(:func:`streamrl.common.transport.make_socket` with ``security=``) speaks ZeroMQ CURVE
(Curve25519 key exchange, then XSalsa20-Poly1305 encryption and authentication
of every frame; RFC 26 / ZMTP-CURVE). Binding sockets are CURVE servers;
connecting sockets are CURVE clients that know the server's public key, so a
client also authenticates the server. Each process runs one ZAP handler
(pyzmq's :class:`zmq.auth.thread.ThreadAuthenticator`) that accepts a client
only when its public key is in the allow-list folder.

Keys folder (made by ``streamrl keys generate --dir DIR``; pyzmq certificate
files, Z85 keys)::

    DIR/server.key                  the cluster's server public key: every host
    DIR/server.key_secret           its secret key: hosts that bind (learner, buffer, scorers)
    DIR/clients/<service>.key       a service's client public key
    DIR/clients/<service>.key_secret  its secret key: hosts that run that service
    DIR/authorized/<name>.key       allow-list: client public keys the servers accept

A process of service ``generator`` connects with ``clients/generator.key_secret``
(likewise ``scorer``, ``learner``; the buffer only binds). The allow-list is
re-read on every handshake, so a key added with ``streamrl keys authorize`` is
accepted without a restart; deleting a key file refuses new connections from
it (connections already made stay up until either side restarts).

Refusals are counted in ``streamrl_<service>_auth_rejected_total{reason,endpoint}``
and logged at WARNING (the first, then the 10th, 100th, ... per reason and
endpoint) by the process that refused:

* ``unknown_key``: a CURVE client whose public key is not in ``authorized/``
  (counted by the ZAP handler, which logs the key);
* ``no_key``: a client that presented no CURVE key: one without keys (the
  NULL mechanism) fails the handshake on a mechanism mismatch before ZAP is
  asked, or hangs up as soon as it sees the server's greeting (which of the
  two the server observes is a race; the log line says which), and so does a
  bare TCP probe (counted from the socket monitor);
* ``bad_handshake``: any other failed handshake, e.g. a client holding a wrong
  ``server.key`` (its HELLO does not decrypt) or garbage bytes.

Each refused connection attempt is counted. A client whose handshake fails logs an ERROR and
counts ``streamrl_<service>_auth_failed_total{reason,endpoint}`` (``key_refused``, ``no_curve``:
the server has no keys, ``bad_handshake``). libzmq itself dials again only after a failure it
does not blame on the peer (a connection lost mid-handshake); after a refusal (ZAP status 4xx/5xx)
or a protocol error it drops that connection for good, and a server that refused a client only
while it was shutting down (its allow-list gone with its keys folder, its handshake cut) left the
client with no connection for the rest of the run. So a connecting socket made with
``security=`` (a :class:`RedialingSocket`) dials such an endpoint again itself, after
:data:`REDIAL_FIRST_S` doubling up to :data:`REDIAL_MAX_S` while the refusals go on (a key
authorized later is then accepted without a restart), in its own thread the next time it polls
or sends.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from streamrl.common.metrics import ServiceMetrics
from streamrl.common.throttle import should_log

log = logging.getLogger(__name__)

SERVER_NAME = "server"
CLIENTS_DIR = "clients"
AUTHORIZED_DIR = "authorized"
DEFAULT_CLIENTS = ("generator", "scorer", "buffer", "learner")
"""Client key pairs ``streamrl keys generate`` makes by default (one per service)."""

REJECT_REASONS = ("unknown_key", "no_key", "bad_handshake")
"""``reason`` labels of ``auth_rejected_total`` (peers a server refused)."""
FAIL_REASONS = ("key_refused", "no_curve", "bad_handshake")
"""``reason`` labels of ``auth_failed_total`` (handshakes a client failed)."""

REDIAL_FIRST_S = 1.0
"""Seconds after a refused or failed handshake before a client dials that endpoint again."""
REDIAL_MAX_S = 30.0
"""Longest wait between two dials of an endpoint that keeps refusing, seconds (the wait doubles)."""

_SERVER_EVENTS = zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_MONITOR_STOPPED
_CLIENT_EVENTS = _SERVER_EVENTS | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_SUCCEEDED
_monitor_ids = itertools.count()


class SecurityError(RuntimeError):
    """A key file is missing or unreadable; the message names the file and the fix."""


# ---------------------------------------------------------------- key files


def generate_keys(keys_dir: str | Path, clients: Iterable[str] = DEFAULT_CLIENTS, *, force: bool = False) -> list[Path]:
    """Create the server key pair, one client key pair per name, and authorize each client.

    Existing keys are kept (so the command also adds clients to a running
    cluster); ``force`` replaces the server pair, which locks out every host
    that still holds the old ``server.key``. Secret files get mode 0600, the
    folders 0700.

    Args:
        keys_dir: the keys folder (created when missing).
        clients: client names, e.g. service names; each gets ``clients/<name>.key[_secret]``
            and ``authorized/<name>.key``.
        force: replace an existing server key pair.

    Returns:
        The files written.

    Raises:
        SecurityError: a name is not a plain file name.
    """
    root = Path(keys_dir)
    names = list(clients)
    for name in names:
        if not name or Path(name).name != name or name.startswith("."):
            raise SecurityError(f"client name {name!r} must be a plain file name")
    for folder in (root, root / CLIENTS_DIR, root / AUTHORIZED_DIR):
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)
    written: list[Path] = []
    if force or not (root / f"{SERVER_NAME}.key").exists():
        written += _create_pair(root, SERVER_NAME)
    for name in names:
        public = root / CLIENTS_DIR / f"{name}.key"
        if not public.exists():
            written += _create_pair(root / CLIENTS_DIR, name)
        if not (root / AUTHORIZED_DIR / f"{name}.key").exists():
            written.append(authorize(root, public, name=name))
    return written


def _create_pair(folder: Path, name: str) -> list[Path]:
    umask = os.umask(0o077)  # the secret file is never readable by others, not even briefly
    try:
        public, secret = zmq.auth.create_certificates(folder, name)
    finally:
        os.umask(umask)
    os.chmod(public, 0o644)
    return [Path(public), Path(secret)]


def authorize(keys_dir: str | Path, public_key_file: str | Path, *, name: str | None = None) -> Path:
    """Add a client's public key to the allow-list: copy it to ``authorized/<name>.key``.

    Args:
        keys_dir: the keys folder.
        public_key_file: the client's public ``.key`` certificate file (never its ``.key_secret``).
        name: file name in the allow-list (default: the file's stem).

    Returns:
        The allow-list file.

    Raises:
        SecurityError: the file is unreadable, has no public key, or holds a secret key.
    """
    source = Path(public_key_file)
    _public, secret = _load(source)
    if secret is not None:
        raise SecurityError(f"{source} holds a secret key; fix: pass the public .key file next to it")
    target_dir = Path(keys_dir) / AUTHORIZED_DIR
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / f"{name or source.name.split('.')[0]}.key"
    if not target.exists() or not os.path.samefile(source, target):
        shutil.copyfile(source, target)
    return target


def _load(path: Path) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as err:
        raise SecurityError(
            f"cannot read CURVE key {path}: {err}; fix: run "
            f"`streamrl keys generate --dir {path.parent}` or copy the file there"
        ) from None


def load_allow_list(authorized_dir: str | Path) -> set[bytes]:
    """Z85 public keys of every ``*.key`` file in ``authorized_dir`` (empty when the folder is missing)."""
    try:
        return set(zmq.auth.load_certificates(authorized_dir))
    except OSError:
        return set()


# ---------------------------------------------------------------- sockets


class RedialingSocket(zmq.Socket):
    """A connecting CURVE socket that dials again an endpoint whose handshake libzmq gave up on.

    ``make_socket(..., security=...)`` creates one for every socket that connects; its
    :class:`Security` schedules the dial (:meth:`Security.redial_later`) from its monitor thread,
    and the socket performs it in the thread that owns it, on its next :meth:`poll` or send (ZeroMQ
    sockets are not thread-safe).
    """

    # pyzmq treats unknown attribute names as socket options: declare ours on the class
    _redials: dict[str, float] | None = None  # endpoint -> monotonic time it is due
    _redial_guard: threading.Lock | None = None

    def redial_later(self, endpoint: str, delay_s: float) -> None:
        """Dial ``endpoint`` again in ``delay_s`` seconds (any thread)."""
        if self._redial_guard is None or self._redials is None:  # not redialing
            return
        with self._redial_guard:
            self._redials[endpoint] = time.monotonic() + delay_s

    def redial_due(self) -> list[str]:
        """Disconnect and connect each endpoint whose dial is due (owning thread only); returns them."""
        if not self._redials or self._redial_guard is None:
            return []
        now = time.monotonic()
        with self._redial_guard:
            due = [endpoint for endpoint, when in self._redials.items() if when <= now]
            for endpoint in due:
                del self._redials[endpoint]
        for endpoint in due:
            try:
                self.disconnect(endpoint)
            except zmq.ZMQError:  # libzmq already forgot it
                pass
            self.connect(endpoint)
            log.info("dialling %s again after a failed handshake", endpoint)
        return due

    def poll(self, timeout: int | None = None, flags: int = zmq.POLLIN) -> int:
        """:meth:`redial_due`, then poll as ``zmq.Socket.poll`` does."""
        self.redial_due()
        return super().poll(timeout, flags)

    def send_multipart(self, msg_parts, flags: int = 0, copy: bool = True, track: bool = False, **kwargs):
        """:meth:`redial_due`, then send as ``zmq.Socket.send_multipart`` does."""
        self.redial_due()
        return super().send_multipart(msg_parts, flags=flags, copy=copy, track=track, **kwargs)

    def _start_redialing(self) -> None:
        if self._redial_guard is None:
            self._redials = {}
            self._redial_guard = threading.Lock()


class Security:
    """CURVE keys and the ZAP handler of one process's ZeroMQ context.

    Pass it as ``make_socket(..., security=...)``: a binding socket becomes a
    CURVE server whose ZAP domain is its endpoint, a connecting one a CURVE
    client. The ZAP handler and a monitor thread start with the first socket;
    :meth:`close` stops them (before ``Context.term``). One per context: the
    ZAP endpoint ``inproc://zeromq.zap.01`` is per context.

    Args:
        ctx: the process's ZeroMQ context.
        keys_dir: the keys folder (layout in the module docstring).
        client_name: which ``clients/<name>.key_secret`` connecting sockets use.
        metrics: where refusals are counted.

    Raises:
        SecurityError: ``server.key`` is missing or unreadable.
    """

    def __init__(self, ctx: zmq.Context, keys_dir: str | Path, client_name: str, metrics: ServiceMetrics):
        self.ctx = ctx
        self.keys_dir = Path(keys_dir)
        self.client_name = client_name
        self.instance = metrics.instance
        self.authorized_dir = self.keys_dir / AUTHORIZED_DIR
        if not zmq.has("curve"):
            raise SecurityError("this libzmq was built without CURVE; fix: install pyzmq's wheel (bundles libsodium)")
        self.server_public, _ = _load(self.keys_dir / f"{SERVER_NAME}.key")
        self.rejected = metrics.counter(
            "auth_rejected_total",
            "Connections refused by CURVE/ZAP authentication, by reason and endpoint",
            ["reason", "endpoint"],
        )
        self.failed = metrics.counter(
            "auth_failed_total",
            "Handshakes this process's connecting sockets failed, by reason and endpoint",
            ["reason", "endpoint"],
        )
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] = {}
        self._auth: ThreadAuthenticator | None = None
        self._monitors: dict[zmq.Socket, tuple[str, bool, zmq.Socket]] = {}
        self._new_monitors: list[tuple[zmq.Socket, str, bool, zmq.Socket]] = []
        self._refusals: dict[tuple[int, str], int] = {}  # (socket id, endpoint) -> handshakes failed in a row
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- called by make_socket, in the thread that owns ``sock``, before bind/connect

    def secure(self, sock: zmq.Socket, *, bind: str | None, connect: Sequence[str]) -> None:
        """Make ``sock`` a CURVE server (``bind``) or client (``connect``) and watch its handshakes.

        Raises:
            SecurityError: this host lacks the key file the role needs.
        """
        if bind is not None:
            _public, secret = _load(self.keys_dir / f"{SERVER_NAME}.key_secret")
            if secret is None:
                raise SecurityError(f"{self.keys_dir / (SERVER_NAME + '.key_secret')} has no secret key")
            self._start().configure_curve_callback(domain=bind, credentials_provider=self)
            sock.curve_server = True
            sock.curve_secretkey = secret
            sock.zap_domain = bind.encode()
            for reason in REJECT_REASONS:  # exported at 0: dashboards show no refusals, not no data
                self.rejected.labels(reason=reason, endpoint=bind)
            self._watch(sock, bind, server=True)
        else:
            path = self.keys_dir / CLIENTS_DIR / f"{self.client_name}.key_secret"
            public, secret = _load(path)
            if secret is None:
                raise SecurityError(f"{path} has no secret key; fix: copy the .key_secret file, not the .key")
            sock.curve_serverkey = self.server_public
            sock.curve_publickey = public
            sock.curve_secretkey = secret
            self._start()
            for endpoint in connect:
                for reason in FAIL_REASONS:
                    self.failed.labels(reason=reason, endpoint=endpoint)
            if isinstance(sock, RedialingSocket):
                sock._start_redialing()
            self._watch(sock, ", ".join(connect), server=False)

    def callback(self, domain: str, client_key: bytes) -> bool:
        """ZAP decision (pyzmq credentials provider): is ``client_key`` (Z85) in the allow-list?"""
        if client_key in load_allow_list(self.authorized_dir):
            return True
        self.refuse(
            "unknown_key",
            domain,
            f"client key {client_key.decode()} is not in {self.authorized_dir}; fix if it is ours: "
            f"streamrl keys authorize --dir {self.keys_dir} CLIENT.key",
        )
        return False

    def refuse(self, reason: str, endpoint: str, detail: str) -> None:
        """Count (``auth_rejected_total{reason,endpoint}``) and rate-limited log one refusal."""
        self.rejected.labels(reason=reason, endpoint=endpoint).inc()
        with self._lock:
            n = self._counts[reason, endpoint] = self._counts.get((reason, endpoint), 0) + 1
        if should_log(n):
            log.warning("%s refused a connection on %s (%s, %d so far): %s", self.instance, endpoint, reason, n, detail)

    def close(self) -> None:
        """Stop the monitor thread and the ZAP handler, closing their sockets (waits at most 5 s)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    # -- internals

    def _start(self) -> ThreadAuthenticator:
        """Start the ZAP handler and the monitor thread unless running; returns the handler."""
        with self._lock:
            if self._auth is None:
                self._auth = ThreadAuthenticator(self.ctx, log=logging.getLogger("zmq.auth"))
                self._auth.start()
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch_loop, name="auth-monitor", daemon=True)
                self._thread.start()
            return self._auth

    def _watch(self, sock: zmq.Socket, endpoint: str, *, server: bool) -> None:
        monitor = sock.get_monitor_socket(
            _SERVER_EVENTS if server else _CLIENT_EVENTS, addr=f"inproc://streamrl-auth-monitor-{next(_monitor_ids)}"
        )
        with self._lock:  # handed to the monitor thread (the lock is the memory barrier)
            self._new_monitors.append((monitor, endpoint, server, sock))

    def _watch_loop(self) -> None:
        poller = zmq.Poller()
        try:
            while not self._stop.is_set():
                with self._lock:
                    for monitor, endpoint, server, sock in self._new_monitors:
                        self._monitors[monitor] = (endpoint, server, sock)
                        poller.register(monitor, zmq.POLLIN)
                    self._new_monitors.clear()
                for monitor, _ in poller.poll(200):
                    event = recv_monitor_message(monitor)
                    if event["event"] == zmq.EVENT_MONITOR_STOPPED:  # the watched socket closed
                        poller.unregister(monitor)
                        del self._monitors[monitor]
                        monitor.close(0)
                    else:
                        self._on_event(event, *self._monitors[monitor])
        finally:
            with self._lock:
                leftover = list(self._monitors) + [m for m, *_ in self._new_monitors]
                self._monitors.clear()
                self._new_monitors.clear()
            for monitor in leftover:
                monitor.close(0)

    def _on_event(self, event: dict, endpoint: str, server: bool, sock: zmq.Socket | None = None) -> None:
        kind, value = event["event"], event["value"]
        # a server counts under its bind string (as ZAP does: libzmq reports tcp://*:N as tcp://0.0.0.0:N);
        # a client connected to several endpoints under the one that failed
        where = endpoint if server else (event["endpoint"].decode(errors="replace") or endpoint)
        if kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._refusals.pop((id(sock), where), None)
            return
        if server:
            if kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                self.refuse(
                    "no_key",
                    where,
                    f"the client hung up before authenticating ({_errno_name(value)}; "
                    "a client without keys, or a port probe)",
                )
            elif value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
                self.refuse("no_key", where, "the client offered no CURVE key (NULL mechanism: no security.keys_dir?)")
            else:
                self.refuse(
                    "bad_handshake",
                    where,
                    f"CURVE handshake failed ({_protocol_error_name(value)}); a client with a wrong server.key?",
                )
            return
        if kind == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            reason, why = (
                "key_refused",
                (
                    f"the server refused our key {self.keys_dir / CLIENTS_DIR}/"
                    f"{self.client_name}.key (ZAP status {value}); fix: authorize it on the "
                    "server (streamrl keys authorize); this process dials again by itself"
                ),
            )
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
            reason, why = "no_curve", "the server does not use CURVE; fix: give it the same security.keys_dir"
        elif kind == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            reason, why = "bad_handshake", f"CURVE handshake failed ({_protocol_error_name(value)})"
        else:  # the connection went before the handshake ended: libzmq dials again itself
            reason, why = "bad_handshake", f"the connection closed during the CURVE handshake ({_errno_name(value)})"
        self.failed.labels(reason=reason, endpoint=where).inc()
        if kind == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL or not isinstance(sock, RedialingSocket):
            log.error("%s cannot connect to %s: %s", self.instance, where, why)
            return
        n = self._refusals[id(sock), where] = self._refusals.get((id(sock), where), 0) + 1
        delay = min(REDIAL_MAX_S, REDIAL_FIRST_S * 2 ** (n - 1))
        sock.redial_later(where, delay)
        if should_log(n):
            log.error(
                "%s cannot connect to %s: %s; dialling again in %.0fs (%d failed in a row)",
                self.instance,
                where,
                why,
                delay,
                n,
            )


def _errno_name(value: int) -> str:
    return errno.errorcode.get(value, str(value))


def _protocol_error_name(value: int) -> str:
    """``ZMQ_PROTOCOL_ERROR_*`` name of a handshake-failure value, e.g. ``ZMTP_CRYPTOGRAPHIC``."""
    names = [
        n.removeprefix("PROTOCOL_ERROR_")
        for n in dir(zmq)
        if n.startswith("PROTOCOL_ERROR_") and getattr(zmq, n) == value
    ]
    return names[0] if names else str(value)


def open_security(keys_dir: str | None, service: str, ctx: zmq.Context, metrics: ServiceMetrics) -> Security | None:
    """A :class:`Security` for a service process, or None when ``keys_dir`` is unset (no CURVE).

    Raises:
        SecurityError: ``server.key`` is missing.
    """
    return None if keys_dir is None else Security(ctx, keys_dir, service, metrics)
