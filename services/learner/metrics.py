"""The learner's Prometheus metrics, ``streamrl_learner_*`` (docs/metrics.md)."""

from __future__ import annotations

from collections.abc import Sequence

from streamrl.common.metrics import STALENESS_BUCKETS, MetricSet, ServiceMetrics, counter, gauge, histogram

STEP_GAUGES = {
    "loss/total": "loss",
    "loss/policy": "policy_loss",
    "loss/value": "value_loss",
    "loss/kl": "kl_loss",
    "loss/ptx": "ptx_loss",
    "kl": "kl",
    "kl_per_sequence": "kl_per_sequence",
    "kl_coef": "kl_coef",
    "entropy": "entropy",
    "clip_fraction": "clip_fraction",
    "approx_kl": "approx_kl",
    "importance_ratio_mean": "importance_ratio_mean",
    "importance_ratio_max": "importance_ratio_max",
    "truncated_fraction": "truncated_fraction",
    "ess": "effective_sample_size",
    "ess_fraction": "effective_sample_size_ratio",
    "outside_nucleus_fraction": "outside_nucleus_fraction",
    "masked_fraction": "masked_fraction",
    "dual_clip_fraction": "dual_clip_fraction",
    "grad_norm": "grad_norm",
    "reward_mean": "reward_mean",
    "samples_per_second": "samples_per_second",
}
"""Key of a step record (``metrics.jsonl``) -> name of the gauge holding its value of the last step."""


class LearnerMetrics(MetricSet):
    """Every metric the learner updates (see :class:`streamrl.common.metrics.MetricSet`).

    Besides the declarations below, one gauge per :data:`STEP_GAUGES` entry holds the
    last step's value (``last_step[key]``).
    """

    SERVICE = "learner"
    step = gauge("step", "Learner steps completed")
    version = gauge("policy_version", "Current policy version")
    samples = counter("samples_total", "Rollouts trained on")
    tokens = counter("tokens_total", "Completion tokens trained on")
    wait = counter("data_wait_seconds_total", "Seconds waiting for a batch")
    publish_seconds = histogram("weight_publish_seconds", "Seconds to pack and publish one version")
    staleness = histogram("staleness", "Staleness of trained rollouts (versions)", buckets=STALENESS_BUCKETS)
    dropped = counter("buffer_dropped_stale_total", "Stale rollouts the buffer reported dropping")
    evicted = counter("buffer_evicted_total", "Rollouts the buffer reported evicting")
    unexpected = counter(
        "unexpected_batches_total", "Batches for another version (late duplicates of a re-sent request), ignored"
    )
    busy = gauge(
        "busy_ratio",
        "Fraction of the learner's time since its first step spent training and publishing "
        "(not waiting for data): (train_s + publish_s) / (wait + train_s + publish_s), summed over steps",
    )
    refused = counter(
        "rollouts_refused_total",
        "Rollouts refused: sampled with another temperature or top_p than the rest of their batch",
        ["reason"],
    )

    def __init__(self, registry: ServiceMetrics):
        super().__init__(registry)
        self.last_step = {
            key: registry.gauge(name, f"Learner {key} of the last step") for key, name in STEP_GAUGES.items()
        }
        self._busy_s = self._total_s = 0.0

    def observe_step(self, record: dict, staleness: Sequence[int]) -> None:
        """A step completed: its record (``metrics.jsonl``) and each trained row's staleness (versions)."""
        for key, g in self.last_step.items():
            if key in record:
                g.set(record[key])
        self.step.set(record["step"])
        busy = record.get("train_s", 0.0) + record.get("publish_s", 0.0)
        self._busy_s += busy
        self._total_s += busy + record.get("wait_data_s", 0.0)
        if self._total_s > 0:
            self.busy.set(self._busy_s / self._total_s)
        self.samples.inc(len(staleness))
        self.tokens.inc(record["tokens"])
        self.dropped.inc(record["dropped_stale"])
        self.evicted.inc(record["evicted"])
        for s in staleness:
            self.staleness.observe(s)
