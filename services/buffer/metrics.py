"""The buffer's Prometheus metrics, ``streamrl_buffer_*`` (docs/metrics.md)."""

from __future__ import annotations

from streamrl.common.messages import Batch
from streamrl.common.metrics import STALENESS_BUCKETS, MetricSet, ServiceMetrics, counter, gauge, histogram
from streamrl.services.buffer.credits import CreditLedger
from streamrl.services.buffer.journal import Journal
from streamrl.services.buffer.store import REJECT_OUTCOMES, ReplayBuffer


class BufferMetrics(MetricSet):
    """Every metric the buffer updates (see :class:`streamrl.common.metrics.MetricSet`).

    The store and the journal keep monotonic totals; :meth:`observe_store` and
    :meth:`observe_journal` add what grew since the previous call to the counters.
    The store's admission refusals (``duplicate``, ``group_*``) are exported at 0 in
    ``messages_rejected_total{reason}`` next to the decoder's reasons.
    """

    SERVICE = "buffer"
    items = gauge("rollouts", "Rollouts held")
    groups = gauge("groups", "Complete groups held")
    incomplete = gauge("incomplete_groups", "Groups still waiting for members")
    inserted = counter("inserted_total", "Rollouts accepted")
    sampled = counter("sampled_total", "Rollouts served to the learner (reuse counted)")
    stale = counter("dropped_stale_total", "Rollouts dropped for staleness > max_staleness")
    evicted = counter(
        "evicted_total", "Rollouts evicted (capacity, incomplete-group timeout, a member's reward failed in a scorer)"
    )
    groups_dropped = counter(
        "groups_dropped_by_scorers_total",
        "Reports of a group a scorer dropped because the "
        "reward raised on a member (what is held of it is evicted, its credit returned)",
    )
    batches = counter("batches_total", "Batches served")
    staleness = histogram("staleness", "Staleness (versions) of served rollouts", buckets=STALENESS_BUCKETS)
    blocked = counter(
        "producers_blocked_seconds_total", "Seconds the buffer stopped reading producers because it was full"
    )
    journal_bytes = counter("journal_written_bytes_total", "Bytes appended to the journal")
    fsync = counter("journal_fsync_seconds_total", "Seconds spent in fsync of the journal")
    compactions = counter("journal_compactions_total", "Journal compactions (snapshot + delete)")
    recovered = gauge("recovered_rollouts", "Rollouts recovered from the journal at start")
    credits_granted = counter(
        "credits_granted_total", "Generation credits granted (one per group a generator may sample)"
    )
    credits_expired = counter(
        "credits_expired_total",
        "Credits written off: a generator restarted or went silent, or its groups never arrived",
    )
    credits_outstanding = gauge(
        "credits_outstanding", "Credits granted whose group has not arrived (in flight or not yet sampled)"
    )
    reserved = counter(
        "batches_reserved_total", "Unacknowledged batches served again (learner restarted or lost a batch)"
    )

    def __init__(self, registry: ServiceMetrics):
        super().__init__(registry)
        for outcome in REJECT_OUTCOMES:
            registry.rejected.labels(reason=outcome.value)
        self._store_totals = (0, 0, 0, 0)
        self._journal_totals: tuple[int, float, int] = (0, 0.0, 0)
        self._credit_totals = (0, 0)

    def observe_store(self, store: ReplayBuffer) -> None:
        """Set the held gauges and add the growth of the store's totals to the counters."""
        self.items.set(store.held_rollouts)
        self.groups.set(store.complete_groups)
        self.incomplete.set(store.incomplete_groups)
        now = (store.inserted_total, store.sampled_total, store.dropped_stale_total, store.evicted_total)
        _add_growth((self.inserted, self.sampled, self.stale, self.evicted), self._store_totals, now)
        self._store_totals = now

    def observe_credits(self, ledger: CreditLedger) -> None:
        """Set the outstanding-credits gauge and add the growth of granted and expired credits."""
        self.credits_outstanding.set(ledger.outstanding())
        now = (ledger.granted_total, ledger.expired_total)
        _add_growth((self.credits_granted, self.credits_expired), self._credit_totals, now)
        self._credit_totals = now

    def observe_journal(self, journal: Journal) -> None:
        """Add the growth of the journal's bytes, fsync seconds and compactions to the counters."""
        now = (journal.bytes_written, journal.fsync_seconds, journal.compactions)
        _add_growth((self.journal_bytes, self.fsync, self.compactions), self._journal_totals, now)
        self._journal_totals = now

    def observe_batch(self, batch: Batch) -> None:
        """A batch was served: count it and observe each rollout's staleness (versions)."""
        self.batches.inc()
        for s in batch.rollouts:
            self.staleness.observe(batch.learner_version - s.rollout.policy_version)


def _add_growth(counters, before, after) -> None:
    for c, b, a in zip(counters, before, after):
        if a > b:
            c.inc(a - b)
