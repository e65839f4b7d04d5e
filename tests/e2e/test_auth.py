"""End to end with ``security.keys_dir``: the four services train over CURVE, and a client with no
key or with an unknown key gets nothing from any bound socket, each refusal counted and logged.

Bound sockets: the scorer's PULL (rollouts), the buffer's PULL (scored rollouts) and ROUTER
(batch requests), the learner's weights ROUTER (chunks) and announce PUB. Each intruder
(no key; a valid CURVE pair that is not on the allow-list) subscribes to the announcements,
asks the buffer for a batch, asks the learner for a weight chunk and pushes frames into both
PULL sockets. A client with an authorized key then does the same (the control: the same
probes do see announcements, chunks and frames reaching the decoders).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import zmq
import zmq.auth

from streamrl.common.messages import BatchRequest, WeightsAnnounce, WeightsChunk, WeightsChunkRequest, decode, encode
from streamrl.common.security import generate_keys
from streamrl.testing import local_run_config, scrape, wait_until, write_config

pytestmark = pytest.mark.slow

GARBAGE = [b"\x93not-a-streamrl-message"]
WAIT_S = 3.0


def trained_steps(tmp_path: Path) -> int:
    path = tmp_path / "run" / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def client_socket(ctx: zmq.Context, kind: int, endpoint: str, keys_dir: Path, client: str | None) -> zmq.Socket:
    """A raw socket (no IMMEDIATE: messages queue before the handshake and would go out after it);
    CURVE with ``clients/<client>.key_secret`` and our server key, or no security when ``client`` is None."""
    sock = ctx.socket(kind)
    sock.linger = 0
    if client is not None:
        sock.curve_serverkey = zmq.auth.load_certificate(keys_dir / "server.key")[0]
        sock.curve_publickey, sock.curve_secretkey = zmq.auth.load_certificate(
            keys_dir / "clients" / f"{client}.key_secret"
        )
    if kind == zmq.SUB:
        sock.subscribe(b"")
    sock.connect(endpoint)
    return sock


def send_frames(sock: zmq.Socket, frames) -> None:
    sock.send_multipart(list(frames), flags=zmq.NOBLOCK)


def decoder_rejections(port: int) -> float:
    """Messages that reached a service's decoder and were rejected as malformed (what GARBAGE is)."""
    return sum(v for k, v in scrape(port).items() if k.endswith("_messages_rejected_total{reason=malformed}"))


