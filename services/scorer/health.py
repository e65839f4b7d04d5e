"""A reward that raises must not starve the run silently: failures counted, logged once, reported.

The scorer calls :meth:`RewardHealth.failed` for every micro-batch whose reward raised
(the rollouts are lost: ``rollouts_lost_total``) and :meth:`RewardHealth.succeeded` for
every one scored. Each failure is counted by reason, the exception's class name
(``streamrl_scorer_reward_failures_total{reason="ValueError"}``; an HTTP reward server
that is down is ``RewardServerDown``, a slow reward model ``RewardTimeout``). The first
failure of each reason is logged with its traceback and the id of the first rollout of
its micro-batch; later ones of the same reason are only counted. After ``failing_after``
micro-batches in a row failed, the reward is *failing*: one ERROR line says so (what
raised, how often, that nothing reaches the buffer, the fix), the gauge
``reward_failing`` is 1 and ``reward_last_error{reason, error}`` carries the message, which
``streamrl status`` and the learner's wait message show. The first success ends it (logged).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from streamrl.common.messages import Rollout
from streamrl.services.scorer.metrics import ScorerMetrics

log = logging.getLogger(__name__)

ERROR_CHARS = 200
"""The error message kept in the ``reward_last_error`` label, at most this many characters."""


def error_text(exc: BaseException) -> str:
    """``"ValueError: message"`` on one line, at most :data:`ERROR_CHARS` characters."""
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= ERROR_CHARS else text[: ERROR_CHARS - 3] + "..."


class RewardHealth:
    """Failure bookkeeping of one scorer's reward (see the module docstring).

    Args:
        metrics: the scorer's metrics (``reward_failures_total``, ``reward_consecutive_failures``,
            ``reward_failing``, ``reward_last_error``, ``scoring_errors_total``, ``rollouts_lost_total``).
        failing_after: consecutive failed micro-batches that make the reward *failing* (>= 1).
        names: the reward components, for the messages.
    """

    def __init__(self, metrics: ScorerMetrics, *, failing_after: int, names: Sequence[str]) -> None:
        if failing_after < 1:
            raise ValueError(f"failing_after must be >= 1, got {failing_after}")
        self.metrics = metrics
        self.failing_after = failing_after
        self.names = ", ".join(names)
        self.consecutive = 0
        self.failing = False
        self.logged: set[str] = set()
        metrics.failing.set(0)
        metrics.consecutive.set(0)

    def failed(self, exc: BaseException, batch: Sequence[Rollout]) -> None:
        """Record that scoring ``batch`` raised ``exc`` (its rollouts are lost)."""
        reason = type(exc).__name__
        m = self.metrics
        m.errors.inc()
        m.lost.inc(len(batch))
        m.failures.labels(reason=reason).inc()
        m.last_error.clear()
        m.last_error.labels(reason=reason, error=error_text(exc)).set(1)
        self.consecutive += 1
        m.consecutive.set(self.consecutive)
        first = batch[0].rollout_id if batch else "(none)"
        if reason not in self.logged:
            self.logged.add(reason)
            log.error("reward (%s) raised %s on rollout %s (and %d more of its micro-batch, all lost); further "
                      "%s failures are counted in reward_failures_total{reason=\"%s\"}, not logged",
                      self.names, reason, first, max(len(batch) - 1, 0), reason, reason, exc_info=exc)
        if self.consecutive >= self.failing_after and not self.failing:
            self.failing = True
            m.failing.set(1)
            log.error("REWARD FAILING: the last %d micro-batches all raised (last: %s); no scored rollout reaches the "
                      "buffer, so the learner waits; fix: correct the reward (%s; traceback above) and restart the "
                      "scorer", self.consecutive, error_text(exc), self.names)

    def succeeded(self) -> None:
        """Record a micro-batch scored; ends a failing episode."""
        if self.failing:
            log.warning("reward recovered after %d failed micro-batches in a row", self.consecutive)
            self.failing = False
            self.metrics.failing.set(0)
        if self.consecutive:
            self.consecutive = 0
            self.metrics.consecutive.set(0)
