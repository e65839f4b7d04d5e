"""`make run` needs no root: its prerequisites never call apt-get or sudo (issue: a fresh
clone without sudo could not run the default job). Checked with make's own dry run, as an
unprivileged user when the test runs as root."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def dry_run(target: str, tmp_path: Path, user: str | None = None) -> str:
    """Commands `make -n <target>` would run from a fresh clone (no venv yet)."""
    # pytest's tmp_path sits in a root-only folder: the unprivileged user gets its own
    clone = Path(tempfile.mkdtemp(prefix="streamrl-clone-")) / "clone"
    os.chmod(clone.parent, 0o755)
    shutil.copytree(REPO, clone, ignore=shutil.ignore_patterns(".venv*", ".git", "runs", "__pycache__", "bench"))
    command = ["make", "-n", "-C", str(clone), target]
    if user is not None:
        subprocess.run(["chown", "-R", user, str(clone)], check=True)
        command = [shutil.which("runuser"), "-u", user, "--", *command]
    env = dict(os.environ, PATH="/usr/bin:/bin")  # no prometheus on PATH: make would install it if it needed it
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    finally:
        shutil.rmtree(clone.parent, ignore_errors=True)
    return result.stdout


def test_make_run_needs_no_root(tmp_path):
    user = "nobody" if os.geteuid() == 0 and shutil.which("runuser") else None
    if user is not None:
        pwd.getpwnam(user)
    commands = dry_run("run", tmp_path, user)
    assert "streamrl run" in commands and "pip install" in commands
    assert "apt-get" not in commands and "sudo" not in commands


def test_make_test_still_installs_prometheus(tmp_path):
    commands = dry_run("test", tmp_path)  # the prometheus recipe is one shell line, printed whole
    assert "apt-get install" in commands and "pytest" in commands


def test_make_test_installs_the_kubernetes_tools_into_the_venv_only(tmp_path):
    test, run = dry_run("test", tmp_path), dry_run("run", tmp_path)
    assert 'pip install --quiet -e ".[k8s]"' in test and "[k8s]" not in run
    assert "install -y -qq --no-install-recommends iproute2" in test and "iproute2" not in run
