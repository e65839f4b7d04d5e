"""Held-out evaluation and the run report on the tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from streamrl.common.config import validate_config
from streamrl.common.messages import FinishReason, SamplingParams
from streamrl.common.models import build_char_tokenizer, build_tiny_model
from streamrl.common.prompts import Prompt, load_prompts, split_prompts
from streamrl.evaluation import evaluate, held_out_prompts, scored_group
from streamrl.report import plot_learning_curve
from streamrl.services.generator.sampling import Completion
from streamrl.services.learner.batch import collate
from support import tiny_eval_config as tiny_config


def test_held_out_prompts_are_the_eval_split(tiny_model_dir):
    cfg = tiny_config(tiny_model_dir)
    prompts = load_prompts(cfg.generator.prompts)
    train, held = split_prompts(prompts, eval_fraction=0.1, seed=0)
    got = held_out_prompts(cfg, None)
    assert [p.prompt_id for p in got] == [p.prompt_id for p in held]
    assert not {p.prompt_id for p in got} & {p.prompt_id for p in train}
    assert len(held_out_prompts(cfg, 3)) == 3


def test_evaluate_is_reproducible_and_reward_matches_the_rule(tiny_model_dir):
    cfg = tiny_config(tiny_model_dir)
    a = evaluate(cfg, str(tiny_model_dir), limit=6, seed=7, num_samples=6)
    b = evaluate(cfg, str(tiny_model_dir), limit=6, seed=7, num_samples=6)
    assert a.reward_mean == b.reward_mean
    assert [s["completion"] for s in a.samples] == [s["completion"] for s in b.samples]
    # the policy is the reference: KL is exactly zero
    assert a.kl_mean == 0.0 and a.kl_per_token == 0.0
    # reward = fraction of "e" in each completion; stderr = sample std / sqrt(n)
    fractions = [s["completion"].count("e") / max(1, len(s["completion"])) for s in a.samples]
    assert [s["reward"] for s in a.samples] == fractions
    mean = sum(fractions) / 6
    std = math.sqrt(sum((f - mean) ** 2 for f in fractions) / 5)
    assert math.isclose(a.reward_mean, mean) and math.isclose(a.reward_stderr, std / math.sqrt(6))


def test_evaluate_reports_positive_kl_for_a_changed_policy(tiny_model_dir, tmp_path):
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(tokenizer, seed=0)
    with torch.no_grad():
        model.lm_head.weight.add_(0.05 * torch.randn_like(model.lm_head.weight))  # tied: embeddings too
    model.save_pretrained(tmp_path / "changed")
    tokenizer.save_pretrained(tmp_path / "changed")
    result = evaluate(tiny_config(tiny_model_dir), str(tmp_path / "changed"), limit=8, seed=1)
    assert result.kl_mean > 0.01 and result.prompts == 8


def test_evaluate_under_top_p_compares_with_the_untruncated_reference(tiny_model_dir, tmp_path):
    """top_p < 1: the policy as it samples against the untruncated reference, as in the learner:
    for the initial policy each token's KL is -log(nucleus mass), in (0, -log top_p], and a
    changed policy's is finite (the reference's own nucleus would give -inf log-probs)."""
    cfg = tiny_config(tiny_model_dir)
    cfg.generator.top_p = 0.6
    same = evaluate(cfg, str(tiny_model_dir), limit=4, seed=2)
    assert 0.0 < same.kl_per_token <= -math.log(0.6) + 1e-6
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(tokenizer, seed=0)
    with torch.no_grad():
        model.lm_head.weight.add_(0.05 * torch.randn_like(model.lm_head.weight))
    model.save_pretrained(tmp_path / "changed")
    tokenizer.save_pretrained(tmp_path / "changed")
    changed = evaluate(cfg, str(tmp_path / "changed"), limit=4, seed=2)
    assert math.isfinite(changed.kl_mean) and changed.kl_mean != 0.0


def test_learning_curve_png(tmp_path):
    records = [{"step": i, "reward_mean": i / 10, "kl": i / 100} for i in range(1, 21)]
    png = plot_learning_curve(records, tmp_path / "curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_several_samples_per_prompt_average_within_prompt(tiny_model_dir):
    cfg = tiny_config(tiny_model_dir)
    result = evaluate(cfg, str(tiny_model_dir), limit=4, seed=3, samples_per_prompt=3, num_samples=12)
    assert result.prompts == 4 and result.samples_per_prompt == 3 and len(result.samples) == 12
    per_prompt = [sum(s["reward"] for s in result.samples[i : i + 3]) / 3 for i in range(0, 12, 3)]
    assert math.isclose(result.reward_mean, sum(per_prompt) / 4)
    mean = sum(per_prompt) / 4
    std = math.sqrt(sum((r - mean) ** 2 for r in per_prompt) / 3)
    assert math.isclose(result.reward_stderr, std / 2)


def test_eval_rewards_are_scored_on_the_same_completions_and_compared_paired(tiny_model_dir, tmp_path):
    from streamrl.evaluation import compare

    prompts = tmp_path / "heldout.jsonl"
    prompts.write_text("".join(f'{{"id": "h{i}", "text": "The film {i}"}}\n' for i in range(5)))
    cfg = tiny_config(tiny_model_dir)
    cfg.eval = cfg.eval.model_validate(
        {
            "prompts": {"path": str(prompts)},
            "rewards": [
                {
                    "function": "streamrl.services.scorer.rewards:count_char",
                    "kwargs": {"char": "a"},
                    "name": "a_share",
                    "weight": 3.0,
                }
            ],
        }
    )
    result = evaluate(cfg, str(tiny_model_dir), seed=5, samples_per_prompt=2, num_samples=10)
    assert result.prompt_ids == [f"h{i}" for i in range(5)]  # all of eval.prompts, not a split of them
    shares = [s["completion"].count("a") / max(1, len(s["completion"])) for s in result.samples]
    per_prompt = [(shares[i] + shares[i + 1]) / 2 for i in range(0, 10, 2)]
    assert result.per_prompt["a_share"] == pytest.approx(per_prompt)  # unweighted
    mean = sum(per_prompt) / 5
    se = math.sqrt(sum((x - mean) ** 2 for x in per_prompt) / 4) / math.sqrt(5)
    assert result.rewards["a_share"] == pytest.approx({"mean": mean, "stderr": se})
    assert "a_share" in result.line()

    other = evaluate(cfg, str(tiny_model_dir), seed=6, samples_per_prompt=2)
    change = compare(result, other, "a_share")
    diffs = [y - x for x, y in zip(result.per_prompt["a_share"], other.per_prompt["a_share"])]
    d = sum(diffs) / 5
    paired = math.sqrt(sum((x - d) ** 2 for x in diffs) / 4) / math.sqrt(5)
    assert change["delta"] == pytest.approx(d) and change["delta_stderr"] == pytest.approx(paired)
    assert change["delta_stderr_unpaired"] == pytest.approx(math.hypot(se, other.rewards["a_share"]["stderr"]))
    assert compare(result, other)["before"] == pytest.approx(result.reward_mean)
    with pytest.raises(ValueError, match="different prompts"):
        compare(result, evaluate(cfg, str(tiny_model_dir), limit=3, seed=6))


def test_eval_rewards_need_distinct_names():
    with pytest.raises(ValueError, match="set `name`"):
        validate_config({"eval": {"rewards": [{"function": "count_char"}]}})
    with pytest.raises(ValueError, match="repeat"):
        validate_config(
            {"eval": {"rewards": [{"function": "count_char", "name": "g"}, {"function": "count_char", "name": "g"}]}}
        )


def test_scored_group_makes_one_group_of_completions_sampled_offline():
    """scored_group (the generators' group_rollouts, scored): member j is rollout '{group}:{j}' with reward
    j, the completion's tokens, log-probs and finish reason, group_size = the number of completions;
    collate takes the result as one group."""
    completions = [
        Completion(
            prompt_tokens=np.array([5, 6], np.int32),
            completion_tokens=np.array([7, 8, 9][: n + 1], np.int32),
            logprobs=np.array([-0.5, -1.0, -1.5][: n + 1], np.float32),
            finish_reason=reason,
            text="xyz"[: n + 1],
        )
        for n, reason in enumerate([FinishReason.STOP, FinishReason.LENGTH])
    ]
    sampling = SamplingParams(temperature=0.7, top_p=1.0, max_new_tokens=3)
    prompt = Prompt("p3", "Hi", metadata={"answer": "7"})
    got = scored_group(prompt, completions, [0.25, -1.0], sampling=sampling, generator_id="eval", group_number=7)
    assert [(s.rollout.rollout_id, s.rollout.group_id, s.rollout.prompt_id, s.reward) for s in got] == [
        ("eval:7:0", "eval:7", "p3", 0.25),
        ("eval:7:1", "eval:7", "p3", -1.0),
    ]
    assert [(s.rollout.group_size, s.rollout.policy_version, s.rollout.metadata) for s in got] == [
        (2, 0, {"answer": "7"})
    ] * 2
    assert [s.rollout.finish_reason for s in got] == [FinishReason.STOP, FinishReason.LENGTH]
    np.testing.assert_array_equal(got[1].rollout.behaviour_logprobs, [-0.5, -1.0])
    b = collate(got, pad_id=0)
    assert b.group_ids.tolist() == [0, 0] and b.mask.tolist() == [[1, 0], [1, 1]]
    with pytest.raises(ValueError, match="2 completions but 1 rewards"):
        scored_group(prompt, completions, [1.0], sampling=sampling, generator_id="eval", group_number=8)
