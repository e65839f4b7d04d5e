"""The generator's Prometheus metrics, ``streamrl_generator_*`` (docs/metrics.md)."""

from __future__ import annotations

from streamrl.common.metrics import MetricSet, counter, gauge, histogram


class GeneratorMetrics(MetricSet):
    """Every metric the generator updates (see :class:`streamrl.common.metrics.MetricSet`)."""

    SERVICE = "generator"
    rollouts = counter("rollouts_total", "Completions sampled and sent")
    tokens = counter("tokens_total", "Completion tokens sampled")
    batch_seconds = histogram("generation_seconds", "Seconds per generation batch")
    version = gauge("policy_version", "Policy version of the loaded weights")
    latest_version = gauge("announced_version", "Newest version announced by the learner")
    fetch_seconds = histogram("weight_fetch_seconds", "Seconds to fetch and verify one version")
    load_seconds = histogram("weight_load_seconds", "Seconds to load fetched weights")
    weight_bytes = counter("weight_bytes_total", "Weight bytes received")
    weight_syncs = counter("weight_syncs_total", "Versions loaded")
    weight_errors = counter("weight_sync_errors_total", "Failed weight fetches")
    wait_weights = counter("weight_wait_seconds_total", "Seconds paused waiting for fresher weights")
    blocked = counter("send_blocked_seconds_total", "Seconds blocked sending (backpressure)")
    credits = counter("credits_total", "Generation credits received from the buffer (one per group)")
    wait_credits = counter("credit_wait_seconds_total", "Seconds paused without a generation credit")
    useful = gauge(
        "useful_ratio",
        "Trained / generated: this generator's groups the buffer served to the learner "
        "over the groups it sampled (reported with each credit grant)",
    )
    in_flight = gauge("prompts_in_flight", "Prompts being generated now")
    lost = counter("rollouts_lost_total", "Rollouts sampled but never sent (stopped while blocked)")
    control_shared = counter(
        "control_shared_total", "Rollouts kept among K candidates by action biasing or control sharing"
    )
    selected_by_model = counter("selected_by_model_total", "Control-shared rollouts H-hat chose (the coin said H-hat)")
    human_version = gauge("human_model_version", "H-hat version in use (0: none received)")
