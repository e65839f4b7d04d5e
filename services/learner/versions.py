"""The learner's version counter across restarts: the ``published_version`` file and where to continue.

The version increments once per optimizer step and never goes backwards anywhere.
A checkpoint is written before its version is
published, and ``published_version`` (in ``run.output_dir``) records the newest version
that ever left the process; a learner that resumes from an older checkpoint (killed
between checkpoints) continues one past it, so generators and the buffer never see a
version twice with different weights.
"""

from __future__ import annotations

import os
from pathlib import Path


def read_published_version(path: Path) -> int | None:
    """The newest version a learner ever published into this output folder, or None (no file, or unreadable)."""
    try:
        return int(path.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def write_published_version(path: Path, version: int) -> None:
    """Record ``version`` as published (write a temp file, then rename: never half-written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{version}\n")
    os.replace(tmp, path)


def continue_at(checkpoint_version: int, published: int | None) -> int:
    """The version to continue at: the checkpoint's, or ``published + 1`` when a newer version
    was published after that checkpoint (its weights are lost; its number must not be reused)."""
    if published is not None and published > checkpoint_version:
        return published + 1
    return checkpoint_version
