"""Every service has the one shape (DESIGN.md, "Layout"): ``__main__.py`` runs ``<Name>Service`` from
``loop.py``, whose only top-level definition is that class; ``metrics.py`` holds the one
``<Name>Metrics`` MetricSet, the only place in the service that creates a metric."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

from streamrl.common.metrics import MetricSet

SERVICES_DIR = Path(__file__).resolve().parents[2] / "services"
NAMES = sorted(p.name for p in SERVICES_DIR.iterdir() if (p / "__init__.py").exists())


def tree(name: str, module: str) -> ast.Module:
    return ast.parse((SERVICES_DIR / name / f"{module}.py").read_text())


def test_the_services_are_found():
    assert {"generator", "scorer", "buffer", "learner"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_loop_holds_only_the_service_class(name):
    definitions = [
        node
        for node in tree(name, "loop").body
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
    ]
    assert [d.name for d in definitions] == [f"{name.capitalize()}Service"], (
        "loop.py keeps the socket loop only: pure helpers go to a logic module, metrics to metrics.py"
    )


@pytest.mark.parametrize("name", NAMES)
def test_main_runs_the_service_class(name):
    calls = [
        node
        for node in ast.walk(tree(name, "__main__"))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "run_service"
    ]
    assert len(calls) == 1
    service, loop_class = calls[0].args
    assert (service.value, loop_class.id) == (name, f"{name.capitalize()}Service")


@pytest.mark.parametrize("name", NAMES)
def test_one_metrics_class_declared_on_metric_set(name):
    module = importlib.import_module(f"streamrl.services.{name}.metrics")
    classes = [
        c for c in vars(module).values() if isinstance(c, type) and issubclass(c, MetricSet) and c is not MetricSet
    ]
    assert [c.__name__ for c in classes] == [f"{name.capitalize()}Metrics"]
    assert classes[0].SERVICE == name


def metric_creations(source: str) -> list[str]:
    """Calls ``<anything>.counter/gauge/histogram(...)`` in ``source``: a metric created outside metrics.py."""
    return [
        f"line {node.lineno}: {ast.unparse(node)[:80]}"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in ("counter", "gauge", "histogram")
    ]


def test_metric_creations_are_found():
    planted = (
        "class S:\n    def __init__(self, ctx):\n        m = ctx.metrics\n        self.x = m.counter('x_total', 'x')\n"
    )
    assert metric_creations(planted) == ["line 4: m.counter('x_total', 'x')"]
    assert metric_creations("self.metrics.rollouts.inc(); self.metrics.refused.labels(reason='a').inc(2)") == []


@pytest.mark.parametrize("name", NAMES)
def test_metrics_are_created_only_in_the_metrics_module(name):
    offenders = {
        path.name: found
        for path in sorted((SERVICES_DIR / name).glob("*.py"))
        if path.name != "metrics.py" and (found := metric_creations(path.read_text()))
    }
    assert not offenders, f"declare these in {name}/metrics.py: {offenders}"
