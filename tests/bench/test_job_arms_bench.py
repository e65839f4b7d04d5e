"""bench/job_arms.py's bookkeeping: each arm trained with its overrides, gains paired over prompts, the table.

The training (``bench.trl_grpo.run_ours``) and ``streamrl eval`` it calls are exercised on the tiny job by
``test_bench_smoke.py::test_trl_grpo_ours_side_and_evaluation``; here they are replaced by stand-ins whose
held-out rewards are chosen so that every figure of the result can be computed by hand.
"""

from __future__ import annotations

import json

import pytest

from bench import job_arms


def eval_result(per_prompt: list[float], kl: float = 0.0) -> dict:
    n = len(per_prompt)
    return {
        "model": "m",
        "prompts": n,
        "reward_mean": sum(per_prompt) / n,
        "reward_stderr": 0.0,
        "kl_mean": kl,
        "kl_per_token": kl,
        "completion_tokens_mean": 32.0,
        "samples_per_prompt": 2,
        "per_prompt": {"reward": per_prompt},
        "prompt_ids": [str(i) for i in range(n)],
    }


def test_arms_gains_and_difference_by_hand(tmp_path, monkeypatch):
    trained = {}

    def run_ours(config, overrides, seconds, workdir):
        arm = workdir.name
        trained[arm] = (overrides, seconds, workdir.is_dir())
        steps = 3 if arm == "full" else 4
        # launched at t = 100; one step of 16 every 10 s, the first ending at t = 130
        return {
            "steps": steps,
            "samples": 16 * steps,
            "model": f"ckpt-{arm}",
            "launched": 100.0,
            "step_times": [130.0 + 10.0 * i for i in range(steps)],
            "step_samples": [16] * steps,
        }

    finals = {
        None: eval_result([0.0, 0.0, 0.0, 0.0]),
        "ckpt-full": eval_result([0.1, 0.2, 0.3, 0.2], kl=0.01),
        "ckpt-lora": eval_result([0.3, 0.4, 0.3, 0.6], kl=0.05),
    }
    monkeypatch.setattr(job_arms, "run_ours", run_ours)
    monkeypatch.setattr(job_arms, "evaluate", lambda config, extra, checkpoint, *a: finals[checkpoint])
    args = ["--seconds", "7", "--lora-lr", "2e-4", "--workdir", str(tmp_path / "w")]
    assert job_arms.main([*args, "--results-dir", str(tmp_path), "--results-md", str(tmp_path / "R.md")]) == 0

    assert trained == {
        "full": ([], 7.0, True),
        "lora": (["learner.lora.rank=4", "learner.lr=0.0002"], 7.0, True),
    }
    result = json.loads((tmp_path / "lora_job.json").read_text())
    full, lora = result["runs"]["full"]["gain"], result["runs"]["lora"]["gain"]
    assert abs(full["delta"] - 0.2) < 1e-12 and abs(lora["delta"] - 0.4) < 1e-12
    # lora - full per prompt: 0.2, 0.2, 0.0, 0.4 -> mean 0.2, sample std sqrt(0.08 / 3), SE that / 2
    diff = result["differences"]["lora_minus_full"]
    assert abs(diff["delta"] - 0.2) < 1e-12
    assert abs(diff["delta_stderr"] - (0.08 / 3) ** 0.5 / 2) < 1e-12
    table = (tmp_path / "R.md").read_text()
    # full: 48 samples by t = 150 (1.0/s from launch), 32 in the 20 s after step 1 (1.6/s); lora: 64 by 160
    assert result["runs"]["full"]["samples_per_s"] == pytest.approx(48 / 50)
    assert result["runs"]["full"]["steady_samples_per_s"] == pytest.approx(32 / 20)
    assert "| lora | learner.lora.rank=4 learner.lr=0.0002 | 4 | 64 | 1.07 | 1.6 |" in table
    assert "LoRA minus the default job (vllm engine, whole model), final policies paired over prompts: " in table
    assert "+0.200 +- 0.082 (+2.4 SE); samples/s 1.11x." in table


def test_engine_arm_writes_its_own_section(tmp_path, monkeypatch):
    def run_ours(config, overrides, seconds, workdir):
        return {
            "steps": 1,
            "samples": 16,
            "model": workdir.name,
            "launched": 0.0,
            "step_times": [8.0],
            "step_samples": [16],
        }

    monkeypatch.setattr(job_arms, "run_ours", run_ours)
    monkeypatch.setattr(job_arms, "evaluate", lambda config, extra, checkpoint, *a: eval_result([0.1, 0.3]))
    args = ["--arms", "full,hf", "--workdir", str(tmp_path / "w"), "--results-dir", str(tmp_path)]
    assert job_arms.main([*args, "--results-md", str(tmp_path / "R.md")]) == 0
    result = json.loads((tmp_path / "hf_job.json").read_text())
    assert result["runs"]["hf"]["overrides"] == ["generator.engine=hf"]
    assert result["differences"]["hf_minus_full"]["delta"] == 0.0
    assert "<!-- bench:hf_job -->" in (tmp_path / "R.md").read_text()


def test_an_unknown_arm_is_refused_before_any_run():
    with pytest.raises(ValueError, match="unknown arm 'qlora'"):
        job_arms.main(["--arms", "full,qlora"])
