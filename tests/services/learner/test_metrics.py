"""LearnerMetrics: the names of docs/metrics.md; a step record reaches the gauges, counters and staleness histogram."""

from __future__ import annotations

from streamrl.common.metrics import ServiceMetrics
from streamrl.services.learner.metrics import STEP_GAUGES, LearnerMetrics
from support import declared_metrics, documented_metrics


def test_learner_metrics_are_the_readme_row():
    assert declared_metrics(LearnerMetrics) == documented_metrics("learner")


def test_observe_step():
    registry = ServiceMetrics("learner", "learner-0")
    metrics = LearnerMetrics(registry)
    record = {
        "step": 3,
        "tokens": 40,
        "dropped_stale": 2,
        "evicted": 1,
        "loss/total": 0.5,
        "ess": 3.5,
        "samples_per_second": 8.0,
    }
    metrics.observe_step(record, staleness=[0, 1, 1, 2])
    metrics.observe_step({**record, "step": 4, "loss/total": 0.25}, staleness=[0, 0])

    def value(name, labels=None):
        return registry.registry.get_sample_value(f"streamrl_learner_{name}", labels or {})

    assert value("step") == 4 and value("loss") == 0.25 and value("effective_sample_size") == 3.5
    assert value("samples_total") == 6 and value("tokens_total") == 80
    assert value("buffer_dropped_stale_total") == 4 and value("buffer_evicted_total") == 2
    assert value("staleness_count") == 6 and value("staleness_sum") == 4
    assert value("staleness_bucket", {"le": "0.0"}) == 3
    assert value("kl") == 0  # not in the record: left as it was
    assert set(metrics.last_step) == set(STEP_GAUGES)


def test_busy_ratio_is_training_and_publishing_over_all_time():
    registry = ServiceMetrics("learner", "learner-0")
    metrics = LearnerMetrics(registry)
    base = {"step": 1, "tokens": 1, "dropped_stale": 0, "evicted": 0}
    metrics.observe_step({**base, "wait_data_s": 6.0, "train_s": 3.0, "publish_s": 1.0}, staleness=[0])
    assert registry.registry.get_sample_value("streamrl_learner_busy_ratio") == 4 / 10
    metrics.observe_step({**base, "wait_data_s": 0.0, "train_s": 9.5, "publish_s": 0.5}, staleness=[0])
    assert registry.registry.get_sample_value("streamrl_learner_busy_ratio") == 14 / 20
