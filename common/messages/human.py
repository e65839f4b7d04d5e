"""People in the loop: H-hat, the learned model of the labellers' reinforcement.

Part of :mod:`streamrl.common.messages` (its docstring describes the wire format); import the
names from there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from streamrl.common.messages.envelope import Message, array_field, require


@dataclass(kw_only=True)
class HumanModel(Message):
    """A version of H-hat, the learned model of the labellers' reinforcement (feedback -> scorers
    and generators, PUB; re-sent periodically so late joiners get it).

    H-hat(x) = clip(weight . ((phi(x) - mean) / scale) + bias, -1, 1), with phi(x) the
    ``feature`` of the frozen reference model (``streamrl.common.human.reference_features``).

    Attributes:
        version: H-hat version (>= 1), incremented by every refit.
        active: False while the labellers paused the human influence.
        feature: feature name (``streamrl.common.human.FEATURE``); a consumer with
            another feature refuses the model.
        mean: ``[D]`` float32 feature mean used for standardisation.
        scale: ``[D]`` float32 feature scale (> 0).
        weight: ``[D]`` float32 linear head.
        bias: the head's bias.
        anchors: ``[N, D]`` float32 standardised features of the most recently labelled
            rollouts (the eligibility module's anchors), N >= 0.
        anchor_times: ``[N]`` float64 Unix times (seconds) of those labels.
        labels: number of labels the fit used.
    """

    KIND: ClassVar[str] = "human_model"
    version: int
    active: bool
    feature: str
    mean: np.ndarray = array_field("float32", 1)
    scale: np.ndarray = array_field("float32", 1)
    weight: np.ndarray = array_field("float32", 1)
    bias: float
    anchors: np.ndarray = array_field("float32", 2)
    anchor_times: np.ndarray = array_field("float64", 1)
    labels: int

    def check(self) -> None:
        require(self.version >= 1, "version must be >= 1")
        require(self.labels >= 0, "labels must be >= 0")
        dim = self.weight.shape[0]
        require(dim >= 1, "weight is empty")
        require(
            self.mean.shape == (dim,) and self.scale.shape == (dim,), "mean, scale and weight must have the same length"
        )
        require(self.anchors.shape[1] == dim or self.anchors.shape[0] == 0, f"anchors must be [N, {dim}]")
        require(self.anchor_times.shape == (self.anchors.shape[0],), "anchor_times must be [N]")
        for name in ("mean", "scale", "weight", "anchors", "anchor_times"):
            require(bool(np.all(np.isfinite(getattr(self, name)))), f"{name} has non-finite values")
        require(bool(np.all(self.scale > 0)), "scale must be > 0")
        require(math.isfinite(self.bias), "bias is not finite")
