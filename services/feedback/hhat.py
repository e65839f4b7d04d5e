"""Fitting H-hat, the model of the labellers' reinforcement, from the stored labels. No sockets here.

TAMER (Knox & Stone 2009) regresses H-hat(s, a) on the trainer's reinforcement online, with a
linear model on features of (s, a). Here phi is the frozen reference model's pooled hidden state
(:func:`streamrl.common.human.reference_features`) and H-hat a linear head on standardised phi,
refit after every burst of labels on the newest ``max_labels`` of them:

    minimise (1/N) [ sum_ratings sum_i c_i (h(x_i) - y)^2 + sum_preferences softplus(-(h(x_chosen) - h(x_rejected))) ]
             + l2 * |w|^2,   h(x) = w . (phi(x) - mean) / scale + b

where a rating's credit c_i is spread over the rollouts x_i the person saw within their
reaction delay (TAMER's credit assignment, Knox & Stone 2009 sec. 3: c_i the share of the
delay distribution falling on x_i; here uniform over the window, ``feedback.credit_delay_*``),
sum_i c_i = 1, or all on the rated rollout (c = 1) without a window. Squared error toward the
+1 / -1 ratings as TAMER; the Bradley-Terry log-likelihood of the
pairwise picks, as reward models are trained from comparisons: Christiano et al. 2017, Ouyang et
al. 2022 eq. 1. The objective is convex (strictly in w, since l2 > 0), and L-BFGS starts from
zero every time, so the same labels always give the same head.
"""

from __future__ import annotations

import numpy as np
import torch

from streamrl.common.human import FEATURE, HumanHead
from streamrl.common.messages import HumanModel
from streamrl.services.feedback.store import LabelRow

MIN_SCALE = 1e-4
"""Floor of the feature scale (a feature constant over the labelled rollouts)."""


def fit_head(rows: list[LabelRow], *, l2: float) -> tuple[HumanHead, float]:
    """Fit H-hat to ``rows`` (each with features; see the module docstring for the objective).

    Args:
        rows: labels with ``features`` (and ``other_features`` for preferences), all ``[D]``.
        l2: ridge coefficient (> 0).

    Returns:
        ``(head, loss)``: the fitted head and the objective at the optimum.

    Raises:
        ValueError: no rows, a row without features, or features of different sizes.
    """
    if not rows:
        raise ValueError("fit_head: no labels")
    chosen: list[np.ndarray] = []  # the preferred rollout of each preference, [D] each
    rejected: list[np.ndarray] = []  # the other one
    credited: list[tuple[np.ndarray, float, float]] = []  # (features, c_i, y) per credited rollout
    for r in rows:
        features, other = r.features, r.other_features
        if features is None or (r.kind == "preference" and other is None):
            raise ValueError("fit_head: every label needs the features of its rollout(s)")
        if r.kind == "preference" and other is not None:
            chosen.append(features)
            rejected.append(other)
        elif r.kind == "rating":
            credited += [(f, c, float(r.value)) for f, c in (r.credit if r.credit else [(features, 1.0)])]
    everything = np.stack(chosen + rejected + [f for f, _, _ in credited]).astype(np.float64)
    mean = everything.mean(0)
    scale = np.maximum(everything.std(0), MIN_SCALE)
    dim = everything.shape[1]

    def z(values: list[np.ndarray]) -> torch.Tensor:
        if not values:
            return torch.zeros((0, dim), dtype=torch.float64)
        return torch.from_numpy((np.stack(values).astype(np.float64) - mean) / scale)

    x_rated = z([f for f, _, _ in credited])
    c = torch.tensor([c for _, c, _ in credited], dtype=torch.float64)
    y = torch.tensor([y for _, _, y in credited], dtype=torch.float64)
    x_chosen, x_rejected = z(chosen), z(rejected)
    w = torch.zeros(dim, dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    n = len(rows)

    def objective() -> torch.Tensor:
        loss = (c * (x_rated @ w + b - y) ** 2).sum() / n
        loss = loss + torch.nn.functional.softplus(-((x_chosen - x_rejected) @ w)).sum() / n
        return loss + l2 * (w * w).sum()

    optimizer = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=500,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        loss = float(objective())
    head = HumanHead(
        mean=mean.astype(np.float32),
        scale=scale.astype(np.float32),
        weight=w.detach().numpy().astype(np.float32),
        bias=float(b.detach()),
    )
    return head, loss


def model_message(
    head: HumanHead, *, version: int, active: bool, rows: list[LabelRow], anchors: int, sender: str
) -> HumanModel:
    """The :class:`~streamrl.common.messages.HumanModel` of a fitted head.

    The eligibility anchors are the standardised features of the newest ``anchors`` labelled
    rollouts (both sides of a preference), with their label times.
    """
    recent: list[tuple[np.ndarray, float]] = []
    for r in reversed(rows):
        for f in (r.features, r.other_features):
            if f is not None and len(recent) < anchors:
                recent.append((f, r.created_at))
    points = head.standardize(np.stack([f for f, _ in recent])) if recent else np.zeros((0, head.dim), np.float32)
    return HumanModel(
        sender=sender,
        version=version,
        active=active,
        feature=FEATURE,
        mean=head.mean,
        scale=head.scale,
        weight=head.weight,
        bias=head.bias,
        anchors=points.astype(np.float32),
        anchor_times=np.array([t for _, t in recent], dtype=np.float64),
        labels=len(rows),
    )
