"""``streamrl check`` and ``streamrl run`` send each HTTP reward server one request first: a server
that cannot answer (nothing listening, HTTP 5xx after every retry) stops the command at once with
its message and the fix, instead of a run whose learner waits learner.batch_timeout_s (600 s) for a
batch; ``--no-probe`` skips it. Against a real HTTP server on loopback, and against none."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from streamrl.cli import main
from streamrl.common.models import save_tiny_model
from streamrl.services.scorer.http_reward import PROBE_BODY
from streamrl.testing import free_port
from support import RewardServer


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("probe") / "model")


def job(tmp_path: Path, model: Path, url: str) -> Path:
    (tmp_path / "prompts.jsonl").write_text('{"text": "The film was"}\n')
    path = tmp_path / "job.toml"
    path.write_text(f"""
[run]
output_dir = "{tmp_path / "run"}"
[model]
path = "{model}"
[generator.prompts]
path = "prompts.jsonl"
[[scorer.rewards]]
url = "{url}"
retries = 1
backoff_s = 0.05
timeout_s = 2.0
""")
    return path


def command(*argv: str, capsys) -> tuple[int, str, float]:
    """``streamrl ARGV``: (exit status, stderr, seconds)."""
    started = time.monotonic()
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    return info.value.code, capsys.readouterr().err, time.monotonic() - started


def test_check_sends_a_server_that_answers_one_request(tmp_path, model, capsys):
    with RewardServer() as server:
        code, err, _ = command("check", "--config", str(job(tmp_path, model, server.url)), capsys=capsys)
    assert code == 0 and "reward server" not in err, err  # (check may note default ports in use here)
    assert server.requests == [PROBE_BODY]


def test_a_server_that_is_down_fails_check_and_run_at_once(tmp_path, model, capsys):
    url = f"http://127.0.0.1:{free_port()}/score"  # nothing listens
    config = str(job(tmp_path, model, url))
    code, err, seconds = command("check", "--config", config, capsys=capsys)
    assert code == 2 and seconds < 10
    assert f"  - scorer.rewards[0].url: reward server {url} is down: cannot connect (" in err
    assert "(2 tries over" in err and "fix: start the reward server, or correct scorer.rewards[].url" in err
    assert "--no-probe skips this check" in err
    code, err, seconds = command("run", "--config", config, capsys=capsys)
    assert code == 2 and seconds < 10 and f"reward server {url} is down" in err
    assert not (tmp_path / "run").exists()  # nothing started, no run folder
    code, err, _ = command("check", "--config", config, "--no-probe", capsys=capsys)
    assert code == 0 and "reward server" not in err, err


def test_a_server_that_fails_every_request_fails_check_with_its_answer(tmp_path, model, capsys):
    with RewardServer(script=[503, 503]) as server:
        code, err, _ = command("check", "--config", str(job(tmp_path, model, server.url)), capsys=capsys)
    assert code == 2 and len(server.requests) == 2  # the request and its one retry
    assert f"scorer.rewards[0].url: reward server {server.url}: HTTP 503 Service Unavailable" in err
    with RewardServer(script=[400]) as server:  # a refusal is not retried
        code, err, _ = command("check", "--config", str(job(tmp_path, model, server.url)), capsys=capsys)
    assert code == 2 and len(server.requests) == 1 and "refused the request: HTTP 400" in err
