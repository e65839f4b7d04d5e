"""The documentation's user pages describe what the code does: every troubleshooting message
(docs/troubleshooting.md) is one the services print, every metric in "What the metrics mean"
(docs/metrics.md) exists, and KL is named in one unit everywhere it is shown."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TROUBLESHOOTING = (REPO / "docs" / "troubleshooting.md").read_text()
METRICS = (REPO / "docs" / "metrics.md").read_text()


def _normalised(code: str) -> str:
    """Source text with implicitly concatenated string literals joined, placeholders (``{...}``, ``%s``)
    turned into a separator, and backticks dropped, so a message reads as it is printed."""
    code = re.sub(r"\"\s*\n\s*(?:f|rf|fr)?\"", "", code)
    code = re.sub(r"\{[^{}\n]*\}|%[-.0-9]*[sdfr]", "\x00", code)
    return code.replace("`", "")


SOURCES = "\n".join(
    _normalised(p.read_text()) for folder in ("common", "services", "streamrl") for p in (REPO / folder).rglob("*.py")
)


def section(page: str, title: str) -> str:
    start = page.index(title)
    end = page.find("\n## ", start + len(title))
    return page[start : end if end > 0 else None]


def table_first_cells(text: str) -> list[str]:
    return [
        line.split(" | ")[0].lstrip("| ")
        for line in text.splitlines()
        if line.startswith("| ") and not line.startswith("| message") and not line.startswith("| metric")
    ]


def literal_pieces(message: str) -> list[str]:
    """The fixed parts of a quoted message: split at ``...``, numbers, quoted values and example names."""
    pieces = re.split(
        r"\.\.\.|\(\.\.\.\)|\d+(?:\.\d+)?s?|'[^']*'|\"[^\"]*\"|runs/x|scorer-0|generator-0|learner-0|"
        r"buffer-0|KeyError|127\.0\.0\.1|http://\S+|name\)|\b[A-Z]\b|: |; |the buffer |"
        r"Address already in use|(?<=another) (?:learner|buffer)",
        message,
    )
    return [p.strip(" ,:;()") for p in pieces if len(p.strip(" ,:;()")) >= 12]


MESSAGES = [
    re.findall(r"`([^`]+)`", cell)[0]
    for cell in table_first_cells(section(TROUBLESHOOTING, "# Troubleshooting"))
    if not cell.startswith("`journal")
]  # the journal's own messages are listed under Fault tolerance


def test_the_troubleshooting_table_is_not_empty():
    assert len(MESSAGES) >= 15


@pytest.mark.parametrize("message", MESSAGES)
def test_each_troubleshooting_message_is_printed_by_the_code(message):
    pieces = literal_pieces(message)
    assert pieces, message
    missing = [p for p in pieces if p not in SOURCES]
    assert not missing, f"docs/troubleshooting.md message {message!r}: not in the sources: {missing}"


def test_each_metric_explained_exists():
    from streamrl.services.learner.metrics import STEP_GAUGES, LearnerMetrics
    from streamrl.services.scorer.metrics import ScorerMetrics

    declared = {d.name for cls in (LearnerMetrics, ScorerMetrics) for d in cls.declared()} | set(STEP_GAUGES.values())
    declared |= {"waiting_seconds", "messages_rejected_total"}  # declared by shared components
    explained = {
        name.split("{")[0]
        for cell in table_first_cells(section(METRICS, "## What the metrics mean"))
        for name in re.findall(r"`([a-z_{}]+)`", cell)
    }
    assert explained and explained <= declared, explained - declared


def test_kl_is_per_token_wherever_it_is_shown():
    from streamrl.evaluation import EvalResult

    line = EvalResult(
        model="m",
        prompts=2,
        reward_mean=0.5,
        reward_stderr=0.1,
        kl_mean=3.2,
        kl_per_token=0.1,
        completion_tokens_mean=32.0,
    ).line()
    assert "KL to reference 0.1000 nats/token" in line
    assert 'set_ylabel("KL to reference (nats/token)")' in (REPO / "streamrl" / "report.py").read_text()
    assert "KL is in **nats per completion token** everywhere" in METRICS
