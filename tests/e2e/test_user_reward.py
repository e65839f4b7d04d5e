"""A user's own reward module imports wherever users expect it to: the README's worked example
("Your own reward function": a module, a config, two commands), copied exactly from the README into an
empty folder, passes ``streamrl check`` and trains with the real ``streamrl`` command; a module next to
the config imports when ``streamrl`` runs from another folder, and one in the launch directory when the
config is elsewhere, in ``streamrl check`` (whose console script used to say "No module named
'myrewards'") and in a scorer process started in yet another directory; a missing module is refused
with the folders to put it in, in the README's words."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from streamrl.testing import wait_until

REPO = Path(__file__).resolve().parents[2]
STREAMRL = Path(sys.executable).parent / "streamrl"  # the console script a user runs

pytestmark = pytest.mark.slow


def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(f"\n### {title}\n")
    end = re.compile(r"\n#{2,3} ").search(text, start + 1)
    return text[start : end.start() if end else None]


def block_after(section: str, marker: str, language: str) -> str:
    """The fenced ``language`` block that follows ``marker`` in ``section``."""
    found = re.search(re.escape(marker) + r".*?```" + language + r"\n(.*?)```", section, re.DOTALL)
    assert found, f"no ```{language} block after {marker!r}"
    return found.group(1)


SECTION = readme_section("Your own reward function")
MODULE = block_after(SECTION, "`myrewards.py`:", "python")
CONFIG = block_after(SECTION, "`my.toml`:", "toml")
COMMANDS = block_after(SECTION, "`my.toml`:", "bash").strip().splitlines()
MISSING = block_after(SECTION, "**Where the module is imported from.**", "").strip()


def streamrl(cwd: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [STREAMRL, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=dict(env, PYTHONUNBUFFERED="1")
    )


def test_the_readme_example_runs_from_an_empty_folder(tmp_path):
    folder = tmp_path / "exp"
    folder.mkdir()
    (folder / "myrewards.py").write_text(MODULE)
    (folder / "my.toml").write_text(CONFIG)
    assert COMMANDS == ["streamrl check --config my.toml", "streamrl run --config my.toml"]
    check = streamrl(folder, *COMMANDS[0].split()[1:])
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stdout.startswith("my.toml: OK (my-reward, model tiny-char-llama, 20 steps")
    # the README's command, shortened to 2 steps, on free ports (tests share this machine)
    run = streamrl(
        folder,
        *COMMANDS[1].split()[1:],
        "--free-ports",
        "--set",
        "learner.total_steps=2",
        "--set",
        "learner.checkpoint_every=2",
        timeout=500,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "scoring on tcp://127.0.0.1:" in run.stdout and "with mentions" in run.stdout
    output = folder / "runs" / "my-reward"
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    # the reward is the module's: 1 when the completion says "great", minus 0.01 per word
    assert all(-1.0 < r["reward_mean"] <= 1.0 for r in records)
    assert json.loads((output / "summary.json").read_text())["steps"] == 2

    # the README's refusal of a missing module is the one printed (its folder in place of /home/me/exp)
    (folder / "myrewards.py").rename(folder / "elsewhere.py")
    missing = streamrl(folder, *COMMANDS[0].split()[1:])
    assert missing.returncode == 2
    assert f"  - {MISSING.replace('/home/me/exp', str(folder))}\n" in missing.stderr


def test_a_module_next_to_the_config_or_in_the_launch_directory_imports_in_check_and_services(
    tmp_path, tiny_model_dir, services
):
    from streamrl.testing import local_run_config, scrape, write_config

    exp, launch, other = tmp_path / "exp", tmp_path / "launch", tmp_path / "other"
    for folder in (exp, launch, other):
        folder.mkdir()
    (exp / "nextto.py").write_text(MODULE.replace("def mentions", "def near"))
    (launch / "incwd.py").write_text(MODULE.replace("def mentions", "def here"))
    sections = local_run_config(tmp_path, tiny_model_dir)
    sections["scorer"] = {"rewards": [{"function": "nextto:near"}, {"function": "incwd:here", "weight": 0.5}]}
    config = write_config(exp / "job.toml", sections)

    check = streamrl(launch, "check", "--config", str(config))  # config elsewhere, launched from `launch`
    assert check.returncode == 0, check.stdout + check.stderr
    lost = streamrl(other, "check", "--config", str(config))  # incwd.py is not in `other`
    assert lost.returncode == 2 and "cannot import incwd:here: No module named 'incwd'" in lost.stderr
    assert f"fix: put incwd.py (or a package folder incwd/) in {exp} or {other}" in lost.stderr

    # a scorer process started in `launch` by hand, as supervisord would: nextto.py next to its config
    sections["scorer"]["rewards"] = sections["scorer"]["rewards"][:1]
    write_config(exp / "job.toml", sections)
    scorer = services(config).start("scorer")  # cwd: the test's own folder, not `exp`
    port = sections["metrics"]["scorer_port"]

    def serving() -> bool:
        try:
            return bool(scrape(port))
        except ConnectionError:
            return False

    assert wait_until(lambda: serving() or scorer.poll() is not None, timeout=120), "scorer did not start"
    assert scorer.poll() is None, (tmp_path / "scorer-0.log").read_text()[-3000:]
