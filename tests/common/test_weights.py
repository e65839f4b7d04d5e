"""Weight packing and the learner -> generator weight push over real loopback sockets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zmq

from streamrl.common.messages import WeightsChunk, WeightsChunkRequest, decode, encode
from streamrl.common.metrics import ServiceMetrics
from streamrl.common.modes import WeightDtype
from streamrl.common.transport import make_socket, send
from streamrl.common.weights import (
    FetchStopped,
    WeightClient,
    WeightServer,
    WeightSyncError,
    chunk_digests,
    digest_root,
    pack_state_dict,
    unpack_state_dict,
)
from streamrl.testing import free_port


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
    server = WeightServer(
        ctx,
        announce_endpoint=ann,
        fetch_endpoint=fetch,
        metrics=metrics,
        sender="learner-test",
        announce_interval_s=0.1,
        max_message_bytes=1 << 24,
        hwm=16,
    )
    yield ctx, server, ann, fetch, metrics
    server.close()
    ctx.term()


def client(ctx, ann, fetch, credit=2, *, timeout_s=2.0, **options):
    """A generator's WeightClient on ``ann``/``fetch``; ``options``: ``max_retries``, ``stop``."""
    return WeightClient(
        ctx,
        announce_endpoint=ann,
        fetch_endpoint=fetch,
        inbox_metrics=ServiceMetrics("generator", "g"),
        sender="g",
        credit=credit,
        timeout_s=timeout_s,
        max_message_bytes=1 << 24,
        hwm=16,
        **options,
    )


def test_late_joiner_fetches_latest_version(server_and_endpoints):
    ctx, server, ann, fetch, _ = server_and_endpoints
    for v in range(3):
        server.publish(
            pack_state_dict(state(v), version=v, dtype=WeightDtype.FLOAT32, chunk_bytes=97, sender="learner-test")
        )
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
            server.publish(pack_state_dict(state(v), version=v, dtype=WeightDtype.FLOAT32, chunk_bytes=97, sender="l"))
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
    c = client(ctx, ann, f"tcp://127.0.0.1:{free_port()}", timeout_s=0.2, max_retries=3)  # nobody there
    try:
        announce = c.poll_announcements(timeout_s=3.0)
        assert announce is not None
        start = time.monotonic()
        with pytest.raises(WeightSyncError, match="no chunk"):
            c.fetch(announce)
        assert time.monotonic() - start < 0.2 * 4 + 2.0  # (retries + 1) timeouts, plus slack
    finally:
        c.close()


def test_a_stop_request_ends_a_fetch_and_the_wait_for_announcements_at_once(server_and_endpoints):
    """SIGTERM while a fetch waits on a learner that stopped answering: the fetch ends within a
    fraction of a second (FetchStopped), not after its timeouts and retries (5 x 10 s by default),
    which had the launcher SIGKILL the generator at the end of every run."""
    import threading
    import time

    ctx, server, ann, fetch, _ = server_and_endpoints
    server.publish(pack_state_dict(state(0), version=0, dtype=WeightDtype.FLOAT32, chunk_bytes=97, sender="l"))
    stop = threading.Event()
    c = client(ctx, ann, f"tcp://127.0.0.1:{free_port()}", timeout_s=10.0, max_retries=5, stop=stop)  # nobody there
    try:
        announce = c.poll_announcements(timeout_s=3.0)
        assert announce is not None
        threading.Timer(0.3, stop.set).start()
        start = time.monotonic()
        with pytest.raises(FetchStopped, match="stopped with 0 of"):
            c.fetch(announce)
        assert time.monotonic() - start < 1.5
        start = time.monotonic()
        assert c.poll_announcements(timeout_s=30.0) is announce  # stopped: returns the newest seen at once
        assert time.monotonic() - start < 0.5
    finally:
        c.close()


# ---------------------------------------------------------------------- the wire-speed paths


