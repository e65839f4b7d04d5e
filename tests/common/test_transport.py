"""Socket limits and the backpressure wait of producers, over real loopback sockets."""

from __future__ import annotations

import threading

import zmq

from common.messages import BatchRequest, decode
from common.metrics import ServiceMetrics
from common.transport import make_socket, send_when_ready
from support import free_port


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
        assert not send_when_ready(push, BatchRequest(learner_version=0, num_groups=1), stop=stop,
                                   blocked_seconds=blocked, warn_after_s=60, peer="test")
        waited = metrics.registry.get_sample_value("streamrl_generator_send_blocked_seconds_total")
        assert 0.25 < waited < 2.0
        # a receiver appears: the message goes through
        pull = make_socket(ctx, zmq.PULL, bind=endpoint, max_message_bytes=1 << 20, hwm=1)
        stop.clear()
        assert send_when_ready(push, BatchRequest(learner_version=3, num_groups=2), stop=stop,
                               blocked_seconds=blocked, warn_after_s=60, peer="test")
        assert pull.poll(5000)
        assert decode(pull.recv_multipart()).learner_version == 3
        pull.close(0)
    finally:
        push.close(0)
        ctx.term()
