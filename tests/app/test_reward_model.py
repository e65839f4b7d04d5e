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
from streamrl.stages.finetune import StageError
from streamrl.stages.reward_model import run_rm
from streamrl.stages.rlhf_data import load_examples, split_examples

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
    section = {
        "base_model": str(model),
        "data": {"path": str(data), "eval_rows": eval_rows},
        "epochs": 3,
        "batch_size": 8,
        "lr": 3e-3,
        "threads": 1,
        "trainable_layers": 1,
        **rm,
    }
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
    summary = run_rm(
        rm_config(tmp_path, tiny_model_dir, data, eval_rows=30, normalize=False, cache_frozen=False),
        log=lambda line: None,
    )
    assert summary["heldout_comparisons"] == 3 * summary["heldout_rows"]  # C(3, 2) per prompt
    assert summary["heldout_accuracy"] > 0.8 and summary["bias"] == 0.0


def test_single_responses_are_refused(tiny_model_dir, tmp_path):
    data = tmp_path / "demos.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"p{i}", "response": " r"}) + "\n" for i in range(10)))
    with pytest.raises(StageError, match="has one response; a reward model learns from ranked responses"):
        run_rm(rm_config(tmp_path, tiny_model_dir, data, eval_rows=2))


def test_proxy_gold_split_is_disjoint_deterministic_halves():
    from streamrl.stages.rlhf_data import Example, split_proxy_gold

    examples = [
        Example(({"role": "user", "content": f"p{i % 37}"},), f"p{i % 37}", (" a", " b"), i + 1) for i in range(60)
    ]  # 37 prompts, 23 of them on two rows
    proxy, gold = split_proxy_gold(examples, seed=3)
    assert len(proxy) + len(gold) == 60 and not {e.text for e in proxy} & {e.text for e in gold}
    assert len({e.text for e in proxy}) == 19 and len({e.text for e in gold}) == 18  # ceil / floor of 37 / 2
    assert [e.row for e in proxy] == sorted(e.row for e in proxy)  # input order kept
    shuffled = list(reversed(examples))
    again_proxy, again_gold = split_proxy_gold(shuffled, seed=3)
    assert {e.row for e in again_proxy} == {e.row for e in proxy}
    assert {e.row for e in again_gold} == {e.row for e in gold}
    other, _ = split_proxy_gold(examples, seed=4)
    assert {e.text for e in other} != {e.text for e in proxy}  # the seed matters
    with pytest.raises(ValueError, match="cannot be split into a proxy and a gold half"):
        split_proxy_gold(examples[:1] + [examples[37]], seed=3)  # rows 1 and 38 share prompt p0


