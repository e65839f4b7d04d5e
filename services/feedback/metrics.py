"""The feedback service's Prometheus metrics, ``streamrl_feedback_*`` (docs/metrics.md)."""

from __future__ import annotations

from streamrl.common.metrics import MetricSet, counter, gauge, histogram

LABEL_DELAY_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300)
REFUSALS = ("unauthenticated", "bad_token", "csrf", "cross_origin", "label")
"""``reason`` labels of ``requests_refused_total``."""


class FeedbackMetrics(MetricSet):
    """Every metric the feedback service updates (see :class:`streamrl.common.metrics.MetricSet`).

    Every ``kind`` and ``reason`` label value is exported at 0 from the start (dashboards show
    no labels or refusals, not no data).
    """

    SERVICE = "feedback"
    received = counter("rollouts_received_total", "Scored rollouts received from the scorers' feed")
    labels = counter("labels_total", "Labels stored, by kind (rating, preference)", ["kind"])
    refused = counter(
        "requests_refused_total",
        "HTTP requests refused, by reason (unauthenticated, bad_token, csrf, cross_origin, label)",
        ["reason"],
    )
    model_version = gauge("human_model_version", "Newest H-hat version published")
    labels_in_model = gauge("human_model_labels", "Labels the newest H-hat version was fit on")
    published = counter("human_models_published_total", "H-hat messages published (new versions and re-announcements)")
    fit_seconds = histogram("fit_seconds", "Seconds to compute missing features and refit H-hat")
    label_to_model = histogram(
        "label_to_model_seconds",
        "Seconds from a label's commit to the first H-hat version that includes it",
        buckets=LABEL_DELAY_BUCKETS,
    )
    influence = gauge("influence_active", "1 while the human influence is on (page start / pause)")

    def __init__(self, registry):
        super().__init__(registry)
        for kind in ("rating", "preference"):
            self.labels.labels(kind=kind)
        for reason in REFUSALS:
            self.refused.labels(reason=reason)