def test_unauthenticated_clients_get_nothing_from_any_service(tmp_path, tiny_model_dir, services):
    keys = tmp_path / "keys"
    generate_keys(keys, ["generator", "scorer", "learner", "intruder"])
    (keys / "authorized" / "intruder.key").unlink()  # a well-formed pair the servers do not know
    sections = local_run_config(  # the scorer starts faster without a model; CURVE is the claim
        tmp_path,
        tiny_model_dir,
        reference_in_scorer=False,
        security={"keys_dir": str(keys)},
        learner={"total_steps": 1000},
    )
    procs = services(write_config(tmp_path / "run.toml", sections))
    for name in ("learner", "buffer", "scorer", "generator"):
        procs.start(name)
    ports, ep = sections["metrics"], sections["endpoints"]
    # training runs over CURVE: the generator fetched weights, rollouts reached the learner
    assert wait_until(lambda: trained_steps(tmp_path) >= 2, timeout=120), procs.logs()

    bound = {  # service -> (metrics port, endpoints it binds)
        "scorer": (ports["scorer_port"], [ep["scorers"][0]]),
        "buffer": (ports["buffer_port"], [ep["buffer"], ep["batches"]]),
        "learner": (ports["learner_port"], [ep["weights_announce"], ep["weights"]]),
    }
    pull_endpoints = (ep["scorers"][0], ep["buffer"])
    before = {s: decoder_rejections(port) for s, (port, _) in bound.items() if s != "learner"}
    ctx = zmq.Context()
    try:
        probes = []
        for client in (None, "intruder"):
            sub = client_socket(ctx, zmq.SUB, ep["weights_announce"], keys, client)
            weights = client_socket(ctx, zmq.DEALER, ep["weights"], keys, client)
            send_frames(weights, encode(WeightsChunkRequest(sender="x", version=0, chunk_index=0)))
            batches = client_socket(ctx, zmq.DEALER, ep["batches"], keys, client)
            send_frames(batches, encode(BatchRequest(sender="x", learner_version=0, num_groups=1)))
            pushes = [client_socket(ctx, zmq.PUSH, endpoint, keys, client) for endpoint in pull_endpoints]
            for push in pushes:
                send_frames(push, GARBAGE)
            probes.append((sub, weights, batches, *pushes))
        deadline = time.monotonic() + WAIT_S
        for sub, weights, batches, *_pushes in probes:  # nothing comes back on any of them
            for sock in (sub, weights, batches):
                assert not sock.poll(max(0, int((deadline - time.monotonic()) * 1000))), "an intruder got a reply"
        # nothing they sent reached a decoder
        assert {s: decoder_rejections(bound[s][0]) for s in before} == before

        # each refusal is counted per reason and endpoint by the service that owns the socket ...
        def counted(service: str, reason: str, endpoint: str) -> float:
            return scrape(bound[service][0]).get(
                f"streamrl_{service}_auth_rejected_total{{endpoint={endpoint},reason={reason}}}", 0.0
            )

        for service, (_port, endpoints) in bound.items():
            for endpoint in endpoints:
                for reason in ("no_key", "unknown_key"):
                    assert wait_until(lambda s=service, r=reason, e=endpoint: counted(s, r, e) >= 1, timeout=5), (
                        service,
                        endpoint,
                        reason,
                        scrape(bound[service][0]),
                    )
        # ... and logged, the unknown key named
        intruder_key = zmq.auth.load_certificate(keys / "clients" / "intruder.key")[0].decode()
        logs = {s: (tmp_path / f"{s}-0.log").read_text() for s in bound}
        for service, (_port, endpoints) in bound.items():
            for endpoint in endpoints:
                assert f"refused a connection on {endpoint} (no_key" in logs[service], logs[service][-3000:]
                assert f"refused a connection on {endpoint} (unknown_key" in logs[service]
            assert intruder_key in logs[service]

        # the control: with an authorized key the same probes are answered and reach the decoders
        sub = client_socket(ctx, zmq.SUB, ep["weights_announce"], keys, "generator")
        assert sub.poll(10_000), "no announcement for an authorized subscriber"
        announce = decode(sub.recv_multipart(), expected=(WeightsAnnounce,))
        weights = client_socket(ctx, zmq.DEALER, ep["weights"], keys, "generator")
        send_frames(weights, encode(WeightsChunkRequest(sender="x", version=announce.version, chunk_index=0)))
        assert weights.poll(10_000)
        assert isinstance(decode(weights.recv_multipart()), WeightsChunk)
        batches = client_socket(ctx, zmq.DEALER, ep["batches"], keys, "learner")
        send_frames(batches, GARBAGE)
        pushes = [client_socket(ctx, zmq.PUSH, endpoint, keys, "scorer") for endpoint in pull_endpoints]
        for push in pushes:
            send_frames(push, GARBAGE)
        assert wait_until(lambda: decoder_rejections(bound["scorer"][0]) == before["scorer"] + 1, timeout=10)
        assert wait_until(lambda: decoder_rejections(bound["buffer"][0]) == before["buffer"] + 2, timeout=10)
    finally:
        ctx.destroy(0)

    # training went on through all of it, and nothing crashed
    steps = trained_steps(tmp_path)
    assert wait_until(lambda: trained_steps(tmp_path) > steps, timeout=60), procs.logs()
    assert all(p.poll() is None for p in procs.procs.values()), procs.logs()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, len(records) + 1))
