"""Socket limits and the backpressure wait of producers, over real loopback sockets."""

from __future__ import annotations

import threading
import time

import zmq

from streamrl.common.messages import BatchRequest, decode
from streamrl.common.metrics import ServiceMetrics
from streamrl.common.transport import STOP_CHECK_S, make_socket, poll_unless_stopped, send_when_ready, try_send
from streamrl.testing import free_port


def test_send_when_ready_waits_for_a_peer_and_counts_the_wait():
    ctx = zmq.Context()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    metrics = ServiceMetrics("generator", "g")
    blocked = metrics.counter("send_blocked_seconds_total", "test")
    push = make_socket(ctx, zmq.PUSH, connect=[endpoint], max_message_bytes=1 << 20, hwm=1)
    stop = threading.Event()
    try:
        # nobody listens: the send waits until stopped and reports False
        threading.Timer(0.3, stop.set).start()
        assert not send_when_ready(
            push,
            BatchRequest(learner_version=0, num_groups=1),
            stop=stop,
            blocked_seconds=blocked,
            warn_after_s=60,
            peer="test",
        )
        waited = metrics.registry.get_sample_value("streamrl_generator_send_blocked_seconds_total")
        assert 0.25 < waited < 2.0
        # a receiver appears: the message goes through
        pull = make_socket(ctx, zmq.PULL, bind=endpoint, max_message_bytes=1 << 20, hwm=1)
        stop.clear()
        assert send_when_ready(
            push,
            BatchRequest(learner_version=3, num_groups=2),
            stop=stop,
            blocked_seconds=blocked,
            warn_after_s=60,
            peer="test",
        )
        assert pull.poll(5000)
        assert decode(pull.recv_multipart()).learner_version == 3
        pull.close(0)
    finally:
        push.close(0)
        ctx.term()


def test_try_send_never_blocks_without_a_peer():
    ctx = zmq.Context()
    try:
        dealer = make_socket(
            ctx, zmq.DEALER, connect=[f"tcp://127.0.0.1:{free_port()}"], max_message_bytes=1 << 20, hwm=4
        )
        assert try_send(dealer, BatchRequest(learner_version=0, num_groups=1)) is False
        port = free_port()
        router = make_socket(ctx, zmq.ROUTER, bind=f"tcp://127.0.0.1:{port}", max_message_bytes=1 << 20, hwm=4)
        dealer.connect(f"tcp://127.0.0.1:{port}")
        sent = False
        for _ in range(50):  # once connected, the same call goes through
            if try_send(dealer, BatchRequest(learner_version=3, num_groups=1)):
                sent = True
                break
            threading.Event().wait(0.05)
        assert sent
        assert router.poll(2000)
        frames = router.recv_multipart()
        assert decode(frames[1:]).learner_version == 3
        dealer.close(0)
        router.close(0)
    finally:
        ctx.term()


def test_poll_unless_stopped_ends_at_the_stop_request_not_the_timeout():
    """Every wait of a service polls through it: ready -> True, timeout -> False, and a stop request
    ends a long wait within STOP_CHECK_S (the generator's weight fetch and credit waits did not)."""
    ctx = zmq.Context()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    pull = make_socket(ctx, zmq.PULL, bind=endpoint, max_message_bytes=1 << 20, hwm=4)
    push = make_socket(ctx, zmq.PUSH, connect=[endpoint], max_message_bytes=1 << 20, hwm=4)
    stop = threading.Event()
    try:
        start = time.monotonic()
        assert not poll_unless_stopped(pull, 0.3, stop)  # nothing sent: the timeout
        assert 0.29 < time.monotonic() - start < 1.0
        threading.Timer(0.3, stop.set).start()
        start = time.monotonic()
        assert not poll_unless_stopped(pull, 60.0, stop)  # the stop request, not the 60 s
        assert time.monotonic() - start < 0.3 + STOP_CHECK_S + 0.5
        stop.clear()
        push.send(b"x")
        assert poll_unless_stopped(pull, 5.0, stop)
        stop.set()
        assert not poll_unless_stopped(pull, 5.0, stop)  # stopped: not even a ready socket is looked at
    finally:
        push.close(0)
        pull.close(0)
        ctx.term()
