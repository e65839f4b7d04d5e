"""The real pipeline on the real SmolLM2-135M-Instruct weights, for a few short steps."""

from __future__ import annotations

import json

import pytest
import torch

from streamrl.testing import local_run_config, scrape, wait_until, write_config
from support import REPO

pytestmark = pytest.mark.slow


def test_smollm2_trains_with_vader_reward(tmp_path, services):
    from streamrl.common.models import SMOLLM2_NAME, resolve_model_path

    base = resolve_model_path(SMOLLM2_NAME)  # converted once per machine into the cache
    sections = local_run_config(
        tmp_path,
        base,
        run={"max_staleness": 1},
        generator={
            "max_new_tokens": 6,
            "group_size": 2,
            "prompts_per_batch": 2,
            "prompts": {"kind": "jsonl", "path": str(REPO / "deploy/prompts/review_openings.jsonl")},
        },
        scorer={"rewards": [{"function": "streamrl.services.scorer.rewards:vader_sentiment"}]},
        buffer={"capacity_groups": 4},
        learner={"total_steps": 3, "groups_per_step": 2, "lr": 1e-4, "kl_coef": 0.05},
        transport={"weight_dtype": "bfloat16", "announce_interval_s": 0.5, "request_timeout_s": 20.0},
    )
    procs = services(write_config(tmp_path / "run.toml", sections))
    for name in ("learner", "buffer", "scorer", "generator"):
        procs.start(name)
    learner = procs.procs["learner-0"]
    assert wait_until(lambda: learner.poll() is not None, timeout=400), procs.logs()
    assert learner.returncode == 0, procs.logs()
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["version"] for r in records] == [1, 2, 3]
    assert scrape(sections["metrics"]["generator_port"])["streamrl_generator_policy_version"] >= 1

    # rewards were real VADER compound scores of the completions
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    samples = [s for r in records for s in r["samples"]]
    assert len(samples) == 6
    for s in samples:
        assert s["reward"] == analyzer.polarity_scores(s["completion"])["compound"], s
    assert all(-1.0 <= r["reward_mean"] <= 1.0 for r in records)
    assert scrape(sections["metrics"]["scorer_port"])["streamrl_scorer_rollouts_scored_total"] >= 3 * 2 * 2

    # the exported checkpoint loads with AutoModelForCausalLM, differs from the base, and generates
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path / "run" / "checkpoints" / "step-000003" / "model"
    trained = AutoModelForCausalLM.from_pretrained(folder)
    original = AutoModelForCausalLM.from_pretrained(base)
    changed = [n for n, p in trained.state_dict().items() if not torch.equal(p, original.state_dict()[n])]
    assert changed, "training did not change any weight"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("The movie was", return_tensors="pt")
    out = trained.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    assert tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip()
