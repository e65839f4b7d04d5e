"""Two runs on one machine: a port another run holds is named with its config key by ``streamrl check``
and ``streamrl run`` (which refuses before starting anything), ``streamrl run --free-ports`` starts and
finishes a real run while every port of its config is held, and a config that leaves every port at its
default gets free ports without being asked when a default one is taken (instead of "Address already in
use" from a service)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tomllib
from contextlib import ExitStack
from pathlib import Path

import pytest

from streamrl.cli import main
from streamrl.common.config import load_config
from streamrl.ports import PortsTaken, claim_ports, port_taken, ports_at_defaults, run_ports, taken_ports
from streamrl.testing import local_run_config, write_config

pytestmark = pytest.mark.slow


def hold(stack: ExitStack, host: str, port: int) -> bool:
    """Listen on ``host:port`` until ``stack`` closes, as a first run's service would; False when another
    process already holds it (taken all the same)."""
    s = stack.enter_context(socket.socket())
    try:
        s.bind((host, port))
    except OSError:
        return False
    s.listen()
    return True


def small_job(tmp_path: Path, model: Path, name: str = "job") -> Path:
    sections = local_run_config(tmp_path / name, model)
    sections["learner"].update(total_steps=2, checkpoint_every=2, groups_per_step=1)
    sections["generator"].update(group_size=2, prompts_per_batch=1, max_new_tokens=6)
    return write_config(tmp_path / f"{name}.toml", sections)


def test_a_taken_port_is_named_with_its_key_by_check_and_run(tmp_path, tiny_model_dir, capsys):
    job = small_job(tmp_path, tiny_model_dir)
    cfg = load_config(job)
    with ExitStack() as stack:
        assert hold(stack, "127.0.0.1", cfg.metrics.buffer_port)
        assert hold(stack, "127.0.0.1", int(cfg.endpoints.batches.rpartition(":")[2]))
        with pytest.raises(SystemExit) as checked:
            main(["check", "--config", str(job)])
        err = capsys.readouterr().err
        assert checked.value.code == 0  # the config is fine; the machine is busy now
        assert (
            f"streamrl: note: ports in use on this machine now (another run?): "
            f"{cfg.endpoints.batches.rpartition(':')[2]} (endpoints.batches), {cfg.metrics.buffer_port} "
            "(metrics.buffer_port); fix: set these keys to free ports, or run with `streamrl run --free-ports`"
        ) in err
        with pytest.raises(SystemExit) as ran:
            main(["run", "--config", str(job)])
        err = capsys.readouterr().err
        assert ran.value.code == 2 and "(metrics.buffer_port)" in err and "add --free-ports" in err
        assert not (tmp_path / "job" / "run").exists()  # refused before anything was started or written


def test_free_ports_runs_while_every_port_of_the_config_is_held(tmp_path, tiny_model_dir):
    job = small_job(tmp_path, tiny_model_dir)
    cfg = load_config(job)
    uses = run_ports(cfg, 1, 1)
    assert {u.key for u in uses} >= {
        "endpoints.scorers[0]",
        "endpoints.buffer",
        "endpoints.batches",
        "endpoints.weights_announce",
        "endpoints.weights",
        "metrics.generator_port",
        "metrics.scorer_port",
        "metrics.buffer_port",
        "metrics.learner_port",
    }
    with ExitStack() as stack:
        for use in uses:  # the first run on this machine
            assert hold(stack, use.host, use.port)
        assert all(port_taken(u.host, u.port) for u in uses)
        run = subprocess.run(
            [Path(sys.executable).parent / "streamrl", "run", "--config", str(job), "--free-ports"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=500,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "Address already in use" not in run.stdout + run.stderr
    output = tmp_path / "job" / "run"
    assert [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    used = tomllib.loads((output / "config.toml").read_text())  # what `streamrl status --config` reads
    held = {u.port for u in uses}
    ports = [int(used["endpoints"][name].rpartition(":")[2]) for name in ("buffer", "batches", "weights")]
    ports += [used["metrics"][f"{s}_port"] for s in ("generator", "scorer", "buffer", "learner")]
    assert not held & set(ports) and len(set(ports)) == len(ports)
    assert "ports of this run: endpoints.scorers=" in run.stdout and str(output / "config.toml") in run.stdout


def test_default_ports_taken_by_another_run_are_replaced_without_asking(tmp_path, capsys):
    """A config with no port of its own (the README's example) while a default port is held: the run gets
    free ports (the run itself is the previous test's; here only the overrides it would start with)."""
    job = tmp_path / "my.toml"
    job.write_text('[run]\nname = "mine"\n[model]\npath = "tiny-char-llama"\n')
    cfg = load_config(job)
    assert ports_at_defaults(cfg)
    with ExitStack() as stack:
        hold(stack, "127.0.0.1", cfg.metrics.buffer_port)  # held by us or by someone else: taken either way
        assert port_taken("127.0.0.1", cfg.metrics.buffer_port)
        overrides = claim_ports(cfg, 1, 1)
    out = capsys.readouterr().out
    claimed = load_config(job, overrides)
    assert not ports_at_defaults(claimed) and claimed.metrics.buffer_port != cfg.metrics.buffer_port
    assert "the default ports " in out and f"{cfg.metrics.buffer_port} (metrics.buffer_port)" in out
    assert "this run uses free ports instead" in out
    assert not taken_ports(run_ports(claimed, 1, 1))

    # a config on several hosts is never moved: the message says why and what to do
    remote = tmp_path / "cluster.toml"
    remote.write_text('[endpoints]\nbuffer = "tcp://trainer:5560"\n[security]\nallow_insecure = true\n')
    with pytest.raises(
        PortsTaken,
        match='--free-ports: endpoints.buffer = "tcp://trainer:5560": free ports are for runs on one machine',
    ):
        claim_ports(load_config(remote), 1, 1, free_ports=True)
