"""``streamrl status``: it finds the generators actually running, its rates span a
learner step (never 0.00/s just because no step ended in the last 2 s), and a failing reward shows."""

from __future__ import annotations

import socket

import pytest

import streamrl.cli as cli
from streamrl.common.config import validate_config
from streamrl.common.metrics import ServiceMetrics
from streamrl.services.scorer.health import RewardHealth
from streamrl.services.scorer.metrics import ScorerMetrics
from streamrl.status import DISCOVER_GENERATORS, ScrapeHistory, discover_generators, render
from streamrl.testing import free_port, write_config


def free_run(n: int) -> int:
    """A base port with ``n`` consecutive free ports."""
    for _ in range(50):
        base = free_port()
        try:
            for i in range(n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", base + i))
        except OSError:
            continue
        return base
    raise RuntimeError("no run of free ports")


@pytest.fixture
def fake_clock(monkeypatch):
    """``time.sleep`` advances ``time.monotonic`` and runs the callbacks queued for it."""
    state = {"now": 1000.0, "during_sleep": []}

    def sleep(seconds):
        state["now"] += seconds
        slept.append(seconds)
        while state["during_sleep"]:
            state["during_sleep"].pop(0)()

    slept = []
    state["slept"] = slept
    monkeypatch.setattr("streamrl.status.time.sleep", sleep)
    monkeypatch.setattr("streamrl.status.time.monotonic", lambda: state["now"])
    return state


def test_status_lists_the_generators_that_run_and_a_failing_reward(tmp_path, fake_clock, capsys):
    # every port discovery scans is free at the start: a metrics server of an earlier test in this process
    # (or of another job on the machine) at base + 24 once made discovery count 25 generators
    base = free_run(DISCOVER_GENERATORS)
    running = []
    for i in (0, 2):  # generator 1 died; nothing listens on base + 3 and above
        gen = ServiceMetrics("generator", f"generator-{i}")
        gen.serve("127.0.0.1", base + i)
        running.append(gen)
    scorer = ServiceMetrics("scorer", "scorer-0")
    scorer_port = scorer.serve("127.0.0.1", 0)
    health = RewardHealth(ScorerMetrics(scorer), failing_after=3, names=["mine"])
    for _ in range(3):
        health.failed(ValueError("boom"), [])
    sections = {
        "metrics": {
            "generator_port": base,
            "scorer_port": scorer_port,
            "learner_port": free_port(),
            "buffer_port": free_port(),
        }
    }
    cfg = validate_config(sections)
    assert discover_generators(cfg) == 3
    job = write_config(tmp_path / "job.toml", sections)
    with pytest.raises(SystemExit) as info:
        cli.main(["status", "--config", str(job), "--interval", "1"])
    assert info.value.code == 0
    rows = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows == {
        "learner-0": "DOWN",
        "buffer-0": "DOWN",
        "scorer-0": "up",
        "generator-0": "up",
        "generator-1": "DOWN",
        "generator-2": "up",
    }
    table = render(cfg, 3, 1.0)
    assert "REWARD FAILING (3 micro-batches in a row: ValueError: boom)" in table


def test_rates_span_a_learner_step(fake_clock):
    learner, buffer = ServiceMetrics("learner", "learner-0"), ServiceMetrics("buffer", "buffer-0")
    sections = {
        "metrics": {
            "learner_port": learner.serve("127.0.0.1", 0),
            "buffer_port": buffer.serve("127.0.0.1", 0),
            "scorer_port": free_port(),
            "generator_port": free_port(),
        },
        "learner": {"groups_per_step": 4},
        "generator": {"group_size": 4},
    }
    cfg = validate_config(sections)
    learner.gauge("samples_per_second", "s").set(2.0)  # 16 rows per step / 2 per s: a step takes 8 s
    learner.gauge("busy_ratio", "b").set(0.625)
    sampled = buffer.counter("sampled_total", "s")
    history = ScrapeHistory()
    fake_clock["during_sleep"].append(lambda: sampled.inc(16))  # one batch served during the first wait
    first = render(cfg, 0, None, history=history).splitlines()
    assert fake_clock["slept"] == [pytest.approx(8.4)]  # waited one learner step (plus 5%), not 2 s
    assert first[0].endswith("detail  (rates over the last 8.4s; a learner step takes 8.0s)")
    rows = {line.split()[0]: line for line in first[1:]}
    assert "out 1.90/s" in rows["buffer-0"]  # 16 / 8.4
    assert "2.00 samples/s" in rows["learner-0"]  # the learner's own rate over its last step
    assert "busy 62%" in rows["learner-0"]  # training + publishing / all its time (0.625 rounds to even)
    # --watch: 2 s later no batch was served, yet the window still spans the last step
    second = {line.split()[0]: line for line in render(cfg, 0, None, history=history).splitlines()[1:]}
    assert fake_clock["slept"][1:] == [2.0]
    assert "out 1.54/s" in second["buffer-0"]  # 16 over the 10.4 s since the first scrape
