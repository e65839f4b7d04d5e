"""ResolvingSocket: one connection per address of a host name, following the name as peers come and go."""

from __future__ import annotations

import threading

import pytest
import zmq

from streamrl.common.resolve import ResolvingSocket, literal_host, lookup_addresses, resolve_endpoint
from streamrl.common.transport import make_socket
from streamrl.testing import free_port, wait_until

LIMITS = dict(max_message_bytes=1 << 20, hwm=100)


def test_resolve_endpoint_expands_names_and_keeps_literals():
    table = {"scorers.svc": ["10.0.0.9", "10.0.0.7", "10.0.0.9", "fe80::1%eth0"]}
    lookup = lambda host, port: table[host]  # noqa: E731
    assert resolve_endpoint("tcp://scorers.svc:5550", lookup) == [
        "tcp://10.0.0.7:5550",
        "tcp://10.0.0.9:5550",
        "tcp://[fe80::1]:5550",
    ]
    for endpoint in ("tcp://10.1.2.3:5550", "tcp://[::1]:5550", "ipc:///tmp/x", "inproc://y"):
        assert literal_host(endpoint) and resolve_endpoint(endpoint, lookup) == [endpoint]
    assert not literal_host("tcp://localhost:1")
    assert "127.0.0.1" in lookup_addresses("localhost", 80)  # the system resolver itself
    with pytest.raises(OSError):
        resolve_endpoint("tcp://no-such-host.invalid:1")


class Table:
    """A DNS stand-in whose answers the test changes (the look-up thread reads it)."""

    def __init__(self, addresses: list[str]):
        self.addresses = addresses
        self.lock = threading.Lock()
        self.fail = False

    def __call__(self, host: str, port: int) -> list[str]:
        with self.lock:
            if self.fail or host != "scorers.test":
                raise OSError("Name or service not known")
            return list(self.addresses)

    def set(self, addresses: list[str], fail: bool = False) -> None:
        with self.lock:
            self.addresses, self.fail = addresses, fail


def test_push_reaches_every_address_and_follows_the_name():
    ctx = zmq.Context()
    port = free_port()
    pulls = {}
    for host in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
        pulls[host] = make_socket(ctx, zmq.PULL, bind=f"tcp://{host}:{port}", **LIMITS)
    table = Table(["127.0.0.1", "127.0.0.2"])
    push = make_socket(ctx, zmq.PUSH, connect=[], **LIMITS)  # a plain socket: no resolution
    assert not isinstance(push, ResolvingSocket)
    push.close(0)
    push = ctx.socket(zmq.PUSH, socket_class=ResolvingSocket)
    push.setsockopt(zmq.LINGER, 0)
    push.setsockopt(zmq.IMMEDIATE, 1)
    push.start_resolving([f"tcp://scorers.test:{port}"], every_s=0.5, lookup=table)
    try:
        assert push.peers == [f"tcp://127.0.0.1:{port}", f"tcp://127.0.0.2:{port}"]

        def received_by_each(count: int) -> dict[str, int]:
            got = {host: 0 for host in pulls}
            for _ in range(count):  # PUSH round-robins over the connected peers
                assert push.poll(5000, zmq.POLLOUT)
                push.send(b"x")
            assert wait_until(lambda: _drain(pulls, got) == count, timeout=5), got
            return got

        assert wait_until(lambda: push.poll(0, zmq.POLLOUT), timeout=5)
        first = received_by_each(40)
        assert first["127.0.0.3"] == 0 and first["127.0.0.1"] >= 10 and first["127.0.0.2"] >= 10
        table.set(["127.0.0.2", "127.0.0.3"])  # one scorer left, another joined
        assert wait_until(
            lambda: push.poll(0, zmq.POLLOUT) is not None and len(push.peers) == 3, timeout=5, interval=0.05
        )
        pulls["127.0.0.1"].close(0)  # it leaves (its connection closes) before DNS forgets it for good
        assert wait_until(
            lambda: (
                push.poll(0, zmq.POLLOUT) is not None
                and push.peers == [f"tcp://127.0.0.2:{port}", f"tcp://127.0.0.3:{port}"]
            ),
            timeout=5,
        )
        threading.Event().wait(0.2)  # the closed connection and the disconnect reach libzmq's I/O thread
        pulls["127.0.0.1"] = ctx.socket(zmq.PULL)  # unbound: counts nothing
        second = received_by_each(40)
        assert second["127.0.0.1"] == 0 and second["127.0.0.2"] >= 10 and second["127.0.0.3"] >= 10
        table.set([], fail=True)  # DNS down for several look-ups: the known peers stay
        threading.Event().wait(2.0)
        push.poll(0, zmq.POLLOUT)
        assert push.peers == [f"tcp://127.0.0.2:{port}", f"tcp://127.0.0.3:{port}"]
    finally:
        push.close(0)
        for sock in pulls.values():
            sock.close(0)
        ctx.term()


def _drain(pulls: dict, got: dict) -> int:
    """Count what has arrived at each PULL socket into ``got``; the total so far."""
    for host, sock in pulls.items():
        while sock.poll(0):
            sock.recv()
            got[host] += 1
    return sum(got.values())


def test_make_socket_resolves_names_when_asked():
    ctx = zmq.Context()
    port = free_port()
    pull = make_socket(ctx, zmq.PULL, bind=f"tcp://127.0.0.1:{port}", **LIMITS)
    push = make_socket(ctx, zmq.PUSH, connect=[f"tcp://localhost:{port}"], resolve_every_s=60, **LIMITS)
    try:
        assert isinstance(push, ResolvingSocket) and f"tcp://127.0.0.1:{port}" in push.peers
        assert wait_until(lambda: push.poll(100, zmq.POLLOUT), timeout=5)
        push.send(b"hello")
        assert pull.poll(5000) and pull.recv() == b"hello"
    finally:
        push.close(0)
        pull.close(0)
        ctx.term()
