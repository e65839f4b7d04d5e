"""``streamrl status`` reads real metrics endpoints and reports up/down, state and rates."""

from __future__ import annotations

from streamrl.common.config import validate_config
from streamrl.common.metrics import ServiceMetrics
from streamrl.status import render
from streamrl.testing import free_port


def test_status_table_from_live_endpoints(monkeypatch):
    buffer = ServiceMetrics("buffer", "buffer-0")
    port = buffer.serve("127.0.0.1", 0)
    buffer.gauge("groups", "g").set(12)
    buffer.gauge("rollouts", "r").set(48)
    inserted = buffer.counter("inserted_total", "i")
    buffer.counter("dropped_stale_total", "d").inc(7)
    buffer.gauge("credits_outstanding", "c").set(3)
    buffer.rejected.labels(reason="malformed").inc(3)
    gen = ServiceMetrics("generator", "generator-0")
    gport = gen.serve("127.0.0.1", 0)
    gen.gauge("policy_version", "v").set(5)
    gen.gauge("announced_version", "a").set(6)
    gen.gauge("useful_ratio", "u").set(0.875)
    cfg = validate_config(
        {
            "metrics": {
                "buffer_port": port,
                "generator_port": gport,
                "learner_port": free_port(),
                "scorer_port": free_port(),
                "feedback_port": free_port(),
            },
            "feedback": {"enabled": True},
        }
    )
    # 10 rollouts arrive between the two scrapes, which are "2 s" apart
    clock = [100.0]

    def sleep(seconds):
        clock[0] += seconds
        inserted.inc(10)

    monkeypatch.setattr("streamrl.status.time.sleep", sleep)
    monkeypatch.setattr("streamrl.status.time.monotonic", lambda: clock[0])
    table = render(cfg, generators=2, interval=2.0).splitlines()
    rows = {line.split()[0]: line for line in table[1:]}
    assert rows["learner-0"].split()[1] == "DOWN" and rows["scorer-0"].split()[1] == "DOWN"
    assert rows["generator-1"].split()[1] == "DOWN"
    # the feedback service is optional: down, the run trains on without it
    assert rows["feedback-0"].split()[1] == "DOWN" and "training goes on without new H-hat" in rows["feedback-0"]
    assert "12 groups (48 rollouts" in rows["buffer-0"] and "stale-dropped 7" in rows["buffer-0"]
    assert "in 5.00/s" in rows["buffer-0"] and "rejected 3" in rows["buffer-0"]
    assert rows["generator-0"].split()[1] == "up" and "v5 (newest v6)" in rows["generator-0"]
    assert "useful 88%" in rows["generator-0"] and "credits out 3" in rows["buffer-0"]
