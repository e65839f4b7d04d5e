"""bench/learner_passes.py runs end to end on the tiny model and reports every variant and the bf16 mismatch."""

from __future__ import annotations

import json

import pytest

from bench import learner_passes


@pytest.mark.slow
def test_learner_passes_bench_on_the_tiny_model(tmp_path, tiny_model_dir):
    code = learner_passes.main(
        [
            "--set",
            f"model.path={tiny_model_dir}",
            "--set",
            "model.chat_template=false",
            "--repeats",
            "1",
            "--results-dir",
            str(tmp_path),
            "--results-md",
            str(tmp_path / "RESULTS.md"),
        ]
    )
    assert code == 0
    result = json.loads((tmp_path / "learner_passes.json").read_text())
    assert set(result["step_s"]) == set(learner_passes.VARIANTS)
    fp32, bf16 = result["ratio_mismatch_staleness_0"]["fp32"], result["ratio_mismatch_staleness_0"]["bf16"]
    assert fp32["abs_log_ratio_max"] < 1e-4  # the same fp32 weights sampled them: ratios of 1
    assert bf16["abs_log_ratio_max"] > fp32["abs_log_ratio_max"]  # bf16 adds its own error
    assert "Learner passes" in (tmp_path / "RESULTS.md").read_text()
    assert set(result["generator_batch_s"]) == {"fp32", "bf16"} and min(result["generator_batch_s"].values()) > 0
    reference_s = result["scorer_reference_pass_s"]
    assert set(reference_s) == {"fp32", "bf16"} and min(reference_s.values()) > 0
    ref = result["reference_bf16_mismatch"]
    assert 0 < ref["token_abs_mean"] <= ref["token_abs_max"]  # the bf16 pass differs, by rounding only
    assert abs(ref["token_mean"]) <= ref["token_abs_mean"]
