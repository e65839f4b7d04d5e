"""Waits: the waiting_seconds{on} gauge, a WARNING with the reason at warn_after_s and again every
warn_after_s, an INFO line when a warned wait ends, independent waits per thing awaited."""

from __future__ import annotations

import logging

from streamrl.common.liveness import Waits
from streamrl.common.metrics import ServiceMetrics


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def gauge(metrics: ServiceMetrics, on: str) -> float:
    return metrics.registry.get_sample_value("streamrl_learner_waiting_seconds", {"on": on})


def make(warn_after_s=5.0):
    clock = Clock()
    metrics = ServiceMetrics("learner", "learner-0")
    return Waits(metrics, warn_after_s=warn_after_s, clock=clock), metrics, clock


def warnings(caplog) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "streamrl.common.liveness" and r.levelno == logging.WARNING
    ]


def test_gauge_tracks_the_current_wait_and_resets(caplog):
    waits, metrics, clock = make()
    assert waits.current("data") == 0.0 and waits.done("data") == 0.0  # not waiting: no-ops
    assert waits.waiting("data", "buffer silent") == 0.0
    clock.now += 3.5
    assert waits.waiting("data", "buffer silent") == 3.5
    assert gauge(metrics, "data") == 3.5 and waits.current("data") == 3.5
    clock.now += 1.0
    assert waits.done("data") == 4.5
    assert gauge(metrics, "data") == 0 and waits.current("data") == 0.0
    assert warnings(caplog) == []  # shorter than warn_after_s: silent


def test_warns_with_the_reason_then_every_interval_and_says_when_it_resumed(caplog):
    caplog.set_level(logging.INFO, logger="streamrl.common.liveness")
    waits, _, clock = make(warn_after_s=5.0)
    for _ in range(12):  # polls 1 s apart for 11 s
        waits.waiting("weights", "no weights announced yet")
        clock.now += 1.0
    assert warnings(caplog) == [
        "learner-0 has waited 5s on weights: no weights announced yet",
        "learner-0 has waited 10s on weights: no weights announced yet",
    ]
    waits.done("weights")
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert infos == ["learner-0 resumed after waiting 12s on weights"]


def test_a_new_wait_starts_from_zero_and_waits_are_independent(caplog):
    waits, metrics, clock = make(warn_after_s=5.0)
    waits.waiting("data", "a")
    clock.now += 6
    waits.waiting("learner", "b")
    waits.waiting("data", "a")  # 6 s: warns for data only
    assert warnings(caplog) == ["learner-0 has waited 6s on data: a"]
    waits.done("data")
    clock.now += 2
    assert waits.waiting("data", "a") == 0.0  # a new wait
    # the gauge is live: it moved with the clock although nothing reported (a call blocked, a frozen peer)
    assert gauge(metrics, "learner") == 2.0 and waits.current("learner") == 2.0
    waits.waiting("learner", "b")
    assert gauge(metrics, "learner") == 2.0
    clock.now += 4
    waits.waiting("data", "a")
    assert len(warnings(caplog)) == 1  # data's new wait is 4 s old: no warning yet
