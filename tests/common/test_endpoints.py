"""Addresses for real networks: bind vs connect endpoints, DNS names, replica identity without
hand-set indices, metrics bound to every interface."""

from __future__ import annotations

import logging
import signal
import socket
import urllib.request
import zlib

import pytest

from streamrl.common.config import ConfigError, endpoint_problem, load_config
from streamrl.common.security import generate_keys
from streamrl.common.service import CONFIG_ENV, OVERRIDES_ENV, REPLICA_ENV, Replica, replica_identity, start_service
from streamrl.testing import free_port, write_config

INSECURE = "security.allow_insecure=true"


def problems(overrides: list[str]) -> list[str]:
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    return [line.removeprefix("  - ") for line in str(err.value).splitlines()[1:]]


def test_bind_defaults_to_the_connect_address_and_can_differ():
    e = load_config(None).endpoints
    assert [e.bind_address(n) for n in ("buffer", "batches", "weights_announce", "weights")] == [
        "tcp://127.0.0.1:5560",
        "tcp://127.0.0.1:5561",
        "tcp://127.0.0.1:5570",
        "tcp://127.0.0.1:5571",
    ]
    e = load_config(
        None,
        [
            INSECURE,
            'endpoints.buffer="tcp://buffer.streamrl.svc:5560"',
            'endpoints.bind.buffer="tcp://*:5560"',
            'endpoints.bind.weights="tcp://0.0.0.0:6000"',
            'endpoints.scorers=["tcp://scorer:5550"]',
            'endpoints.bind.scorer="tcp://*:5550"',
        ],
    ).endpoints
    assert (e.buffer, e.bind_address("buffer")) == ("tcp://buffer.streamrl.svc:5560", "tcp://*:5560")
    assert (e.weights, e.bind_address("weights")) == ("tcp://127.0.0.1:5571", "tcp://0.0.0.0:6000")
    assert e.bind_address("batches") == "tcp://127.0.0.1:5561" and e.bind.scorer == "tcp://*:5550"
    with pytest.raises(ValueError, match="no endpoint 'scorer'"):
        e.bind_address("scorer")


@pytest.mark.parametrize(
    ("endpoint", "bind", "problem"),
    [
        ("tcp://learner.example.org:5571", False, None),  # a DNS name
        ("tcp://[fd00::5]:5571", False, None),
        ("ipc:///run/streamrl/buffer", False, None),
        ("tcp://*:5560", True, None),
        ("tcp://eth0:*", True, None),  # an interface, any free port
        ("tcp://*:5560", False, "`*` is a bind address (every interface), not one a peer can connect to; fix: put"),
        ("tcp://0.0.0.0:5560", False, "`0.0.0.0` is a bind address"),
        ("tcp://[::]:5560", False, "`[::]` is a bind address"),
        ("tcp://host:*", False, "port '*' is not a number in 1..65535"),
        ("tcp://host:70000", True, "port '70000' is not a number in 1..65535"),
        ("tcp://host", False, "has no HOST:PORT"),
        ("udp://host:1", False, "is not tcp://HOST:PORT, ipc://PATH or inproc://NAME"),
        ("127.0.0.1:5560", True, "is not tcp://HOST:PORT"),
    ],
)
def test_endpoint_syntax(endpoint, bind, problem):
    found = endpoint_problem(endpoint, bind=bind)
    assert (found is None) if problem is None else found.startswith(problem) or problem in found


def test_config_names_the_key_of_a_bad_endpoint_and_the_fix():
    lines = problems(
        [
            INSECURE,
            'endpoints.weights="tcp://0.0.0.0:5571"',
            'endpoints.bind.buffer="buffer:5560"',
            'endpoints.scorers=["tcp://a:1", "tcp://*:2"]',
        ]
    )
    assert len(lines) == 3, lines
    assert lines[0].startswith("endpoints.scorers: tcp://*:2: `*` is a bind address") and "endpoints.bind" in lines[0]
    assert lines[1].startswith("endpoints.weights: tcp://0.0.0.0:5571: `0.0.0.0` is a bind address")
    assert lines[2].startswith("endpoints.bind.buffer: buffer:5560: is not tcp://HOST:PORT")


def test_non_loopback_binds_and_names_need_keys_or_the_explicit_opt_out(tmp_path):
    cluster = [
        'endpoints.buffer="tcp://buffer:5560"',
        'endpoints.bind.buffer="tcp://*:5560"',
        'endpoints.bind.batches="tcp://10.0.0.4:5561"',
    ]
    lines = problems(cluster)
    assert [line.split(":")[0] for line in lines] == [
        "endpoints.buffer",
        "endpoints.bind.buffer",
        "endpoints.bind.batches",
    ]
    assert all("is not a loopback address and security.keys_dir is unset" in line for line in lines)
    assert load_config(None, cluster + [INSECURE]).endpoints.bind.buffer == "tcp://*:5560"
    generate_keys(tmp_path / "keys")
    config = load_config(None, cluster + [f'security.keys_dir="{tmp_path / "keys"}"'])
    assert config.endpoints.bind_address("batches") == "tcp://10.0.0.4:5561"
    # loopback binds behind a loopback name are fine without keys
    load_config(None, ['endpoints.buffer="tcp://localhost:5560"', 'endpoints.bind.buffer="tcp://127.0.0.1:5560"'])


