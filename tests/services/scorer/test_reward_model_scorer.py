"""The scorer with a reward model trained by ``streamrl rm``: normalised, batched, truncated,
formatted as in training, summed with rule rewards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from streamrl.common.config import RewardSpec, validate_config
from streamrl.common.reward_model import RewardModel
from streamrl.services.scorer.rewards import RewardModelScorer, build_reward
from support import train_tiny_reward_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def rm_folder(tiny_model_dir, tmp_path_factory) -> Path:
    """A tiny RM trained to prefer responses with 'a' over responses with 'b'."""
    return train_tiny_reward_model(
        tmp_path_factory.mktemp("scorer-rm"), tiny_model_dir, preferred="a", pairs=120, eval_rows=20, max_length=24
    )


PROMPTS = ["q1:", "q2:", "a much longer prompt that the stored max_length of 24 tokens truncates:", "q4:"]
COMPLETIONS = [" aaaa", " bbbb", " aaxa", ""]


def test_scorer_uses_the_stored_bias_and_length(rm_folder):
    scorer = RewardModelScorer(str(rm_folder), batch_size=3, device=CPU)
    reference = RewardModel(str(rm_folder), device=CPU, batch_size=1)
    assert scorer.max_length == 24 and scorer.info.bias != 0
    scores = scorer(PROMPTS, COMPLETIONS, [{}] * 4)
    assert scores == pytest.approx(reference.score(PROMPTS, COMPLETIONS), abs=1e-5)  # batching changes nothing
    assert scores[0] > scores[1]  # learned preference: 'a' over 'b'
    # left truncation: the long prompt's start is cut, its end (the completion) scored
    assert scores[2] == pytest.approx(reference.score_texts([(PROMPTS[2] + COMPLETIONS[2])[-24:]])[0], abs=1e-5)


def test_rm_summed_with_a_rule_reward(rm_folder):
    reward = build_reward(
        [
            RewardSpec(model=str(rm_folder), weight=2.0, batch_size=2, name="rm"),
            RewardSpec(function="count_char", weight=0.5, kwargs={"char": "a"}),
        ],
        device=CPU,
    )
    totals, parts = reward(PROMPTS, COMPLETIONS, [{}] * 4)
    expected_rm = RewardModel(str(rm_folder), device=CPU).score(PROMPTS, COMPLETIONS)
    for total, part, rm_score in zip(totals, parts, expected_rm):
        assert part["rm"] == pytest.approx(rm_score, abs=1e-5)
        assert total == pytest.approx(2.0 * part["rm"] + 0.5 * part["count_char"], abs=1e-6)


def test_chat_template_wraps_raw_prompts_as_in_training(rm_folder, tmp_path):
    for f in rm_folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    wrapped = RewardModelScorer(str(tmp_path), device=CPU, chat_template=True)
    plain = RewardModelScorer(str(tmp_path), device=CPU)
    assert wrapped.reward_model.render_prompt("q1:") == "<user>q1:<assistant>"
    assert wrapped(["q1:"], [" aa"], [{}]) == pytest.approx(plain(["<user>q1:<assistant>"], [" aa"], [{}]), abs=1e-6)


def test_check_refuses_prompts_formatted_unlike_training(rm_folder, tiny_model_dir):
    """The RM was trained on plain prompts: scoring chat-template prompts is refused by the
    config check (`streamrl check`, scorer start-up), with the key and the fix."""
    from streamrl.common.config import resource_problems

    def problems(**model):
        cfg = validate_config(
            {"model": {"path": str(tiny_model_dir), **model}, "scorer": {"rewards": [{"model": str(rm_folder)}]}}
        )
        return [p for p in resource_problems(cfg, ["scorer"]) if p.startswith("scorer.rewards[0]")]

    assert problems() == []
    (found,) = problems(chat_template=True)
    assert "trained on plain prompts but would score chat-template ones; fix: set model.chat_template = false" in found
