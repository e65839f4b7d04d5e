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


@pytest.mark.slow  # each collects the whole suite in a fresh interpreter: 25-60 s on 2 cores
@pytest.mark.parametrize(
    "command",
    [[str(Path(sys.executable).with_name("pytest"))], [sys.executable, "-m", "pytest"]],
    ids=["pytest", "python -m pytest"],
)
def test_the_suite_collects_from_the_repository_root(command):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [*command, "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "tests/bench/test_bench_smoke.py" in result.stdout and " error" not in result.stdout.splitlines()[-1]