@pytest.fixture(scope="module")
def proxy_gold(tiny_model_dir, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("rm-gold")
    data = preference_task(tmp_path / "pairs.jsonl", rows=120)
    computed: list[int] = []
    from streamrl.stages.finetune import Trunk

    lower = Trunk._lower

    def counting(self, input_ids, attention_mask):
        computed.append(input_ids.shape[0])
        return lower(self, input_ids, attention_mask)

    Trunk._lower = counting
    try:
        summary = run_rm(rm_config(tmp_path, tiny_model_dir, data, eval_rows=30, gold=True), log=lambda line: None)
    finally:
        Trunk._lower = lower
    return summary, data, tmp_path, sum(computed)


@pytest.mark.slow
def test_gold_writes_proxy_and_gold_measured_on_the_same_heldout_rows(proxy_gold):
    summary, data, _, computed = proxy_gold
    root = Path(summary["output_dir"])
    proxy, gold = summary["models"]["proxy"], summary["models"]["gold"]
    assert summary["gold"] is True and (root / "COMPLETE").is_file()
    assert proxy["output_dir"] == str(root / "proxy") and gold["output_dir"] == str(root / "gold")
    assert proxy["train_rows"] + gold["train_rows"] == summary["train_rows"] == 90
    assert abs(proxy["train_rows"] - gold["train_rows"]) <= 1  # one row per prompt here
    assert proxy["heldout_rows"] == gold["heldout_rows"] == 30 == proxy["heldout_comparisons"]
    for part in (proxy, gold):
        assert part["heldout_accuracy"] - 3 * part["heldout_accuracy_stderr"] > 0.5
        rm = RewardModel(part["output_dir"], device=CPU)
        assert rm.score(["q1:"], [" aaaaa"])[0] > rm.score(["q1:"], [" bbbbb"])[0]
    assert summary["heldout_accuracy"] == proxy["heldout_accuracy"]  # the proxy's figures at the top
    # every distinct text (90 training + 30 held-out rows, 2 responses each) went through the frozen blocks once
    assert computed == 240


@pytest.mark.slow
def test_shared_features_give_the_same_gold_head_as_training_it_alone(proxy_gold, tiny_model_dir):
    """The gold model trained on the proxy's cached features equals the gold model trained alone
    on its half (a file of the gold rows and the same held-out rows, which stay the first in hash
    order), which computes its own features."""
    from streamrl.stages.rlhf_data import split_proxy_gold

    summary, data, tmp_path, _ = proxy_gold
    examples = load_examples(data)
    train, held = split_examples(examples, eval_rows=30, seed=0)
    _, gold_rows = split_proxy_gold(train, seed=0)
    keep = {e.row for e in gold_rows + held}
    lines = [line for i, line in enumerate(data.read_text().splitlines(), start=1) if i in keep]
    alone_data = tmp_path / "gold-alone.jsonl"
    alone_data.write_text("\n".join(lines) + "\n")
    alone_cfg = rm_config(tmp_path / "alone", tiny_model_dir, alone_data, eval_rows=30)
    alone = run_rm(alone_cfg, log=lambda line: None)
    shared = summary["models"]["gold"]
    assert alone["train_rows"] == shared["train_rows"] and alone["heldout_rows"] == shared["heldout_rows"]
    a = AutoModelForSequenceClassification.from_pretrained(alone["output_dir"]).state_dict()
    b = AutoModelForSequenceClassification.from_pretrained(shared["output_dir"]).state_dict()
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5, msg=name)
    assert alone["heldout_accuracy"] == pytest.approx(shared["heldout_accuracy"])
    # the same head; its bias is computed on every training row's demonstration, not on its half's only
    assert alone["bias"] != pytest.approx(shared["bias"], abs=1e-4)


@pytest.mark.slow
def test_gold_models_are_normalised_on_every_demonstration(proxy_gold):
    """rm.gold: the proxy and the gold model each score the demonstrations of all the training
    rows (both halves: the SFT demonstrations) 0 on average, not only those of their own half."""
    from streamrl.stages.rlhf_data import split_proxy_gold

    summary, data, _, _ = proxy_gold
    train, _ = split_examples(load_examples(data), eval_rows=30, seed=0)
    halves = dict(zip(("proxy", "gold"), split_proxy_gold(train, seed=0)))
    for role, part in summary["models"].items():
        rm = RewardModel(part["output_dir"], device=CPU)
        scores = rm.score([e.text for e in train], [e.demonstration for e in train])
        assert sum(scores) / len(scores) == pytest.approx(0.0, abs=1e-4), role
        own = rm.score([e.text for e in halves[role]], [e.demonstration for e in halves[role]])
        assert abs(sum(own) / len(own)) > 1e-3  # on its own half alone the mean is not 0: the test can tell


def test_check_refuses_ppo_on_the_gold_model_or_the_bare_rm_folder(tmp_path):
    rm = tmp_path / "run" / "rm"

    def problems(model: Path, value_model: Path | None = None) -> str:
        learner = {"advantage": "gae", "value_model": str(value_model)} if value_model else {}
        with pytest.raises(ValueError) as err:
            validate_config(
                {
                    "run": {"output_dir": str(tmp_path / "run")},
                    "rm": {"gold": True},
                    "scorer": {"rewards": [{"model": str(model)}]},
                    "learner": learner,
                }
            )
        return str(err.value)

    assert "is the gold reward model, which PPO must never optimise" in problems(rm / "gold")
    assert f'fix: use "{rm / "proxy"}"' in problems(rm / "gold")
    assert "learner.value_model: with rm.gold = true" in problems(rm / "proxy", value_model=rm)
    validate_config(
        {
            "run": {"output_dir": str(tmp_path / "run")},
            "rm": {"gold": True},
            "scorer": {"rewards": [{"model": str(rm / "proxy")}]},
        }
    )  # the proxy is fine
    validate_config(
        {"run": {"output_dir": str(tmp_path / "run")}, "scorer": {"rewards": [{"model": str(rm)}]}}
    )  # one reward model: its folder


