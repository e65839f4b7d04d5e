"""End to end: a reward model trained by ``streamrl rm`` drives the streaming PPO run as real
processes: the scorer scores with it (summed with a rule reward) and the learner's GAE critic
starts from it."""

from __future__ import annotations

import json

import pytest
import torch

from streamrl.common.reward_model import RewardModel
from streamrl.services.scorer.rewards import count_char
from streamrl.testing import local_run_config, wait_until, write_config
from support import train_tiny_reward_model

pytestmark = pytest.mark.slow


def test_ppo_against_a_trained_reward_model_with_the_critic_from_it(tmp_path, tiny_model_dir, services):
    (tmp_path / "stages").mkdir()  # the PPO run below writes tmp_path / "run"
    rm = str(
        train_tiny_reward_model(
            tmp_path / "stages", tiny_model_dir, preferred="e", pairs=80, eval_rows=16, max_length=64
        )
    )

    steps = 3
    sections = local_run_config(
        tmp_path,
        tiny_model_dir,
        learner={"total_steps": steps, "advantage": "gae", "value_model": rm, "value_lr": 1e-3, "kl_coef": 0.05},
    )
    sections["scorer"]["rewards"] = [
        {"model": rm, "weight": 1.0, "name": "rm"},
        {"function": "count_char", "weight": 0.5, "kwargs": {"char": "e"}},
    ]
    procs = services(write_config(tmp_path / "run.toml", sections))
    for name in ("learner", "buffer", "scorer"):
        procs.start(name)
    procs.start("generator", 0)
    learner = procs.procs["learner-0"]
    assert wait_until(lambda: learner.poll() is not None, timeout=300), procs.logs()
    assert learner.returncode == 0, procs.logs()

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert all(r["loss/value"] > 0 for r in records)  # the separate critic trained every step
    reward_model = RewardModel(rm, device=torch.device("cpu"))
    samples = [s for r in records for s in r["samples"]]
    expected = reward_model.score([s["prompt"] for s in samples], [s["completion"] for s in samples])
    rules = count_char(
        [s["prompt"] for s in samples], [s["completion"] for s in samples], [{}] * len(samples), char="e"
    )
    for sample, rm_score, rule in zip(samples, expected, rules):
        assert sample["reward"] == pytest.approx(rm_score + 0.5 * rule, abs=1e-4)
