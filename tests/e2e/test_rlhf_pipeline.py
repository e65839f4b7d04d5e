"""``streamrl pipeline`` end to end at a tiny size: SFT -> proxy and gold reward models -> held-out
evaluation -> streaming PPO (real processes under the launcher) against the proxy with the critic
from it, the KL penalty and PPO-ptx -> evaluation after; then a second invocation skips every stage."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from streamrl.pipeline import STAGES, PipelineError, run_pipeline
from streamrl.testing import local_run_config, write_config


def pairs(path: Path, rows: int = 48) -> Path:
    """Preference pairs whose chosen responses hold more 'e' (learnable by the tiny model)."""
    rng = random.Random(0)
    lines = [
        {
            "prompt": f"Review {i}:",
            "chosen": " " + "".join(rng.choice("eeexyz ") for _ in range(8)),
            "rejected": " " + "".join(rng.choice("bbbxyz ") for _ in range(8)),
        }
        for i in range(rows)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in lines))
    return path


def pipeline_config(tmp_path: Path, tiny_model_dir: Path, **changes) -> Path:
    run = tmp_path / "run"
    sft, rm = run / "sft", run / "rm"
    stage = {
        "data": {"path": str(pairs(tmp_path / "pairs.jsonl")), "eval_rows": 8},
        "threads": 1,
        "batch_size": 8,
        "max_length": 48,
    }
    sections = local_run_config(
        tmp_path,
        tiny_model_dir,
        learner={
            "total_steps": 2,
            "advantage": "gae",
            "value_model": str(rm / "proxy"),
            "value_lr": 1e-3,
            "lr": 1e-3,
            "kl_coef": 0.05,
            "ptx_coef": 0.1,
            "ptx_data": {"kind": "jsonl", "path": str(sft / "demonstrations.jsonl")},
        },
    )
    sections["model"] = {"path": str(sft)}
    sections["generator"].update(
        max_new_tokens=8, prompts={"kind": "jsonl", "path": str(sft / "prompts.jsonl"), "eval_fraction": 0.0}
    )
    sections["scorer"] = {"rewards": [{"model": str(rm / "proxy"), "name": "proxy"}]}
    sections["sft"] = {**stage, "base_model": str(tiny_model_dir), "lr": 1e-3, "trainable_layers": 1}
    sections["rm"] = {**stage, "base_model": str(sft), "lr": 3e-3, "epochs": 2, "trainable_layers": 0, "gold": True}
    sections["eval"] = {
        "prompts": {"kind": "jsonl", "path": str(sft / "heldout_prompts.jsonl")},
        "limit": 4,
        "samples_per_prompt": 2,
        "rewards": [{"model": str(rm / "gold"), "name": "gold"}],
    }
    for section, values in changes.items():
        sections[section].update(values)
    return write_config(tmp_path / "pipeline.toml", sections)


@pytest.mark.slow
def test_pipeline_runs_every_stage_then_skips_them(tmp_path, tiny_model_dir):
    config = pipeline_config(tmp_path, tiny_model_dir)
    lines: list[str] = []
    summary = run_pipeline(config, log=lines.append)
    run = tmp_path / "run"

    # every stage's artefacts
    for name in ("config.json", "prompts.jsonl", "heldout_prompts.jsonl", "demonstrations.jsonl", "COMPLETE"):
        assert (run / "sft" / name).is_file(), name
    for part in ("proxy", "gold"):
        assert (run / "rm" / part / "config.json").is_file() and (run / "rm" / part / "summary.json").is_file()
    assert (run / "rm" / "COMPLETE").is_file() and not (run / "rm" / "config.json").exists()
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert summary["ppo"]["final_checkpoint"] == str(run / "checkpoints" / "step-000002")
    for stage in ("eval_before", "eval_after"):
        assert (run / "pipeline" / f"{stage}.json").is_file()

    # the summary
    assert json.loads((run / "pipeline_summary.json").read_text()) == summary
    assert list(summary["stages"]) == list(STAGES)
    assert all(s["status"] == "ran" and s["wall_seconds"] > 0 for s in summary["stages"].values())
    models = summary["reward_models"]
    assert set(models) == {"proxy", "gold"} and models["proxy"]["dir"] == str(run / "rm" / "proxy")
    assert models["proxy"]["train_rows"] + models["gold"]["train_rows"] == 40
    assert models["proxy"]["heldout_comparisons"] == models["gold"]["heldout_comparisons"] == 8
    assert all(0 <= m["heldout_accuracy"] <= 1 and m["heldout_accuracy_stderr"] >= 0 for m in models.values())
    ev = summary["eval"]
    assert ev["prompts"] == 4 and ev["samples_per_prompt"] == 2 and set(ev["scores"]) == {"proxy", "gold"}
    for score in ev["scores"].values():
        assert score["delta"] == pytest.approx(score["after"] - score["before"])
        assert score["delta_stderr"] >= 0 and score["before_stderr"] >= 0
    assert ev["kl_per_completion_before"] == 0.0  # the SFT policy is the reference
    assert ev["kl_per_completion_after"] != 0.0  # two PPO steps at lr 1e-3 moved the policy
    assert summary["sft"]["heldout_loss_after"] < summary["sft"]["heldout_loss_before"]
    # the proxy score before PPO is the proxy RM's score of the SFT policy's completions (KL 0 there)
    before = json.loads((run / "pipeline" / "eval_before.json").read_text())["result"]
    assert ev["scores"]["proxy"]["before"] == pytest.approx(before["reward_mean"])
    assert ev["scores"]["gold"]["before"] == pytest.approx(before["rewards"]["gold"]["mean"])
    table = (run / "pipeline_summary.md").read_text()
    assert "| proxy |" in table and "| gold |" in table and "KL to SFT" in table

    # a second invocation skips every completed stage and reports the same figures
    again = run_pipeline(config, log=lines.append)
    assert all(s["status"] == "skipped" for s in again["stages"].values())
    assert {k: s["wall_seconds"] for k, s in again["stages"].items()} == {
        k: s["wall_seconds"] for k, s in summary["stages"].items()
    }
    assert again["eval"] == summary["eval"] and again["reward_models"] == summary["reward_models"]


def test_unconnected_stages_are_refused_with_the_stage_and_fix(tmp_path, tiny_model_dir):
    config = pipeline_config(tmp_path, tiny_model_dir, model={"path": str(tiny_model_dir)}, eval={"rewards": []})
    with pytest.raises(PipelineError) as err:
        run_pipeline(config, log=lambda line: None)
    message = str(err.value)
    assert f"ppo: model.path is {tiny_model_dir}" in message
    assert f'model.path = "{tmp_path / "run" / "sft"}"' in message
    assert "eval: rm.gold = true but no [[eval.rewards]] reports the gold model" in message
    assert not (tmp_path / "run" / "sft").exists()  # nothing ran


def test_the_recipe_connects_its_stages():
    from streamrl.common.config import load_config
    from streamrl.pipeline import stage_dirs, wiring_problems
    from support import REPO

    config = load_config(REPO / "deploy" / "configs" / "rlhf.toml")
    assert wiring_problems(config) == [] and config.rm.gold
    dirs = stage_dirs(config)
    assert config.learner.value_model == str(dirs["proxy"]) and [s.name for s in config.eval.rewards] == ["gold"]
    assert config.eval.prompts.path == str(dirs["sft"] / "heldout_prompts.jsonl")
    assert config.sft.data.model_dump() == config.rm.data.model_dump()  # the same held-out rows in both stages


@pytest.mark.slow
def test_a_failing_stage_is_named_with_its_fix(tmp_path, tiny_model_dir):
    demos = tmp_path / "demos.jsonl"
    demos.write_text("".join(json.dumps({"prompt": f"Review {i}:", "response": " eee"}) + "\n" for i in range(20)))
    config = pipeline_config(tmp_path, tiny_model_dir, rm={"data": {"path": str(demos), "eval_rows": 4}})
    with pytest.raises(PipelineError, match=r"^stage rm: rm.data: row \d+ of .* has one response; .* fix: use "):
        run_pipeline(config, log=lambda line: None)
    assert (tmp_path / "run" / "sft" / "COMPLETE").is_file() and not (tmp_path / "run" / "rm").exists()