@pytest.mark.slow
def test_a_complete_stage_is_reused_only_with_the_same_settings(trained, tiny_model_dir):
    summary, data = trained
    tmp_path = Path(summary["output_dir"]).parent.parent
    lines: list[str] = []
    again = run_rm(rm_config(tmp_path, tiny_model_dir, data, threads=2), log=lines.append)  # threads: same model
    assert again == summary and any("is complete; skipped" in line for line in lines)
    with pytest.raises(
        StageError,
        match=r"made with other settings \(data.eval_rows: 40 -> 30, lr: 0.003 -> 0.001\); "
        r"fix: redo it \(`streamrl rm --force`",
    ):
        run_rm(rm_config(tmp_path, tiny_model_dir, data, eval_rows=30, lr=1e-3), log=lines.append)
    with pytest.raises(StageError, match=r"gold: False -> True"):
        run_rm(rm_config(tmp_path, tiny_model_dir, data, gold=True), log=lines.append)


def test_a_complete_stage_is_refused_when_its_base_model_was_retrained(tmp_path):
    """`streamrl sft --force` rewrites the SFT folder that `streamrl rm` starts from under the same
    name: the complete reward model, trained on the old weights, is refused (with the fix) instead
    of being silently kept; --force retrains it on the new weights."""
    from streamrl.common.models import build_char_tokenizer, build_tiny_model, save_tiny_model

    base = save_tiny_model(tmp_path / "sft", seed=0)
    data = preference_task(tmp_path / "pairs.jsonl", rows=24)
    config = rm_config(tmp_path, base, data, eval_rows=4, epochs=1)
    first = run_rm(config, log=lambda line: None)
    assert len(first["base_fingerprint"]) == 16
    lines: list[str] = []
    assert run_rm(config, log=lines.append) == first  # the same weights: reused
    tokenizer = build_char_tokenizer()
    build_tiny_model(tokenizer, seed=5).save_pretrained(base)  # what `streamrl sft --force` does to the folder
    with pytest.raises(
        StageError,
        match=r"rm: .* is complete but was trained from other weights of rm.base_model = "
        r".*fix: redo it \(`streamrl rm --force`",
    ):
        run_rm(config, log=lines.append)
    again = run_rm(config, force=True, log=lambda line: None)
    assert again["base_fingerprint"] not in ("", first["base_fingerprint"])
    assert run_rm(config, log=lines.append)["base_fingerprint"] == again["base_fingerprint"]


@pytest.mark.slow
def test_rm_with_lora_trains_adapters_and_the_score_head(tiny_model_dir, tmp_path):
    """``[rm.lora]``: adapters on every block plus the whole score head train; the output is a plain
    sequence classifier (adapters merged) that beats chance on held-out pairs."""
    data = preference_task(tmp_path / "pairs.jsonl")
    config = rm_config(tmp_path, tiny_model_dir, data, trainable_layers=None, lora={"rank": 4})
    summary = run_rm(config, log=lambda line: None)
    assert summary["trainable_parameters"] == 2 * 4 * (4 * 128 + 3 * 320) + 64  # adapters + score [1, 64]
    assert summary["heldout_accuracy"] - 3 * summary["heldout_accuracy_stderr"] > 0.5
    model = AutoModelForSequenceClassification.from_pretrained(summary["output_dir"])
    assert not any("lora" in name for name in model.state_dict())
    assert model.score.weight.abs().sum() > 0  # the zero-initialised head trained
