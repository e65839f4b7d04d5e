"""Reruns that never surprise: what ``streamrl run`` does with a run folder that already holds a run,
and what it records in the folder about each launch.

A run folder (``run.output_dir``) holds a run when the learner or the buffer left state there:
checkpoints, ``metrics.jsonl``, ``trained.jsonl``, ``published_version``, or buffer journal
segments (in ``buffer.journal_dir`` when that is set). Then ``streamrl run``

* without a flag refuses (exit 2), saying what is there and the three fixes;
* with ``--resume`` continues it: the learner resumes from its newest complete checkpoint and the
  buffer replays its journal (refused, with the fix, when the run already reached
  ``learner.total_steps``: nothing would happen). When ``scorer.rewards`` differs from the
  previous launch's (its ``config.toml``), the journaled rollouts were scored by the old reward:
  the line says so with the keys that differ, and ``--journal-rewards`` decides what happens to
  them: ``keep`` (the default: trained on as they are), ``rescore`` (scored again with the new
  reward before the buffer starts, :func:`rescore_journal`) or ``drop`` (the journal moves to
  ``previous/``, as ``--fresh`` moves it; the learner keeps its checkpoint);
* with ``--fresh`` starts over: the previous run's files move to ``<output_dir>/previous/<time>/``
  (never deleted; folders other runs or stages keep there, such as ``sft/`` and ``rm/``, stay).

Services started by hand or by a supervisor (``python -m streamrl.services.learner``) keep
resuming on their own: that is their crash recovery.

Each launch is recorded in the folder: ``config.toml`` (the resolved config, every default filled
in and paths absolute: ``streamrl run --config <output_dir>/config.toml`` runs it again) and one
line of ``launches.jsonl`` (time, mode, command line, working directory, config file and
overrides, the resolved config, package versions, Python and platform, and the git commit and
dirty flag of the streamrl source and of the working directory when they are git checkouts).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from enum import Enum
from pathlib import Path

import tomli_w

from streamrl.common.config import Config
from streamrl.common.runlock import RunLock
from streamrl.common.service import journal_folder

__all__ = [
    "JournalRewards",
    "RunMode",
    "RunRefused",
    "run_state",
    "prepare_run_folder",
    "record_launch",
    "reward_changes",
    "rescore_journal",
    "PACKAGES",
]

LEARNER_STATE = ("checkpoints", "metrics.jsonl", "trained.jsonl", "published_version")
"""What the learner leaves in ``run.output_dir``; any of it means the folder holds a run."""
RUN_FILES = (
    *LEARNER_STATE,
    "summary.json",
    "learning_curve.png",
    "tensorboard",
    "wandb",
    "config.toml",
    "launches.jsonl",
    "ledger",
)
"""Everything a run writes in ``run.output_dir`` (besides the journal): moved away by ``--fresh``."""
PACKAGES = (
    "streamrl",
    "torch",
    "transformers",
    "datasets",
    "pyzmq",
    "msgpack",
    "numpy",
    "pydantic",
    "tokenizers",
    "safetensors",
    "huggingface_hub",
    "tensorboard",
    "wandb",
    "httpx2",
    "vaderSentiment",
    "prometheus_client",
)
"""Distributions whose versions each launch records (absent ones as null)."""


class RunMode(str, Enum):
    """What ``streamrl run`` does with a folder that holds a run."""

    NEW = "new"
    RESUME = "resume"
    FRESH = "fresh"


class JournalRewards(str, Enum):
    """What ``streamrl run --resume`` does with journaled rollouts when the reward changed."""

    KEEP = "keep"
    RESCORE = "rescore"
    DROP = "drop"


REWARD_IGNORED = ("batch_size",)
"""``scorer.rewards`` fields that do not change a score (how many texts go in one call)."""


class RunRefused(Exception):
    """``streamrl run`` would surprise the user; the message says what is there and the fix."""


def _segments(folder: Path) -> list[Path]:
    return sorted(folder.glob("segment-*.log")) if folder.is_dir() else []


def _steps_logged(metrics: Path) -> int:
    try:
        return sum(1 for line in metrics.read_text().splitlines() if line.strip())
    except OSError:
        return 0


def run_state(cfg: Config) -> tuple[list[str], int | None]:
    """What the previous run left: one phrase per thing found (empty: no run there), and the step of
    its newest complete checkpoint (None without one)."""
    from streamrl.services.learner.checkpoint import MARKER, latest_checkpoint

    out = Path(cfg.run.output_dir)
    found: list[str] = []
    step = None
    newest = latest_checkpoint(out / "checkpoints")
    if newest is not None:
        step = int(json.loads((newest / MARKER).read_text())["step"])
        found.append(f"checkpoint {newest.name}")
    steps = _steps_logged(out / "metrics.jsonl")
    if steps:
        found.append(f"metrics.jsonl with {steps} steps")
    for name in ("trained.jsonl", "published_version"):
        if (out / name).exists() and not found:
            found.append(name)
    segments = _segments(journal_folder(cfg)) if cfg.buffer.journal else []
    if segments:
        found.append(f"buffer journal with {len(segments)} segment(s) in {journal_folder(cfg)}")
    return found, step


def reward_changes(cfg: Config) -> list[str]:
    """``scorer.rewards[i].key: old -> new`` for each reward setting that differs from the previous
    launch's resolved config (``<run.output_dir>/config.toml``); [] when there is none to compare
    with. A component added or removed shows as ``scorer.rewards[i]: ... -> ...``."""
    import tomllib

    previous = Path(cfg.run.output_dir) / "config.toml"
    try:
        old = tomllib.loads(previous.read_text()).get("scorer", {}).get("rewards", [])
    except (OSError, tomllib.TOMLDecodeError):
        return []
    new = resolved_config(cfg).get("scorer", {}).get("rewards", [])
    changes = []
    for i in range(max(len(old), len(new))):
        key = f"scorer.rewards[{i}]"
        if i >= len(old) or i >= len(new):
            changes.append(f"{key}: {old[i] if i < len(old) else None!r} -> {new[i] if i < len(new) else None!r}")
            continue
        for name in sorted(set(old[i]) | set(new[i])):
            if name not in REWARD_IGNORED and old[i].get(name) != new[i].get(name):
                changes.append(f"{key}.{name}: {old[i].get(name)!r} -> {new[i].get(name)!r}")
    return changes


def rescore_journal(cfg: Config) -> int:
    """Score every rollout the buffer journal holds again with ``scorer.rewards`` (as the scorers
    do: :func:`~streamrl.services.scorer.scoring.score_batch` on ``prompt_text``,
    ``completion_text`` and ``metadata``) and write them back as one snapshot (the journal's own
    compaction), the batches served and not yet acknowledged included. ``reward`` and
    ``reward_parts`` change; the reference log-probs and any human score are kept. Run it only
    while no buffer holds the journal (its lock is taken here).

    Returns:
        The number of rollouts scored again.

    Raises:
        RunFolderLocked: a buffer holds the journal.
        JournalDamaged: the journal cannot be recovered (``buffer.journal_repair`` decides, in the buffer).
        Exception: whatever the reward raises (the journal is then left as it was).
    """
    from streamrl.common.models import select_device
    from streamrl.services.buffer.durable import open_journal
    from streamrl.services.scorer.rewards import build_reward
    from streamrl.services.scorer.scoring import MAX_BATCH, score_batch

    lock = RunLock(journal_folder(cfg), "buffer")
    try:
        journal = open_journal(cfg)
        recovered = journal.recover()
        scored = [m for g in recovered.groups for m in g.members]
        scored += [s for held in recovered.held for s in held.batch.rollouts]
        reward = build_reward(cfg.scorer.rewards, device=select_device(cfg.scorer.device))
        new = []
        for start in range(0, len(scored), MAX_BATCH):
            new += score_batch(reward, [s.rollout for s in scored[start : start + MAX_BATCH]], "rescore")
        for old, fresh in zip(scored, new):
            old.reward, old.reward_parts = fresh.reward, fresh.reward_parts
        journal.compact(recovered.groups, recovered.held)
        journal.close()
    finally:
        lock.release()
    return len(scored)


def _journal_rewards(cfg: Config, action: JournalRewards) -> str:
    """What the resume line adds when the reward changed since the previous launch (see the module docstring)."""
    changes = reward_changes(cfg)
    if not changes or not cfg.buffer.journal or not _segments(journal_folder(cfg)):
        return ""
    what = f"\nstreamrl: warning: the reward changed since the last launch ({'; '.join(changes)})"
    if action is JournalRewards.DROP:
        target = journal_folder(cfg) / "previous" / time.strftime("%Y%m%d-%H%M%S")
        lock = RunLock(journal_folder(cfg), "buffer")  # raises while a buffer holds the journal
        try:
            moved = _move_journal(cfg, target)
        finally:
            lock.release()
        return f"{what}; --journal-rewards drop: moved the journal's {moved} file(s) to {target}"
    if action is JournalRewards.RESCORE:
        return f"{what}; --journal-rewards rescore: scored the journal's {rescore_journal(cfg)} rollouts again"
    return (
        f"{what}; the journal's rollouts were scored by the old reward and are trained on as they are.\n"
        "fix: --journal-rewards rescore (score them again with the new reward) or --journal-rewards drop "
        "(move the journal to previous/)"
    )


def prepare_run_folder(
    cfg: Config, mode: RunMode, *, journal_rewards: JournalRewards = JournalRewards.KEEP, now: float | None = None
) -> str:
    """Apply ``mode`` to ``run.output_dir`` (see the module docstring); returns the line to print.

    ``journal_rewards``: what ``--resume`` does with journaled rollouts when ``scorer.rewards``
    changed since the previous launch (:class:`JournalRewards`).

    Raises:
        RunRefused: a folder holding a run without ``--resume``/``--fresh``; ``--resume`` of a run
            that reached ``learner.total_steps``; ``--fresh`` while a learner or buffer still holds
            the folder (its lock).
    """
    out = Path(cfg.run.output_dir)
    found, step = run_state(cfg)
    total = cfg.learner.total_steps
    if not found:
        if mode is RunMode.RESUME:
            return f"streamrl: nothing to resume in {out}; starting a new run"
        return f"streamrl: new run in {out}"
    if mode is RunMode.NEW:
        raise RunRefused(
            f"{out} already holds a run ({', '.join(found)}).\n"
            f"fix: add --resume to continue it, or --fresh to start over (its files move to {out}/previous/), "
            "or set run.output_dir to a new folder (--set run.output_dir=runs/NEW)"
        )
    if mode is RunMode.RESUME:
        if step is not None and step >= total:
            raise RunRefused(
                f"{out} already reached learner.total_steps = {total} (checkpoint step-{step:06d}); --resume would "
                f"do nothing.\nfix: raise it to train further (--resume --set learner.total_steps={2 * total}), or "
                "--fresh to start over"
            )
        where = f"checkpoint step-{step:06d}" if step is not None else "step 0 (no complete checkpoint yet)"
        return f"streamrl: resuming {out} from {where} of {total}; the buffer replays its journal" + _journal_rewards(
            cfg, JournalRewards(journal_rewards)
        )
    return _archive(cfg, now if now is not None else time.time())


def _archive(cfg: Config, now: float) -> str:
    out = Path(cfg.run.output_dir)
    journal = journal_folder(cfg)
    locks = [RunLock(out, "learner")]  # raises RunFolderLocked (a RunRefused-like message) if a run is live
    try:
        if cfg.buffer.journal:
            locks.append(RunLock(journal, "buffer"))
        target = out / "previous" / time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
        moved = []
        for name in RUN_FILES:
            if (out / name).exists():
                target.mkdir(parents=True, exist_ok=True)
                shutil.move(str(out / name), str(target / name))
                moved.append(name)
        if cfg.buffer.journal and journal.is_dir():
            inside = journal.resolve().is_relative_to(out.resolve())
            dest = target / journal.relative_to(out) if inside else journal / "previous" / target.name
            if _move_journal(cfg, dest):
                moved.append(f"the buffer journal ({dest})")
    finally:
        for lock in locks:
            lock.release()
    return f"streamrl: --fresh: moved the previous run ({', '.join(moved)}) to {target}; starting over"


def _move_journal(cfg: Config, dest: Path) -> int:
    """Move the journal folder's entries (not its lock or ``previous/``) into ``dest``; returns how many."""
    journal = journal_folder(cfg)
    entries = [p for p in journal.iterdir() if p.name not in ("buffer.lock", "previous")] if journal.is_dir() else []
    for entry in entries:
        dest.mkdir(parents=True, exist_ok=True)
        shutil.move(str(entry), str(dest / entry.name))
    return len(entries)


