"""A failing reward is counted, logged once, reported as failing, and named in the learner's wait
message."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from streamrl.common.config import load_config
from streamrl.common.liveness import Waits
from streamrl.common.messages import FinishReason, Rollout, SamplingParams
from streamrl.common.metrics import ServiceMetrics
from streamrl.common.peers import reward_troubles, scorer_metrics_addresses, scrape
from streamrl.services.learner.diagnosis import data_wait_reason
from streamrl.services.scorer.health import RewardHealth
from streamrl.services.scorer.metrics import ScorerMetrics
from streamrl.testing import free_port


def rollouts(n: int, start: int = 0) -> list[Rollout]:
    return [
        Rollout(
            sender="g",
            prompt_id="p",
            group_id="g:0",
            rollout_id=f"g:0:{i}",
            generator_id="g",
            group_size=n,
            prompt_tokens=np.array([1], np.int32),
            completion_tokens=np.array([2], np.int32),
            behaviour_logprobs=np.array([-1.0], np.float32),
            policy_version=0,
            finish_reason=FinishReason.LENGTH,
            sampling=SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=4),
        )
        for i in range(start, start + n)
    ]


def sample(registry: ServiceMetrics, name: str, **labels) -> float:
    value = registry.registry.get_sample_value(f"streamrl_scorer_{name}", labels or None)
    return 0.0 if value is None else value


def test_failures_are_counted_by_reason_logged_once_and_failing_after_n(caplog):
    registry = ServiceMetrics("scorer", "scorer-0")
    health = RewardHealth(ScorerMetrics(registry), failing_after=3, names=["my_reward"])
    caplog.set_level(logging.INFO, logger="streamrl.services.scorer.health")
    for k in range(2):
        try:
            raise ValueError(f"bad answer {k}")
        except ValueError as exc:
            health.failed(exc, rollouts(4, start=4 * k))
    assert not health.failing and sample(registry, "reward_failing") == 0
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1  # logged once per reason, with the rollout id and the traceback
    assert errors[0].getMessage() == (
        "reward (my_reward) raised ValueError on rollout g:0:0 (4 of the 4 rollouts of "
        "its micro-batch raised it; the groups of the rollouts that raised are "
        "dropped); further ValueError failures are counted in "
        'reward_failures_total{reason="ValueError"}, not logged'
    )
    assert errors[0].exc_info[1].args == ("bad answer 0",)
    health.failed(KeyError("answer"), rollouts(2))
    assert health.failing
    assert sample(registry, "reward_failures_total", reason="ValueError") == 2
    assert sample(registry, "reward_failures_total", reason="KeyError") == 1
    assert sample(registry, "reward_consecutive_failures") == 3
    assert sample(registry, "reward_failing") == 1
    assert sample(registry, "reward_failed_rollouts_total", reason="ValueError") == 8
    assert sample(registry, "reward_failed_rollouts_total", reason="KeyError") == 2
    assert sample(registry, "scoring_errors_total") == 3
    assert sample(registry, "reward_last_error", reason="KeyError", error="KeyError: 'answer'") == 1
    assert sample(registry, "reward_last_error", reason="ValueError", error="ValueError: bad answer 1") == 0
    failing = [r.getMessage() for r in caplog.records if r.getMessage().startswith("REWARD FAILING")]
    assert failing == [
        "REWARD FAILING: the last 3 micro-batches all raised (last: KeyError: 'answer'); no scored "
        "rollout reaches the buffer, so the learner waits; fix: correct the reward (my_reward; "
        "traceback above) and restart the scorer"
    ]
    health.failed(KeyError("answer"), rollouts(1))  # still failing: not announced again
    assert sum(r.getMessage().startswith("REWARD FAILING") for r in caplog.records) == 1
    health.succeeded()
    assert not health.failing and sample(registry, "reward_failing") == 0
    assert sample(registry, "reward_consecutive_failures") == 0
    assert caplog.records[-1].getMessage() == "reward recovered after 4 failed micro-batches in a row"


def test_the_learner_wait_message_names_a_failing_reward(tmp_path):
    port = free_port()
    cfg = load_config(
        None, [f"metrics.scorer_port={port}", 'endpoints.scorers=["tcp://127.0.0.1:5550"]', "scorer.failing_after=2"]
    )
    assert scorer_metrics_addresses(cfg) == [("scorer-0", "127.0.0.1", port)]
    assert reward_troubles(cfg) == []  # nobody serves: nothing to say
    assert data_wait_reason(cfg) == (
        "no batch of 4 groups from the buffer at tcp://127.0.0.1:5561 (buffer down, or "
        "generators/scorers slow or not running)"
    )
    registry = ServiceMetrics("scorer", "scorer-0")
    health = RewardHealth(ScorerMetrics(registry), failing_after=2, names=["verifier"])
    registry.serve("127.0.0.1", port)
    assert scrape("127.0.0.1", port)["streamrl_scorer_reward_failing"] == 0
    assert reward_troubles(cfg) == []
    for _ in range(2):
        health.failed(ZeroDivisionError("division by zero"), rollouts(1))
    expected = (
        "the reward is failing in scorer-0 (2 micro-batches in a row raised ZeroDivisionError: division by "
        "zero; no scored rollout reaches the buffer; see its log)"
    )
    assert reward_troubles(cfg) == [expected]
    assert data_wait_reason(cfg) == f"no batch of 4 groups from the buffer at tcp://127.0.0.1:5561: {expected}"
    health.succeeded(rollouts(8))  # recovered, but 2 of its last 10 rollouts raised: still named, as dropping
    assert reward_troubles(cfg) == [
        "the reward raises on some inputs in scorer-0 (on 20% of its last 100 rollouts, "
        "last ZeroDivisionError: division by zero; their groups are dropped, so fewer "
        "reach the buffer; see its log)"
    ]


def test_a_wait_reason_given_as_a_function_is_computed_only_when_logged(caplog):
    now = [0.0]
    waits = Waits(ServiceMetrics("learner", "learner-0"), warn_after_s=10, clock=lambda: now[0])
    calls = []

    def why():
        calls.append(now[0])
        return "because"

    caplog.set_level(logging.WARNING, logger="streamrl.common.liveness")
    for t in range(0, 25):
        now[0] = float(t)
        waits.waiting("data", why)
    assert calls == [10.0, 20.0]
    assert [r.getMessage() for r in caplog.records] == [
        "learner-0 has waited 10s on data: because",
        "learner-0 has waited 20s on data: because",
    ]


def test_failing_after_must_be_positive():
    with pytest.raises(ValueError, match="failing_after must be >= 1"):
        RewardHealth(ScorerMetrics(ServiceMetrics("scorer", "s")), failing_after=0, names=[])


def test_a_reward_that_raises_on_a_fraction_of_rollouts_is_reported_failing(caplog):
    """Failures spread over micro-batches never make failing_after in a row: the fraction over the
    last failing_window rollouts does (before, REWARD FAILING never printed for such a reward)."""
    registry = ServiceMetrics("scorer", "scorer-0")
    health = RewardHealth(
        ScorerMetrics(registry), failing_after=3, names=["flaky"], failing_fraction=0.2, failing_window=20
    )
    caplog.set_level(logging.INFO, logger="streamrl.services.scorer.health")
    for k in range(2):  # 1 of 5 raises: 20%, but the window is not full yet
        batch = rollouts(5, start=5 * k)
        health.record(batch, {batch[0].rollout_id: ValueError("no score")}, raised=[ValueError(), ValueError()])
    assert not health.failing and sample(registry, "reward_failure_fraction") == pytest.approx(0.2)
    assert sample(registry, "reward_consecutive_failures") == 0  # every micro-batch had scored rollouts
    for k in range(2, 4):
        batch = rollouts(5, start=5 * k)
        health.record(batch, {batch[0].rollout_id: ValueError("no score")}, raised=[ValueError(), ValueError()])
    assert health.failing and sample(registry, "reward_failing") == 1
    assert sample(registry, "reward_failed_rollouts_total", reason="ValueError") == 4
    assert sample(registry, "reward_failures_total", reason="ValueError") == 8  # calls: batch + the rollout alone
    failing = [r.getMessage() for r in caplog.records if r.getMessage().startswith("REWARD FAILING")]
    assert failing == [
        "REWARD FAILING: the reward raised on 4 of the last 20 rollouts (20%, scorer.failing_fraction "
        "= 0.2; last: ValueError: no score); their groups are dropped, so the learner gets fewer groups "
        "and waits longer; fix: correct the reward (flaky; traceback above) so that it scores every "
        "input, and restart the scorer"
    ]
    health.succeeded(rollouts(1, start=20))  # the oldest failure leaves the window: 3 of the last 20
    assert not health.failing and sample(registry, "reward_failing") == 0
    assert caplog.records[-1].getMessage() == "reward recovered: it raised on 3 of the last 20 rollouts (15%)"
