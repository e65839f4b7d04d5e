"""bench.feedback (not run here: it trains SmolLM2 for minutes per arm): every arm's overrides make a
valid run config with its combination, and the simulated person's settings reach the labeller."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from bench.feedback import ARMS, CONFIG, across_seeds, arm_overrides, main, person_args
from streamrl.common.config import load_config
from streamrl.common.modes import HumanCombination


@pytest.mark.parametrize("arm", ARMS)
def test_every_arm_is_a_valid_config(tmp_path, arm):
    args = argparse.Namespace(
        lr=2e-5,
        max_new_tokens=24,
        beta=1.0,
        beta_decay=0.99,
        candidates=4,
        credit_delay_min=1.0,
        credit_delay_max=3.0,
        labels_per_second=2.0,
        min_labels=8,
        steps=None,
        eval_every=None,
        engine=None,
    )
    overrides, _ = arm_overrides(tmp_path, arm, args, seed=3)
    cfg = load_config(CONFIG, overrides)
    assert cfg.run.seed == 3 and cfg.feedback.combination is HumanCombination(arm)
    assert cfg.learner.total_steps == 100000 and cfg.generator.engine == load_config(CONFIG, []).generator.engine
    # equal learner steps: the learner stops itself at --steps and checkpoints every --eval-every
    args.steps, args.eval_every, args.engine = 12, 4, "hf"
    cfg = load_config(CONFIG, arm_overrides(tmp_path, arm, args, seed=3)[0])
    assert (cfg.learner.total_steps, cfg.learner.checkpoint_every, cfg.generator.engine) == (12, 4, "hf")
    assert cfg.feedback.enabled == (arm != "none")
    if arm != "none":
        assert (cfg.feedback.credit_delay_min_s, cfg.feedback.credit_delay_max_s) == (1.0, 3.0)
    assert set(ARMS) == {c.value for c in HumanCombination}


def test_the_person_and_the_seeds():
    args = argparse.Namespace(
        likes="char:o",
        labels_per_second=2.0,
        attention=0.5,
        delay_min=1.0,
        delay_max=3.0,
        noise=0.1,
        threshold=0.05,
        max_labels=300,
    )
    assert person_args(args, 7) == [
        "--likes",
        "char:o",
        "--labels-per-second",
        "2.0",
        "--attention",
        "0.5",
        "--delay-min",
        "1.0",
        "--delay-max",
        "3.0",
        "--noise",
        "0.1",
        "--seed",
        "7",
        "--threshold",
        "0.05",
        "--max-labels",
        "300",
    ]
    got = across_seeds(
        [{"arm": "none", "liked": 1.0}, {"arm": "none", "liked": 3.0}, {"arm": "q", "liked": 2.0}], "liked"
    )
    assert got["none"] == (2.0, 1.0, 2) and got["q"][0] == 2.0 and math.isnan(got["q"][1])
    with pytest.raises(SystemExit):
        main(["--arms", "none,nonsense"])


def test_a_summary_from_the_printed_runs(tmp_path, monkeypatch):
    """--from-log: the per-run JSON lines of an unfinished invocation give the table, the paired per-seed
    differences (hand-computed: q - none = +0.2 and +0.4 on seeds 0 and 1: mean 0.3, SE 0.1) and the plot."""
    import bench.feedback as feedback

    def run(arm, seed, liked):
        curve = [{"step": 0, "liked": 0.5}, {"step": 6, "liked": liked}]
        return {"arm": arm, "seed": seed, "steps": 6, "labels": 0, "wall_s": 60.0, "liked": liked, "vader": 0.1} | {
            "liked_se": 0.05,
            "vader_se": 0.01,
            "eval_prompts": 16,
            "curve": curve,
        }

    runs = [run("none", 0, 1.0), run("q_augmentation", 0, 1.2), run("none", 1, 0.8), run("q_augmentation", 1, 1.2)]
    log = tmp_path / "bench.log"
    log.write_text('{"seed": 0, "base": {}}\narm none, seed 0\n' + "\n".join(json.dumps(r) for r in runs) + "\n")
    written = {}
    monkeypatch.setattr(feedback, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(feedback, "write_results", lambda name, res, section: written.update(res=res, md=section))
    main(["--steps", "6", "--seeds", "0,1,2", "--arms", "none,q_augmentation", "--from-log", str(log)])
    assert [r["seed"] for r in written["res"]["results"]] == [0, 1, 0, 1]
    assert "paired +0.3000 (+3.0 SE)" in written["md"] and "First: q_augmentation" in written["md"]
    assert (tmp_path / "feedback.png").stat().st_size > 10_000
