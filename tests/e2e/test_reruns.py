"""A real `streamrl run` twice on one folder: the second is refused with the fix,
`--resume` continues from the checkpoint to the raised total, only `keep_checkpoints` checkpoints stay,
and the TensorBoard events (read back with TensorBoard's reader) hold every step of both launches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from streamrl.testing import local_run_config, write_config

pytestmark = pytest.mark.slow


def streamrl_run(job: Path, cwd: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "streamrl", "run", "--config", str(job), *flags],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=400,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )


def test_refused_rerun_then_resume(tmp_path, tiny_model_dir):
    sections = local_run_config(tmp_path, tiny_model_dir)
    sections["learner"].update(total_steps=2, checkpoint_every=1, keep_checkpoints=1, groups_per_step=1)
    sections["generator"].update(group_size=2, prompts_per_batch=1, max_new_tokens=6)
    job = write_config(tmp_path / "job.toml", sections)
    output = tmp_path / "run"

    first = streamrl_run(job, tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert f"streamrl: new run in {output}" in first.stdout
    assert [p.name for p in (output / "checkpoints").iterdir() if not p.name.startswith(".")] == ["step-000002"]

    again = streamrl_run(job, tmp_path)
    assert again.returncode == 2
    assert again.stderr.startswith(
        f"streamrl: {output} already holds a run (checkpoint step-000002, metrics.jsonl with 2 steps"
    )
    assert "fix: add --resume to continue it, or --fresh to start over" in again.stderr

    resumed = streamrl_run(job, tmp_path, "--resume", "--set", "learner.total_steps=3")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"streamrl: resuming {output} from checkpoint step-000002 of 3" in resumed.stdout
    assert "resumed from" in resumed.stdout + resumed.stderr and "at step 2" in resumed.stdout + resumed.stderr
    steps = [json.loads(line)["step"] for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert sorted(p.name for p in (output / "checkpoints").iterdir()) == ["step-000003"]  # keep_checkpoints = 1
    launches = [json.loads(line) for line in (output / "launches.jsonl").read_text().splitlines()]
    assert [r["mode"] for r in launches] == ["new", "resume"]
    assert (
        launches[1]["overrides"] == ["learner.total_steps=3"] and launches[1]["config"]["learner"]["total_steps"] == 3
    )

    events = EventAccumulator(str(output / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("reward/mean")] == [1, 2, 3]
    rewards = [json.loads(line)["reward_mean"] for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in events.Scalars("reward/mean")] == pytest.approx(rewards, abs=1e-6)
