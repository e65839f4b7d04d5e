"""The scorer's Prometheus metrics, ``streamrl_scorer_*`` (README, "Metrics and logs")."""

from __future__ import annotations

from streamrl.common.metrics import REWARD_BUCKETS, MetricSet, ServiceMetrics


class ScorerMetrics(MetricSet):
    """Every metric the scorer updates (see :class:`streamrl.common.metrics.MetricSet`)."""

    SERVICE = "scorer"

    def __init__(self, registry: ServiceMetrics):
        super().__init__(registry)
        m = registry
        self.scored = m.counter("rollouts_scored_total", "Rollouts scored and sent to the buffer")
        self.lost = m.counter("rollouts_lost_total", "Rollouts lost (reward errors; stopped while the buffer was full)")
        self.errors = m.counter("scoring_errors_total", "Reward computations that raised")
        self.rewards = m.histogram("reward", "Reward of each scored rollout", buckets=REWARD_BUCKETS)
        self.seconds = m.histogram("scoring_seconds", "Seconds to score one micro-batch")
        self.blocked = m.counter("send_blocked_seconds_total", "Seconds blocked sending to the buffer")
