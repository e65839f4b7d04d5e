"""Reruns that never surprise: a folder holding a run is refused without --resume or
--fresh, --resume continues (or says it has nothing to do), --fresh moves the old run away, and every
launch records its resolved config, command line, versions and git commit."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
from pathlib import Path

import pytest

import streamrl.cli as cli
import streamrl.training as training
from streamrl.common.config import load_config
from streamrl.common.runlock import RunLock
from streamrl.runs import RunMode, RunRefused, prepare_run_folder, record_launch, run_state
from streamrl.services.learner.checkpoint import MARKER
from streamrl.testing import local_run_config, write_config

REPO = Path(__file__).resolve().parents[2]


def fake_run(cfg, steps: int, *, journal: Path | None = None) -> Path:
    """What a learner and buffer leave after ``steps`` steps (a complete checkpoint marker, the logs, a segment)."""
    out = Path(cfg.run.output_dir)
    ckpt = out / "checkpoints" / f"step-{steps:06d}"
    ckpt.mkdir(parents=True)
    (ckpt / MARKER).write_text(json.dumps({"step": steps, "version": steps}))
    records = [
        {"step": i + 1, "reward_mean": 0.0, "kl": 0.0, "dropped_stale": 0, "behaviour_versions": [i]}
        for i in range(steps)
    ]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (out / "trained.jsonl").write_text("{}\n")
    (out / "published_version").write_text(f"{steps}\n")
    journal = journal or out / "buffer"
    journal.mkdir(parents=True, exist_ok=True)
    (journal / "segment-00000001.log").write_bytes(b"x")
    (out / "sft").mkdir()  # another stage's output: never moved
    return out


@pytest.fixture
def cfg(tmp_path):
    return load_config(None, [f'run.output_dir="{tmp_path / "run"}"', "learner.total_steps=4"])


def test_an_empty_folder_is_a_new_run_and_resume_says_so(cfg):
    assert run_state(cfg) == ([], None)
    assert prepare_run_folder(cfg, RunMode.NEW) == f"streamrl: new run in {cfg.run.output_dir}"
    assert prepare_run_folder(cfg, RunMode.RESUME) == (
        f"streamrl: nothing to resume in {cfg.run.output_dir}; starting a new run"
    )


def test_a_folder_holding_a_run_is_refused_with_the_fix(cfg):
    out = fake_run(cfg, 2)
    with pytest.raises(RunRefused) as info:
        prepare_run_folder(cfg, RunMode.NEW)
    assert str(info.value) == (
        f"{out} already holds a run (checkpoint step-000002, metrics.jsonl with 2 steps, buffer journal with 1 "
        f"segment(s) in {out}/buffer).\nfix: add --resume to continue it, or --fresh to start over (its files move "
        f"to {out}/previous/), or set run.output_dir to a new folder (--set run.output_dir=runs/NEW)"
    )


def test_resume_continues_and_refuses_a_finished_run(cfg, tmp_path):
    out = fake_run(cfg, 2)
    assert prepare_run_folder(cfg, RunMode.RESUME) == (
        f"streamrl: resuming {out} from checkpoint step-000002 of 4; the buffer replays its journal"
    )
    done = load_config(None, [f'run.output_dir="{out}"', "learner.total_steps=2"])
    with pytest.raises(
        RunRefused,
        match=r"already reached learner.total_steps = 2 \(checkpoint step-000002\); "
        r"--resume would do nothing.\nfix: raise it to train further \(--resume "
        r"--set learner.total_steps=4\), or --fresh to start over",
    ):
        prepare_run_folder(done, RunMode.RESUME)
    assert (out / "metrics.jsonl").exists()  # nothing touched


def test_fresh_moves_the_previous_run_away_and_keeps_other_stages(cfg):
    out = fake_run(cfg, 2)
    line = prepare_run_folder(cfg, RunMode.FRESH, now=0.0)
    target = next((out / "previous").iterdir())
    assert line == (
        "streamrl: --fresh: moved the previous run (checkpoints, metrics.jsonl, trained.jsonl, "
        f"published_version, the buffer journal ({target}/buffer)) to {target}; starting over"
    )
    assert run_state(cfg) == ([], None)
    assert (target / "checkpoints" / "step-000002" / MARKER).exists()
    assert (target / "buffer" / "segment-00000001.log").exists() and (out / "sft").is_dir()
    assert prepare_run_folder(cfg, RunMode.NEW) == f"streamrl: new run in {out}"


def test_fresh_moves_a_journal_kept_elsewhere_and_refuses_a_live_run(tmp_path):
    journal = tmp_path / "journal"
    cfg = load_config(None, [f'run.output_dir="{tmp_path / "run"}"', f'buffer.journal_dir="{journal}"'])
    fake_run(cfg, 1, journal=journal)
    live = RunLock(journal, "buffer")
    with pytest.raises(Exception, match=r"is in use by another buffer \(pid \d+"):
        prepare_run_folder(cfg, RunMode.FRESH)
    assert (journal / "segment-00000001.log").exists() and (Path(cfg.run.output_dir) / "metrics.jsonl").exists()
    live.release()
    prepare_run_folder(cfg, RunMode.FRESH)
    assert [p.name for p in (journal / "previous").iterdir()][0].startswith("20")
    assert not list(journal.glob("segment-*"))


def test_each_launch_records_config_command_versions_and_git(cfg, monkeypatch):
    monkeypatch.chdir(REPO)
    path = record_launch(
        cfg, mode=RunMode.FRESH, config_path="job.toml", overrides=["learner.total_steps=4"], argv=["run", "--fresh"]
    )
    record_launch(cfg, mode=RunMode.RESUME, config_path="job.toml", overrides=[], argv=["run", "--resume"])
    first, second = [json.loads(line) for line in path.read_text().splitlines()]
    assert (first["mode"], second["mode"]) == ("fresh", "resume")
    assert first["command"][1:] == ["run", "--fresh"] and first["overrides"] == ["learner.total_steps=4"]
    assert first["packages"]["torch"] == importlib.metadata.version("torch")
    assert first["packages"]["streamrl"] == importlib.metadata.version("streamrl")
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert first["git"]["streamrl"]["commit"] == head == first["git"]["cwd"]["commit"]
    assert first["config"]["learner"]["total_steps"] == 4
    again = load_config(Path(cfg.run.output_dir) / "config.toml")  # the resolved config runs again as is
    assert again.model_dump() == cfg.model_dump()


def test_the_cli_refuses_then_resumes_then_starts_fresh(tmp_path, tiny_model_dir, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    job = write_config(work / "job.toml", local_run_config(tmp_path, tiny_model_dir))
    calls = []
    monkeypatch.setattr(training, "run_procfile", lambda *a, **k: calls.append(a) or 0)
    cfg = load_config(job)
    fake_run(cfg, 2)

    def run(*flags):
        with pytest.raises(SystemExit) as info:
            cli.main(["run", "--config", str(job), *flags])
        return info.value.code

    assert run() == 2 and calls == []
    err = capsys.readouterr().err
    assert err.startswith(f"streamrl: {cfg.run.output_dir} already holds a run (checkpoint step-000002")
    assert "fix: add --resume to continue it, or --fresh to start over" in err
    assert run("--resume") == 0 and len(calls) == 1
    assert f"streamrl: resuming {cfg.run.output_dir} from checkpoint step-000002 of 6" in capsys.readouterr().out
    assert run("--resume", "--set", "learner.total_steps=2") == 2 and len(calls) == 1
    assert run("--fresh") == 0 and len(calls) == 2
    assert "streamrl: --fresh: moved the previous run (checkpoints, metrics.jsonl" in capsys.readouterr().out
    launches = [json.loads(line) for line in (Path(cfg.run.output_dir) / "launches.jsonl").read_text().splitlines()]
    assert [r["mode"] for r in launches] == ["fresh"]  # the resume's record moved away with the old run
    assert run("--resume", "--fresh") == 2  # mutually exclusive (usage error)


def reward_config(tmp_path: Path, char: str):
    path = tmp_path / f"job-{char}.toml"
    path.write_text(
        f'[run]\noutput_dir = "{tmp_path / "run"}"\n[learner]\ntotal_steps = 4\n'
        f'[[scorer.rewards]]\nfunction = "count_char"\nkwargs = {{ char = "{char}" }}\n'
    )
    return load_config(path)


def journaled_run(cfg) -> list[str]:
    """A run at step 2 whose buffer journal holds one group of two rollouts scored by count_char("a");
    returns their completions."""
    from streamrl.common.messages import encode
    from streamrl.common.service import journal_folder
    from streamrl.services.buffer.journal import Journal
    from support import scored_item

    out = fake_run(cfg, 2)
    (out / "buffer" / "segment-00000001.log").unlink()
    journal = Journal(journal_folder(cfg), fsync="always")
    texts = ["aab", "bbb"]
    for k, text in enumerate(texts):
        item = scored_item("g0", k)
        item.rollout.prompt_text, item.rollout.completion_text = "say:", text
        item.reward = float(text.count("a"))
        journal.accept(encode(item))
    journal.close()
    return texts


def journal_rewards(cfg) -> list[float]:
    from streamrl.common.service import journal_folder
    from streamrl.services.buffer.journal import Journal

    return [s.reward for g in Journal(journal_folder(cfg), fsync="always").recover().groups for s in g.members]


@pytest.mark.parametrize("action", ["keep", "rescore", "drop"])
def test_resume_after_changing_the_reward_warns_and_rescores_or_drops_the_journal(tmp_path, action):
    """--resume with another scorer.rewards than the last launch: the journal's rollouts were scored
    by the old reward. The line names the keys that differ; --journal-rewards keeps them (with the
    fix), scores them again with the new reward, or moves the journal away."""
    from streamrl.common.service import journal_folder
    from streamrl.runs import JournalRewards
    from streamrl.services.scorer.rewards import count_char

    old = reward_config(tmp_path, "a")
    texts = journaled_run(old)
    record_launch(old, mode=RunMode.NEW, config_path="job-a.toml", overrides=[])
    assert prepare_run_folder(old, RunMode.RESUME).endswith("the buffer replays its journal")  # same reward: quiet
    new = reward_config(tmp_path, "b")
    line = prepare_run_folder(new, RunMode.RESUME, journal_rewards=JournalRewards(action))
    assert (
        "warning: the reward changed since the last launch (scorer.rewards[0].kwargs: {'char': 'a'} -> {'char': 'b'})"
    ) in line
    if action == "keep":
        assert "fix: --journal-rewards rescore" in line
        assert journal_rewards(new) == [2.0, 0.0]
    elif action == "rescore":
        assert "scored the journal's 2 rollouts again" in line
        expected = count_char(["say:"] * 2, texts, [{}, {}], char="b")
        assert journal_rewards(new) == expected != [2.0, 0.0]
    else:
        assert "moved the journal's 1 file(s)" in line
        assert not list(journal_folder(new).glob("segment-*")) and journal_rewards(new) == []
