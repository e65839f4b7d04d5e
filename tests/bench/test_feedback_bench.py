"""bench.feedback (not run here: it trains SmolLM2 for minutes per arm): every arm's overrides make a
valid run config with its combination, and the simulated person's settings reach the labeller."""

from __future__ import annotations

import argparse
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
    )
    overrides, _ = arm_overrides(tmp_path, arm, args, seed=3)
    cfg = load_config(CONFIG, overrides)
    assert cfg.run.seed == 3 and cfg.feedback.combination is HumanCombination(arm)
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