def big_state(seed: int, n: int = 300_000) -> dict[str, torch.Tensor]:
    """About 1.2 MB of float32 (19 chunks of 64 KiB), a tied duplicate and a float16 tensor
    (whose 10 bytes leave the last chunk unaligned)."""
    g = torch.Generator().manual_seed(seed)
    embed = torch.randn(n // 100, 100, generator=g)
    return {
        "embed.weight": embed,
        "mlp.weight": torch.randn(1000, 7, generator=g),
        "lm_head.weight": embed,
        "positions": torch.arange(5, dtype=torch.float16) + seed,
    }


def server_for(ctx, metrics, *, dtype=WeightDtype.FLOAT32, chunk_bytes=64 * 1024, interval=0.1, **kwargs):
    ann, fetch = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    server = WeightServer(
        ctx,
        announce_endpoint=ann,
        fetch_endpoint=fetch,
        metrics=metrics,
        sender="l",
        announce_interval_s=interval,
        max_message_bytes=1 << 24,
        hwm=16,
        dtype=dtype,
        chunk_bytes=chunk_bytes,
        **kwargs,
    )
    return server, ann, fetch


def wait_for_version(c: WeightClient, version: int, timeout_s: float = 10.0):
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        latest = c.poll_announcements(timeout_s=0.2)
        if latest is not None and latest.version >= version:
            return latest
    raise AssertionError(f"version {version} never announced")


@pytest.mark.parametrize("dtype", [WeightDtype.FLOAT32, WeightDtype.BFLOAT16])
def test_publish_state_dict_round_trip_reuses_buffers(dtype):
    """Snapshot, background digests and announcement, chunked fetch: five versions arrive exactly,
    through three pooled blobs on the learner (keep_versions + 1) and one receive buffer."""
    ctx = zmq.Context()
    server, ann, fetch = server_for(ctx, ServiceMetrics("learner", "l"), dtype=dtype)
    c = client(ctx, ann, fetch, credit=3)
    try:
        for v in range(5):
            sd = big_state(v)
            blocked = server.publish_state_dict(sd, v)
            assert blocked >= 0
            for t in sd.values():
                t.add_(1000.0)  # the caller changes its tensors at once: the snapshot is unaffected
            got = c.fetch(wait_for_version(c, v))
            assert got.version == v
            want = big_state(v)
            assert set(got.tensors) == {"embed.weight", "mlp.weight", "positions"}  # tied head sent once
            for name, t in got.tensors.items():
                assert t.dtype == getattr(torch, dtype.value)  # every floating tensor in the wire dtype
                assert torch.equal(t, want[name].to(t.dtype))
            timing = server.timings[v]
            assert timing.announced_at is not None and timing.announced_at >= timing.sealed_at
        assert server._pool.allocated == 3
        assert c.buffers_allocated == 1
    finally:
        c.close()
        server.close()
        ctx.term()


def test_digest_root_binds_every_chunk_and_its_position():
    blob = np.frombuffer(bytes(range(256)) * 40, dtype=np.uint8).copy()
    root = digest_root(chunk_digests(blob, 1000))
    assert len(chunk_digests(blob, 1000)) == 16 * 11  # 10,240 bytes in chunks of 1000
    flipped = blob.copy()
    flipped[5555] ^= 1
    swapped = blob.copy()
    swapped[:1000], swapped[1000:2000] = blob[1000:2000], blob[:1000]
    for other in (flipped, swapped, blob[:-1]):
        assert digest_root(chunk_digests(other, 1000)) != root
    assert digest_root(chunk_digests(blob.copy(), 1000)) == root


def test_corrupted_served_blob_is_never_loaded(server_and_endpoints):
    """A byte of the served blob changes after the version was sealed (memory corruption, a buffer
    reused too early): the client's chunk digests no longer give the announced root."""
    ctx, server, ann, fetch, _ = server_and_endpoints
    server.publish(pack_state_dict(state(0), version=0, dtype=WeightDtype.FLOAT32, chunk_bytes=97, sender="l"))
    c = client(ctx, ann, fetch)
    try:
        announce = c.poll_announcements(timeout_s=3.0)
        server._versions[0].blob[500] ^= 0x01
        with pytest.raises(WeightSyncError, match="sha256"):
            c.fetch(announce)
        server._versions[0].blob[500] ^= 0x01
        got = c.fetch(announce)  # the same client, once the bytes are right again
        assert torch.equal(got.tensors["embed.weight"], state(0)["embed.weight"])
    finally:
        c.close()


class FakeLearner:
    """A ROUTER answering chunk requests from ``packed``; ``tamper(index, attempt)`` returns the
    frames to send instead of the honest reply (None = honest)."""

    def __init__(self, ctx, packed, tamper):
        import threading

        self.packed, self.tamper = packed, tamper
        self.router = make_socket(ctx, zmq.ROUTER, bind="tcp://127.0.0.1:*", max_message_bytes=1 << 24, hwm=64)
        self.endpoint = self.router.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.attempts: dict[int, int] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def honest(self, index, version=None, data=None):
        return encode(
            WeightsChunk(
                version=self.packed.announce.version if version is None else version,
                chunk_index=index,
                data=self.packed.chunk(index) if data is None else data,
            )
        )

    def run(self):
        while not self.stop.is_set():
            if not self.router.poll(50):
                continue
            route, *frames = self.router.recv_multipart()
            request = decode(frames)
            i = request.chunk_index
            self.attempts[i] = self.attempts.get(i, 0) + 1
            reply = self.tamper(self, i, self.attempts[i])
            reply = [self.honest(i)] if reply is None else reply
            for message in reply:
                self.router.send_multipart([route, *message])

    def close(self):
        self.stop.set()
        self.thread.join(2)
        self.router.close(0)


def fetch_from_fake(tamper, *, credit=2, timeout_s=0.5):
    ctx = zmq.Context()
    packed = pack_state_dict(state(4), version=4, dtype=WeightDtype.FLOAT32, chunk_bytes=97, sender="l")
    fake = FakeLearner(ctx, packed, tamper)
    metrics = ServiceMetrics("generator", "g")
    c = WeightClient(
        ctx,
        announce_endpoint=f"tcp://127.0.0.1:{free_port()}",
        fetch_endpoint=fake.endpoint,
        inbox_metrics=metrics,
        sender="g",
        credit=credit,
        timeout_s=timeout_s,
        max_message_bytes=1 << 24,
        hwm=16,
        max_retries=3,
    )
    try:
        return c.fetch(packed.announce), fake, metrics
    finally:
        c.close()
        fake.close()
        ctx.term()


def test_flipped_byte_in_transit_is_never_loaded():
    def flip(fake, index, attempt):
        if index == 7:
            data = bytearray(fake.packed.chunk(7))
            data[3] ^= 0x80
            return [fake.honest(7, data=bytes(data))]
        return None

    with pytest.raises(WeightSyncError, match="sha256"):
        fetch_from_fake(flip)


def test_chunk_of_another_version_is_never_loaded():
    """The right index and the requested version number, but another version's bytes."""
    other = pack_state_dict(state(5), version=5, dtype=WeightDtype.FLOAT32, chunk_bytes=97, sender="l")

    def mixed(fake, index, attempt):
        return [fake.honest(index, data=other.chunk(index))] if index == 2 else None

    with pytest.raises(WeightSyncError, match="sha256"):
        fetch_from_fake(mixed)


def test_truncated_chunk_fails_the_fetch():
    def short(fake, index, attempt):
        return [fake.honest(index, data=bytes(fake.packed.chunk(index))[:-1])] if index == 1 else None

    with pytest.raises(WeightSyncError, match="bytes, expected"):
        fetch_from_fake(short)


def test_stray_and_malformed_replies_are_skipped_and_lost_chunks_re_requested():
    """A reply tagged with another version is ignored, a chunk with an extra frame is rejected
    (counted) and re-requested after the timeout, a dropped reply too; the fetch then verifies."""

    def misbehave(fake, index, attempt):
        if index == 0 and attempt == 1:
            return [fake.honest(0, version=3), fake.honest(0)]  # a late reply of another version first
        if index == 5 and attempt == 1:
            return [[*fake.honest(5), b"extra"]]
        if index == 9 and attempt == 1:
            return []  # lost
        return None

    got, fake, metrics = fetch_from_fake(misbehave, timeout_s=0.3)
    assert torch.equal(got.tensors["embed.weight"], state(4)["embed.weight"])
    assert fake.attempts[5] == 2 and fake.attempts[9] == 2 and fake.attempts[0] == 1
    assert metrics.registry.get_sample_value("streamrl_generator_messages_rejected_total", {"reason": "malformed"}) == 1


STALLED_CLIENT = """
import sys, zmq
from streamrl.common.messages import WeightsChunkRequest
from streamrl.common.transport import send
ctx = zmq.Context()
d = ctx.socket(zmq.DEALER)
d.setsockopt(zmq.RCVHWM, 1)
d.setsockopt(zmq.RCVBUF, 65536)
d.setsockopt(zmq.LINGER, 0)
d.connect(sys.argv[1])
print("ready", flush=True)
for line in sys.stdin:  # "version count": count requests for chunk 0, never a read
    version, count = map(int, line.split())
    for _ in range(count):
        send(d, WeightsChunkRequest(sender="stalled", version=version, chunk_index=0))
    print("sent", flush=True)
"""


def resident_bytes() -> int:
    import os

    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
def test_a_client_that_never_reads_does_not_grow_the_learner(server_and_endpoints):
    """A generator asks for a 4 MB chunk of every new version and never reads the
    replies. Each queued reply used to keep its whole version's blob alive (64 per peer), so the
    learner grew by a blob per version (252 MB over the last 30 of these 40 before this change); now replies come
    from the pooled blobs and one peer's queue is capped, so once the pool is full more versions cost nothing,
    the drops are counted, the stalled peer is shown, and another generator still fetches."""
    import gc
    import subprocess
    import sys
    import time

    ctx, server, ann, fetch, metrics = server_and_endpoints
    stalled = subprocess.Popen(
        [sys.executable, "-c", STALLED_CLIENT, fetch], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    healthy = client(ctx, ann, fetch, credit=2)
    blob_bytes = 4 * 1024 * 1024
    try:
        assert stalled.stdout.readline().strip() == "ready"

        def version(v):
            g = torch.Generator().manual_seed(v)
            return {"w": torch.randn(blob_bytes // 4, generator=g)}

        resident = {}
        for v in range(40):
            server.publish(
                pack_state_dict(version(v), version=v, dtype=WeightDtype.FLOAT32, chunk_bytes=blob_bytes, sender="l")
            )
            stalled.stdin.write(f"{v} 1\n")
            stalled.stdin.flush()
            assert stalled.stdout.readline().strip() == "sent"
            time.sleep(0.05)  # the server answers (or drops) before the next version retires this one
            if v == 39:  # more requests than the queue and the waiting requests may hold: some are dropped
                stalled.stdin.write("39 20\n")
                stalled.stdin.flush()
                assert stalled.stdout.readline().strip() == "sent"
            if v in (9, 39):  # by version 9 the pool and the peer's queue are full
                time.sleep(0.5)
                gc.collect()
                resident[v] = resident_bytes()
        grown = resident[39] - resident[9]
        # 252 MB before; a few blobs of slack for the allocator (freed tensors it keeps mapped)
        assert grown < 5 * blob_bytes, f"30 more versions grew the learner by {grown / 1e6:.0f} MB"
        got = healthy.fetch(wait_for_version(healthy, 39))
        assert torch.equal(got.tensors["w"], version(39)["w"])
        sample = metrics.registry.get_sample_value
        assert sample("streamrl_learner_weight_replies_dropped_total", {"reason": "peer_full"}) > 0
        assert sample("streamrl_learner_weight_stalled_peers") == 1
        # chunks queued to the stalled peer (exported with each announcement, every 0.1 s here)
        assert 0 < sample("streamrl_learner_weight_queued_bytes") <= server.peer_max_bytes
    finally:
        healthy.close()
        stalled.kill()
        stalled.wait()


def test_weight_server_metrics_are_the_readme_row():
    """The metrics the weight server adds to the learner's registry are the row of docs/metrics.md for it."""
    from support import documented_metrics, metric_names

    bare = metric_names(ServiceMetrics("learner", "l").registry)
    ctx = zmq.Context()
    metrics = ServiceMetrics("learner", "l")
    server, _, _ = server_for(ctx, metrics)
    try:
        added = {name.removeprefix("streamrl_learner_") for name in metric_names(metrics.registry) - bare}
    finally:
        server.close()
        ctx.term()
    assert added == documented_metrics("learner's weight server")


class TiedModel(torch.nn.Module):
    """An embedding tied to the output head, a hidden layer and a buffer (as in a causal LM)."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.embed = torch.nn.Embedding(300, 100, dtype=dtype)
        self.mlp = torch.nn.Linear(7, 1000, bias=False, dtype=dtype)
        self.head = torch.nn.Linear(100, 300, bias=False, dtype=dtype)
        self.head.weight = self.embed.weight
        self.register_buffer("positions", torch.zeros(5, dtype=dtype))


def tied_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    embed = torch.randn(300, 100, generator=g)
    return {
        "embed.weight": embed,
        "mlp.weight": torch.randn(1000, 7, generator=g),
        "head.weight": embed,
        "positions": torch.arange(5.0) + seed,
    }


def test_load_into_adopts_the_receive_buffer_and_fetches_into_the_other():
    """A CPU float32 model takes views of the receive buffer (no copy; the tied head follows the
    embedding); the next fetch goes into the other buffer, so the model's weights do not change
    until that version is loaded; two buffers serve any number of versions."""
    ctx = zmq.Context()
    server, ann, fetch = server_for(ctx, ServiceMetrics("learner", "l"))
    c = client(ctx, ann, fetch, credit=3)
    model = TiedModel()
    try:
        for v in range(4):
            server.publish_state_dict(tied_state(v), v)
            got = c.fetch(wait_for_version(c, v))
            if v:  # fetched, not loaded: the model still runs version v - 1
                assert torch.equal(model.mlp.weight, tied_state(v - 1)["mlp.weight"])
            missing, unexpected = c.load_into(model, got)
            assert (missing, unexpected) == (["head.weight"], [])  # as load_state_dict(strict=False) says
            want = tied_state(v)
            for name in ("embed.weight", "mlp.weight", "positions"):
                assert torch.equal(model.state_dict()[name], want[name])
                assert model.state_dict()[name].data_ptr() == got.tensors[name].data_ptr()  # a view, not a copy
            assert model.head.weight is model.embed.weight and isinstance(model.mlp.weight, torch.nn.Parameter)
            assert got.slot == v % 2
        assert c.buffers_allocated == 2
    finally:
        c.close()
        server.close()
        ctx.term()


def test_load_into_copies_what_it_cannot_adopt_and_refuses_a_misfit(server_and_endpoints):
    ctx, server, ann, fetch, _ = server_and_endpoints
    server.publish(pack_state_dict(tied_state(3), version=0, dtype=WeightDtype.FLOAT32, chunk_bytes=4096, sender="l"))
    c = client(ctx, ann, fetch)
    try:
        got = c.fetch(c.poll_announcements(timeout_s=3.0))
        half = TiedModel(dtype=torch.bfloat16)  # another dtype: cast and copied, the buffer stays the client's
        c.load_into(half, got)
        assert torch.equal(half.mlp.weight, tied_state(3)["mlp.weight"].to(torch.bfloat16))
        assert c.fetch(c.latest).slot == 0  # nothing adopted: the same buffer again
        small = TiedModel()
        small.mlp = torch.nn.Linear(7, 999, bias=False)
        before = small.embed.weight.clone()
        with pytest.raises(RuntimeError, match="mlp.weight: shape"):
            c.load_into(small, got)
        assert torch.equal(small.embed.weight, before)  # refused before anything was loaded
    finally:
        c.close()
