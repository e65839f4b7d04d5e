"""Process placement on a host's CPU cores (``run.cpu_placement``).

On a small CPU box the learner is the bottleneck (on 2 cores one SmolLM2 learner step takes
longer than sampling and scoring the next step's rollouts), and it runs one torch thread, so
every moment the scheduler gives its core to a generator or a scorer is lost to the whole job.
``learner_owns_cores`` pins each learner rank to cores of its own and every other service to the
rest, with ``os.sched_setaffinity`` on every thread the process has (``/proc/self/task``; threads
started later inherit the mask):

* learner rank ``r`` (``LOCAL_RANK`` under torchrun, else 0) gets cores ``[r * t, (r + 1) * t)``
  of the cores this process may use, ``t = learner.threads``;
* every other service gets the cores after the first ``learner.world_size * t``, shared
  (the scheduler balances generators, scorers, the buffer and the feedback service among them).

Each process places itself at start-up from the config alone (no coordination), so it works
the same under ``streamrl run``, honcho, supervisord or Kubernetes. It is a per-host rule: a host
that runs no learner should keep ``none`` (``--set run.cpu_placement=none`` in its process
file), or its services would leave the learner's cores idle. A host with no core left over
for the other services (``cores <= world_size * t``) is left to the scheduler, with a warning.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

LEARNER = "learner"


def placement(
    service: str, cpus: list[int], *, learner_threads: int, learner_ranks: int, local_rank: int = 0
) -> list[int] | None:
    """The cores ``service`` should run on under ``learner_owns_cores``.

    Args:
        service: ``learner``, ``generator``, ``scorer``, ``buffer`` or ``feedback``.
        cpus: the cores this process may use now, ascending (``sorted(os.sched_getaffinity(0))``).
        learner_threads: ``learner.threads``: cores per learner rank.
        learner_ranks: learner ranks that may run on this host (``learner.world_size``).
        local_rank: this learner rank's position on the host.

    Returns:
        The cores, or None when the host has no core left for the other services (or the rank
        lies outside the ranks reserved for), so the scheduler should place the process.
    """
    reserved = learner_threads * learner_ranks
    if len(cpus) <= reserved:
        return None
    if service == LEARNER:
        if not 0 <= local_rank < learner_ranks:
            return None
        return cpus[local_rank * learner_threads : (local_rank + 1) * learner_threads]
    return cpus[reserved:]


def place_process(service: str, mode: str, *, learner_threads: int, learner_ranks: int) -> list[int] | None:
    """Apply ``run.cpu_placement`` = ``mode`` to this process (all its threads), by :func:`placement`.

    Args:
        service: this process's service name (``learner``, ``generator``, ...).
        mode: ``none`` or ``learner_owns_cores``.
        learner_threads: ``learner.threads``.
        learner_ranks: ``learner.world_size``.

    Raises:
        OSError: the kernel refused the affinity (e.g. a core outside this process's cgroup cpuset).

    Returns:
        The cores it now runs on, or None when it was left to the scheduler (``mode = "none"``,
        too few cores, or no ``os.sched_setaffinity`` on this platform).
    """
    if mode == "none" or not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    cores = placement(
        service,
        cpus,
        learner_threads=learner_threads,
        learner_ranks=learner_ranks,
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
    )
    if cores is None:
        log.warning(
            "run.cpu_placement = %s: %d core(s) here, the learner reserves %d x %d; left to the scheduler",
            mode,
            len(cpus),
            learner_ranks,
            learner_threads,
        )
        return None
    for tid in _threads():
        try:
            os.sched_setaffinity(tid, cores)
        except ProcessLookupError:  # the thread ended meanwhile
            pass
    log.info("%s pinned to cores %s (run.cpu_placement = %s)", service, cores, mode)
    return cores


def _threads() -> list[int]:
    """Thread ids of this process (Linux ``/proc/self/task``; elsewhere the calling thread, 0)."""
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [0]
