"""A run ends cleanly, whether the learner finished or ``streamrl run`` got SIGTERM/SIGINT: every
service exits within a few seconds of the learner's ``learner finished`` (no process is left to be
SIGKILLed), nothing is orphaned, every port is free for the next run, and ``summary.json`` is written.

Before, ``streamrl run`` started honcho with ``subprocess.call`` and did not forward
signals: the launcher died and honcho and all four services kept running, holding ports.
Later, the generator ignored the stop request while it waited inside a weight fetch (its
retries: five times ``transport.request_timeout_s``) or a credit request, so a finished run
spent a minute or more shutting down and ended with SIGKILLs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from streamrl.common.models import bf16_native
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


TCP_STATES = {
    "01": "ESTABLISHED",
    "02": "SYN_SENT",
    "03": "SYN_RECV",
    "04": "FIN_WAIT1",
    "05": "FIN_WAIT2",
    "06": "TIME_WAIT",
    "07": "CLOSE",
    "08": "CLOSE_WAIT",
    "09": "LAST_ACK",
    "0A": "LISTEN",
    "0B": "CLOSING",
}


def sockets_on(port: int) -> list[str]:
    """The TCP sockets bound to local ``port`` (``/proc/net/tcp``), as ``STATE local -> remote`` lines:
    what a failed :func:`port_is_free` found in its way."""
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, remote, state = line.split()[1:4]
        if int(local.rpartition(":")[2], 16) == port:
            found.append(f"{TCP_STATES.get(state, state)} {local} -> {remote}")
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


SHUTDOWN_S = 10.0
"""From the learner's ``learner finished`` until no service process is left, at most (seconds)."""
END_CPU_S = 2.0
"""CPU seconds ``streamrl run`` may spend from the learner's ``learner finished`` to its exit (its summary
and learning curve, about 0.2 s; the interpreter's finalisation of torch once added seconds here), counted
in CPU time, not wall time: on a loaded machine the niced launcher waits for a core many times longer than
it works (0.23 s of CPU took 3.2 s, and once 10.5 s, at load 7-11 with one core held by a busy loop)."""


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds ``pid`` has used so far (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Launch:
    """``streamrl run`` of the tiny job on fresh loopback ports, its log written to ``run.log``."""

    def __init__(self, tmp_path: Path, *overrides: str):
        self.zmq_ports = [free_port() for _ in range(5)]
        self.metric_ports = {name: free_port() for name in ("generator", "scorer", "buffer", "learner")}
        self.output = tmp_path / "run"
        values = [f"run.output_dir={str(self.output)!r}", f'endpoints.scorers=["tcp://127.0.0.1:{self.zmq_ports[0]}"]']
        values += [
            f'endpoints.{name}="tcp://127.0.0.1:{port}"'
            for name, port in zip(("buffer", "batches", "weights_announce", "weights"), self.zmq_ports[1:])
        ]
        values += [f"metrics.{name}_port={port}" for name, port in self.metric_ports.items()]
        command = [sys.executable, "-m", "streamrl", "run", "--config", str(REPO / "deploy/configs/tiny.toml")]
        for value in [*values, *overrides]:
            command += ["--set", value]
        self.log_path = tmp_path / "run.log"
        self.proc = subprocess.Popen(
            command,
            cwd=tmp_path,
            stdout=open(self.log_path, "wb"),
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def learner_step(self) -> float:
        try:
            return scrape(self.metric_ports["learner"]).get("streamrl_learner_step", 0.0)
        except ConnectionError:
            return 0.0

    def wait_exit(self, timeout: float) -> tuple[int, float, float]:
        """Wait for ``streamrl run`` to exit (reaped here, with its resource usage); returns its status, the
        seconds from the first ``learner finished`` in its log until no service process is left, and the CPU
        seconds ``streamrl run`` used from that line to its exit (log and processes read every 50 ms)."""
        deadline = time.monotonic() + timeout
        finished_at = gone_at = None
        cpu_at_finish = 0.0
        while time.monotonic() < deadline:
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                self.proc.returncode = os.waitstatus_to_exitcode(status)
                break
            if finished_at is None and "learner finished at step" in self.log():
                finished_at, cpu_at_finish = time.monotonic(), cpu_seconds(self.proc.pid)
            if finished_at is not None and gone_at is None and not processes_with(str(self.output)):
                gone_at = time.monotonic()
            time.sleep(0.05)
        exited_at = time.monotonic()
        assert self.proc.returncode is not None, (
            f"streamrl run still running after {timeout:.0f}s\n{self.log()[-4000:]}"
        )
        assert finished_at is not None or "learner finished at step" in self.log(), (
            f"no 'learner finished at step' line: the learner did not end its loop\n{self.log()[-4000:]}"
        )
        finished_at = exited_at if finished_at is None else finished_at  # seen only at the exit
        services_s = (exited_at if gone_at is None else gone_at) - finished_at
        return self.proc.returncode, services_s, usage.ru_utime + usage.ru_stime - cpu_at_finish

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        for pid in processes_with(str(self.output)):
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def assert_clean_end(run: Launch, services_s: float, end_cpu_s: float) -> None:
    """Every service exited by itself soon after the learner finished, the launcher did little more
    before its exit, nothing is left running, every port is free and the run's summary is written."""
    log = run.log()
    print(f"services gone {services_s:.2f} s after 'learner finished'; streamrl run then used {end_cpu_s:.2f} s of CPU")
    assert services_s <= SHUTDOWN_S, f"{services_s:.1f}s from 'learner finished' to the services' exit\n{log[-6000:]}"
    assert end_cpu_s <= END_CPU_S, f"streamrl run used {end_cpu_s:.2f} s of CPU after 'learner finished'\n{log[-3000:]}"
    assert "SIGKILL" not in log, log[-6000:]
    assert wait_until(lambda: not processes_with(str(run.output)), timeout=10), processes_with(str(run.output))
    for port in [*run.zmq_ports, *run.metric_ports.values()]:
        assert port_is_free(port), (port, sockets_on(port), processes_with(str(run.output)))
    assert (run.output / "summary.json").is_file(), log[-4000:]


def test_a_finished_run_stops_every_service_within_seconds(tmp_path):
    keys = ("generator.autocast_bf16", "scorer.autocast_bf16", "learner.autocast_bf16")
    run = Launch(tmp_path, "learner.total_steps=4", "learner.checkpoint_every=4", *(f'{key}="auto"' for key in keys))
    try:
        code, services_s, end_cpu_s = run.wait_exit(timeout=300)
        assert code == 0, run.log()[-4000:]
        assert_clean_end(run, services_s, end_cpu_s)
        assert json.loads((run.output / "summary.json").read_text())["steps"] == 4
        # each service says once what "auto" resolved to on this machine, and why
        resolved = "bf16 autocast" if bf16_native(torch.device("cpu")) else "float32"
        for key in keys:
            lines = [line for line in run.log().splitlines() if f'{key} = "auto": ' in line]
            assert len(lines) == 1 and f'{key} = "auto": {resolved} on cpu (this CPU ' in lines[0], lines
    finally:
        run.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_to_streamrl_run_stops_every_service(tmp_path, sig):
    run = Launch(tmp_path, "learner.total_steps=100000", "learner.checkpoint_every=100000")
    try:
        assert wait_until(lambda: run.learner_step() >= 2, timeout=240), run.log()[-4000:]
        services = processes_with(str(run.output))
        names = " ".join(services.values())
        for service in ("learner", "buffer", "scorer", "generator"):
            assert f"streamrl.services.{service}" in names, names
        run.proc.send_signal(sig)
        code, services_s, end_cpu_s = run.wait_exit(timeout=90)
        expected = {signal.SIGTERM: 143, signal.SIGINT: 130}[sig]
        assert code == expected, f"exit status {code}, not {expected}\n{run.log()[-4000:]}"
        assert_clean_end(run, services_s, end_cpu_s)
        steps = sorted(p.name for p in (run.output / "checkpoints").iterdir() if p.name.startswith("step-"))
        assert steps, f"the learner wrote no final checkpoint on its way out\n{run.log()[-4000:]}"
        assert "stopped by a signal" in run.log(), run.log()[-4000:]
    finally:
        run.close()
