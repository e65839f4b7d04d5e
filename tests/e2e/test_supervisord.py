"""deploy/supervisord.conf: a service killed with SIGKILL is restarted by supervisord and the run completes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streamrl.testing import local_run_config, wait_until, write_config
from support import REPO

pytestmark = pytest.mark.slow

STEPS = 8


def supervisorctl(env: dict, *args: str) -> str:
    bin_dir = Path(sys.executable).parent
    result = subprocess.run(
        [str(bin_dir / "supervisorctl"), "-c", str(REPO / "deploy/supervisord.conf"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return result.stdout


def pid_of(env: dict, name: str) -> int:
    out = supervisorctl(env, "pid", name).strip()
    return int(out) if out.isdigit() else 0


def steps_done(run_dir: Path) -> int:
    path = run_dir / "trained.jsonl"
    return max((json.loads(line)["step"] for line in path.read_text().splitlines()), default=0) if path.exists() else 0


def test_killed_services_are_restarted_and_the_run_completes(tmp_path, tiny_model_dir):
    sections = local_run_config(
        tmp_path,
        tiny_model_dir,
        transport={"announce_interval_s": 0.2, "request_timeout_s": 1.0},
        learner={"total_steps": STEPS, "checkpoint_every": 1},
    )
    config = write_config(tmp_path / "run.toml", sections)
    logs = tmp_path / "logs"
    logs.mkdir()
    env = dict(
        os.environ,
        STREAMRL_CONFIG=str(config),
        STREAMRL_GENERATORS="2",
        STREAMRL_SCORERS="1",
        STREAMRL_PYTHON=sys.executable,
        STREAMRL_LOGS=str(logs),
        PYTHONUNBUFFERED="1",
    )
    bin_dir = Path(sys.executable).parent
    daemon = subprocess.Popen(
        [str(bin_dir / "supervisord"), "-c", str(REPO / "deploy/supervisord.conf")],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    run_dir = tmp_path / "run"

    def all_logs() -> str:
        return "\n".join(f"===== {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(logs.glob("*.log")))

    try:
        assert wait_until(lambda: steps_done(run_dir) >= 2, timeout=180), all_logs()
        killed = {}
        for name in ("buffer", "generator:generator-1"):
            killed[name] = pid_of(env, name)
            assert killed[name] > 0, supervisorctl(env, "status")
            os.kill(killed[name], signal.SIGKILL)
        # supervisord starts each again (a new pid) and the learner still reaches its target
        assert wait_until(lambda: all(pid_of(env, n) not in (0, p) for n, p in killed.items()), timeout=60), (
            supervisorctl(env, "status")
        )
        assert wait_until(lambda: "EXITED" in supervisorctl(env, "status", "learner"), timeout=240), all_logs()
        assert steps_done(run_dir) == STEPS
        assert "exit status 0" in (logs / "supervisord.log").read_text()
        assert "recovered" in (logs / "buffer-0.log").read_text()
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(60)
        except subprocess.TimeoutExpired:
            daemon.kill()
        time.sleep(0.2)
