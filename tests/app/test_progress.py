"""Progress where work is long: the libraries' progress bars are never switched off
globally (not by the CLI, not by a service), evaluation shows a bar over the held-out prompts, and it
reports KL per token like the learner."""

from __future__ import annotations

import signal

import pytest
import transformers

import streamrl.cli as cli
from streamrl.common.config import load_config
from streamrl.common.service import start_service
from streamrl.evaluation import evaluate
from streamrl.testing import local_run_config, write_config


@pytest.fixture
def bars_on():
    transformers.utils.logging.enable_progress_bar()
    yield
    transformers.utils.logging.enable_progress_bar()


def test_neither_the_cli_nor_a_service_switches_progress_bars_off(tmp_path, tiny_model_dir, bars_on, monkeypatch):
    job = write_config(tmp_path / "job.toml", local_run_config(tmp_path, tiny_model_dir))
    with pytest.raises(SystemExit):
        cli.main(["check", "--config", str(job)])
    assert transformers.utils.logging.is_progress_bar_enabled()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        ctx = start_service("scorer", ["--config", str(job), "--set", "metrics.enabled=false"])
        ctx.close()
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert transformers.utils.logging.is_progress_bar_enabled()


@pytest.mark.slow
def test_evaluation_shows_a_progress_bar_and_kl_per_token(tmp_path, tiny_model_dir, capsys):
    sections = local_run_config(tmp_path, tiny_model_dir)
    sections["generator"]["max_new_tokens"] = 4
    cfg = load_config(write_config(tmp_path / "job.toml", sections))
    result = evaluate(cfg, str(tiny_model_dir), limit=3, batch_prompts=2)
    err = capsys.readouterr().err
    assert f"evaluating {tiny_model_dir.name}: 100%" in err and "3/3" in err
    assert result.kl_per_token == pytest.approx(0.0, abs=1e-6)  # the policy is its own reference
    assert "nats/token" in result.line() and "nats/completion" not in result.line()
