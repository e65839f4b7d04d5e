"""The shipped Grafana dashboard's queries and the metric names a PromQL expression reads."""

from __future__ import annotations

import json
import re
from pathlib import Path

from support import REPO

DASHBOARD = REPO / "deploy" / "grafana" / "streamrl.json"

# Grafana's range variables and what the tests give Prometheus instead.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m"}

_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "and",
    "or",
    "unless",
    "inf",
    "nan",
    "atan2",
}
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w.:])[a-zA-Z_:][a-zA-Z0-9_:]*")


def load_dashboard(path: Path = DASHBOARD) -> dict:
    """The dashboard JSON as a dict."""
    return json.loads(path.read_text())


def panels(dashboard: dict) -> list[dict]:
    """Every panel, rows' nested panels included (rows themselves left out)."""
    out = []
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            out += panel.get("panels", [])
        else:
            out.append(panel)
    return out


def queries(dashboard: dict) -> list[tuple[str, str]]:
    """``(panel title, expr)`` of every Prometheus query target of every panel."""
    return [(p["title"], t["expr"]) for p in panels(dashboard) for t in p.get("targets", []) if "expr" in t]


def to_prometheus(expr: str) -> str:
    """``expr`` with Grafana's ``$__rate_interval``-style variables replaced by fixed durations."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (``rate(a_total[1m]) / b`` -> ``{a_total, b}``).

    Function and aggregation names, keywords, label names in ``{...}``, ``by (...)``-style
    groupings, ranges and numbers are not metric names. Selectors by ``{__name__=...}``
    are not resolved (they return nothing here).
    """
    text = _STRING.sub('""', to_prometheus(expr))
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        name = match.group()
        if name.lower() in _KEYWORDS or re.match(r"\s*\(", text[match.end() :]):
            continue
        names.add(name)
    return names
