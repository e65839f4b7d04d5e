"""End to end: 10,000 hostile messages into every socket the services bind; all stay up.

Learner, buffer, scorer and a generator run as processes on loopback. The test sends
hostile messages (tests/fuzz_frames.py) to the scorer's PULL (takes Rollout), the
buffer's PULL (ScoredRollout) and ROUTER (BatchRequest) and the learner's weights
ROUTER (WeightsChunkRequest). For each message it predicts the rejection reason with the
decoder (the socket's kind, the configured size limit), or the service's own reason
for a message the decoder accepts but the service refuses (a batch of more groups than
the buffer holds, a chunk of a version not held or past the end, a rollout id already
accepted, a token id past the learner's vocabulary); fuzz messages that turn out valid are not sent (they
would be real traffic).
Every service's ``messages_rejected_total{reason}`` must then equal the prediction,
reason by reason. Frames larger than ``transport.max_message_bytes`` never reach
Python: libzmq (``ZMQ_MAXMSGSIZE``) drops the connection that sent them. Afterwards
every process is alive, the learner keeps stepping and a weight fetch verifies.
"""

from __future__ import annotations

import collections
import os
import socket
import struct
import time

import numpy as np
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from fuzz_frames import frames_of, hostile
from streamrl.common import messages as m
from streamrl.common.messages import ProtocolError
from streamrl.common.metrics import ServiceMetrics
from streamrl.common.weights import WeightClient, WeightSyncError
from streamrl.testing import local_run_config, scrape, wait_until, write_config

pytestmark = pytest.mark.slow

MAX_MESSAGE_BYTES = 1024 * 1024  # ZMQ_MAXMSGSIZE and the decoders' limit
CHUNK_BYTES = 128 * 1024  # weight chunks fit under it
CAPACITY_GROUPS = 8
PER_SOCKET = 2_500  # x 4 sockets = 10,000 fuzz messages, plus the service-level ones
SERVICE_LEVEL = 20  # duplicates and out-of-range chunk requests
SEND_TIMEOUT_MS = 30_000
# Weight requests in flight (sent, not yet answered), as a WeightClient keeps its credit: the learner
# drops replies to a peer with 64 queued (weight_replies_dropped_total{reason="peer_full"}), and on 2
# loaded cores its weight-server thread can answer a burst of an unbounded flood faster than libzmq's
# I/O thread writes the replies out, so 1-35 of 2,500 were dropped (counted, logged "is not reading").
WEIGHTS_IN_FLIGHT = 16


class Target:
    """One bound socket under fuzz: our connected socket, what it takes, whose metrics count."""

    def __init__(self, name: str, ctx: zmq.Context, kind: int, endpoint: str, expects: type[m.Message], service: str):
        self.name, self.expects, self.service = name, expects, service
        self.sock = ctx.socket(kind)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.connect(endpoint)
        self.sent = 0
        self.predicted: collections.Counter = collections.Counter()

    def send(self, frames: list[bytes], reason: str) -> None:
        self.sock.send_multipart(frames or [b""])  # zmq cannot send zero frames; one empty frame is as bad
        self.sent += 1
        self.predicted[reason] += 1


def decoder_reason(frames: list[bytes], kind: type[m.Message]) -> tuple[str | None, m.Message | None]:
    """(reason, None) when the services' decoder rejects ``frames``, else (None, message)."""
    try:
        return None, m.decode(frames or [b""], expected=[kind], max_bytes=MAX_MESSAGE_BYTES)
    except ProtocolError as err:
        return err.reason.value, None


def service_reason(message: m.Message) -> str | None:
    """The reason a service refuses a message its decoder accepted; None: valid traffic (not sent)."""
    if isinstance(message, m.BatchRequest) and message.num_groups > CAPACITY_GROUPS:
        return "bad_value"
    if isinstance(message, m.WeightsChunkRequest) and message.version >= 10**6:
        return "unknown_version"  # the learner runs for minutes, not a million versions
    return None


