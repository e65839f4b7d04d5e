"""Weight packing and the learner -> generator weight push over real loopback sockets."""

from __future__ import annotations

import socket

import pytest
import torch
import zmq

from streamrl.common.messages import WeightsChunkRequest
from streamrl.common.metrics import ServiceMetrics
from streamrl.common.modes import WeightDtype
from streamrl.common.transport import make_socket, send
from streamrl.common.weights import (
    WeightClient,
    WeightServer,
    WeightSyncError,
    pack_state_dict,
    unpack_state_dict,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(50, 8, generator=g),
        "layer.bias": torch.randn(8, generator=g),
        "step": torch.tensor([seed], dtype=torch.float16),
    }


@pytest.mark.parametrize("dtype", list(WeightDtype))
def test_pack_unpack_round_trip(dtype):
    sd = state(1)
    packed = pack_state_dict(sd, version=3, dtype=dtype, chunk_bytes=100, sender="t")
    assert packed.announce.total_bytes == sum(
        t.numel() * torch.empty(0, dtype=getattr(torch, dtype.value)).element_size() for t in sd.values()
    )
    back = unpack_state_dict(packed.announce, bytearray(packed.blob.tobytes()))
    for name, t in sd.items():
        assert back[name].dtype == getattr(torch, dtype.value)
        assert torch.equal(back[name], t.to(back[name].dtype))


def test_unpack_detects_corruption():
    packed = pack_state_dict(state(1), version=0, dtype=WeightDtype.FLOAT32, chunk_bytes=64, sender="t")
    blob = bytearray(packed.blob.tobytes())
    blob[17] ^= 0xFF
    with pytest.raises(WeightSyncError, match="sha256"):
        unpack_state_dict(packed.announce, blob)


@pytest.fixture
def server_and_endpoints():
    ctx = zmq.Context()
    ann, fetch = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    metrics = ServiceMetrics("learner", "learner-test")
    server = WeightServer(ctx, announce_endpoint=ann, fetch_endpoint=fetch, metrics=metrics,
                          sender="learner-test", announce_interval_s=0.1,
                          max_message_bytes=1 << 24, hwm=16)
    yield ctx, server, ann, fetch, metrics
    server.close()
    ctx.term()


def client(ctx, ann, fetch, credit=2):
    return WeightClient(ctx, announce_endpoint=ann, fetch_endpoint=fetch,
                        inbox_metrics=ServiceMetrics("generator", "g"), sender="g",
                        credit=credit, timeout_s=2.0, max_message_bytes=1 << 24, hwm=16)


def test_late_joiner_fetches_latest_version(server_and_endpoints):
    ctx, server, ann, fetch, _ = server_and_endpoints
    for v in range(3):
        server.publish(pack_state_dict(state(v), version=v, dtype=WeightDtype.FLOAT32,
                                       chunk_bytes=97, sender="learner-test"))
    c = client(ctx, ann, fetch)  # joins after all versions were published
    try:
        announce = c.poll_announcements(timeout_s=3.0)
        assert announce is not None and announce.version == 2
        got = c.fetch(announce)
        assert got.version == 2 and got.nbytes == announce.total_bytes
        for name, t in state(2).items():
            assert torch.equal(got.tensors[name], t)
        # 50*8*4 + 8*4 + 2 = 1634 bytes in chunks of 97 -> 17 chunks, each served once
        assert announce.num_chunks == 17
        assert server.chunks_served == 17
    finally:
        c.close()


def test_retired_version_raises(server_and_endpoints):
    ctx, server, ann, fetch, _ = server_and_endpoints
    server.publish(pack_state_dict(state(0), version=0, dtype=WeightDtype.FLOAT32, chunk_bytes=97, sender="l"))
    c = client(ctx, ann, fetch)
    try:
        old = c.poll_announcements(timeout_s=3.0)
        for v in (1, 2):  # keep_versions=2 retires version 0
            server.publish(pack_state_dict(state(v), version=v, dtype=WeightDtype.FLOAT32,
                                           chunk_bytes=97, sender="l"))
        with pytest.raises(WeightSyncError, match="retired"):
            c.fetch(old)
    finally:
        c.close()


def test_server_survives_malformed_requests(server_and_endpoints):
    ctx, server, ann, fetch, metrics = server_and_endpoints
    server.publish(pack_state_dict(state(0), version=0, dtype=WeightDtype.FLOAT32, chunk_bytes=97, sender="l"))
    dealer = make_socket(ctx, zmq.DEALER, connect=[fetch], max_message_bytes=1 << 24, hwm=16)
    try:
        dealer.send_multipart([b"\x93garbage"])
        dealer.send_multipart([b"\x80"])
        send(dealer, WeightsChunkRequest(version=0, chunk_index=999))
        replies = [dealer.recv_multipart() for _ in range(3) if dealer.poll(3000)]
        assert len(replies) == 3
        sample = metrics.registry.get_sample_value
        name = "streamrl_learner_messages_rejected_total"
        assert sample(name, {"reason": "malformed"}) == 1  # not msgpack
        assert sample(name, {"reason": "unknown_kind"}) == 1  # an empty map
        c = client(ctx, ann, fetch)
        got = c.fetch(c.poll_announcements(timeout_s=3.0))
        assert torch.equal(got.tensors["layer.bias"], state(0)["layer.bias"])
        c.close()
    finally:
        dealer.close(0)


def test_fetch_from_a_vanished_learner_fails_in_bounded_time(server_and_endpoints):
    """The learner announced, then went away: fetch must give up (retries), never block in send."""
    import time

    ctx, server, ann, fetch, _ = server_and_endpoints
    server.publish(pack_state_dict(state(0), version=0, dtype=WeightDtype.FLOAT32, chunk_bytes=97, sender="l"))
    c = WeightClient(ctx, announce_endpoint=ann, fetch_endpoint=f"tcp://127.0.0.1:{free_port()}",  # nobody there
                     inbox_metrics=ServiceMetrics("generator", "g"), sender="g", credit=2, timeout_s=0.2,
                     max_message_bytes=1 << 24, hwm=16, max_retries=3)
    try:
        announce = c.poll_announcements(timeout_s=3.0)
        assert announce is not None
        start = time.monotonic()
        with pytest.raises(WeightSyncError, match="no chunk"):
            c.fetch(announce)
        assert time.monotonic() - start < 0.2 * 4 + 2.0  # (retries + 1) timeouts, plus slack
    finally:
        c.close()
