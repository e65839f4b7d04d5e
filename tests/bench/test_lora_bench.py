"""bench/lora.py on the tiny model: one generator, one measured sync of each kind."""

from __future__ import annotations

import json

import pytest

from bench import lora
from streamrl.common.config import LoraSection

pytestmark = pytest.mark.slow


def test_lora_bench_tiny(tmp_path):
    args = ["--models", "tiny", "--generators", "1", "--repeats", "1", "--learner-steps", "1", "--max-seconds", "120"]
    assert lora.main([*args, "--results-dir", str(tmp_path), "--results-md", str(tmp_path / "RESULTS.md")]) == 0
    result = json.loads((tmp_path / "lora.json").read_text())
    full, adapter = result["rows"]
    assert (full["version"], adapter["version"], adapter["generators"]) == ("full", "adapter", 1)
    # the tiny char Llama (hidden 64, MLP 256, 2 blocks): r (in + out) per projection, float32
    assert adapter["nbytes"] == 4 * LoraSection().rank * 2 * (4 * 128 + 3 * 320)
    assert adapter["nbytes"] < full["nbytes"] / 5
    for row in (full, adapter):
        assert row["total"] >= row["transfer"] + row["load"] > 0
    assert "| tiny | adapter | 1 |" in (tmp_path / "RESULTS.md").read_text()
    learner_full, learner_lora = result["learner"]
    assert learner_lora["trained_parameters"] == adapter["nbytes"] // 4  # the adapters, as sent
    assert learner_full["trained_parameters"] > 5 * learner_lora["trained_parameters"]
    assert all(r["step"] > 0 and r["peak_rss_mb"] > 0 for r in result["learner"])
