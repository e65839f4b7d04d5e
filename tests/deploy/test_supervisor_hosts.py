"""deploy/supervisor/*.conf (one supervisord file per host role) parse with supervisord's own
loader into the programs each role runs, with the stop behaviour of deploy/supervisord.conf, and
deploy/supervisor/cluster.toml places the services consistently (ports, binds, targets)."""

from __future__ import annotations

import shutil

import pytest
from supervisor.datatypes import RestartUnconditionally, RestartWhenExitUnexpected
from supervisor.options import ClientOptions, ServerOptions

from streamrl.common.config import load_config
from streamrl.common.security import generate_keys
from streamrl.status import targets
from support import REPO

FOLDER = REPO / "deploy" / "supervisor"
ROLES = {
    "trainer": {"learner", "buffer", "feedback"},
    "scorer": {"scorer-0", "scorer-1"},
    "generator": {"generator-0", "generator-1", "generator-2"},
}


def programs(role: str, monkeypatch, tmp_path) -> dict:
    """``{process name: supervisord's process config}`` of a role file, as supervisord reads it."""
    env = {
        "STREAMRL_CONFIG": "/etc/streamrl/cluster.toml",
        "STREAMRL_PYTHON": "/opt/streamrl/bin/python",
        "STREAMRL_LOGS": str(tmp_path),
        "STREAMRL_SCORERS": "2",
        "STREAMRL_GENERATORS": "3",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    options = ServerOptions()
    options.realize(args=["-c", str(FOLDER / f"{role}.conf")])
    assert options.logfile == str(tmp_path / "supervisord.log")  # daemon.inc was included
    return {p.name: p for group in options.process_group_configs for p in group.process_configs}


@pytest.mark.parametrize("role", sorted(ROLES))
def test_each_role_runs_its_services(role, monkeypatch, tmp_path):
    found = programs(role, monkeypatch, tmp_path)
    assert set(found) == ROLES[role]
    for name, process in found.items():
        service, _, index = name.partition("-")
        command = process.command.split()
        assert command[:3] == ["/opt/streamrl/bin/python", "-m", f"streamrl.services.{service}"]
        assert command[3:5] == ["--config", "/etc/streamrl/cluster.toml"]
        replica = process.environment["STREAMRL_REPLICA"]
        if index:  # replicas of a host: the port offset, and a name unique across hosts
            assert command[5:] == ["--index", index]
            assert replica.startswith(f"{service}-") and replica.endswith(f"-{index}") and replica.count("-") >= 2
        else:
            assert command[5:] == [] and replica.startswith(f"{service}-")
        assert process.stdout_logfile == str(tmp_path / f"{name}.log")
    client = ClientOptions()  # supervisorctl -c <role>.conf reaches that daemon (it does not read includes)
    client.realize(args=["-c", str(FOLDER / f"{role}.conf")])
    assert client.serverurl == f"unix://{tmp_path}/supervisor.sock"


def test_stop_and_restart_rules_are_those_of_the_one_host_file(monkeypatch, tmp_path):
    monkeypatch.setenv("STREAMRL_CONFIG", "x")
    monkeypatch.setenv("STREAMRL_PYTHON", "python")
    monkeypatch.setenv("STREAMRL_LOGS", str(tmp_path))
    monkeypatch.setenv("STREAMRL_SCORERS", "2")
    monkeypatch.setenv("STREAMRL_GENERATORS", "3")
    options = ServerOptions()
    options.realize(args=["-c", str(REPO / "deploy" / "supervisord.conf")])
    one_host = {g.name: g.process_configs[0] for g in options.process_group_configs}
    for role in ROLES:
        for name, process in programs(role, monkeypatch, tmp_path).items():
            reference = one_host[name.partition("-")[0]]
            assert (process.stopwaitsecs, process.autorestart, process.exitcodes) == (
                reference.stopwaitsecs,
                reference.autorestart,
                reference.exitcodes,
            ), name
    assert one_host["learner"].autorestart is RestartWhenExitUnexpected  # not restarted after total_steps
    # the optional feedback service: a disabled one exits 0 at once and stays stopped
    assert one_host["feedback"].autorestart is RestartWhenExitUnexpected and one_host["feedback"].exitcodes == [0]
    assert one_host["generator"].autorestart is RestartUnconditionally


def test_the_example_placement_is_consistent(tmp_path):
    shutil.copy(FOLDER / "cluster.toml", tmp_path / "cluster.toml")
    with pytest.raises(Exception, match="keys/server.key does not exist; fix: streamrl keys generate"):
        load_config(tmp_path / "cluster.toml")  # wildcard binds without keys are refused
    generate_keys(tmp_path / "keys")
    cfg = load_config(tmp_path / "cluster.toml")
    e = cfg.endpoints
    assert [e.scorer_bind(i) for i in range(len(e.scorers))] == [
        f"tcp://*:{endpoint.rpartition(':')[2]}" for endpoint in e.scorers
    ]  # scorer i of scorer-a: 5550 + i
    assert {e.bind_address(n).rpartition(":")[2] for n in ("buffer", "batches")} == {
        e.buffer.rpartition(":")[2],
        e.batches.rpartition(":")[2],
    }
    assert {e.bind_address(n) for n in ("feedback", "human_model")} == {
        f"tcp://*:{getattr(e, n).rpartition(':')[2]}" for n in ("feedback", "human_model")
    }
    assert {getattr(e, n).partition("://")[2].rpartition(":")[0] for n in ("feedback", "human_model")} == {
        "trainer"
    }  # the host whose role file runs it
    assert [(t.name, t.address) for t in targets(cfg, 0, [("gen-a", 2)])] == [
        ("learner-0", "trainer:9400"),
        ("buffer-0", "trainer:9300"),
        ("scorer-0", "scorer-a:9200"),
        ("scorer-1", "scorer-a:9201"),
        ("generator-gen-a-0", "gen-a:9100"),
        ("generator-gen-a-1", "gen-a:9101"),
    ]
