"""End to end: a 2-rank data-parallel learner trains with the buffer, a scorer and
a generator on loopback. The learner is started exactly as the Procfile and supervisord start it
(``python -m streamrl.services.learner``); ``learner.world_size = 2`` makes it torchrun itself."""

from __future__ import annotations

import json
import re
import signal

import pytest
import torch

from streamrl.testing import local_run_config, scrape, wait_until, write_config

pytestmark = pytest.mark.slow

STEPS = 6  # 12 groups: some group has unequal rewards (count_char 'e' on random text) with p > 0.99


def test_two_rank_learner_trains_with_the_other_services(tmp_path, tiny_model_dir, services):
    sections = local_run_config(
        tmp_path, tiny_model_dir, learner={"total_steps": STEPS, "world_size": 2, "checkpoint_every": 2}
    )
    procs = services(write_config(tmp_path / "run.toml", sections))
    procs.train()
    logs = (tmp_path / "learner-0.log").read_text()
    assert "torch.distributed.run --standalone --nproc-per-node=2" in logs
    assert "rank 1 of 2" in logs and f"rank 1 stopped after {STEPS} steps" in logs, logs[-4000:]
    # the replicas stayed identical: both ranks log the same digest of their weights at the end
    digests = re.findall(r"weights digest (\S+)\)", logs)
    assert len(digests) == 2 and digests[0] == digests[1], logs[-4000:]

    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["version"]) for r in records] == [(i, i) for i in range(1, STEPS + 1)]
    assert any(r["grad_norm"] > 0 for r in records)
    ledger = [json.loads(line) for line in (run / "trained.jsonl").read_text().splitlines()]
    assert [len(line["rollout_ids"]) for line in ledger] == [8] * STEPS  # 2 groups x 4: rank 0's whole batches
    # rank 0 wrote checkpoints (every 2 steps) and the weights moved
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert checkpoints[-1] == f"step-{STEPS:06d}"
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(run / "checkpoints" / checkpoints[-1] / "model").state_dict()
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert max(float((trained[k] - initial[k]).abs().max()) for k in initial) > 1e-4
    # the generator followed the published versions
    generator = scrape(sections["metrics"]["generator_port"])
    assert generator["streamrl_generator_weight_syncs_total"] >= 2, procs.logs()
    assert torch.isfinite(torch.tensor([r["loss/total"] for r in records])).all()


def test_sigterm_checkpoints_and_stops_every_rank(tmp_path, tiny_model_dir, services):
    """SIGTERM reaches torchrun (what honcho, supervisord and Kubernetes signal): it forwards it to the
    ranks, rank 0 finishes its step, checkpoints and stops rank 1, and every rank exits within the grace
    period. torchrun itself then exits 1 (it re-raises the signal as ``SignalException``): a stop, not a crash."""
    sections = local_run_config(tmp_path, tiny_model_dir, learner={"total_steps": 1000, "world_size": 2})
    procs = services(write_config(tmp_path / "run.toml", sections))
    for name in ("buffer", "scorer", "generator"):
        procs.start(name)
    procs.start("learner")
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert wait_until(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2, 240), procs.logs()
    learner = procs.procs["learner-0"]
    learner.send_signal(signal.SIGTERM)
    assert wait_until(lambda: learner.poll() is not None, 60), procs.logs()
    logs = (tmp_path / "learner-0.log").read_text()
    assert "SIGKILL" not in logs and "exitcode  : -" not in logs, logs[-4000:]  # no rank was killed
    n = len(metrics.read_text().splitlines())
    assert (tmp_path / "run" / "checkpoints" / f"step-{n:06d}").is_dir(), procs.logs()
    assert f"rank 1 stopped after {n} steps" in logs, logs[-4000:]
