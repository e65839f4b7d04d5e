"""A connecting socket that reaches every address a host name resolves to, kept current.

libzmq resolves the host name of a ``tcp://`` endpoint to one address per connection. Behind a
name that stands for several peers (a Kubernetes headless Service lists one address per scorer
pod; round-robin DNS; several lines in ``/etc/hosts``) that reaches one peer only, and peers that
start later are never reached. :class:`ResolvingSocket` looks each name up itself: it keeps one
connection per address (PUSH then round-robins over all of them), connects addresses that
appear and disconnects addresses that go, so ``kubectl scale deployment/scorer --replicas=N``
takes effect in the generators within one look-up interval, without a restart.

The look-ups run in a background thread (a slow DNS server never blocks sending); the socket
applies their result in its own thread each time it is polled, as every sender does before
sending (:func:`streamrl.common.transport.send_when_ready`). Endpoints that are not ``tcp://``
or whose host is an IP address are connected once, as given. A failed look-up keeps the
addresses found before (a DNS hiccup does not drop live peers) and is logged (rate-limited).

An address is disconnected only after :data:`DROP_AFTER_LOOKUPS` successful look-ups in a row
without it: messages still queued for a peer at the moment it is disconnected are dropped by
libzmq, so a peer is let go only once it has surely left (a scorer pod is gone from its Service
when it terminates; by then its connection closed and, with ``IMMEDIATE``, nothing is queued for it).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from collections import deque
from collections.abc import Callable, Sequence

import zmq

from streamrl.common.throttle import should_log

log = logging.getLogger(__name__)

DROP_AFTER_LOOKUPS = 3
"""Successful look-ups in a row that must miss an address before its connection is closed."""

Lookup = Callable[[str, int], list[str]]
"""``lookup(host, port) -> IP addresses`` (raises ``OSError`` when the name does not resolve)."""


def lookup_addresses(host: str, port: int) -> list[str]:
    """Every IP address of ``host`` (IPv4 and IPv6) through the system resolver (``getaddrinfo``).

    Raises:
        OSError: (``socket.gaierror``) the name does not resolve.
    """
    return [str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


def literal_host(endpoint: str) -> bool:
    """True when ``endpoint`` needs no look-up: not ``tcp://``, or its host is an IP address."""
    transport, _, address = endpoint.partition("://")
    if transport != "tcp":
        return True
    host = address.rpartition(":")[0].strip("[]")
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def resolve_endpoint(endpoint: str, lookup: Lookup = lookup_addresses) -> list[str]:
    """The endpoints to connect for ``endpoint``: one ``tcp://ADDRESS:PORT`` per address of its host, sorted.

    ``tcp://scorer:5550`` whose name has the addresses 10.0.0.7 and 10.0.0.9 gives
    ``["tcp://10.0.0.7:5550", "tcp://10.0.0.9:5550"]`` (IPv6 as ``tcp://[::1]:5550``); an endpoint
    that needs no look-up (:func:`literal_host`) is returned as it is.

    Raises:
        OSError: the name does not resolve.
    """
    if literal_host(endpoint):
        return [endpoint]
    host, _, port = endpoint.partition("://")[2].rpartition(":")
    found = set()
    for address in lookup(host, int(port)):
        address = address.split("%", 1)[0]  # an IPv6 zone index
        found.add(f"tcp://[{address}]:{port}" if ":" in address else f"tcp://{address}:{port}")
    return sorted(found)


class ResolvingSocket(zmq.Socket):
    """A ZeroMQ socket connected to every address of its endpoints' host names (see the module docstring).

    Create it with ``make_socket(..., resolve_every_s=...)`` (or ``ctx.socket(kind,
    socket_class=ResolvingSocket)`` then :meth:`start_resolving`).
    """

    # pyzmq treats unknown attribute names as socket options: declare ours on the class
    _endpoints: tuple[str, ...] = ()
    _every_s: float = 10.0
    _lookup: Lookup = staticmethod(lookup_addresses)
    _found: dict[str, deque[list[str]]] | None = None  # endpoint -> its newest look-ups
    _connected: set[str] | None = None
    _guard: threading.Lock | None = None
    _stopping: threading.Event | None = None
    _thread: threading.Thread | None = None
    _failures: int = 0

    def start_resolving(self, endpoints: Sequence[str], every_s: float, lookup: Lookup = lookup_addresses) -> None:
        """Resolve ``endpoints`` now, connect every address, and keep looking them up every ``every_s`` seconds.

        Names that do not resolve yet (a peer whose DNS record appears later) are retried by the
        background thread; nothing is connected for them meanwhile.
        """
        self._endpoints = tuple(endpoints)
        self._every_s = every_s
        self._lookup = lookup
        self._found = {}
        self._connected = set()
        self._guard = threading.Lock()
        self._stopping = threading.Event()
        self._resolve_all()
        self.apply()
        if not all(literal_host(e) for e in self._endpoints):
            self._thread = threading.Thread(target=self._resolve_loop, name="resolve-peers", daemon=True)
            self._thread.start()

    @property
    def peers(self) -> list[str]:
        """The addresses this socket is connected to now, sorted."""
        return sorted(self._connected or ())

    def apply(self) -> None:
        """Connect the addresses found since the last call and disconnect those that are gone (owning thread only)."""
        if self._guard is None or self._found is None or self._connected is None:  # not resolving
            return
        with self._guard:
            wanted = {address for recent in self._found.values() for found in recent for address in found}
        for address in sorted(wanted - self._connected):
            if address.startswith("tcp://["):
                self.setsockopt(zmq.IPV6, 1)
            self.connect(address)
            self._connected.add(address)
            log.info("connected to %s", address)
        for address in sorted(self._connected - wanted):
            try:
                self.disconnect(address)
            except zmq.ZMQError:  # already gone
                pass
            self._connected.discard(address)
            log.info("disconnected from %s (no longer in DNS)", address)

    def poll(self, timeout: int | None = None, flags: int = zmq.POLLIN) -> int:
        """:meth:`apply` the newest look-ups, then poll as ``zmq.Socket.poll`` does."""
        self.apply()
        return super().poll(timeout, flags)

    def close(self, linger: int | None = None) -> None:
        """Stop the look-up thread, then close the socket."""
        if self._stopping is not None:
            self._stopping.set()
        super().close(linger)

    def _resolve_all(self) -> None:
        if self._guard is None or self._found is None:  # start_resolving sets both first
            return
        for endpoint in self._endpoints:
            try:
                found = resolve_endpoint(endpoint, self._lookup)
            except (OSError, UnicodeError) as err:
                self._failures += 1
                if should_log(self._failures):
                    log.warning(
                        "cannot resolve %s (%s); keeping its %d known addresses, retrying every %.0fs "
                        "(%d failed look-ups so far)",
                        endpoint,
                        err,
                        len(self._found.get(endpoint, [[]])[-1]),
                        self._every_s,
                        self._failures,
                    )
                continue
            with self._guard:
                self._found.setdefault(endpoint, deque(maxlen=DROP_AFTER_LOOKUPS)).append(found)

    def _resolve_loop(self) -> None:
        while self._stopping is not None and not self._stopping.wait(self._every_s):
            self._resolve_all()
