"""KL-penalty coefficient controllers (the beta of the KL penalty to the reference).

Units: the adaptive controller compares the KL *per sequence* (nats summed over a
completion's tokens, averaged over the batch's sequences; :func:`per_sequence_kl`) with
its target, as Ziegler et al. 2019 and TRL do; not the per-token mean.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

from torch import Tensor

from streamrl.common.tensors import masked_sum

__all__ = ["AdaptiveKLController", "FixedKLController", "KLController", "make_kl_controller", "per_sequence_kl"]


def per_sequence_kl(kl_tokens: Tensor, mask: Tensor) -> Tensor:
    """Mean over sequences of the summed per-token KL estimates: ``mean_b sum_t KL[b, t]``
    (nats per sequence), the quantity the adaptive controller targets (Ziegler et al. 2019,
    whose KL is that of whole samples; TRL's ``mean_kl = kl.sum(1).mean()``).

    Args:
        kl_tokens: ``[B, T]`` per-token KL estimates (garbage in padding is ignored).
        mask: ``[B, T]`` bool or float, non-zero = real token.

    Returns:
        0-d tensor, dtype of ``kl_tokens``; 0 for an empty batch.
    """
    per_row = masked_sum(kl_tokens, mask, dim=1)
    return per_row.mean() if per_row.numel() else per_row.sum()


class KLController(Protocol):
    """Interface shared by the controllers: read ``value``, call ``update`` once
    per batch with the batch's mean KL and the number of samples it held."""

    @property
    def value(self) -> float: ...

    def update(self, current_kl: float, n_steps: int) -> None: ...

    def state_dict(self) -> dict[str, float]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _check_kl_args(current_kl: float, n_steps: int) -> None:
    if not math.isfinite(current_kl):
        raise ValueError(f"current_kl must be finite, got {current_kl}")
    if n_steps < 0:
        raise ValueError(f"n_steps must be >= 0, got {n_steps}")


def _read_value(state: dict[str, Any]) -> float:
    if "value" not in state:
        raise ValueError("KL controller state is missing 'value'")
    value = float(state["value"])
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"KL controller state 'value' must be finite and >= 0, got {value}")
    return value


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, "Fine-Tuning Language Models
    from Human Preferences": the proportional controller for the beta of
    their eq. 2 reward penalty)::

        e_t       = clip(KL_t / KL_target - 1, -0.2, 0.2)
        beta_t+1  = beta_t * (1 + K_beta * e_t),   K_beta = n_steps / horizon

    Args:
        init_kl_coef: starting beta (>= 0).
        target: KL_target (> 0), nats per sequence (the units of :func:`per_sequence_kl`,
            which the learner passes to :meth:`update`).
        horizon: samples over which beta may change by roughly e^(+-0.2) (> 0).

    Raises:
        ValueError: on any argument out of range.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        if not (math.isfinite(init_kl_coef) and init_kl_coef >= 0):
            raise ValueError(f"init_kl_coef must be finite and >= 0, got {init_kl_coef}")
        if not (math.isfinite(target) and target > 0):
            raise ValueError(f"target must be > 0 for the adaptive controller, got {target}")
        if not horizon > 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self._value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    @property
    def value(self) -> float:
        """Current beta."""
        return self._value

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move beta towards the value that holds the KL at ``target``.

        Args:
            current_kl: KL per sequence of the batch just used (:func:`per_sequence_kl`; finite).
            n_steps: samples in that batch (>= 0).

        Raises:
            ValueError: non-finite ``current_kl`` or negative ``n_steps``.
        """
        _check_kl_args(current_kl, n_steps)
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self._value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        """``{"value": beta}`` (target and horizon come from the config)."""
        return {"value": self._value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore beta from :meth:`state_dict` output.

        Raises:
            ValueError: missing or invalid ``value``.
        """
        self._value = _read_value(state)

    def __repr__(self) -> str:
        return f"AdaptiveKLController(value={self._value:.6g}, target={self.target:g}, horizon={self.horizon})"


class FixedKLController:
    """Constant KL coefficient; :meth:`update` only validates its arguments.

    Args:
        kl_coef: beta (finite, >= 0).
    """

    def __init__(self, kl_coef: float) -> None:
        if not (math.isfinite(kl_coef) and kl_coef >= 0):
            raise ValueError(f"kl_coef must be finite and >= 0, got {kl_coef}")
        self._value = float(kl_coef)

    @property
    def value(self) -> float:
        """The fixed beta."""
        return self._value

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op (arguments are still checked, as for the adaptive controller)."""
        _check_kl_args(current_kl, n_steps)

    def state_dict(self) -> dict[str, float]:
        """``{"value": beta}``, same shape as the adaptive controller's."""
        return {"value": self._value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Validate ``state`` but keep the configured beta: a fixed coefficient
        comes from the config, so a changed config wins over the checkpoint."""
        _read_value(state)

    def __repr__(self) -> str:
        return f"FixedKLController(value={self._value:.6g})"


def make_kl_controller(kl_coef: float, target: float | None, horizon: int) -> AdaptiveKLController | FixedKLController:
    """``target is None`` -> :class:`FixedKLController(kl_coef)`; otherwise
    :class:`AdaptiveKLController(kl_coef, target, horizon)` (``horizon`` is unused
    for the fixed controller).

    Raises:
        ValueError: from the chosen controller's constructor.
    """
    if target is None:
        return FixedKLController(kl_coef)
    return AdaptiveKLController(kl_coef, target, horizon)
