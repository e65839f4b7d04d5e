"""The generator declares exactly the metrics the README lists for it."""

from __future__ import annotations

from streamrl.services.generator.metrics import GeneratorMetrics
from support import declared_metrics, readme_metrics


def test_generator_metrics_are_the_readme_row():
    assert declared_metrics(GeneratorMetrics) == readme_metrics("generator")
