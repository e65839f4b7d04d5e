"""The generator declares exactly the metrics docs/metrics.md lists for it."""

from __future__ import annotations

from streamrl.services.generator.metrics import GeneratorMetrics
from support import declared_metrics, documented_metrics


def test_generator_metrics_are_the_readme_row():
    assert declared_metrics(GeneratorMetrics) == documented_metrics("generator")
