"""A reward that raises must not starve the run silently: failures counted, logged once, reported.

The scorer scores each micro-batch with :func:`~streamrl.services.scorer.scoring.score_each`
(each rollout alone when the micro-batch raised) and calls :meth:`RewardHealth.record` with the
rollouts whose reward raised. Each reward call that raised is counted by reason, the exception's
class name (``streamrl_scorer_reward_failures_total{reason="ValueError"}``; an HTTP reward server
that is down is ``RewardServerDown``, a slow reward model ``RewardTimeout``), and each rollout
whose reward raised in ``reward_failed_rollouts_total{reason}``. The first failure of each reason
is logged with its traceback and the rollout's id; later ones of the same reason are only counted.
``reward_failure_fraction`` is the fraction of the last ``failing_window`` rollouts whose reward
raised.

The reward is *failing* when either

* the last ``failing_after`` micro-batches failed entirely (every rollout's reward raised: nothing
  reaches the buffer), or
* at least ``failing_fraction`` of the last ``failing_window`` rollouts failed (a reward that raises
  on some inputs: their groups are dropped, so the learner gets fewer groups per second).

Then one ERROR line, starting ``REWARD FAILING``, says which (what raised, how often, what it
costs, the fix), the gauge ``reward_failing`` is 1 and ``reward_last_error{reason, error}`` carries
the message, which ``streamrl status`` and the learner's wait message show. It ends (logged) when
neither holds any more.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
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
        metrics: the scorer's metrics (``reward_failures_total``, ``reward_failed_rollouts_total``,
            ``reward_failure_fraction``, ``reward_consecutive_failures``, ``reward_failing``,
            ``reward_last_error``, ``scoring_errors_total``).
        failing_after: consecutive entirely failed micro-batches that make the reward *failing* (>= 1).
        names: the reward components, for the messages.
        failing_fraction: fraction of the last ``failing_window`` rollouts whose reward raised that
            makes the reward *failing*, in (0, 1].
        failing_window: rollouts the fraction is taken over (>= 1); the rule applies once that many
            were scored.

    Raises:
        ValueError: an argument out of its range.
    """

    def __init__(
        self,
        metrics: ScorerMetrics,
        *,
        failing_after: int,
        names: Sequence[str],
        failing_fraction: float = 0.1,
        failing_window: int = 100,
    ) -> None:
        if failing_after < 1:
            raise ValueError(f"failing_after must be >= 1, got {failing_after}")
        if not 0 < failing_fraction <= 1 or failing_window < 1:
            raise ValueError(
                f"failing_fraction must be in (0, 1] and failing_window >= 1, got {failing_fraction} "
                f"and {failing_window}"
            )
        self.metrics = metrics
        self.failing_after = failing_after
        self.failing_fraction = failing_fraction
        self.window = failing_window
        self.names = ", ".join(names)
        self.consecutive = 0
        self.failing = False
        self.logged: set[str] = set()
        self.recent: deque[bool] = deque(maxlen=failing_window)  # True: that rollout's reward raised
        metrics.failing.set(0)
        metrics.consecutive.set(0)
        metrics.fraction.set(0)

    @property
    def fraction(self) -> float:
        """Fraction of the last ``failing_window`` rollouts (fewer at the start) whose reward raised."""
        return sum(self.recent) / len(self.recent) if self.recent else 0.0

    def record(
        self, batch: Sequence[Rollout], failures: dict[str, BaseException], raised: Sequence[BaseException] = ()
    ) -> None:
        """Record a scored micro-batch.

        Args:
            batch: its rollouts.
            failures: rollout id -> the exception its reward raised (empty: every rollout was scored).
            raised: the exception of each reward call that raised while scoring it (the micro-batch's,
                then each rollout's scored alone): ``scoring_errors_total`` and
                ``reward_failures_total{reason}``.
        """
        m = self.metrics
        self.recent.extend(r.rollout_id in failures for r in batch)
        m.fraction.set(self.fraction)
        for exc in raised:
            m.errors.inc()
            m.failures.labels(reason=type(exc).__name__).inc()
        last = failures[next(reversed(failures))] if failures else raised[-1] if raised else None
        if last is not None:
            m.last_error.clear()
            m.last_error.labels(reason=type(last).__name__, error=error_text(last)).set(1)
        if failures:
            self._count(batch, failures)
        ended = 0
        if len(failures) < len(batch):  # something was scored: a run of failed micro-batches ends
            ended, self.consecutive = self.consecutive, 0
        elif raised:
            self.consecutive += 1
        m.consecutive.set(self.consecutive)
        self._update(last, ended)

    def failed(self, exc: BaseException, batch: Sequence[Rollout]) -> None:
        """Record that one reward call on ``batch`` raised ``exc`` and none of its rollouts was scored."""
        self.record(batch, {r.rollout_id: exc for r in batch}, raised=[exc])

    def succeeded(self, batch: Sequence[Rollout] = ()) -> None:
        """Record a micro-batch scored entirely (``batch``: its rollouts); ends a run of failed micro-batches."""
        if batch:
            self.record(batch, {})
            return
        ended, self.consecutive = self.consecutive, 0
        self.metrics.consecutive.set(0)
        self._update(None, ended)

    def _count(self, batch: Sequence[Rollout], failures: dict[str, BaseException]) -> None:
        """Count the failed rollouts by reason and log each reason's first failure."""
        reasons = Counter(type(exc).__name__ for exc in failures.values())
        for reason, count in reasons.items():
            self.metrics.failed_rollouts.labels(reason=reason).inc(count)
        for rollout in batch:
            exc = failures.get(rollout.rollout_id)
            reason = type(exc).__name__
            if exc is None or reason in self.logged:
                continue
            self.logged.add(reason)
            log.error(
                "reward (%s) raised %s on rollout %s (%d of the %d rollouts of its micro-batch raised it; the "
                "groups of the rollouts that raised are dropped); further %s failures are counted in "
                'reward_failures_total{reason="%s"}, not logged',
                self.names,
                reason,
                rollout.rollout_id,
                reasons[reason],
                len(batch),
                reason,
                reason,
                exc_info=exc,
            )

    def _update(self, last: BaseException | None, ended: int) -> None:
        """Enter or leave the *failing* state (module docstring), saying so once each way; ``last`` is
        the newest failure, ``ended`` the length of a run of failed micro-batches that just ended."""
        in_a_row = self.consecutive >= self.failing_after
        by_fraction = len(self.recent) >= self.window and self.fraction >= self.failing_fraction
        if (in_a_row or by_fraction) and not self.failing:
            self.failing = True
            self.metrics.failing.set(1)
            what = error_text(last) if last is not None else "see above"
            if in_a_row:
                log.error(
                    "REWARD FAILING: the last %d micro-batches all raised (last: %s); no scored rollout reaches "
                    "the buffer, so the learner waits; fix: correct the reward (%s; traceback above) and "
                    "restart the scorer",
                    self.consecutive,
                    what,
                    self.names,
                )
            else:
                log.error(
                    "REWARD FAILING: the reward raised on %d of the last %d rollouts (%.0f%%, scorer."
                    "failing_fraction = %g; last: %s); their groups are dropped, so the learner gets fewer "
                    "groups and waits longer; fix: correct the reward (%s; traceback above) so that it scores "
                    "every input, and restart the scorer",
                    sum(self.recent),
                    len(self.recent),
                    100 * self.fraction,
                    self.failing_fraction,
                    what,
                    self.names,
                )
        elif self.failing and not (in_a_row or by_fraction):
            self.failing = False
            self.metrics.failing.set(0)
            if ended:
                log.warning("reward recovered after %d failed micro-batches in a row", ended)
            else:
                log.warning(
                    "reward recovered: it raised on %d of the last %d rollouts (%.0f%%)",
                    sum(self.recent),
                    len(self.recent),
                    100 * self.fraction,
                )
