"""Log throttling for repeated events (rejected messages, refused peers).

A flood of bad input must not fill the log: the 1st, 10th, 100th, ... occurrence
of an event (per reason and endpoint, counted by the caller) is logged, the rest
only counted in metrics.
"""

from __future__ import annotations


def should_log(n: int) -> bool:
    """True for the counts at which a repeated event is logged: 1, 10, 100, 1000, ...

    Args:
        n: how many times the event has happened, counting this one (>= 1).
    """
    return n == 1 or (n >= 10 and str(n).strip("0") == "1")
