"""End to end: a LoRA learner (``learner.lora``) trains with the buffer, a scorer and a generator on
loopback, a new learner process resumes from its adapter checkpoint, and the generator receives
adapter-only versions throughout: every version it loads is exactly the adapter's bytes, a small
fraction of the whole model's."""

from __future__ import annotations

import json
import time

import pytest
import torch

from streamrl.common.config import LoraSection
from streamrl.common.lora import adapter_tensors, apply_lora, is_adapter_folder
from streamrl.common.models import load_causal_lm, save_tiny_model
from streamrl.common.weights import tied_duplicates
from streamrl.testing import local_run_config, scrape, wait_until, write_config

pytestmark = pytest.mark.slow

STEPS = 6
LORA = {"rank": 4, "alpha": 8.0}


def test_a_lora_run_trains_and_streams_only_adapters(tmp_path, tiny_model_dir, services):
    sections = local_run_config(
        tmp_path, tiny_model_dir, learner={"total_steps": STEPS, "lr": 1e-2, "checkpoint_every": 3, "lora": LORA}
    )
    procs = services(write_config(tmp_path / "run.toml", sections))
    procs.train()
    run = tmp_path / "run"
    assert is_adapter_folder(run / "checkpoints" / f"step-{STEPS:06d}" / "model")
    # a new learner process resumes from the adapter checkpoint and goes on; the generator follows
    learner = procs.start("learner", 0, "--set", f"learner.total_steps={STEPS + 3}")
    assert wait_until(lambda: learner.poll() is not None, timeout=240), procs.logs()
    assert learner.returncode == 0, procs.logs()
    assert f"step-{STEPS:06d} at step {STEPS}, version {STEPS}" in (tmp_path / "learner-0.log").read_text()
    generator = scrape(sections["metrics"]["generator_port"])

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 4))
    assert any(r["grad_norm"] > 0 for r in records)
    assert is_adapter_folder(run / "checkpoints" / f"step-{STEPS + 3:06d}" / "model")

    base = load_causal_lm(str(tiny_model_dir), device=torch.device("cpu"))
    state = base.state_dict()
    full_bytes = sum(t.numel() * t.element_size() for k, t in state.items() if k not in tied_duplicates(state))
    adapter_bytes = sum(t.numel() * 4 for t in adapter_tensors(apply_lora(base, LoraSection(**LORA))).values())
    syncs = generator["streamrl_generator_weight_syncs_total"]
    assert syncs >= 2, procs.logs()
    assert generator["streamrl_generator_weight_bytes_total"] == syncs * adapter_bytes  # adapters only
    assert adapter_bytes < full_bytes / 10
    assert generator["streamrl_generator_policy_version"] > STEPS  # a version of the resumed learner


def test_a_generator_with_another_base_refuses_the_adapter_and_keeps_running(tmp_path, tiny_model_dir, services):
    """The adapter's announcement carries the fingerprint of the base it was trained on; a generator whose
    own ``model.path`` is another base (here: same vocabulary, another width) refuses every version, counts
    it once per version in ``messages_rejected_total{reason=model_mismatch}``, says why, and stays up."""
    other = save_tiny_model(tmp_path / "other", seed=1, hidden_size=32)
    sections = local_run_config(tmp_path, tiny_model_dir, learner={"total_steps": 2, "lora": LORA})
    procs = services(write_config(tmp_path / "run.toml", sections))
    procs.start("learner")
    generator = procs.start("generator", 0, "--set", f"model.path={other}")
    port = sections["metrics"]["generator_port"]

    def refused() -> float:
        try:
            samples = scrape(port)
        except ConnectionError:
            return 0.0
        return sum(v for k, v in samples.items() if "messages_rejected_total" in k and "reason=model_mismatch" in k)

    assert wait_until(lambda: refused() >= 1, timeout=120), procs.logs()
    time.sleep(1.0)  # announcements repeat every 0.2 s: still one refusal for the one version
    assert refused() == 1 and generator.poll() is None, procs.logs()
    samples = scrape(port)
    assert samples.get("streamrl_generator_weight_syncs_total", 0) == 0
    log = (tmp_path / "generator-0.log").read_text()
    assert "model fingerprint" in log and "weights not loaded" in log, log[-3000:]
