"""A run folder has one owner, and a port that is taken stops a service at once.

Red-team findings this reproduces: a second buffer on a live run's folder replayed and
compacted the journal before trying to bind, deleting the segment the first buffer was
writing, and then hung forever in ``zmq_ctx_term`` (the socket whose bind failed was
never closed); a second learner on the same folder with other ports resumed from the
first one's checkpoint and wrote into the same files.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from streamrl.testing import free_port, local_run_config, scrape, wait_until, write_config

pytestmark = pytest.mark.slow


def other_ports(sections: dict) -> dict:
    """The same run with every endpoint and metrics port replaced by a fresh one."""
    fresh = {k: dict(v) for k, v in sections.items()}
    fresh["endpoints"] = {
        k: ([f"tcp://127.0.0.1:{free_port()}" for _ in v] if isinstance(v, list) else f"tcp://127.0.0.1:{free_port()}")
        for k, v in sections["endpoints"].items()
    }
    fresh["metrics"] = {k: free_port() for k in sections["metrics"]}
    return fresh


def open_files(pid: int) -> list[str]:
    fds = Path(f"/proc/{pid}/fd")
    return [os.readlink(fd) for fd in fds.iterdir() if fd.exists() or fd.is_symlink()]


def finished(proc: subprocess.Popen, timeout: float) -> int | None:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def owner_and_intruder(tmp_path, tiny_model_dir, services, service: str, timeout: float):
    """Start ``service`` on a run and wait (``timeout`` seconds) until it serves metrics; returns the
    process and a config of the same run folder with every port changed (for the intruder)."""
    sections = local_run_config(tmp_path, tiny_model_dir)
    config = write_config(tmp_path / "run.toml", sections)
    second = write_config(tmp_path / "second.toml", other_ports(sections))
    svc = services(config)
    first = svc.start(service)
    assert wait_until(lambda: _up(sections["metrics"][f"{service}_port"]), timeout=timeout), svc.logs()
    return first, second


def test_a_second_buffer_on_a_live_folder_is_refused_and_touches_nothing(tmp_path, tiny_model_dir, services):
    first, second = owner_and_intruder(tmp_path, tiny_model_dir, services, "buffer", 60)
    journal = tmp_path / "run" / "buffer"
    segments = sorted(p.name for p in journal.glob("segment-*"))
    assert segments
    intruder = services(second).start("buffer", 1)
    code = finished(intruder, timeout=30)
    log = (tmp_path / "buffer-1.log").read_text()
    assert code == 2, log
    assert f"pid {first.pid}" in log and "fix:" in log, log
    assert sorted(p.name for p in journal.glob("segment-*")) == segments
    assert not [f for f in open_files(first.pid) if f.endswith("(deleted)")]
    assert first.poll() is None


def test_a_second_learner_on_the_same_folder_is_refused(tmp_path, tiny_model_dir, services):
    first, second = owner_and_intruder(tmp_path, tiny_model_dir, services, "learner", 90)
    intruder = services(second).start("learner", 1)
    code = finished(intruder, timeout=60)
    log = (tmp_path / "learner-1.log").read_text()
    assert code == 2 and f"pid {first.pid}" in log and "run.output_dir" in log, log


def test_a_taken_endpoint_stops_the_service_with_the_address_and_the_fix(tmp_path, tiny_model_dir, services):
    """Same ports, other folder: the bind fails; the process exits 2 at once instead of hanging."""
    sections = local_run_config(tmp_path, tiny_model_dir)
    config = write_config(tmp_path / "run.toml", sections)
    clash = {k: dict(v) for k, v in sections.items()}
    clash["run"]["output_dir"] = str(tmp_path / "elsewhere")
    clash["metrics"] = {k: free_port() for k in sections["metrics"]}
    second = write_config(tmp_path / "clash.toml", clash)
    svc = services(config)
    svc.start("buffer")
    assert wait_until(lambda: _up(sections["metrics"]["buffer_port"]), timeout=60), svc.logs()
    started = time.monotonic()
    intruder = services(second).start("buffer", 1)
    code = finished(intruder, timeout=60)
    log = (tmp_path / "buffer-1.log").read_text()
    assert code == 2, log
    assert f"cannot bind {sections['endpoints']['buffer']}" in log and "fix:" in log, log
    assert time.monotonic() - started < 60


def _up(port: int) -> bool:
    try:
        scrape(port)
        return True
    except ConnectionError:
        return False
