"""Run every service of a job as its own process, with honcho's process manager.

``streamrl run`` calls :func:`run_procfile` in its own process (not a child ``honcho``
command), so the signals a user, a job scheduler or systemd sends to ``streamrl run``
reach every service: honcho's :class:`~honcho.manager.Manager` handles SIGTERM and
SIGINT by sending SIGTERM to each process, waits for them, and sends SIGKILL only to
those still alive ``stop_timeout_s`` after the first one stopped. When any process
exits (the learner when it finishes, or one that crashed) the others are stopped the
same way, except an *optional* process (the feedback service): its exit is reported and
it is started again (after 1, 2, 4 ... up to 30 seconds when it keeps failing) while the
run goes on; it picks up its labels from its database on restart.
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from pathlib import Path

import honcho.manager
from honcho.environ import expand_processes, parse_procfile
from honcho.printer import Message, Printer

OPTIONAL = ("feedback",)
"""Procfile process types whose exit does not stop the run: they are restarted."""
RESTART_DELAY_S = (1.0, 30.0)
"""First and largest delay before an optional process is restarted (doubling while it keeps
exiting within :data:`STABLE_AFTER_S`)."""
STABLE_AFTER_S = 60.0
"""An optional process that ran this long before exiting is restarted after the first delay again."""


class _Restarts:
    """Honcho's event queue, seen through a filter: the ``stop`` event of an optional process is
    turned into a report and a scheduled restart (honcho never sees it stop, so it stops nothing);
    once the manager is terminating, a process still waiting for its restart is reported stopped."""

    def __init__(self, manager: _Manager, events: multiprocessing.Queue, optional: set[str]):
        self.manager, self.events, self.optional = manager, events, optional
        self.due: dict[str, float] = {}  # process name -> monotonic time of its restart
        self.failures: dict[str, int] = {}
        self.started: dict[str, float] = {}

    def put(self, message) -> None:
        self.events.put(message)

    def get(self, timeout: float):
        now = time.monotonic()
        for name, at in list(self.due.items()):
            if self.manager._terminating:
                del self.due[name]
                return Message(
                    "stop", {"returncode": self.manager.returncode or 0}, self.manager._clock.now(), name, None
                )
            if now >= at:
                del self.due[name]
                self.started[name] = now
                self.manager.start_one(name)
        message = self.events.get(timeout=timeout)
        if message.type == "start" and message.name in self.optional:
            self.started.setdefault(message.name, time.monotonic())
        if message.type != "stop" or message.name not in self.optional or self.manager._terminating:
            return message
        name, code = message.name, message.data["returncode"]
        lived = time.monotonic() - self.started.pop(name, time.monotonic())
        self.failures[name] = 1 if lived >= STABLE_AFTER_S else self.failures.get(name, 0) + 1
        delay = min(RESTART_DELAY_S[0] * 2 ** (self.failures[name] - 1), RESTART_DELAY_S[1])
        self.due[name] = time.monotonic() + delay
        return message._replace(
            type="line",
            name=honcho.manager.SYSTEM_PRINTER_NAME,
            colour=None,
            data=f"{name} exited (rc={code}); it is optional: the run goes on without it, "
            f"restarting it in {delay:.0f}s (restart {self.failures[name]})\n",
        )

    def __getattr__(self, name):
        return getattr(self.events, name)


class _Manager(honcho.manager.Manager):
    """Honcho's manager with optional processes (see the module docstring)."""

    def __init__(self, printer: Printer, optional: set[str]):
        super().__init__(printer)
        self.events = _Restarts(self, self.events, optional)

    def start_one(self, name: str) -> None:
        """Start process ``name`` again (its ``start`` event records the new pid)."""
        entry = self._processes[name]
        entry.pop("pid", None)
        entry["process"] = multiprocessing.Process(name=name, target=entry["obj"].run, args=(self.events, True))
        entry["process"].start()


def run_procfile(
    procfile: Path,
    concurrency: dict[str, int],
    env: dict[str, str],
    cwd: str,
    stop_timeout_s: float = 60.0,
    optional: tuple[str, ...] = OPTIONAL,
) -> int:
    """Start the Procfile's processes (``concurrency`` replicas each) and block until all have stopped.

    A process of an ``optional`` type that exits is reported and restarted; any other that exits
    stops the run.

    Args:
        procfile: a honcho Procfile (``name: command`` per line).
        concurrency: replicas per process type, e.g. ``{"generator": 4, "scorer": 1}`` (others: 1).
        env: the environment of every process (replicas get ``HONCHO_PROCESS_NAME``, e.g. ``generator.3``).
        cwd: working directory of every process.
        stop_timeout_s: seconds a process gets to exit after SIGTERM (the learner writes its final
            checkpoint then) before it is killed.
        optional: process types whose exit does not stop the run (:data:`OPTIONAL`).

    Returns:
        The exit status: the first process's that stopped, 143 after SIGTERM, 130 after SIGINT.
    """
    processes = parse_procfile(procfile.read_text()).processes
    # honcho reads this module-level grace period each time it checks its children
    honcho.manager.KILL_WAIT = stop_timeout_s
    expanded = list(expand_processes(processes, concurrency=concurrency, env=env))
    optional_names = {p.name for p in expanded if p.name.split(".")[0] in optional}
    manager = _Manager(Printer(sys.stdout, colour=sys.stdout.isatty()), optional_names)
    for process in expanded:
        manager.add_process(process.name, process.cmd, quiet=process.quiet, env={**env, **process.env}, cwd=cwd)
    manager.loop()
    return manager.returncode if manager.returncode is not None else 0


def interrupted(code: int) -> bool:
    """True for the exit statuses :func:`run_procfile` returns after SIGINT or SIGTERM."""
    return code in (130, 143)
