"""SIGTERM to ``streamrl run`` stops the whole run: every service exits (the learner after
its final checkpoint), nothing is orphaned, and every port is free for the next run.

Before, ``streamrl run`` started honcho with ``subprocess.call`` and did not forward
signals: the launcher died and honcho and all four services kept running, holding ports.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streamrl.testing import free_port, scrape, wait_until

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def processes_with(marker: str) -> dict[int, str]:
    """pid -> command line of every live process whose environment contains ``marker``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
    return found


def port_is_free(port: int) -> bool:
    """A listener can bind ``port`` again, as the next run's would (SO_REUSEADDR, like ZeroMQ and the
    metrics server: connections of the old run may linger in TIME_WAIT)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_streamrl_run_stops_every_service(tmp_path, sig):
    zmq_ports = [free_port() for _ in range(5)]
    metric_ports = {name: free_port() for name in ("generator", "scorer", "buffer", "learner")}
    output = tmp_path / "run"
    overrides = [f"run.output_dir={str(output)!r}", "learner.total_steps=100000", "learner.checkpoint_every=100000",
                 f'endpoints.scorers=["tcp://127.0.0.1:{zmq_ports[0]}"]']
    overrides += [f'endpoints.{name}="tcp://127.0.0.1:{port}"'
                  for name, port in zip(("buffer", "batches", "weights_announce", "weights"), zmq_ports[1:])]
    overrides += [f"metrics.{name}_port={port}" for name, port in metric_ports.items()]
    command = [sys.executable, "-m", "streamrl", "run", "--config", str(REPO / "deploy/configs/tiny.toml")]
    for value in overrides:
        command += ["--set", value]
    log = open(tmp_path / "run.log", "wb")
    launcher = subprocess.Popen(command, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        def learner_step() -> float:
            try:
                return scrape(metric_ports["learner"]).get("streamrl_learner_step", 0.0)
            except ConnectionError:
                return 0.0

        assert wait_until(lambda: learner_step() >= 2, timeout=240), (tmp_path / "run.log").read_text()[-4000:]
        services = processes_with(str(output))
        names = " ".join(services.values())
        for service in ("learner", "buffer", "scorer", "generator"):
            assert f"streamrl.services.{service}" in names, names
        launcher.send_signal(sig)
        code = launcher.wait(timeout=90)
        assert code == {signal.SIGTERM: 143, signal.SIGINT: 130}[sig]
        assert wait_until(lambda: not processes_with(str(output)), timeout=10), processes_with(str(output))
        for port in [*zmq_ports, *metric_ports.values()]:
            assert port_is_free(port), port
        steps = sorted(p.name for p in (output / "checkpoints").iterdir() if p.name.startswith("step-"))
        assert steps, "the learner wrote no final checkpoint on its way out"
        assert "stopped by a signal" in (tmp_path / "run.log").read_text()
    finally:
        if launcher.poll() is None:
            launcher.kill()
        for pid in processes_with(str(output)):
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
