"""Running statistics for reward (or value-target) normalisation."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["RunningMeanStd"]


class RunningMeanStd:
    """Running mean and variance of a scalar stream, updated batch by batch.

    Each :meth:`update` merges the batch's count, mean and variance into the
    running ones with the parallel algorithm of Chan, Golub & LeVeque (1979)
    (Welford's update generalised to batches)::

        delta = mean_b - mean
        N     = n + n_b
        mean' = mean + delta * n_b / N
        M2'   = var * n + var_b * n_b + delta^2 * n * n_b / N,   var' = M2' / N

    so after any sequence of updates ``mean``/``var`` equal the mean and the
    *population* variance of all values seen (up to float64 rounding). The
    statistics are python floats (float64), whatever the input dtype/device.

    Before the first update ``count == 0``, ``mean == 0`` and ``var == 1``, so
    :meth:`normalize` is (nearly) the identity.

    Args:
        epsilon: added to ``var`` inside :meth:`normalize`.
    """

    def __init__(self, epsilon: float = 1e-8) -> None:
        if not epsilon >= 0:
            raise ValueError(f"epsilon must be >= 0, got {epsilon}")
        self.epsilon = float(epsilon)
        self._count = 0.0
        self._mean = 0.0
        self._var = 1.0

    @property
    def count(self) -> float:
        """Number of values seen so far."""
        return self._count

    @property
    def mean(self) -> float:
        """Mean of all values seen (0.0 before any)."""
        return self._mean

    @property
    def var(self) -> float:
        """Population variance of all values seen (1.0 before any)."""
        return self._var

    @property
    def std(self) -> float:
        """``sqrt(var)``."""
        return math.sqrt(self._var)

    def update(self, x: Tensor) -> None:
        """Merge every element of ``x`` (any shape, e.g. ``[B]`` scores) into the
        statistics. An empty tensor is a no-op.

        Raises:
            ValueError: if ``x`` holds NaN or inf (they would poison the stats forever).
        """
        flat = x.detach().reshape(-1).to(torch.float64)
        n_b = flat.numel()
        if n_b == 0:
            return
        if not bool(torch.isfinite(flat).all()):
            raise ValueError("RunningMeanStd.update got NaN or inf; filter the batch first")
        mean_b = float(flat.mean().item())
        var_b = float(flat.var(unbiased=False).item())
        n = self._count
        total = n + n_b
        delta = mean_b - self._mean
        m2 = self._var * n + var_b * n_b + delta * delta * n * n_b / total
        self._mean = self._mean + delta * n_b / total
        self._var = m2 / total
        self._count = total

    def normalize(self, x: Tensor, *, clip: float | None = None, center: bool = True) -> Tensor:
        """``(x - mean) / sqrt(var + epsilon)``, then clamped to ``[-clip, clip]``.

        Args:
            x: any shape and float dtype; the result has the same shape and dtype.
            clip: ``None`` for no clamping, else a bound ``> 0``.
            center: ``False`` divides only (``x / sqrt(var + epsilon)``), the
                scale-only reward normalisation some PPO implementations use.

        Raises:
            ValueError: ``clip <= 0``.
        """
        if clip is not None and not clip > 0:
            raise ValueError(f"clip must be > 0 or None, got {clip}")
        shifted = x - self._mean if center else x
        out = shifted / math.sqrt(self._var + self.epsilon)
        if clip is not None:
            out = out.clamp(-clip, clip)
        return out

    def state_dict(self) -> dict[str, float]:
        """Plain python floats ``{"count", "mean", "var"}`` for checkpoints (JSON-safe)."""
        return {"count": self._count, "mean": self._mean, "var": self._var}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` output.

        Raises:
            ValueError: a key is missing, a value is not finite, or count/var is negative.
        """
        missing = {"count", "mean", "var"} - set(state)
        if missing:
            raise ValueError(f"RunningMeanStd state is missing {sorted(missing)}")
        count, mean, var = float(state["count"]), float(state["mean"]), float(state["var"])
        if not all(math.isfinite(v) for v in (count, mean, var)):
            raise ValueError(f"RunningMeanStd state has non-finite values: {state}")
        if count < 0 or var < 0:
            raise ValueError(f"RunningMeanStd state needs count >= 0 and var >= 0, got {state}")
        self._count, self._mean, self._var = count, mean, var

    def __repr__(self) -> str:
        return f"RunningMeanStd(count={self._count:g}, mean={self._mean:.6g}, var={self._var:.6g})"
