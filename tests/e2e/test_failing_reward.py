"""A reward that raises, in a real run.

On every batch: the scorer logs the exception once with a rollout id and then REWARD FAILING, its
metrics say so, `streamrl status` shows it, and the learner's wait message names the failing reward
instead of guessing.

On some inputs only: the run keeps training (only the groups with a failed rollout are dropped, and
their credits return to the generator), the scorer reports the failure fraction and REWARD FAILING
once it passes scorer.failing_fraction, and the learner's wait message names the reward.
"""

from __future__ import annotations

import time

import pytest

from streamrl.common.config import load_config
from streamrl.services.learner.diagnosis import data_wait_reason
from streamrl.status import render
from streamrl.testing import local_run_config, scrape, wait_until, write_config

pytestmark = pytest.mark.slow


def start_job(tmp_path, sections: dict, services):
    """Write ``sections`` as the job's config and start buffer, learner, scorer and generator; returns the
    loaded config, the running services and the learner's and scorer's log paths."""
    config = write_config(tmp_path / "job.toml", sections)
    run = services(config)
    for name in ("buffer", "learner", "scorer", "generator"):
        run.start(name)
    return load_config(config), run, {name: tmp_path / f"{name}-0.log" for name in ("learner", "scorer")}


def test_a_failing_reward_is_named_by_scorer_status_and_learner(tmp_path, tiny_model_dir, services):
    sections = local_run_config(tmp_path, tiny_model_dir)
    # the review openings carry no reference answer: gsm8k_exact_match raises ValueError on every batch
    sections["scorer"] = {"rewards": [{"function": "gsm8k_exact_match"}], "failing_after": 2}
    sections["transport"]["request_timeout_s"] = 1.0  # the learner warns after 3 s of waiting
    sections["generator"].update(max_new_tokens=4)
    cfg, run, logs = start_job(tmp_path, sections, services)

    def learner_names_it() -> bool:
        return "the reward is failing in scorer-0" in logs["learner"].read_text(errors="replace")

    assert wait_until(learner_names_it, timeout=240), run.logs()
    scorer_log = logs["scorer"].read_text()
    assert scorer_log.count("reward (gsm8k_exact_match) raised ValueError on rollout ") == 1
    assert "metadata[0] has no 'answer' key" in scorer_log  # the traceback, once
    assert (
        "REWARD FAILING: the last 2 micro-batches all raised (last: ValueError: gsm8k_exact_match: metadata[0] "
        "has no 'answer' key" in scorer_log
    )
    learner_line = next(
        line for line in logs["learner"].read_text().splitlines() if "the reward is failing in scorer-0" in line
    )
    assert "has waited" in learner_line and "on data: no batch of 2 groups from the buffer at" in learner_line
    assert "raised ValueError: gsm8k_exact_match: metadata[0] has no 'answer' key" in learner_line
    samples = scrape(cfg.metrics.scorer_port)
    assert samples["streamrl_scorer_reward_failing"] == 1
    assert samples["streamrl_scorer_reward_failures_total{reason=ValueError}"] >= 2
    assert samples.get("streamrl_scorer_rollouts_scored_total", 0) == 0
    table = render(cfg, 1, 0.5)
    assert "REWARD FAILING (" in next(line for line in table.splitlines() if line.startswith("scorer-0"))


FLAKY_REWARD = """
import zlib


def score(prompts, completions, metadata):
    \"\"\"The share of 'e' in each completion; raises on about 1 completion in 8 (by its text).\"\"\"
    for text in completions:
        if zlib.crc32(text.encode()) % 8 == 0:
            raise ValueError(f"cannot score {text!r}")
    return [text.count("e") / max(1, len(text)) for text in completions]
"""


def test_a_reward_that_raises_on_some_inputs_slows_the_run_but_does_not_stall_it(tmp_path, tiny_model_dir, services):
    """Before, one failure discarded the whole micro-batch (most of them, with 8 to 64 rollouts), the
    incomplete groups held the generator's credits until buffer.group_timeout_s, the run crawled, no
    REWARD FAILING was logged and the learner blamed the buffer."""
    (tmp_path / "flaky_reward.py").write_text(FLAKY_REWARD)  # the services start in tmp_path
    sections = local_run_config(tmp_path, tiny_model_dir)
    sections["scorer"] = {
        "rewards": [{"function": "flaky_reward:score"}],
        "failing_fraction": 0.05,
        "failing_window": 40,
    }
    sections["buffer"]["group_timeout_s"] = 600.0  # a dropped group must not wait for its timeout
    sections["buffer"]["credit_ttl_s"] = 600.0  # nor its credit for the ledger's expiry
    sections["learner"].update(total_steps=8, batch_timeout_s=600.0)
    cfg, run, logs = start_job(tmp_path, sections, services)

    def learner_step() -> float:
        try:
            return scrape(cfg.metrics.learner_port).get("streamrl_learner_step", 0.0)
        except ConnectionError:
            return 0.0

    assert wait_until(lambda: learner_step() >= 1, timeout=240), run.logs()
    started = time.monotonic()
    assert wait_until(lambda: "learner finished at step 8" in logs["learner"].read_text(), timeout=240), run.logs()
    per_step = (time.monotonic() - started) / 7
    scorer = scrape(cfg.metrics.scorer_port)
    failed = scorer.get("streamrl_scorer_reward_failed_rollouts_total{reason=ValueError}", 0.0)
    scored = scorer.get("streamrl_scorer_rollouts_scored_total", 0.0)
    assert failed >= 1 and scored >= 8 * 2 * 4, scorer  # the run saw failures and trained on the rest
    assert scorer["streamrl_scorer_rollouts_dropped_total{reason=reward_raised}"] == failed
    assert 0 < scorer["streamrl_scorer_reward_failure_fraction"] < 0.5
    assert scrape(cfg.metrics.buffer_port)["streamrl_buffer_groups_dropped_by_scorers_total"] >= 1
    assert per_step < 20, f"{per_step:.1f}s per learner step\n{run.logs()}"  # no stall on held credits
    scorer_log = logs["scorer"].read_text()
    assert scorer_log.count("reward (score) raised ValueError on rollout ") == 1  # the first, with its traceback
    assert "REWARD FAILING: the reward raised on " in scorer_log and "of the last 40 rollouts" in scorer_log
    reason = data_wait_reason(cfg)  # what the learner says while it waits for data
    assert "in scorer-0 (on " in reason and "of its last 40 rollouts, last ValueError: cannot score" in reason, reason
    assert "buffer down" not in reason
