"""BufferMetrics: the names of docs/metrics.md, counters that follow the store's and journal's totals,
staleness per batch."""

from __future__ import annotations

from streamrl.common.messages import Batch
from streamrl.common.metrics import ServiceMetrics
from streamrl.common.modes import FsyncPolicy, OverflowPolicy
from streamrl.services.buffer.journal import Journal
from streamrl.services.buffer.metrics import BufferMetrics
from streamrl.services.buffer.store import REJECT_OUTCOMES, ReplayBuffer
from support import declared_metrics, documented_metrics, scored_item


def value(registry: ServiceMetrics, name: str, labels: dict | None = None) -> float:
    return registry.registry.get_sample_value(f"streamrl_buffer_{name}", labels or {})


def test_buffer_metrics_are_the_readme_row():
    assert declared_metrics(BufferMetrics) == documented_metrics("buffer")


def test_admission_reasons_are_exported_at_zero():
    registry = ServiceMetrics("buffer", "buffer-0")
    BufferMetrics(registry)
    for outcome in REJECT_OUTCOMES:
        assert value(registry, "messages_rejected_total", {"reason": outcome.value}) == 0


def test_counters_add_what_the_store_and_journal_totals_grew(tmp_path):
    registry = ServiceMetrics("buffer", "buffer-0")
    metrics = BufferMetrics(registry)
    store = ReplayBuffer(
        capacity_groups=1,
        overflow=OverflowPolicy.EVICT_OLDEST,
        max_reuse=1,
        max_staleness=1,
        group_timeout_s=60.0,
        clock=lambda: 0.0,
    )
    for group, version in (("a", 0), ("b", 0), ("c", 5)):  # capacity 1: a, then b are evicted
        for k in range(2):
            store.add(scored_item(group, k, version=version))
    store.add(scored_item("d", 0))  # incomplete
    metrics.observe_store(store)
    metrics.observe_store(store)  # nothing grew: nothing added twice
    assert (value(registry, "inserted_total"), value(registry, "evicted_total")) == (7, 4)
    assert (value(registry, "rollouts"), value(registry, "groups"), value(registry, "incomplete_groups")) == (3, 1, 1)
    sample = store.sample(1, learner_version=6)  # d's group (version 0) is stale at 6 - 0 > 1
    metrics.observe_store(store)
    assert (value(registry, "sampled_total"), value(registry, "dropped_stale_total")) == (2, 1)
    assert value(registry, "rollouts") == 0

    journal = Journal(tmp_path, fsync=FsyncPolicy.ALWAYS)
    journal.accept([b"x" * 100])
    journal.commit()
    metrics.observe_journal(journal)
    metrics.observe_journal(journal)
    assert value(registry, "journal_written_bytes_total") == journal.bytes_written > 100
    assert value(registry, "journal_fsync_seconds_total") == journal.fsync_seconds

    batch = Batch(learner_version=6, rollouts=sample.rollouts, dropped_stale=1)
    metrics.observe_batch(batch)
    assert value(registry, "batches_total") == 1
    assert value(registry, "staleness_count") == 2 and value(registry, "staleness_sum") == 2 * (6 - 5)
