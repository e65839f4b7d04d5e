"""``python -m bench.rlhf`` end to end at tiny size: the recipe config, both stages, the
results JSON and the RESULTS.md section (not a measurement)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import rlhf

HH = Path(rlhf.REPO).parent / "shared" / "data" / "hh_rlhf_harmless_pairs.jsonl.gz"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not HH.is_file(), reason="shared hh-rlhf data not present")]


def test_rlhf_bench_tiny(tmp_path):
    tiny = [
        "model=tiny-char-llama",
        "max_length=48",
        "trainable_layers=1",
        "threads=1",
        "data.eval_rows=12",
        "data.train_rows=24",
        "lr=3e-3",
    ]
    overrides = [
        f"run.output_dir={tmp_path / 'run'}",
        "sft.base_model=tiny-char-llama",
        f"rm.base_model={tmp_path / 'run' / 'sft'}",
    ]
    overrides += [f"{stage}.{o}" for stage in ("sft", "rm") for o in tiny if not o.startswith("model=")]
    args = [a for o in overrides for a in ("--set", o)]
    assert rlhf.main([*args, "--results-dir", str(tmp_path), "--results-md", str(tmp_path / "RESULTS.md")]) == 0
    result = json.loads((tmp_path / "rlhf.json").read_text())
    assert result["rm"]["heldout_comparisons"] == result["rm"]["heldout_rows"] >= 12
    assert result["sft"]["heldout_loss_after"] < result["sft"]["heldout_loss_before"]
    for model in ("proxy", "gold"):  # the recipe trains both (rm.gold), each a Hugging Face folder
        assert (tmp_path / "run" / "rm" / model / "config.json").is_file()
    md = (tmp_path / "RESULTS.md").read_text()
    assert "<!-- bench:rlhf -->" in md and "held-out accuracy" in md and "held-out response loss" in md
    assert "| rm proxy |" in md and "| rm gold |" in md