def scored(rollout_id: str, group_id: str, bad_token: int) -> m.ScoredRollout:
    """A well-formed scored rollout of a group of 4; ``bad_token`` (if not 0) among its completion tokens."""
    rollout = m.Rollout(
        sender="fuzz",
        prompt_id=group_id,
        group_id=group_id,
        rollout_id=rollout_id,
        generator_id="fuzz",
        group_size=4,
        prompt_tokens=np.array([5, 6, 7], dtype=np.int32),
        completion_tokens=np.array([8, bad_token or 9, 1], dtype=np.int32),
        behaviour_logprobs=np.array([-1.0, -0.5, -2.0], dtype=np.float32),
        policy_version=0,
        finish_reason=m.FinishReason.STOP,
        sampling=m.SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=12),
    )
    return m.ScoredRollout(sender="fuzz", rollout=rollout, reward=1.0, scorer_id="fuzz")


def rejected(port: int, service: str) -> collections.Counter:
    prefix = f"streamrl_{service}_messages_rejected_total{{reason="
    return collections.Counter({k[len(prefix) : -1]: v for k, v in scrape(port).items() if k.startswith(prefix)})


def minus(after: collections.Counter, before: collections.Counter) -> collections.Counter:
    return collections.Counter({k: int(after[k] - before[k]) for k in after if after[k] - before[k]})


def zmtp_oversize_frame(endpoint: str, socket_type: bytes, frame_bytes: int, timeout: float = 10.0) -> bool:
    """Speak ZMTP 3.0 (NULL security) to a bound socket as a ``socket_type`` peer, then announce
    one message frame of ``frame_bytes`` bytes and send a little of it. True when the peer
    closes the connection (libzmq's ZMQ_MAXMSGSIZE check on the frame header), before any
    payload beyond the header is needed."""
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    greeting = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31
    prop = bytes([11]) + b"Socket-Type" + struct.pack(">I", len(socket_type)) + socket_type
    ready = b"\x05READY" + prop
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        deadline = time.monotonic() + timeout
        try:
            s.sendall(greeting + bytes([0x04, len(ready)]) + ready)
            s.sendall(b"\x02" + struct.pack(">Q", frame_bytes) + b"\x00" * 1024)  # long frame, last part
            while time.monotonic() < deadline:
                if not s.recv(65536):  # the server's greeting and READY come first, then EOF
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False
    return False


