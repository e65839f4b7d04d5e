"""The scorer's Prometheus metrics, ``streamrl_scorer_*`` (README, "Metrics and logs")."""

from __future__ import annotations

from streamrl.common.metrics import REWARD_BUCKETS, MetricSet, counter, histogram


class ScorerMetrics(MetricSet):
    """Every metric the scorer updates (see :class:`streamrl.common.metrics.MetricSet`)."""

    SERVICE = "scorer"
    scored = counter("rollouts_scored_total", "Rollouts scored and sent to the buffer")
    lost = counter("rollouts_lost_total", "Rollouts lost (reward errors; stopped while the buffer was full)")
    errors = counter("scoring_errors_total", "Reward computations that raised")
    rewards = histogram("reward", "Reward of each scored rollout", buckets=REWARD_BUCKETS)
    seconds = histogram("scoring_seconds", "Seconds to score one micro-batch")
    blocked = counter("send_blocked_seconds_total", "Seconds blocked sending to the buffer")
