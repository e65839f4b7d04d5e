"""CURVE keys, the ZAP allow-list and refusal accounting, over real loopback sockets."""

from __future__ import annotations

import logging
import socket
import stat
import threading

import pytest
import zmq
import zmq.auth

from streamrl.common.messages import BatchRequest, decode
from streamrl.common.metrics import ServiceMetrics
from streamrl.common.security import Security, SecurityError, authorize, generate_keys, load_allow_list
from streamrl.common.transport import make_socket, send
from streamrl.testing import free_port, wait_until

LIMITS = {"max_message_bytes": 1 << 20, "hwm": 8}


@pytest.fixture
def keys(tmp_path):
    """A keys folder with the server pair and client pairs ``good`` and ``other``; only ``good`` authorized."""
    root = tmp_path / "keys"
    generate_keys(root, ["good", "other"])
    (root / "authorized" / "other.key").unlink()
    return root


class Process:
    """One 'process': a context, its metrics and its Security (closed in the right order)."""

    def __init__(self, keys_dir, client_name: str, service: str = "buffer"):
        self.ctx = zmq.Context()
        self.metrics = ServiceMetrics(service, f"{service}-0")
        self.security = Security(self.ctx, keys_dir, client_name, self.metrics) if keys_dir else None
        self.sockets: list[zmq.Socket] = []

    def socket(self, kind, **kw) -> zmq.Socket:
        sock = make_socket(self.ctx, kind, security=self.security, **LIMITS, **kw)
        self.sockets.append(sock)
        return sock

    def rejected(self, reason: str, endpoint: str) -> float:
        value = self.metrics.registry.get_sample_value(
            f"streamrl_{self.metrics.service}_auth_rejected_total", {"reason": reason, "endpoint": endpoint}
        )
        return value or 0.0

    def close(self):
        for sock in self.sockets:
            sock.close(0)
        if self.security is not None:
            self.security.close()
        self.ctx.term()


@pytest.fixture
def processes():
    made: list[Process] = []

    def make(*args, **kw) -> Process:
        made.append(Process(*args, **kw))
        return made[-1]

    yield make
    for p in reversed(made):
        p.close()


def request(version: int) -> BatchRequest:
    return BatchRequest(sender="t", learner_version=version, num_groups=1)


