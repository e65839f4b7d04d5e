"""``streamrl rm`` on the tiny model: a separable preference task, the HF round trip, the bias."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from streamrl.common.config import validate_config
from streamrl.common.reward_model import RewardModel
from streamrl.finetune import StageError
from streamrl.reward_model import run_rm
from streamrl.rlhf_data import load_examples, split_examples

CPU = torch.device("cpu")


def preference_task(path: Path, rows: int = 160, k: int = 2, seed: int = 0) -> Path:
    """Better responses hold more 'a', worse ones more 'b' (separable from the text alone)."""
    rng = random.Random(seed)

    def response(letters: str) -> str:
        return " " + "".join(rng.choice(letters + "xyz") for _ in range(rng.randint(4, 10)))

    lines = []
    for i in range(rows):
        if k == 2:
            row = {"prompt": f"q{i}:", "chosen": response("aaa"), "rejected": response("bbb")}
        else:
            row = {"prompt": f"q{i}:", "responses": [response("aaa"), response("xyz"), response("bbb")][:k]}
        lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n")
    return path


def rm_config(tmp_path: Path, model: Path, data: Path, eval_rows: int = 40, **rm):
    section = {"base_model": str(model), "data": {"path": str(data), "eval_rows": eval_rows}, "epochs": 3,
               "batch_size": 8, "lr": 3e-3, "threads": 1, "trainable_layers": 1, **rm}
    return validate_config({"run": {"output_dir": str(tmp_path / "run")}, "rm": section})


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("rm-stage")
    data = preference_task(tmp_path / "pairs.jsonl")
    summary = run_rm(rm_config(tmp_path, tiny_model_dir, data), log=lambda line: None)
    return summary, data


@pytest.mark.slow
def test_rm_beats_chance_on_heldout_pairs(trained):
    summary, _ = trained
    assert summary["heldout_comparisons"] == summary["heldout_rows"] >= 40
    assert summary["heldout_accuracy"] - 3 * summary["heldout_accuracy_stderr"] > 0.5
    assert summary["heldout_margin"] > 0 and summary["heldout_accuracy_before"] == 0.5  # zero-initialised head
    assert summary["frozen_blocks"] == 1


@pytest.mark.slow
def test_checkpoint_round_trips_through_auto_model_for_sequence_classification(trained):
    summary, _ = trained
    folder = Path(summary["output_dir"])
    hf = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert hf.config.num_labels == 1 and hf.config.streamrl_reward["bias"] == pytest.approx(summary["bias"])
    rm = RewardModel(str(folder), device=CPU)
    for prompt, response in [("q1:", " aaxa"), ("q2:", " bbyb"), ("q3:", "")]:
        ids = torch.tensor([tokenizer(prompt + response)["input_ids"]])
        with torch.no_grad():
            raw = hf(input_ids=ids).logits[0, 0].item()
        assert rm.score([prompt], [response])[0] == pytest.approx(raw + summary["bias"], abs=1e-5)
    assert rm.score(["q1:"], [" aaaaa"])[0] > rm.score(["q1:"], [" bbbbb"])[0]


@pytest.mark.slow
def test_demonstrations_score_zero_on_average(trained):
    """The stored bias makes the mean normalised score of the demonstrations (the chosen
    responses of the training rows, what SFT imitates) 0, as InstructGPT normalises its RM."""
    summary, data = trained
    train, _ = split_examples(load_examples(data), eval_rows=40, seed=0)
    rm = RewardModel(summary["output_dir"], device=CPU)
    scores = rm.score([e.text for e in train], [e.demonstration for e in train])
    assert abs(summary["bias"]) > 0.5  # a real shift, not a no-op
    assert sum(scores) / len(scores) == pytest.approx(0.0, abs=1e-4)
    assert summary["heldout_mean_best"] > 0 > summary["heldout_mean_others"]


@pytest.mark.slow
def test_kwise_rows_train_with_all_comparisons(tiny_model_dir, tmp_path):
    data = preference_task(tmp_path / "ranked.jsonl", rows=100, k=3)
    summary = run_rm(rm_config(tmp_path, tiny_model_dir, data, eval_rows=30,
                               normalize=False, cache_frozen=False), log=lambda line: None)
    assert summary["heldout_comparisons"] == 3 * summary["heldout_rows"]  # C(3, 2) per prompt
    assert summary["heldout_accuracy"] > 0.8 and summary["bias"] == 0.0


def test_single_responses_are_refused(tiny_model_dir, tmp_path):
    data = tmp_path / "demos.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"p{i}", "response": " r"}) + "\n" for i in range(10)))
    with pytest.raises(StageError, match="has one response; a reward model learns from ranked responses"):
        run_rm(rm_config(tmp_path, tiny_model_dir, data, eval_rows=2))
