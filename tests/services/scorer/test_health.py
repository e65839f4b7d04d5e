"""A failing reward is counted, logged once, reported as failing, and named in the learner's wait
message (issue 13 item 3)."""

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
    return [Rollout(sender="g", prompt_id="p", group_id="g:0", rollout_id=f"g:0:{i}", generator_id="g", group_size=n,
                    prompt_tokens=np.array([1], np.int32), completion_tokens=np.array([2], np.int32),
                    behaviour_logprobs=np.array([-1.0], np.float32), policy_version=0,
                    finish_reason=FinishReason.LENGTH,
                    sampling=SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=4))
            for i in range(start, start + n)]


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
    assert errors[0].getMessage() == ("reward (my_reward) raised ValueError on rollout g:0:0 (and 3 more of its "
                                      "micro-batch, all lost); further ValueError failures are counted in "
                                      "reward_failures_total{reason=\"ValueError\"}, not logged")
    assert errors[0].exc_info[1].args == ("bad answer 0",)
    health.failed(KeyError("answer"), rollouts(2))
    assert health.failing
    assert sample(registry, "reward_failures_total", reason="ValueError") == 2
    assert sample(registry, "reward_failures_total", reason="KeyError") == 1
    assert sample(registry, "reward_consecutive_failures") == 3
    assert sample(registry, "reward_failing") == 1
    assert sample(registry, "rollouts_lost_total") == 10 and sample(registry, "scoring_errors_total") == 3
    assert sample(registry, "reward_last_error", reason="KeyError", error="KeyError: 'answer'") == 1
    assert sample(registry, "reward_last_error", reason="ValueError", error="ValueError: bad answer 1") == 0
    failing = [r.getMessage() for r in caplog.records if r.getMessage().startswith("REWARD FAILING")]
    assert failing == ["REWARD FAILING: the last 3 micro-batches all raised (last: KeyError: 'answer'); no scored "
                       "rollout reaches the buffer, so the learner waits; fix: correct the reward (my_reward; "
                       "traceback above) and restart the scorer"]
    health.failed(KeyError("answer"), rollouts(1))  # still failing: not announced again
    assert sum(r.getMessage().startswith("REWARD FAILING") for r in caplog.records) == 1
    health.succeeded()
    assert not health.failing and sample(registry, "reward_failing") == 0
    assert sample(registry, "reward_consecutive_failures") == 0
    assert caplog.records[-1].getMessage() == "reward recovered after 4 failed micro-batches in a row"


def test_the_learner_wait_message_names_a_failing_reward(tmp_path):
    port = free_port()
    cfg = load_config(None, [f"metrics.scorer_port={port}", 'endpoints.scorers=["tcp://127.0.0.1:5550"]'])
    assert scorer_metrics_addresses(cfg) == [("scorer-0", "127.0.0.1", port)]
    assert reward_troubles(cfg) == []  # nobody serves: nothing to say
    assert data_wait_reason(cfg) == ("no batch of 4 groups from the buffer at tcp://127.0.0.1:5561 (buffer down, or "
                                     "generators/scorers slow or not running)")
    registry = ServiceMetrics("scorer", "scorer-0")
    health = RewardHealth(ScorerMetrics(registry), failing_after=2, names=["verifier"])
    registry.serve("127.0.0.1", port)
    assert scrape("127.0.0.1", port)["streamrl_scorer_reward_failing"] == 0
    assert reward_troubles(cfg) == []
    for _ in range(2):
        health.failed(ZeroDivisionError("division by zero"), rollouts(1))
    expected = ("the reward is failing in scorer-0 (2 micro-batches in a row raised ZeroDivisionError: division by "
                "zero; see its log)")
    assert reward_troubles(cfg) == [expected]
    assert data_wait_reason(cfg) == (f"no batch of 4 groups from the buffer at tcp://127.0.0.1:5561: {expected} (no "
                                     "scored rollout reaches the buffer)")
    health.succeeded()
    assert reward_troubles(cfg) == []


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
    assert [r.getMessage() for r in caplog.records] == ["learner-0 has waited 10s on data: because",
                                                        "learner-0 has waited 20s on data: because"]


def test_failing_after_must_be_positive():
    with pytest.raises(ValueError, match="failing_after must be >= 1"):
        RewardHealth(ScorerMetrics(ServiceMetrics("scorer", "s")), failing_after=0, names=[])
