"""The distribution installs and runs anywhere: ``pip install <repo>`` (a real, non-editable
install) into a fresh virtual environment, then ``streamrl`` from an empty directory.

The fresh venv sees the test environment's third-party packages (torch, transformers, ...)
through a ``.pth`` file, so pip resolves every dependency offline and nothing is
downloaded except the build backend; ``streamrl`` itself comes only from the wheel pip
builds (the test checks it is imported from the new venv, not from the repository).
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with streamrl pip-installed from the repository; returns its bin folder."""
    root = tmp_path_factory.mktemp("fresh")
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    bin_dir = env_dir / "bin"
    purelib = subprocess.run(
        [bin_dir / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # third-party packages of this environment, but not its (editable) streamrl
    Path(purelib, "test_env_packages.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    work = root / "build"
    work.mkdir()
    result = subprocess.run(
        [bin_dir / "python", "-m", "pip", "install", "--quiet", str(REPO)],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return bin_dir


def run_cli(bin_dir: Path, cwd: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.run(
        [bin_dir / "streamrl", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_the_wheel_imports_from_the_venv_not_the_repository(installed, tmp_path):
    code = (
        "import streamrl, streamrl.common.config, streamrl.services.learner.loop, streamrl.deploy as d;"
        "import json; print(json.dumps([streamrl.__file__, streamrl.common.config.__file__,"
        " str(d.PROCFILE), d.PROCFILE.is_file(), d.DEFAULT_PROMPTS.is_file(), streamrl.__version__]))"
    )
    out = subprocess.run(
        [installed / "python", "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout
    init, config, procfile, has_procfile, has_prompts, version = json.loads(out)
    venv_root = installed.parent
    for path in (init, config, procfile):
        assert Path(path).is_relative_to(venv_root), path
    assert has_procfile and has_prompts and version != "0+unknown"
    for name in ("common", "services"):  # no generic top-level import names
        probe = subprocess.run([installed / "python", "-c", f"import {name}"], cwd=tmp_path, capture_output=True)
        assert probe.returncode != 0
    assert run_cli(installed, tmp_path, "--version").stdout.startswith("streamrl ")


def test_check_and_a_short_run_from_an_empty_directory(installed, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    config = REPO / "deploy" / "configs" / "tiny.toml"
    check = run_cli(installed, empty, "check", "--config", str(config))
    assert check.returncode == 0, check.stdout + check.stderr
    ports = ["metrics.generator_port=0", "metrics.scorer_port=0", "metrics.buffer_port=0", "metrics.learner_port=0"]
    from streamrl.testing import free_port

    endpoints = [f'endpoints.scorers=["tcp://127.0.0.1:{free_port()}"]'] + [
        f'endpoints.{name}="tcp://127.0.0.1:{free_port()}"'
        for name in ("buffer", "batches", "weights_announce", "weights")
    ]
    args = [
        "run",
        "--config",
        str(config),
        "--set",
        "learner.total_steps=3",
        "--set",
        "learner.checkpoint_every=3",
        "--set",
        "run.name=fresh",
    ]
    for value in ports + endpoints:
        args += ["--set", value]
    run = run_cli(installed, empty, *args, timeout=600)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    output = empty / "runs" / "fresh"  # runs/<run.name> in the current directory
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records][-1] == 3
    assert (output / "checkpoints").is_dir() and (output / "summary.json").is_file()
    assert not (REPO / "runs" / "fresh").exists()
