"""The feedback service declares exactly the metrics docs/metrics.md lists for it."""

from __future__ import annotations

from streamrl.services.feedback.metrics import FeedbackMetrics
from support import declared_metrics, documented_metrics


def test_feedback_metrics_are_the_readme_row():
    assert declared_metrics(FeedbackMetrics) == documented_metrics("feedback")