def _git(folder: Path) -> dict | None:
    """``{"commit", "dirty"}`` of the git checkout holding ``folder``, or None."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        status = subprocess.run(
            ["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def resolved_config(cfg: Config) -> dict:
    """The config as TOML-ready data, every default filled in (:meth:`Config.applicable`)."""
    return cfg.applicable()


def record_launch(
    cfg: Config, *, mode: RunMode, config_path: str, overrides: list[str], argv: list[str] | None = None
) -> Path:
    """Write ``config.toml`` and append this launch to ``launches.jsonl`` in ``run.output_dir``.

    Returns:
        The path of ``launches.jsonl``.
    """
    import streamrl

    out = Path(cfg.run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    resolved = resolved_config(cfg)
    (out / "config.toml").write_text(
        "# resolved config of the latest `streamrl run` in this folder (defaults filled "
        "in, paths absolute)\n" + tomli_w.dumps(resolved)
    )
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "mode": mode.value,
        "command": [Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)],
        "cwd": os.getcwd(),
        "config_file": str(Path(config_path).resolve()),
        "overrides": list(overrides),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "git": {"streamrl": _git(Path(streamrl.__file__).resolve().parent), "cwd": _git(Path.cwd())},
        "config": resolved,
    }
    path = out / "launches.jsonl"
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    return path
