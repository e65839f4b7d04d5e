"""Run every service of a job as its own process, with honcho's process manager.

``streamrl run`` calls :func:`run_procfile` in its own process (not a child ``honcho``
command), so the signals a user, a job scheduler or systemd sends to ``streamrl run``
reach every service: honcho's :class:`~honcho.manager.Manager` handles SIGTERM and
SIGINT by sending SIGTERM to each process, waits for them, and sends SIGKILL only to
those still alive ``stop_timeout_s`` after the first one stopped. When any process
exits (the learner when it finishes, or one that crashed) the others are stopped the
same way.
"""

from __future__ import annotations

import sys
from pathlib import Path

import honcho.manager
from honcho.environ import expand_processes, parse_procfile
from honcho.printer import Printer


def run_procfile(procfile: Path, concurrency: dict[str, int], env: dict[str, str], cwd: str,
                 stop_timeout_s: float = 60.0) -> int:
    """Start the Procfile's processes (``concurrency`` replicas each) and block until all have stopped.

    Args:
        procfile: a honcho Procfile (``name: command`` per line).
        concurrency: replicas per process type, e.g. ``{"generator": 4, "scorer": 1}`` (others: 1).
        env: the environment of every process (replicas get ``HONCHO_PROCESS_NAME``, e.g. ``generator.3``).
        cwd: working directory of every process.
        stop_timeout_s: seconds a process gets to exit after SIGTERM (the learner writes its final
            checkpoint then) before it is killed.

    Returns:
        The exit status: the first process's that stopped, 143 after SIGTERM, 130 after SIGINT.
    """
    processes = parse_procfile(procfile.read_text()).processes
    # honcho reads this module-level grace period each time it checks its children
    honcho.manager.KILL_WAIT = stop_timeout_s
    manager = honcho.manager.Manager(Printer(sys.stdout, colour=sys.stdout.isatty()))
    for process in expand_processes(processes, concurrency=concurrency, env=env):
        manager.add_process(process.name, process.cmd, quiet=process.quiet, env={**env, **process.env}, cwd=cwd)
    manager.loop()
    return manager.returncode if manager.returncode is not None else 0


def interrupted(code: int) -> bool:
    """True for the exit statuses :func:`run_procfile` returns after SIGINT or SIGTERM."""
    return code in (130, 143)