def test_generate_writes_pairs_with_private_secrets_and_an_allow_list(tmp_path):
    root = tmp_path / "keys"
    written = generate_keys(root, ["generator", "learner"])
    assert {p.relative_to(root).as_posix() for p in written} == {
        "server.key",
        "server.key_secret",
        "clients/generator.key",
        "clients/generator.key_secret",
        "clients/learner.key",
        "clients/learner.key_secret",
        "authorized/generator.key",
        "authorized/learner.key",
    }
    for path in root.rglob("*.key_secret"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    # round trip: the public file holds the public half of the secret file; Z85 keys are 40 chars
    public, secret = zmq.auth.load_certificate(root / "server.key_secret")
    assert zmq.auth.load_certificate(root / "server.key") == (public, None)
    assert len(public) == len(secret) == 40 and zmq.curve_public(secret) == public
    clients = {zmq.auth.load_certificate(root / "clients" / f"{n}.key")[0] for n in ("generator", "learner")}
    assert load_allow_list(root / "authorized") == clients
    assert public not in clients
    # a second run keeps every key and adds the new client; --force replaces the server pair
    assert [p.name for p in generate_keys(root, ["generator", "scorer"])] == [
        "scorer.key",
        "scorer.key_secret",
        "scorer.key",
    ]
    assert zmq.auth.load_certificate(root / "server.key")[0] == public
    assert len(load_allow_list(root / "authorized")) == 3
    generate_keys(root, [], force=True)
    assert zmq.auth.load_certificate(root / "server.key")[0] != public
    with pytest.raises(SecurityError, match="plain file name"):
        generate_keys(tmp_path / "other", ["../escape"])


def test_authorize_copies_public_keys_only(keys):
    other = keys / "clients" / "other.key"
    assert zmq.auth.load_certificate(other)[0] not in load_allow_list(keys / "authorized")
    target = authorize(keys, other)
    assert target == keys / "authorized" / "other.key"
    assert zmq.auth.load_certificate(other)[0] in load_allow_list(keys / "authorized")
    with pytest.raises(SecurityError, match="secret key"):
        authorize(keys, keys / "clients" / "other.key_secret")
    with pytest.raises(SecurityError, match="cannot read"):
        authorize(keys, keys / "clients" / "missing.key")


def test_missing_key_files_are_reported_with_the_fix(keys, tmp_path):
    ctx = zmq.Context()
    try:
        with pytest.raises(SecurityError, match="streamrl keys generate"):
            Security(ctx, tmp_path / "nowhere", "good", ServiceMetrics("buffer", "b"))
        # a host with only the public server key can connect but cannot bind
        (keys / "server.key_secret").unlink()
        security = Security(ctx, keys, "good", ServiceMetrics("buffer", "b"))
        with pytest.raises(SecurityError, match="server.key_secret"):
            make_socket(ctx, zmq.PULL, bind=f"tcp://127.0.0.1:{free_port()}", security=security, **LIMITS)
        with pytest.raises(SecurityError, match="nobody.key_secret"):
            make_socket(
                ctx,
                zmq.PUSH,
                connect=["tcp://127.0.0.1:1"],
                **LIMITS,
                security=Security(ctx, keys, "nobody", ServiceMetrics("scorer", "s")),
            )
        security.close()
    finally:
        ctx.destroy(0)


class Recorder:
    """A TCP relay 127.0.0.1:port -> target that records every byte the client sends."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.seen = bytearray()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        client, _ = self.listener.accept()
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()
        self._pipe(client, upstream, True)

    def _pipe(self, src, dst, record):
        try:
            while data := src.recv(65536):
                if record:
                    self.seen += data
                dst.sendall(data)
        except OSError:
            pass


@pytest.mark.parametrize("secure", [True, False])
def test_authorized_client_exchanges_messages_encrypted_on_the_wire(keys, processes, secure):
    server = processes(keys if secure else None, "server", "buffer")
    client = processes(keys if secure else None, "good", "scorer")
    port = free_port()
    pull = server.socket(zmq.PULL, bind=f"tcp://127.0.0.1:{port}")
    relay = Recorder(port)
    push = client.socket(zmq.PUSH, connect=[f"tcp://127.0.0.1:{relay.port}"])
    marker = "needle-in-the-wire-0123456789"
    for version in range(3):
        message = request(version)
        message.sender = marker
        send(push, message)
    got = []
    while len(got) < 3 and pull.poll(5000):
        got.append(decode(pull.recv_multipart()))
    assert [m.learner_version for m in got] == [0, 1, 2]
    assert all(m.sender == marker for m in got)
    assert len(relay.seen) > 100
    # with CURVE the payload is encrypted; without it the field is readable on the wire
    assert (marker.encode() in relay.seen) is not secure
    assert (b"CURVE" in relay.seen[:64]) is secure


def test_unknown_key_gets_nothing_and_is_counted_and_logged(keys, processes, caplog):
    server = processes(keys, "server", "learner")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    pub = server.socket(zmq.PUB, bind=endpoint)
    intruder = processes(keys, "other", "generator")  # a valid pair, but not on the allow-list
    sub = intruder.socket(zmq.SUB, connect=[endpoint], subscribe=b"")
    friend = processes(keys, "good", "generator")
    good_sub = friend.socket(zmq.SUB, connect=[endpoint], subscribe=b"")
    with caplog.at_level(logging.WARNING, logger="streamrl.common.security"):
        assert wait_until(lambda: server.rejected("unknown_key", endpoint) >= 1, timeout=5)
        for version in range(20):  # slow joiner: keep publishing until the friend hears one
            send(pub, request(version))
            if good_sub.poll(100):
                break
        assert isinstance(decode(good_sub.recv_multipart()), BatchRequest)
        assert not sub.poll(500), "an unauthorized subscriber received a message"
    assert server.rejected("unknown_key", endpoint) <= 2  # refused again at most after REDIAL_FIRST_S (backoff)
    other = zmq.auth.load_certificate(keys / "clients" / "other.key")[0].decode()
    assert any("unknown_key" in r.message and other in r.message and endpoint in r.message for r in caplog.records), (
        caplog.text
    )
    # the intruder's own side says why it cannot connect
    assert wait_until(
        lambda: (
            intruder.metrics.registry.get_sample_value(
                "streamrl_generator_auth_failed_total", {"reason": "key_refused", "endpoint": endpoint}
            )
            >= 1
        ),
        timeout=5,
    )


def test_key_added_to_the_allow_list_is_accepted_without_restart(keys, processes):
    server = processes(keys, "server", "buffer")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    router = server.socket(zmq.ROUTER, bind=endpoint)
    late = processes(keys, "other", "learner")
    authorize(keys, keys / "clients" / "other.key")
    dealer = late.socket(zmq.DEALER, connect=[endpoint])
    send(dealer, request(7))
    assert router.poll(5000)
    frames = router.recv_multipart()
    assert decode(frames[1:]).learner_version == 7
    assert server.rejected("unknown_key", endpoint) == 0


def test_client_without_keys_gets_nothing_and_is_counted(keys, processes, caplog):
    server = processes(keys, "server", "buffer")
    port = free_port()
    endpoint = f"tcp://*:{port}"  # counted under the bind string (libzmq itself says tcp://0.0.0.0:port)
    router = server.socket(zmq.ROUTER, bind=endpoint)
    plain = processes(None, "-", "learner")
    dealer = plain.socket(zmq.DEALER, connect=[f"tcp://127.0.0.1:{port}"])
    with caplog.at_level(logging.WARNING, logger="streamrl.common.security"):
        assert wait_until(lambda: server.rejected("no_key", endpoint) >= 1, timeout=5)
    with pytest.raises(zmq.Again):  # IMMEDIATE: nothing is queued for a peer that never connected
        send(dealer, request(1), flags=zmq.NOBLOCK)
    assert not router.poll(500)
    assert any("no_key" in r.message and endpoint in r.message for r in caplog.records), caplog.text


def test_client_with_a_wrong_server_key_is_counted_as_bad_handshake(keys, processes, tmp_path):
    server = processes(keys, "server", "scorer")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    pull = server.socket(zmq.PULL, bind=endpoint)
    impostor_keys = tmp_path / "impostor"
    generate_keys(impostor_keys, ["good"])  # another cluster's server key
    client = processes(impostor_keys, "good", "generator")
    push = client.socket(zmq.PUSH, connect=[endpoint])
    assert wait_until(lambda: server.rejected("bad_handshake", endpoint) >= 2, timeout=5)  # it keeps retrying
    with pytest.raises(zmq.Again):
        send(push, request(1), flags=zmq.NOBLOCK)
    assert not pull.poll(200)


def test_weight_push_over_curve_and_a_keyless_generator_gets_nothing(keys, processes):
    import torch

    from streamrl.common.messages import WeightsChunkRequest
    from streamrl.common.modes import WeightDtype
    from streamrl.common.weights import WeightClient, WeightServer, pack_state_dict

    learner = processes(keys, "learner", "learner")
    ann, fetch = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    server = WeightServer(
        learner.ctx,
        announce_endpoint=ann,
        fetch_endpoint=fetch,
        metrics=learner.metrics,
        sender="learner-0",
        announce_interval_s=0.1,
        security=learner.security,
        **LIMITS,
    )
    weights = {"w": torch.arange(3000, dtype=torch.float32)}
    server.publish(pack_state_dict(weights, version=4, dtype=WeightDtype.FLOAT32, chunk_bytes=4096, sender="l"))

    def client(proc):
        return WeightClient(
            proc.ctx,
            announce_endpoint=ann,
            fetch_endpoint=fetch,
            inbox_metrics=proc.metrics,
            sender=proc.metrics.instance,
            credit=2,
            timeout_s=0.5,
            max_retries=1,
            security=proc.security,
            **LIMITS,
        )

    good = client(processes(keys, "good", "generator"))
    keyless = client(processes(None, "-", "generator"))
    try:
        announce = good.poll_announcements(timeout_s=5)
        assert announce is not None and announce.version == 4
        assert torch.equal(good.fetch(announce).tensors["w"], weights["w"])
        assert keyless.poll_announcements(timeout_s=1.0) is None
        with pytest.raises(zmq.Again):  # no connection to the weight server ever completes
            send(keyless.dealer, WeightsChunkRequest(sender="x", version=4, chunk_index=0), flags=zmq.NOBLOCK)
        for endpoint in (ann, fetch):
            assert learner.rejected("no_key", endpoint) >= 1
        assert server.chunks_served == announce.num_chunks
    finally:
        good.close()
        keyless.close()
        server.close()


def test_config_refuses_non_loopback_endpoints_without_keys(tmp_path):
    from streamrl.common.config import ConfigError, is_local_endpoint, load_config

    assert [
        is_local_endpoint(e)
        for e in (
            "tcp://127.0.0.1:1",
            "tcp://127.3.0.1:1",
            "tcp://localhost:1",
            "tcp://[::1]:1",
            "ipc:///tmp/x",
            "inproc://x",
        )
    ] == [True] * 6
    assert [
        is_local_endpoint(e)
        for e in ("tcp://*:1", "tcp://0.0.0.0:1", "tcp://10.0.0.5:1", "tcp://learner.example:1", "tcp://eth0:1")
    ] == [False] * 5
    load_config(None)  # the defaults bind to loopback
    with pytest.raises(ConfigError) as err:
        load_config(None, ['endpoints.bind.weights="tcp://0.0.0.0:5571"', 'endpoints.scorers=["tcp://10.0.0.2:1"]'])
    lines = str(err.value).splitlines()
    assert lines[0].startswith("2 problem(s)")
    assert "endpoints.scorers[0]: tcp://10.0.0.2:1 is not a loopback address" in lines[1]
    assert "endpoints.bind.weights: tcp://0.0.0.0:5571" in lines[2] and "security.allow_insecure" in lines[2]
    load_config(None, ['endpoints.bind.weights="tcp://0.0.0.0:5571"', "security.allow_insecure=true"])
    with pytest.raises(ConfigError, match="server.key does not exist; fix: streamrl keys generate"):
        load_config(None, [f'security.keys_dir="{tmp_path}"', 'endpoints.bind.weights="tcp://0.0.0.0:5571"'])
    generate_keys(tmp_path, ["learner"])
    config = load_config(None, [f'security.keys_dir="{tmp_path}"', 'endpoints.bind.weights="tcp://0.0.0.0:5571"'])
    assert config.security.keys_dir == str(tmp_path)


def test_cli_generates_and_authorizes(tmp_path, capsys):
    from streamrl.cli import build_parser

    def cli(*argv) -> int:
        args = build_parser().parse_args(list(argv))
        return args.func(args)

    assert cli("keys", "generate", "--dir", str(tmp_path / "k"), "--clients", "generator", "scorer") == 0
    assert "wrote" in capsys.readouterr().out
    assert {p.name for p in (tmp_path / "k" / "authorized").iterdir()} == {"generator.key", "scorer.key"}
    assert cli("keys", "generate", "--dir", str(tmp_path / "k"), "--clients", "generator") == 0
    assert "every key already exists" in capsys.readouterr().out
    generate_keys(tmp_path / "elsewhere", ["laptop"])
    assert (
        cli(
            "keys",
            "authorize",
            "--dir",
            str(tmp_path / "k"),
            str(tmp_path / "elsewhere" / "clients" / "laptop.key"),
            "--name",
            "alice",
        )
        == 0
    )
    assert (tmp_path / "k" / "authorized" / "alice.key").read_bytes() == (
        tmp_path / "elsewhere" / "clients" / "laptop.key"
    ).read_bytes()
    assert (
        cli(
            "keys",
            "authorize",
            "--dir",
            str(tmp_path / "k"),
            str(tmp_path / "elsewhere" / "clients" / "laptop.key_secret"),
        )
        == 2
    )
    assert "holds a secret key" in capsys.readouterr().err


def test_a_client_refused_while_the_server_shuts_down_dials_again_and_connects(keys, processes, tmp_path):
    """libzmq drops a connecting session for good after a refused handshake (ZAP 400). A server shutting down
    refuses every client once its allow-list is gone (here: the keys folder removed before its process ended);
    the client must dial again and reach the server that replaces it (it used to stay unconnected for the run)."""
    import shutil

    serving_keys = tmp_path / "serving"
    shutil.copytree(keys, serving_keys)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    old = processes(serving_keys, "server", "buffer")
    router = old.socket(zmq.ROUTER, bind=endpoint)
    shutil.rmtree(serving_keys / "authorized")  # the shutting-down server's allow-list is gone
    client = processes(keys, "good", "generator")
    dealer = client.socket(zmq.DEALER, connect=[endpoint])

    def failed():
        labels = {"reason": "key_refused", "endpoint": endpoint}
        return client.metrics.registry.get_sample_value("streamrl_generator_auth_failed_total", labels) or 0

    assert wait_until(lambda: failed() >= 1, timeout=10)
    assert old.rejected("unknown_key", endpoint) >= 1
    router.close(0)  # the old server process ends ...
    old.sockets.remove(router)
    new = processes(keys, "server", "buffer")  # ... and its replacement binds the same endpoint
    router = new.socket(zmq.ROUTER, bind=endpoint)

    def delivered() -> bool:
        if dealer.poll(100, zmq.POLLOUT):  # the client's own thread polls: that is where it dials again
            send(dealer, request(5))
        return bool(router.poll(0))

    assert wait_until(delivered, timeout=15, interval=0.2), "the refused client never dialled again"
    assert decode(router.recv_multipart()[1:]).learner_version == 5
    assert new.rejected("unknown_key", endpoint) == 0
