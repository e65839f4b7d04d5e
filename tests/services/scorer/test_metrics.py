"""The scorer declares exactly the metrics docs/metrics.md lists for it, on the scorer registry only."""

from __future__ import annotations

import pytest

from streamrl.common.metrics import ServiceMetrics
from streamrl.services.scorer.metrics import ScorerMetrics
from support import declared_metrics, documented_metrics


def test_scorer_metrics_are_the_readme_row():
    assert declared_metrics(ScorerMetrics) == documented_metrics("scorer")


def test_scorer_metrics_refuse_another_services_registry():
    with pytest.raises(ValueError, match="ScorerMetrics declares streamrl_scorer_.* the 'buffer' registry"):
        ScorerMetrics(ServiceMetrics("buffer", "buffer-0"))
