"""A time limit on one reward component's call (``timeout_s`` of a reward model).

A forward pass cannot be interrupted from Python, so the component runs in one worker
thread and the caller stops waiting after ``timeout_s``: the call raises
:class:`RewardTimeout` (counted by the scorer as ``reason="RewardTimeout"``) and the
micro-batch is lost instead of stalling the scorer forever. The worker is one thread, so
the component is still called from one thread at a time (the reward contract): a call made
while a timed-out one is still running waits behind it, within its own time limit.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Sequence

__all__ = ["RewardTimeout", "TimeLimited"]


class RewardTimeout(TimeoutError):
    """A reward component took longer than its ``timeout_s``; the message says which and the fix."""


class TimeLimited:
    """``fn`` (reward contract) with a time limit per call.

    Args:
        fn: the reward component.
        timeout_s: seconds a call may take (> 0).
        what: the component in messages, e.g. ``"reward model /models/rm"``.

    Raises:
        ValueError: ``timeout_s`` <= 0.
    """

    def __init__(
        self, fn: Callable[[list[str], list[str], list[dict]], Sequence[float]], *, timeout_s: float, what: str
    ) -> None:
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.fn, self.timeout_s, self.what = fn, timeout_s, what
        self.worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)

    def __getattr__(self, name: str):
        """The wrapped component's attributes (``batch_size``, ``max_length``, ...) show through."""
        if name == "fn":
            raise AttributeError(name)
        return getattr(self.fn, name)

    def __call__(self, prompts: list[str], completions: list[str], metadata: list[dict]) -> Sequence[float]:
        """``fn(prompts, completions, metadata)``, or :class:`RewardTimeout` after ``timeout_s`` seconds.

        Raises:
            RewardTimeout: the call (or one still running before it) did not finish in time.
            Exception: whatever ``fn`` raises.
        """
        future = self.worker.submit(self.fn, prompts, completions, metadata)
        try:
            return future.result(timeout=self.timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()  # only takes effect when it was still queued behind an earlier call
            raise RewardTimeout(
                f"{self.what} took more than timeout_s = {self.timeout_s:g}s for {len(completions)} "
                "completions; fix: raise timeout_s, lower batch_size or max_length, or run it on a "
                "GPU (scorer.device)"
            ) from None
