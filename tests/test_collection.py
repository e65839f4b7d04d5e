"""Both `pytest` and `python -m pytest` collect the whole suite from the repository root
(bare `pytest` once failed: `tests/bench` shadowed the `bench` package because the
repository root was not on sys.path)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


COMMANDS = {
    "pytest": [str(Path(sys.executable).with_name("pytest"))],
    "python -m pytest": [sys.executable, "-m", "pytest"],
}


@pytest.mark.slow  # each collects the whole suite in a fresh interpreter: 25-60 s on 2 cores
def test_the_suite_collects_from_the_repository_root():
    """Both commands at once, one interpreter per core (importing the suite is most of the time):
    serially they took 84 s together on the loaded 2-core machine."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    running = {
        name: subprocess.Popen(
            [*command, "--collect-only", "-q", "-p", "no:cacheprovider"],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, command in COMMANDS.items()
    }
    try:
        outputs = {name: proc.communicate(timeout=300) for name, proc in running.items()}
    finally:
        for proc in running.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for name, (stdout, stderr) in outputs.items():
        assert running[name].returncode == 0, (name, stdout[-3000:] + stderr[-3000:])
        assert "tests/bench/test_bench_smoke.py" in stdout and " error" not in stdout.splitlines()[-1], name
