"""bench/waste.py runs the tiny job with generation credits on and off (real processes on loopback)."""

from __future__ import annotations

import json

import pytest

from bench import waste
from bench.report import REPO

pytestmark = pytest.mark.slow


def test_waste_bench_tiny_sync(tmp_path):
    assert (
        waste.main(
            [
                "--config",
                str(REPO / "deploy" / "configs" / "tiny.toml"),
                "--steps",
                "3",
                "--staleness",
                "0",
                "--generators",
                "2",
                "--results-dir",
                str(tmp_path),
                "--results-md",
                str(tmp_path / "RESULTS.md"),
            ]
        )
        == 0
    )
    on, off = json.loads((tmp_path / "waste.json").read_text())["runs"]
    assert (on["credits"], off["credits"]) == (True, False)
    # sync mode with credits: everything sampled was trained, nothing dropped
    assert on["dropped"] == 0 and on["sent"] == on["inserted"] == on["trained"] == 3 * 4 * 8
    assert off["trained"] == on["trained"] and off["sent"] >= off["inserted"] >= off["trained"]
    assert "<!-- bench:waste -->" in (tmp_path / "RESULTS.md").read_text()
