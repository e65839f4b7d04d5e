"""Each benchmark under bench/ runs end to end at tiny size and writes sane results.

Not measurements: these only prove the benchmark commands work (real processes on
loopback, the tiny char-level model), so a change that breaks a benchmark is caught.
"""

from __future__ import annotations

import json

import pytest

from bench import e2e, scale, transport, trl_grpo, weight_sync
from bench.report import REPO

pytestmark = pytest.mark.slow

TINY = str(REPO / "deploy" / "configs" / "tiny.toml")


def outputs(tmp_path) -> list[str]:
    return ["--results-dir", str(tmp_path), "--results-md", str(tmp_path / "RESULTS.md")]


def test_weight_sync_tiny(tmp_path):
    assert (
        weight_sync.main(
            [
                "--models",
                "tiny",
                "--generators",
                "2",
                "--dtypes",
                "float32,bfloat16",
                "--repeats",
                "1",
                "--max-seconds",
                "60",
                *outputs(tmp_path),
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "weight_sync.json").read_text())
    fp32, bf16 = result["rows"]
    assert (fp32["dtype"], bf16["dtype"], fp32["generators"]) == ("float32", "bfloat16", 2)
    assert bf16["nbytes"] * 2 == fp32["nbytes"]  # every float tensor halves on the wire
    for row in result["rows"]:
        assert row["repeats"] == 1 and len(row["raw_seconds"]) == 1
        assert all(row[phase] >= 0 for phase in weight_sync.PHASES)
        # the last generator finishes after the mean generator's announce + transfer + verify + load
        assert row["total"] >= row["transfer"] + row["verify"] + row["load"]
        assert row["transfer_ratio"] > 0 and row["raw_MBps"] > 0
    md = (tmp_path / "RESULTS.md").read_text()
    assert "<!-- bench:weight_sync -->" in md and "| tiny | bfloat16 | 2 |" in md


def test_transport_tiny(tmp_path):
    assert (
        transport.main(
            [
                "--seconds",
                "2",
                "--warmup",
                "1",
                "--runs",
                "1",
                "--iterations",
                "50",
                "--buffer-rollouts",
                "256",
                "--repeats",
                "1",
                *outputs(tmp_path),
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "transport.json").read_text())
    run = result["pipeline_runs"][0]
    assert run["rollouts"] > 0 and run["rollouts"] % 16 == 0  # whole batches of 4 groups x 4
    assert run["rejected"] == {} and run["duplicates"] == 0
    assert result["buffer"]["sample_batches"] == 256 // 16
    assert [m["kind"] for m in result["messages"]] == ["rollout", "scored_rollout", "batch"]
    rollout, scored, batch = result["messages"]
    assert rollout["bytes"] < scored["bytes"] < batch["bytes"]
    assert all(m["round_trip_us"] > 0 for m in result["messages"])


def test_e2e_tiny(tmp_path):
    assert e2e.main(["--config", TINY, "--steps", "3", "--runs", "1", *outputs(tmp_path)]) == 0
    result = json.loads((tmp_path / "e2e.json").read_text())
    sync, async_ = (next(r for r in result["runs"] if r["mode"] == m) for m in ("sync", "async"))
    assert (sync["max_staleness"], async_["max_staleness"]) == (0, 1)  # tiny.toml's bound
    assert sync["steps"] == async_["steps"] == 3
    # on-policy: every trained rollout has staleness 0
    assert set(sync["staleness_histogram"]) == {"0"}
    assert all(r["samples_per_s"] > 0 for r in result["runs"])
    assert result["async_over_sync"]["samples_per_s"] > 0


def test_trl_grpo_ours_side_and_evaluation(tmp_path):
    """The streamrl half of bench/trl_grpo.py and the shared held-out evaluation."""
    (tmp_path / "ours").mkdir()
    # stopped after its first step (the benchmark's own launch, SIGTERM and read-back; start-up alone can
    # take 15 s on 2 busy cores, hence the generous bound)
    ours = trl_grpo.run_ours(TINY, [], 120.0, tmp_path / "ours", stop_after_steps=1)
    assert ours["steps"] >= 1 and ours["samples"] == 32 * ours["steps"]  # tiny.toml: 4 groups x 8
    assert trl_grpo.rates(ours)["samples_per_s"] > 0
    result = trl_grpo.evaluate(TINY, [], ours["model"], samples=1, limit=2, workdir=tmp_path, name="ours")
    assert result["prompts"] == 2 and result["model"] == ours["model"]


@pytest.mark.skipif(
    not trl_grpo.TRL_VENV.joinpath("bin", "python").exists(),
    reason="TRL lives only in .venv-trl (bash bench/setup_trl.sh); never a streamrl dependency",
)
@pytest.mark.parametrize("bf16", [False, True])
def test_trl_grpo_trl_side(tmp_path, bf16):
    from streamrl.common.config import load_config

    cfg = load_config(TINY, ["generator.group_size=4"])
    side = trl_grpo.run_trl(cfg, 5.0, 1, trl_grpo.TRL_VENV / "bin" / "python", tmp_path, bf16=bf16)
    assert side["optimizer_steps"] >= 1
    assert side["samples"] == side["optimizer_steps"] * 16  # 4 prompts x 4, tiny.toml: 1 minibatch
    assert (tmp_path / "trl" / "model" / "config.json").exists()


def test_scale_tiny(tmp_path):
    """bench/scale.py at tiny size: every point ran, the buffer's staleness bound held for every
    trained rollout, the figures are rates and fractions, the plot and the section are written."""
    assert (
        scale.main(
            [
                "--generators",
                "1,2",
                "--max-staleness",
                "1",
                "--ceiling-generators",
                "",
                "--seconds",
                "2",
                "--warmup",
                "1",
                "--step-s",
                "0.1",
                "--max-seconds",
                "120",
                *outputs(tmp_path),
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "scale.json").read_text())
    modes = [True, False] if result["credits_available"] else [False]
    assert [(p["credits"], p["n"]) for p in result["points"]] == [(m, n) for m in modes for n in (1, 2)]
    for p in result["points"]:
        assert p["max_staleness"] == 1 and p["offered_per_s"] == p["n"] * 256 / 32
        assert p["generated_per_s"] > 0 and p["trained_per_s"] >= 0 and 0 <= p["waste"] <= 1
        assert all(0 <= int(s) <= 1 for s in p["staleness"])  # the buffer never serves a rollout older than the bound
        assert p["bound"] in ("learner", "scorer", "buffer", "cpu", "waste", "admission", "generators")
    assert len(result["saturation"]) == len(modes)
    assert (tmp_path / "scale.png").stat().st_size > 10_000
    md = (tmp_path / "RESULTS.md").read_text()
    assert "<!-- bench:scale -->" in md and "](scale.png)" in md
