"""The ``streamrl`` command: parsing, ``--version``, ``run`` (the packaged Procfile, its environment,
the exit status, the summary), ``check``, ``keys`` and the exit codes of each failure."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from honcho.environ import parse_procfile

import streamrl.cli as cli
import streamrl.training as training
from streamrl.common.config import SERVICES, load_config
from streamrl.common.service import CONFIG_ENV, OVERRIDES_ENV
from streamrl.deploy import DEFAULT_CONFIG, PROCFILE
from streamrl.testing import local_run_config, write_config


def run_main(argv: list[str]) -> int:
    """``streamrl <argv>``; returns its exit status."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    code = exit_info.value.code
    return 0 if code is None else code


@pytest.fixture
def job(tmp_path, tiny_model_dir, monkeypatch) -> Path:
    """A valid two-scorer config in the current directory (a fresh, empty one)."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return write_config(work / "job.toml", local_run_config(tmp_path, tiny_model_dir, scorers=2))


class FakeLauncher:
    """Stands in for ``run_procfile``: records the call, writes what a learner would, returns ``code``."""

    def __init__(self, code: int = 0, records: list[dict] | None = None):
        self.code, self.records, self.calls = code, records or [], []

    def __call__(self, procfile, concurrency, env, cwd, stop_timeout_s=60.0):
        self.calls.append(
            {"procfile": procfile, "concurrency": concurrency, "env": env, "cwd": cwd, "stop_timeout_s": stop_timeout_s}
        )
        if self.records:
            output = Path(load_config(env[CONFIG_ENV]).run.output_dir)
            output.mkdir(parents=True, exist_ok=True)
            (output / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.records))
        return self.code


def test_version_prints_the_installed_distributions(capsys):
    assert run_main(["--version"]) == 0
    assert capsys.readouterr().out == f"streamrl {version('streamrl')}\n"


@pytest.mark.parametrize("argv", [[], ["train"], ["run", "--generators", "two"], ["keys"]])
def test_usage_errors_exit_2(argv, capsys):
    assert run_main(argv) == 2
    assert "usage: streamrl" in capsys.readouterr().err


def test_run_defaults():
    args = cli.build_parser().parse_args(["run", "--set", "a.b=1", "--set", "c.d=2"])
    assert args.config == str(DEFAULT_CONFIG) and Path(args.config).is_file()
    assert (args.generators, args.scorers, args.eval, args.stop_timeout) == (1, None, False, 60.0)
    assert args.overrides == ["a.b=1", "c.d=2"] and args.func is cli.cmd_run


def test_the_packaged_procfile_starts_each_service_module():
    assert PROCFILE.is_file() and PROCFILE.parent.name == "deploy"
    processes = parse_procfile(PROCFILE.read_text()).processes
    assert sorted(processes) == sorted(SERVICES)
    for name, command in processes.items():
        assert command == f"exec ${{PYTHON:-python}} -m streamrl.services.{name}"
        assert importlib.util.find_spec(f"streamrl.services.{name}.__main__") is not None


def test_run_starts_the_procfile_with_the_config_and_writes_the_summary(job, monkeypatch, capsys):
    records = [
        {
            "step": i + 1,
            "version": i + 1,
            "reward_mean": float(i),
            "kl": 0.01 * i,
            "dropped_stale": i % 2,
            "behaviour_versions": [max(0, i - 1), i],
        }
        for i in range(10)
    ]
    launcher = FakeLauncher(code=0, records=records)
    monkeypatch.setattr(training, "run_procfile", launcher)
    code = run_main(
        [
            "run",
            "--config",
            "job.toml",
            "--generators",
            "3",
            "--set",
            "learner.total_steps=2",
            "--set",
            "run.seed=4",
            "--stop-timeout",
            "7",
        ]
    )
    assert code == 0
    (call,) = launcher.calls
    assert call["procfile"] == PROCFILE
    # scorers default to one per endpoint; the feedback service runs only when feedback.enabled
    assert call["concurrency"] == {"generator": 3, "scorer": 2, "feedback": 0}
    assert call["cwd"] == os.getcwd() and call["stop_timeout_s"] == 7.0
    env = call["env"]
    assert env[CONFIG_ENV] == str(job.resolve())  # absolute: services may run elsewhere
    assert env[OVERRIDES_ENV] == "learner.total_steps=2\nrun.seed=4"
    assert env["PYTHON"] == sys.executable and env["PYTHONUNBUFFERED"] == "1"
    out = capsys.readouterr().out
    assert "starting learner, buffer, 2 scorer(s) and 3 generator(s)" in out
    output = Path(load_config(job).run.output_dir)
    summary = json.loads((output / "summary.json").read_text())
    # 10 records: the first and last fifth (2 steps each) by hand
    assert summary["steps"] == 10
    assert summary["train_reward_first"] == pytest.approx((0 + 1) / 2)
    assert summary["train_reward_last"] == pytest.approx((8 + 9) / 2)
    assert summary["dropped_stale"] == 5
    assert summary["behaviour_versions_seen"] == 10  # versions 0..9
    assert summary["overrides"] == ["learner.total_steps=2", "run.seed=4"] and summary["config"] == "job.toml"
    assert Path(summary["learning_curve"]).stat().st_size > 0
    assert "before" not in summary  # no --eval


def test_run_summary_counts_a_rolled_back_step_once(job, monkeypatch):
    """A learner restarted from its step-1 checkpoint trains step 2 again: metrics.jsonl holds step 2
    twice, and the summary counts 2 steps with the later record's reward."""
    records = [
        {"step": s, "version": s, "reward_mean": r, "kl": 0.0, "dropped_stale": 0, "behaviour_versions": [0]}
        for s, r in ((1, 0.0), (2, 0.5), (2, 0.7))
    ]
    monkeypatch.setattr(training, "run_procfile", FakeLauncher(code=0, records=records))
    assert run_main(["run", "--config", str(job)]) == 0
    summary = json.loads((Path(load_config(job).run.output_dir) / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["train_reward_last"] == pytest.approx(0.7)


@pytest.mark.parametrize(
    ("status", "says"),
    [(1, None), (143, "stopped by a signal (exit status 143)"), (130, "stopped by a signal (exit status 130)")],
)
def test_run_exits_with_the_services_status(job, monkeypatch, capsys, status, says):
    monkeypatch.setattr(training, "run_procfile", FakeLauncher(code=status))
    assert run_main(["run", "--config", str(job), "--scorers", "1"]) == status
    err = capsys.readouterr().err
    assert (says in err) if says else "stopped by a signal" not in err


def test_run_refuses_more_scorers_than_endpoints(job, monkeypatch, capsys):
    launcher = FakeLauncher()
    monkeypatch.setattr(training, "run_procfile", launcher)
    assert run_main(["run", "--config", str(job), "--scorers", "3"]) == 2
    assert "--scorers 3 but endpoints.scorers lists 2; fix: add one endpoint per scorer" in capsys.readouterr().err
    assert launcher.calls == []


@pytest.mark.parametrize("action", ["keep", "rescore", "drop"])
def test_run_journal_rewards_reaches_the_run_folder(job, monkeypatch, action):
    """``streamrl run --resume --journal-rewards X`` hands X through :func:`streamrl.training.run`
    to :func:`streamrl.runs.prepare_run_folder` (which decides what happens to the journal)."""
    from streamrl.runs import JournalRewards

    seen = []

    def prepare(config, mode, *, journal_rewards=JournalRewards.KEEP):
        seen.append((mode, journal_rewards))
        return "streamrl: prepared"

    monkeypatch.setattr(training, "prepare_run_folder", prepare)
    monkeypatch.setattr(training, "run_procfile", FakeLauncher())
    assert run_main(["run", "--config", str(job), "--resume", "--journal-rewards", action]) == 0
    assert seen == [(training.RunMode.RESUME, JournalRewards(action))]


@pytest.mark.parametrize("command", ["run", "check", "eval", "status"])
def test_an_invalid_config_exits_2_naming_the_key(job, monkeypatch, capsys, command):
    launcher = FakeLauncher()
    monkeypatch.setattr(training, "run_procfile", launcher)
    assert run_main([command, "--config", str(job), "--set", "run.max_staleness=-1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("streamrl: invalid config") and "run.max_staleness" in err
    assert launcher.calls == []
    assert run_main([command, "--config", "nowhere.toml"]) == 2
    assert "nowhere.toml does not exist" in capsys.readouterr().err


def test_check_accepts_a_valid_config(job, capsys):
    assert run_main(["check", "--config", str(job)]) == 0
    assert capsys.readouterr().out.startswith(f"{job}: OK (")


def test_keys_generate_then_authorize(tmp_path, capsys):
    keys = tmp_path / "keys"
    assert run_main(["keys", "generate", "--dir", str(keys), "--clients", "generator"]) == 0
    written = capsys.readouterr().out
    assert "server.key" in written and "generator.key" in written
    assert run_main(["keys", "generate", "--dir", str(keys), "--clients", "generator"]) == 0
    assert "every key already exists" in capsys.readouterr().out
    assert run_main(["keys", "authorize", "--dir", str(keys), str(tmp_path / "absent.key")]) == 2
    assert capsys.readouterr().err.startswith("streamrl keys: ")