@pytest.mark.parametrize(
    ("name", "explicit", "honcho", "expected"),
    [
        (None, None, None, Replica(0, 0, "generator-0")),
        (None, 2, None, Replica(2, 2, "generator-2")),
        (None, None, "generator.4", Replica(3, 3, "generator-3")),
        # a name from the pod / host: distinct replicas from one template, metrics on the base port
        (
            "streamrl-generator-7d9f8c-x2k4q",
            None,
            None,
            Replica(zlib.crc32(b"streamrl-generator-7d9f8c-x2k4q") & 0x7FFFFFFF, 0, "streamrl-generator-7d9f8c-x2k4q"),
        ),
        # supervisord on several hosts: the name makes it unique, --index keeps the host's port offsets
        ("generator-hostb-1", 1, None, Replica(zlib.crc32(b"generator-hostb-1") & 0x7FFFFFFF, 1, "generator-hostb-1")),
    ],
)
def test_replica_identity(monkeypatch, name, explicit, honcho, expected):
    monkeypatch.delenv("HONCHO_PROCESS_NAME", raising=False)
    if honcho:
        monkeypatch.setenv("HONCHO_PROCESS_NAME", honcho)
    assert replica_identity("generator", explicit, name) == expected


def test_replica_names_give_distinct_indices_and_bad_names_are_refused():
    names = [f"streamrl-generator-5c7b9d6f4-{suffix}" for suffix in ("x2k4q", "p9zlm", "a1b2c", "qq7rt", "zz0aa")]
    indices = {replica_identity("generator", None, n).index for n in names}
    assert len(indices) == len(names) and all(0 <= i < 2**31 for i in indices)
    assert replica_identity("generator", None, names[0]) == replica_identity("generator", None, names[0])  # stable
    for bad in ("", "two words"):
        with pytest.raises(ValueError, match="fix: e.g. the pod name"):
            replica_identity("generator", None, bad)


@pytest.fixture
def process_state(monkeypatch):
    """Undo what start_service does to the test process: signal handlers, root log level, env."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    level = logging.getLogger().level
    for name in (CONFIG_ENV, OVERRIDES_ENV, REPLICA_ENV, "HONCHO_PROCESS_NAME"):
        monkeypatch.delenv(name, raising=False)
    yield
    for s, handler in handlers.items():
        signal.signal(s, handler)
    logging.getLogger().setLevel(level)


def test_a_named_replica_serves_metrics_on_every_interface_at_the_base_port(tmp_path, monkeypatch, process_state):
    port = free_port()
    path = write_config(
        tmp_path / "run.toml",
        {"run": {"output_dir": str(tmp_path / "out")}, "metrics": {"host": "0.0.0.0", "scorer_port": port}},
    )
    monkeypatch.setenv(REPLICA_ENV, "streamrl-scorer-6b8d-kq2vx")
    ctx = start_service("scorer", ["--config", str(path)])
    try:
        assert (ctx.instance, ctx.local_index, ctx.metrics.port) == ("streamrl-scorer-6b8d-kq2vx", 0, port)
        assert ctx.index == zlib.crc32(b"streamrl-scorer-6b8d-kq2vx") & 0x7FFFFFFF
        listening = socket.create_connection(("127.0.0.1", port), timeout=5)  # bound to 0.0.0.0: any address
        listening.close()
        text = urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=10).read().decode()
        assert 'streamrl_scorer_info{instance_id="streamrl-scorer-6b8d-kq2vx",service="scorer"} 1.0' in text
    finally:
        ctx.close()


def test_a_bad_replica_name_exits_2(tmp_path, monkeypatch, process_state, capsys):
    path = write_config(
        tmp_path / "run.toml", {"run": {"output_dir": str(tmp_path / "out")}, "metrics": {"enabled": False}}
    )
    monkeypatch.setenv(REPLICA_ENV, "has space")
    with pytest.raises(SystemExit) as exit_info:
        start_service("generator", ["--config", str(path)])
    assert exit_info.value.code == 2
    assert f"{REPLICA_ENV}='has space'" in capsys.readouterr().err


def test_scorers_of_one_host_bind_consecutive_ports():
    e = load_config(None, [INSECURE, 'endpoints.bind.scorer="tcp://*:5550"']).endpoints
    assert [e.scorer_bind(i) for i in range(3)] == ["tcp://*:5550", "tcp://*:5551", "tcp://*:5552"]
    assert load_config(None).endpoints.scorer_bind(1) is None  # unset: scorer i binds endpoints.scorers[i]
    e = load_config(None, [INSECURE, 'endpoints.bind.scorer="tcp://eth0:*"']).endpoints
    assert e.scorer_bind(2) == "tcp://eth0:*"  # any free port stays any free port


def test_seeds_derived_from_a_named_replica_are_accepted():
    from streamrl.common.models import configure_torch

    index = replica_identity("generator", None, "streamrl-generator-5c7b9d6f4-x2k4q").index
    configure_torch(1, seed=2**40 + 7919 * (index + 1))  # the generator's seed of a named replica (numpy: 32 bits)
