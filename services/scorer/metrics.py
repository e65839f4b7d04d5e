"""The scorer's Prometheus metrics, ``streamrl_scorer_*`` (docs/metrics.md)."""

from __future__ import annotations

from streamrl.common.metrics import REWARD_BUCKETS, MetricSet, counter, gauge, histogram


class ScorerMetrics(MetricSet):
    """Every metric the scorer updates (see :class:`streamrl.common.metrics.MetricSet`)."""

    SERVICE = "scorer"
    scored = counter("rollouts_scored_total", "Rollouts scored and sent to the buffer")
    lost = counter(
        "rollouts_lost_total",
        "Rollouts not sent to the buffer (dropped: reward raised on it or on its "
        "group; stopped while the buffer was full)",
    )
    errors = counter("scoring_errors_total", "Reward calls that raised")
    failures = counter(
        "reward_failures_total",
        "Reward calls that raised (a micro-batch, or one rollout scored alone "
        "after its micro-batch raised), by exception class",
        ["reason"],
    )
    failed_rollouts = counter(
        "reward_failed_rollouts_total",
        "Rollouts whose reward raised (dropped with their group), by exception class",
        ["reason"],
    )
    dropped = counter(
        "rollouts_dropped_total",
        "Rollouts dropped without being sent, by reason: reward_raised (its "
        "reward raised), group_member_raised (scored, but the reward raised on a member of its group)",
        ["reason"],
    )
    fraction = gauge(
        "reward_failure_fraction", "Fraction of the last scorer.failing_window rollouts whose reward raised"
    )
    consecutive = gauge(
        "reward_consecutive_failures", "Micro-batches in a row whose reward raised on every rollout (0 after a success)"
    )
    failing = gauge(
        "reward_failing",
        "1 while the reward is failing (scorer.failing_after micro-batches in a row "
        "raised, or scorer.failing_fraction of the last scorer.failing_window rollouts)",
    )
    last_error = gauge(
        "reward_last_error",
        "1, labelled with the last reward failure's exception class and message",
        ["reason", "error"],
    )
    rewards = histogram("reward", "Reward of each scored rollout", buckets=REWARD_BUCKETS)
    seconds = histogram("scoring_seconds", "Seconds to score one micro-batch")
    reference_seconds = histogram(
        "reference_seconds", "Seconds of the reference pass over one micro-batch (scorer.reference_logprobs)"
    )
    blocked = counter("send_blocked_seconds_total", "Seconds blocked sending to the buffer")
    feed_sent = counter(
        "feed_sent_total",
        "Scored rollouts published to the feedback service's feed (PUB: dropped when it is not listening)",
    )
    human_scored = counter("human_scored_total", "Rollouts H-hat scored for reward shaping")
    human_version = gauge("human_model_version", "H-hat version in use (0: none received)")