def test_ten_thousand_hostile_messages_every_service_counts_and_stays_up(tmp_path, tiny_model_dir, services):
    sections = local_run_config(
        tmp_path,
        tiny_model_dir,
        reference_in_scorer=False,  # the scorer starts faster without a model; the decoders are the claim
        transport={"max_message_bytes": MAX_MESSAGE_BYTES, "weight_chunk_bytes": CHUNK_BYTES},
        buffer={"capacity_groups": CAPACITY_GROUPS},
        # the tiny pipeline makes ~10 steps/s: no staleness limit, so no group is dropped while
        # members are in flight (late members would be refused, as group_discarded, by real traffic)
        run={"max_staleness": 1_000_000},
        learner={"total_steps": 1_000_000, "checkpoint_every": 1_000_000},
    )
    ports, ep = sections["metrics"], sections["endpoints"]
    procs = services(write_config(tmp_path / "run.toml", sections))
    for name in ("learner", "buffer", "scorer", "generator"):
        procs.start(name)
    metric_port = {"scorer": ports["scorer_port"], "buffer": ports["buffer_port"], "learner": ports["learner_port"]}

    def learner_step() -> float:
        try:
            return scrape(ports["learner_port"]).get("streamrl_learner_step", 0.0)
        except OSError:
            return 0.0

    # the pipeline is up and trains before any fuzz
    assert wait_until(lambda: learner_step() >= 1, timeout=180), procs.logs()
    before = {svc: rejected(port, svc) for svc, port in metric_port.items()}
    gen_errors_before = scrape(ports["generator_port"])["streamrl_generator_weight_sync_errors_total"]

    ctx = zmq.Context()
    started = time.perf_counter()
    try:
        targets = [
            Target("scorer-pull", ctx, zmq.PUSH, ep["scorers"][0], m.Rollout, "scorer"),
            Target("buffer-pull", ctx, zmq.PUSH, ep["buffer"], m.ScoredRollout, "buffer"),
            Target("buffer-router", ctx, zmq.DEALER, ep["batches"], m.BatchRequest, "buffer"),
            Target("weights-router", ctx, zmq.DEALER, ep["weights"], m.WeightsChunkRequest, "learner"),
        ]
        weights = targets[3]
        replies: collections.Counter = collections.Counter()

        def drain_replies(timeout_ms: int = 0) -> None:
            while weights.sock.poll(timeout_ms):
                timeout_ms = 0
                reply = m.decode(weights.sock.recv_multipart(), expected=[m.Error, m.WeightsChunk])
                replies[reply.code.value if isinstance(reply, m.Error) else "chunk"] += 1

        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(ep["weights_announce"])

        # the fuzz: per socket, PER_SOCKET messages the decoder or the service must refuse
        streams = [(t, hostile(t.expects, seed=100 + i, max_bytes=MAX_MESSAGE_BYTES)) for i, t in enumerate(targets)]
        skipped_valid = collections.Counter()
        categories: dict[str, collections.Counter] = {t.name: collections.Counter() for t in targets}

        def in_flight() -> int:
            return weights.sent - sum(replies.values())

        for _ in range(PER_SOCKET):
            deadline = time.monotonic() + 60
            while in_flight() >= WEIGHTS_IN_FLIGHT and time.monotonic() < deadline:
                drain_replies(100)
            for target, stream in streams:
                while True:
                    case = next(stream)
                    reason, message = decoder_reason(case.frames, target.expects)
                    if reason is None:
                        reason = service_reason(message)
                    if reason is not None:
                        break
                    skipped_valid[target.name] += 1
                target.send(case.frames, reason)
                categories[target.name][case.category] += 1
            drain_replies()

        # service-level refusals of well-formed messages: a rollout id the buffer already holds;
        # a group whose members 0 and 2 carry a token id past the vocabulary (the buffer takes
        # the group, the learner refuses those two and trains on the others)
        buffer_push = targets[1]
        buffer_push.sock.send_multipart(m.encode(scored("fuzz-dup", "fuzz-g1", 0)))  # accepted
        for _ in range(SERVICE_LEVEL):
            buffer_push.send(frames_of(scored("fuzz-dup", "fuzz-g1", 0)), "duplicate")
        for i in range(4):
            buffer_push.sock.send_multipart(m.encode(scored(f"fuzz-oov{i}", "fuzz-g2", 10**6 if i % 2 == 0 else 0)))
        oov_refused = 2
        # chunks past the end of the newest version: once the learner has answered all the fuzz
        # (its queue is empty), so the version is still held when these arrive (it is retired
        # two versions later)
        assert wait_until(lambda: (drain_replies(100), in_flight() == 0)[1], timeout=120), (
            replies,
            weights.sent,
            {k: v for k, v in scrape(ports["learner_port"]).items() if "weight" in k},
        )
        announce = None
        while sub.poll(0 if announce else 10_000):
            announce = m.decode(sub.recv_multipart(), expected=[m.WeightsAnnounce])
        assert announce is not None and announce.num_chunks >= 2  # several chunks of CHUNK_BYTES
        for i in range(SERVICE_LEVEL):
            request = m.WeightsChunkRequest(
                sender="fuzz", version=announce.version, chunk_index=announce.num_chunks + i
            )
            weights.send(frames_of(request), "out_of_range")
        sent_s = time.perf_counter() - started

        # every rejection counted, by reason, exactly as predicted
        predicted: dict[str, collections.Counter] = {svc: collections.Counter() for svc in metric_port}
        for t in targets:
            predicted[t.service].update(t.predicted)
        predicted["learner"]["bad_value"] += oov_refused
        total = sum(t.sent for t in targets)
        assert total >= 10_000 + 2 * SERVICE_LEVEL
        got: dict[str, collections.Counter] = {}

        def counted_as_predicted() -> bool:
            for svc, port in metric_port.items():
                got[svc] = minus(rejected(port, svc), before[svc])
            # the generator asking for a version retired meanwhile is refused as unknown_version too
            lagging = scrape(ports["generator_port"])["streamrl_generator_weight_sync_errors_total"] - gen_errors_before
            extra = got["learner"]["unknown_version"] - predicted["learner"]["unknown_version"]
            if 0 < extra <= lagging:
                got["learner"]["unknown_version"] -= extra
            return all(+got[svc] == +predicted[svc] for svc in metric_port)

        assert wait_until(counted_as_predicted, timeout=60), (
            "\n".join(f"{svc}: predicted {dict(predicted[svc])} got {dict(got[svc])}" for svc in metric_port)
            + "\n"
            + procs.logs()
        )
        counted_s = time.perf_counter() - started
        # the learner answered every request: BAD_REQUEST for what its decoder refused, else the refusal's code
        want_replies = collections.Counter()
        for r, n in weights.predicted.items():
            want_replies["bad_request" if r not in ("unknown_version", "out_of_range") else r] += n
        assert wait_until(lambda: (drain_replies(100), replies == want_replies)[1], timeout=30), (replies, want_replies)

        report = {
            t.name: {"sent": t.sent, "skipped_as_valid": skipped_valid[t.name], "rejected": dict(t.predicted)}
            for t in targets
        }
        print(f"\nfuzz: {total} messages sent in {sent_s:.1f}s, all counted after {counted_s:.1f}s")
        for name, row in report.items():
            print(f"  {name}: {row}")
        print("  categories:", {name: dict(c) for name, c in categories.items()})

        # ZMQ_MAXMSGSIZE: a frame over the limit is refused by libzmq, which drops the sending
        # connection; nothing reaches the decoders (the counts do not move)
        for endpoint, peer_type in (
            (ep["scorers"][0], b"PUSH"),
            (ep["buffer"], b"PUSH"),
            (ep["batches"], b"DEALER"),
            (ep["weights"], b"DEALER"),
            (ep["weights_announce"], b"SUB"),
        ):
            assert zmtp_oversize_frame(endpoint, peer_type, MAX_MESSAGE_BYTES + 1), endpoint
            assert zmtp_oversize_frame(endpoint, peer_type, 2**62), endpoint  # a claim no one could allocate
        big = ctx.socket(zmq.PUSH)
        big.setsockopt(zmq.LINGER, 0)
        monitor = big.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        big.connect(ep["scorers"][0])
        assert monitor.poll(10_000) and recv_monitor_message(monitor)["event"] == zmq.EVENT_CONNECTED
        big.send(os.urandom(MAX_MESSAGE_BYTES + 1))  # one real frame, one byte too large
        assert monitor.poll(10_000) and recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED
        big.disable_monitor()
        big.close(0)
        monitor.close(0)
        time.sleep(1.0)
        assert counted_as_predicted(), got

        # everyone is alive and valid traffic still flows: the learner keeps stepping
        # (generator -> scorer -> buffer -> learner) and a weight fetch verifies its sha256
        assert all(p.poll() is None for p in procs.procs.values()), procs.logs()
        step = learner_step()
        assert wait_until(lambda: learner_step() >= step + 2, timeout=120), procs.logs()
        client = WeightClient(
            ctx,
            announce_endpoint=ep["weights_announce"],
            fetch_endpoint=ep["weights"],
            inbox_metrics=ServiceMetrics("generator", "fuzz-check"),
            sender="fuzz-check",
            credit=2,
            timeout_s=5.0,
            max_message_bytes=MAX_MESSAGE_BYTES,
            hwm=64,
        )
        try:
            for attempt in range(5):  # the tiny learner steps ~10 times a second: a version may retire mid-fetch
                latest = client.poll_announcements(timeout_s=5.0)
                try:
                    fetched = client.fetch(latest)  # verifies the sha256 of the blob
                    break
                except WeightSyncError as err:
                    assert "retired" in str(err) and attempt < 4, err
            assert fetched.version >= announce.version + 2 and fetched.nbytes == latest.total_bytes
        finally:
            client.close()
        assert all(p.poll() is None for p in procs.procs.values()), procs.logs()
        sub.close(0)
        for t in targets:
            t.sock.close(0)
    finally:
        ctx.destroy(0)
