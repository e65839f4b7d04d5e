"""Saying why a process is not making progress: waits, in the log and as a metric.

Every blocking wait in streamrl polls with a timeout (at most a second) and
reports itself here while it lasts. :class:`Waits` keeps, per thing waited on,
the gauge ``streamrl_<service>_waiting_seconds{on="<what>"}`` (seconds the
current wait has lasted, 0 when not waiting; computed when scraped, so it keeps
growing while the process is blocked inside a call, e.g. a weight fetch retrying
against a frozen learner) and logs a WARNING with the
reason after ``warn_after_s`` seconds, again every ``warn_after_s`` seconds
while the wait lasts, and an INFO line when it ends. A hung process is thus
never silent: ``streamrl status`` and a Prometheus alert on
``waiting_seconds > N`` show what it waits on, and its log says why.

Dead peers are noticed at two levels. The application's own pulses: the
learner announces its version every ``announce_interval_s`` (generators
report ``waiting_seconds{on="learner"}`` when it stops), the learner re-sends
its batch request every ``request_timeout_s`` (the buffer reports
``{on="learner"}`` when requests stop), and blocked sends report the peer
they wait for. And TCP keepalive on every connection
(:func:`streamrl.common.transport.make_socket`): a connection whose host vanished is
closed and re-dialled automatically.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from streamrl.common.metrics import ServiceMetrics

log = logging.getLogger(__name__)


class Waits:
    """The waits of one process (see the module docstring).

    Args:
        metrics: the process's metrics; the gauge ``waiting_seconds{on}`` is added to it.
        warn_after_s: seconds of waiting before the first warning, and between warnings.
        clock: monotonic seconds (injected in tests).
    """

    def __init__(self, metrics: ServiceMetrics, *, warn_after_s: float, clock: Callable[[], float] = time.monotonic):
        self.gauge = metrics.gauge("waiting_seconds", "Seconds the current wait has lasted, by what is awaited", ["on"])
        self.instance = metrics.instance
        self.warn_after_s = warn_after_s
        self.clock = clock
        self._since: dict[str, float] = {}
        self._warned: dict[str, float] = {}

    def waiting(self, on: str, why: str | Callable[[], str]) -> float:
        """Report that the process is (still) waiting on ``on``; ``why`` is the log reason, or a
        function returning it, called only when a warning is logged (it may look at peers).

        Returns:
            Seconds this wait has lasted so far.
        """
        now = self.clock()
        if on not in self._since:
            self.gauge.labels(on=on).set_function(lambda: self.current(on))  # live, read at scrape time
        since = self._since.setdefault(on, now)
        elapsed = now - since
        last = self._warned.get(on, since)
        if now - last >= self.warn_after_s:
            log.warning(
                "%s has waited %.0fs on %s: %s", self.instance, elapsed, on, why if isinstance(why, str) else why()
            )
            self._warned[on] = now
        return elapsed

    def done(self, on: str) -> float:
        """The wait on ``on`` ended (no-op when not waiting). Returns its length in seconds."""
        since = self._since.pop(on, None)
        if since is None:
            return 0.0
        elapsed = self.clock() - since
        if self._warned.pop(on, None) is not None:
            log.info("%s resumed after waiting %.0fs on %s", self.instance, elapsed, on)
        return elapsed

    def current(self, on: str) -> float:
        """Seconds the wait on ``on`` has lasted (0 when not waiting)."""
        since = self._since.get(on)
        return 0.0 if since is None else self.clock() - since
