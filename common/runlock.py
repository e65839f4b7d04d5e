"""One owner per run folder: an exclusive lock per service role, taken before anything is read.

A second buffer started on a live run's journal used to replay and compact it (deleting the
segment the first buffer was writing); a second learner on the same folder resumed from the
first one's checkpoint and wrote into the same files. Both now stop at start-up with the
holder's pid and host. The lock is ``fcntl.flock`` on ``<folder>/<role>.lock``: the kernel
drops it when its holder exits, even after ``kill -9``, so a crashed run never leaves a stale
lock behind. The file's content (pid, host, start time) only names the holder in messages.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from streamrl.common.errors import StartupRefused


class RunFolderLocked(StartupRefused):
    """Another live process holds this role's lock on the folder."""


class RunLock:
    """An exclusive ``flock`` on ``<folder>/<role>.lock`` held for the life of this process.

    Args:
        folder: the folder the role writes (the learner's ``run.output_dir``, the buffer's journal).
        role: ``learner``, ``buffer``, ...

    Raises:
        RunFolderLocked: another process holds the lock; the message names its pid, host and the fix.
        OSError: the folder cannot be created or the lock file opened (e.g. permission denied).
    """

    def __init__(self, folder: str | Path, role: str):
        self.path = Path(folder) / f"{role}.lock"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read_holder()
            os.close(self._fd)
            raise RunFolderLocked(
                f"{self.path.parent} is in use by another {role} (pid {holder.get('pid', '?')} on host "
                f"{holder.get('host', '?')}, since {holder.get('started', '?')}); two {role}s on one run folder "
                f"would corrupt it. fix: stop that process, or give this run its own run.output_dir"
                + (" / buffer.journal_dir" if role == "buffer" else "")
            ) from None
        os.ftruncate(self._fd, 0)
        os.write(
            self._fd,
            json.dumps(
                {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
            ).encode(),
        )

    def _read_holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        """Drop the lock (also dropped by the kernel when the process exits)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
