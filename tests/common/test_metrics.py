"""ServiceMetrics (names, rejected reasons at 0, a real /metrics endpoint) and MetricSet declarations."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families

from streamrl.common.messages import RejectReason
from streamrl.common.metrics import MetricSet, ServiceMetrics, counter, gauge, histogram


def samples(metrics: ServiceMetrics) -> dict[tuple[str, tuple], float]:
    """Every sample of the registry as ``{(name, sorted labels): value}``."""
    from prometheus_client import generate_latest

    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_names_are_prefixed_and_counters_end_in_total():
    m = ServiceMetrics("buffer", "buffer-0")
    m.counter("inserted_total", "Rollouts accepted").inc(3)
    m.gauge("rollouts", "Rollouts held").set(7)
    m.histogram("staleness", "Staleness", buckets=(0, 1, 2)).observe(1)
    got = samples(m)
    assert got[("streamrl_buffer_inserted_total", ())] == 3
    assert got[("streamrl_buffer_rollouts", ())] == 7
    assert got[("streamrl_buffer_staleness_bucket", (("le", "0.0"),))] == 0
    assert got[("streamrl_buffer_staleness_bucket", (("le", "1.0"),))] == 1
    assert got[("streamrl_buffer_info", (("instance_id", "buffer-0"), ("service", "buffer")))] == 1
    with pytest.raises(ValueError, match="counter 'inserted' must end in _total"):
        m.counter("inserted", "no suffix")


def test_every_decoder_reason_is_exported_at_zero():
    got = samples(ServiceMetrics("scorer", "scorer-1"))
    exported = {
        dict(labels)["reason"]: value
        for (name, labels), value in got.items()
        if name == "streamrl_scorer_messages_rejected_total"
    }
    assert exported == {reason.value: 0.0 for reason in RejectReason}


def test_two_processes_in_one_interpreter_do_not_collide():
    a, b = ServiceMetrics("generator", "generator-0"), ServiceMetrics("generator", "generator-1")
    a.counter("rollouts_total", "x").inc()
    b.counter("rollouts_total", "x").inc(5)
    assert samples(a)[("streamrl_generator_rollouts_total", ())] == 1
    assert samples(b)[("streamrl_generator_rollouts_total", ())] == 5


def test_serve_on_an_ephemeral_port_answers_a_scrape():
    m = ServiceMetrics("learner", "learner-0")
    m.gauge("step", "Learner steps completed").set(12)
    port = m.serve("127.0.0.1", 0)
    assert port == m.port and port > 0
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert "streamrl_learner_step 12.0" in text.splitlines()
    assert any(line.startswith("process_cpu_seconds_total") for line in text.splitlines())


class ToyMetrics(MetricSet):
    SERVICE = "toy"
    sent = counter("sent_total", "Things sent", ["to"])
    depth = gauge("queue_depth", "Items queued")
    seconds = histogram("step_seconds", "Seconds per step", buckets=(0.5, 1.0))


class MoreToyMetrics(ToyMetrics):
    extra = gauge("extra", "A metric of the subclass")


def test_metric_set_builds_each_declaration_on_its_registry():
    registry = ServiceMetrics("toy", "toy-0")
    toy = ToyMetrics(registry)
    assert isinstance(toy.sent, Counter) and isinstance(toy.depth, Gauge) and isinstance(toy.seconds, Histogram)
    toy.sent.labels(to="buffer").inc(2)
    toy.depth.set(4)
    toy.seconds.observe(0.7)
    got = samples(registry)
    assert got[("streamrl_toy_sent_total", (("to", "buffer"),))] == 2
    assert got[("streamrl_toy_queue_depth", ())] == 4
    assert got[("streamrl_toy_step_seconds_bucket", (("le", "0.5"),))] == 0
    assert got[("streamrl_toy_step_seconds_bucket", (("le", "1.0"),))] == 1
    assert [d.name for d in MoreToyMetrics.declared()] == ["sent_total", "queue_depth", "step_seconds", "extra"]
    assert ToyMetrics.sent.name == "sent_total"  # on the class, the declaration


def test_metric_sets_are_per_registry_and_refuse_another_service():
    first, second = ToyMetrics(ServiceMetrics("toy", "toy-0")), ToyMetrics(ServiceMetrics("toy", "toy-1"))
    first.depth.set(1)
    second.depth.set(2)
    assert first.depth is not second.depth
    assert samples(first.registry)[("streamrl_toy_queue_depth", ())] == 1
    with pytest.raises(ValueError, match="ToyMetrics declares streamrl_toy_\\* metrics; it was given the 'buffer'"):
        ToyMetrics(ServiceMetrics("buffer", "buffer-0"))
    registry = ServiceMetrics("toy", "toy-2")
    ToyMetrics(registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):  # prometheus_client: one name, one metric
        ToyMetrics(registry)
