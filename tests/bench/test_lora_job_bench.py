"""bench/lora_job.py's bookkeeping: each arm trained with its overrides, gains paired over prompts, the table.

The training (``bench.trl_grpo.run_ours``) and ``streamrl eval`` it calls are exercised on the tiny job by
``test_bench_smoke.py::test_trl_grpo_ours_side_and_evaluation``; here they are replaced by stand-ins whose
held-out rewards are chosen so that every figure of the result can be computed by hand.
"""

from __future__ import annotations

import json

from bench import lora_job


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
        return {"steps": 3 if arm == "full" else 4, "samples": 48 if arm == "full" else 64, "model": f"ckpt-{arm}"}

    finals = {
        None: eval_result([0.0, 0.0, 0.0, 0.0]),
        "ckpt-full": eval_result([0.1, 0.2, 0.3, 0.2], kl=0.01),
        "ckpt-lora": eval_result([0.3, 0.4, 0.3, 0.6], kl=0.05),
    }
    monkeypatch.setattr(lora_job, "run_ours", run_ours)
    monkeypatch.setattr(lora_job, "evaluate", lambda config, extra, checkpoint, *a: finals[checkpoint])
    args = ["--seconds", "7", "--lora-lr", "2e-4", "--workdir", str(tmp_path / "w")]
    assert lora_job.main([*args, "--results-dir", str(tmp_path), "--results-md", str(tmp_path / "R.md")]) == 0

    assert trained == {
        "full": ([], 7.0, True),
        "lora": (["learner.lora.rank=4", "learner.lr=0.0002"], 7.0, True),
    }
    result = json.loads((tmp_path / "lora_job.json").read_text())
    full, lora = result["runs"]["full"]["gain"], result["runs"]["lora"]["gain"]
    assert abs(full["delta"] - 0.2) < 1e-12 and abs(lora["delta"] - 0.4) < 1e-12
    # lora - full per prompt: 0.2, 0.2, 0.0, 0.4 -> mean 0.2, sample std sqrt(0.08 / 3), SE that / 2
    diff = result["lora_minus_full"]
    assert abs(diff["delta"] - 0.2) < 1e-12
    assert abs(diff["delta_stderr"] - (0.08 / 3) ** 0.5 / 2) < 1e-12
    table = (tmp_path / "R.md").read_text()
    assert "| lora | learner.lora.rank=4 learner.lr=0.0002 | 4 | 64 |" in table
    assert "+0.200 +- 0.082 (+2.4 SE)" in table
