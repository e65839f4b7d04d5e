"""The generator's credit request waits for the buffer's answer, but not past a stop request."""

from __future__ import annotations

import threading
import time

import zmq

from streamrl.common.metrics import ServiceMetrics
from streamrl.common.transport import make_socket
from streamrl.services.generator.credits import CreditClient
from streamrl.testing import free_port


def test_a_stop_request_ends_the_wait_for_a_credit_grant():
    """A buffer that takes the request and never answers (busy, or stopping itself): the wait ends
    within a fraction of a second of SIGTERM, not after transport.request_timeout_s."""
    ctx = zmq.Context()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    router = make_socket(ctx, zmq.ROUTER, bind=endpoint, max_message_bytes=1 << 20, hwm=4)
    stop = threading.Event()
    client = CreditClient(
        ctx,
        endpoint=endpoint,
        sender="g-1",
        instance="generator-0",
        metrics=ServiceMetrics("generator", "generator-0"),
        timeout_s=30.0,
        max_message_bytes=1 << 20,
        hwm=4,
        security=None,
        stop=stop,
    )
    try:
        deadline = time.monotonic() + 5
        while not router.poll(0) and time.monotonic() < deadline:  # connected once a request gets through
            client.timeout_s = 0.05
            client.request(policy_version=0, groups_sent=0, want=2)
        assert router.poll(0), "the request never reached the buffer's socket"
        client.timeout_s = 30.0
        threading.Timer(0.3, stop.set).start()
        start = time.monotonic()
        assert client.request(policy_version=0, groups_sent=0, want=2) is None
        assert time.monotonic() - start < 1.5
    finally:
        client.close()
        router.close(0)
        ctx.term()
