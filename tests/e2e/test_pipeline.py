"""End to end: learner, buffer, scorer and two generators as separate processes on loopback."""

from __future__ import annotations

import json

import pytest

from support import local_run_config, scrape, wait_until, write_config

pytestmark = pytest.mark.slow


def run_pipeline(tmp_path, tiny_model_dir, services, *, max_staleness: int, steps: int = 6):
    sections = local_run_config(tmp_path, tiny_model_dir, run={"max_staleness": max_staleness},
                                learner={"total_steps": steps})
    config = write_config(tmp_path / "run.toml", sections)
    procs = services(config)
    ports = sections["metrics"]
    learner = procs.start("learner")
    procs.start("buffer")
    procs.start("scorer")
    procs.start("generator", 0)
    procs.start("generator", 1)
    learner_samples: list[dict] = []

    def learner_done() -> bool:
        try:
            learner_samples.append(scrape(ports["learner_port"]))
        except OSError:
            pass
        return learner.poll() is not None

    finished = wait_until(learner_done, timeout=240, interval=0.3)
    assert finished and learner.returncode == 0, procs.logs()
    scraped = {
        "generator-0": scrape(ports["generator_port"]),
        "generator-1": scrape(ports["generator_port"] + 1),
        "scorer": scrape(ports["scorer_port"]),
        "buffer": scrape(ports["buffer_port"]),
    }
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return procs, records, scraped, learner_samples


def test_four_services_train_with_versioned_weights(tmp_path, tiny_model_dir, services):
    procs, records, scraped, learner_samples = run_pipeline(tmp_path, tiny_model_dir, services, max_staleness=1)
    # the learner ran its 6 steps and bumped the version once per step
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6], procs.logs()
    assert [r["version"] for r in records] == [1, 2, 3, 4, 5, 6]
    # rollouts carried several behaviour versions, none staler than max_staleness
    versions = {v for r in records for v in r["behaviour_versions"]}
    assert len(versions) >= 3, versions
    assert max(r["staleness_max"] for r in records) <= 1
    # both generators advanced their weights and produced rollouts
    for name in ("generator-0", "generator-1"):
        g = scraped[name]
        assert g["streamrl_generator_policy_version"] >= 3, (name, procs.logs())
        assert g["streamrl_generator_weight_syncs_total"] >= 3
        assert g["streamrl_generator_rollouts_total"] > 0
    assert scraped["scorer"]["streamrl_scorer_rollouts_scored_total"] > 0
    buffer = scraped["buffer"]
    assert buffer["streamrl_buffer_inserted_total"] >= 6 * 2 * 4
    assert buffer["streamrl_buffer_sampled_total"] == 6 * 2 * 4
    assert buffer["streamrl_buffer_batches_total"] == 6
    # the learner's own endpoint showed the step counter advancing while it ran
    steps_seen = {s.get("streamrl_learner_step") for s in learner_samples if s}
    assert len(steps_seen - {None}) >= 2 and max(steps_seen - {None}) >= 4
    # a checkpoint folder loadable by transformers was written at the end
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "checkpoints" / "step-000006" / "model")
    assert model.config.vocab_size > 0


def test_small_max_staleness_drops_stale_rollouts(tmp_path, tiny_model_dir, services):
    procs, records, scraped, _ = run_pipeline(tmp_path, tiny_model_dir, services, max_staleness=0)
    assert len(records) == 6, procs.logs()
    # strictly on-policy: every trained rollout was sampled by the current version
    assert all(r["staleness_max"] == 0 for r in records), [r["staleness_max"] for r in records]
    dropped = sum(r["dropped_stale"] for r in records)
    assert dropped > 0, procs.logs()
    assert scraped["buffer"]["streamrl_buffer_dropped_stale_total"] >= dropped
