"""The launcher of `streamrl run` with real processes: an optional process (the feedback service) that
dies is reported and restarted while the run goes on; any other process that exits stops the run."""

from __future__ import annotations

import subprocess
import sys
import time

RUN = """
import sys
from pathlib import Path
from streamrl.launcher import run_procfile
sys.exit(run_procfile(Path("Procfile"), {"feedback": 1}, {"PATH": "/usr/bin:/bin"}, ".", stop_timeout_s=5))
"""


def launch(tmp_path, procfile: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess, float]:
    (tmp_path / "Procfile").write_text(procfile)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", RUN], cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
    return done, time.monotonic() - started


def test_a_killed_optional_process_is_restarted_and_the_run_goes_on(tmp_path):
    # the feedback stand-in records each start, then SIGKILLs itself; the learner stand-in runs 6 s
    done, _ = launch(
        tmp_path, "learner: sleep 6; echo learner finished\nfeedback: echo start >> starts.txt; sleep 0.3; kill -9 $$\n"
    )
    assert done.returncode == 0, done.stdout + done.stderr  # the learner's status: the run was not cut short
    assert "learner finished" in done.stdout
    starts = (tmp_path / "starts.txt").read_text().splitlines()
    assert len(starts) >= 3, done.stdout  # restarted after 1 s, then 2 s
    assert "exited (rc=-9); it is optional: the run goes on without it, restarting it in 1s" in done.stdout
    assert "restarting it in 2s (restart 2)" in done.stdout


def test_the_run_ends_when_a_required_process_exits_even_while_a_restart_is_due(tmp_path):
    done, took = launch(tmp_path, "learner: sleep 1.5; exit 3\nfeedback: sleep 1; exit 1\n")
    assert done.returncode == 3, done.stdout + done.stderr
    assert took < 20, done.stdout
    assert "feedback.1 exited (rc=1)" in done.stdout
