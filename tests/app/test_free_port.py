"""streamrl.testing.free_port never hands out a port twice in one process (two services of one
test once got the same port from the kernel and the second failed with "Address already in use")."""

from __future__ import annotations

import socket

from streamrl.testing import free_port


def test_free_port_returns_distinct_bindable_ports():
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    for port in ports[:20]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free when handed out


def test_a_port_the_kernel_hands_back_again_is_skipped(monkeypatch):
    """A stand-in kernel that returns the same port again: free_port moves on to the next one."""
    handed = iter([40001, 40001, 40001, 40002])

    class FakeSocket:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def bind(self, address):
            self.port = next(handed)

        def getsockname(self):
            return ("127.0.0.1", self.port)

    monkeypatch.setattr("streamrl.ports._HANDED_OUT", set())
    monkeypatch.setattr("streamrl.ports.socket.socket", FakeSocket)
    assert free_port() == 40001
    assert free_port() == 40002
