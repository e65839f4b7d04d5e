"""A reward that raises on every batch, in a real run: the scorer logs the exception
once with a rollout id and then REWARD FAILING, its metrics say so, `streamrl status` shows it, and the
learner's wait message names the failing reward instead of guessing."""

from __future__ import annotations

import pytest

from streamrl.common.config import load_config
from streamrl.status import render
from streamrl.testing import local_run_config, scrape, wait_until, write_config

pytestmark = pytest.mark.slow


def test_a_failing_reward_is_named_by_scorer_status_and_learner(tmp_path, tiny_model_dir, services):
    sections = local_run_config(tmp_path, tiny_model_dir)
    # the review openings carry no reference answer: gsm8k_exact_match raises ValueError on every batch
    sections["scorer"] = {"rewards": [{"function": "gsm8k_exact_match"}], "failing_after": 2}
    sections["transport"]["request_timeout_s"] = 1.0  # the learner warns after 3 s of waiting
    sections["generator"].update(max_new_tokens=4)
    config = write_config(tmp_path / "job.toml", sections)
    cfg = load_config(config)
    run = services(config)
    for name in ("buffer", "learner", "scorer", "generator"):
        run.start(name)
    logs = {name: tmp_path / f"{name}-0.log" for name in ("learner", "scorer")}

    def learner_names_it() -> bool:
        return "the reward is failing in scorer-0" in logs["learner"].read_text(errors="replace")

    assert wait_until(learner_names_it, timeout=240), run.logs()
    scorer_log = logs["scorer"].read_text()
    assert scorer_log.count("reward (gsm8k_exact_match) raised ValueError on rollout ") == 1
    assert "metadata[0] has no 'answer' key" in scorer_log  # the traceback, once
    assert "REWARD FAILING: the last 2 micro-batches all raised (last: ValueError: gsm8k_exact_match: metadata[0] " \
           "has no 'answer' key" in scorer_log
    learner_line = next(line for line in logs["learner"].read_text().splitlines()
                        if "the reward is failing in scorer-0" in line)
    assert "has waited" in learner_line and "on data: no batch of 2 groups from the buffer at" in learner_line
    assert "raised ValueError: gsm8k_exact_match: metadata[0] has no 'answer' key" in learner_line
    samples = scrape(cfg.metrics.scorer_port)
    assert samples["streamrl_scorer_reward_failing"] == 1
    assert samples["streamrl_scorer_reward_failures_total{reason=ValueError}"] >= 2
    assert samples.get("streamrl_scorer_rollouts_scored_total", 0) == 0
    table = render(cfg, 1, 0.5)
    assert "REWARD FAILING (" in next(line for line in table.splitlines() if line.startswith("scorer-0"))
