"""Fitting H-hat: it recovers a labeller's rule from ratings and from pairwise picks."""

from __future__ import annotations

import numpy as np
import pytest

from streamrl.services.feedback.hhat import fit_head, model_message
from streamrl.services.feedback.store import LabelRow


def rows_from(rule, n, *, kind, seed=0, dim=6):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        x = rng.normal(size=dim).astype(np.float32) * 3 + 5
        if kind == "rating":
            rows.append(LabelRow(i, float(i), "rating", 1 if rule(x) > 0 else -1, x, None))
        else:
            y = rng.normal(size=dim).astype(np.float32) * 3 + 5
            chosen, rejected = (x, y) if rule(x) > rule(y) else (y, x)
            rows.append(LabelRow(i, float(i), "preference", 1, chosen, rejected))
    return rows


def rule(x):
    return x[0] - 5 - 0.5 * (x[3] - 5)


@pytest.mark.parametrize("kind", ["rating", "preference"])
def test_fit_recovers_the_rule(kind):
    head, loss = fit_head(rows_from(rule, 300, kind=kind), l2=1e-3)
    test = rows_from(rule, 500, kind="rating", seed=1)
    x = np.stack([r.features for r in test])
    truth = np.array([r.value for r in test])
    raw = head.raw(x)
    if kind == "rating":  # ratings pin the sign
        assert np.mean(np.sign(raw) == truth) > 0.95
    else:  # picks pin the order only
        pairs = rows_from(rule, 500, kind="preference", seed=2)
        chosen = head.raw(np.stack([r.features for r in pairs]))
        rejected = head.raw(np.stack([r.other_features for r in pairs]))
        assert np.mean(chosen > rejected) > 0.95
    w = head.weight / head.scale  # in raw feature units the head is along the rule
    assert w[0] > 0 and w[3] < 0 and abs(w[3] / w[0] + 0.5) < 0.15
    assert np.all(np.abs(head.predict(x)) <= 1) and np.isfinite(loss)


def test_fit_is_deterministic_and_refuses_rows_without_features():
    rows = rows_from(rule, 40, kind="rating") + rows_from(rule, 40, kind="preference", seed=3)
    a, loss_a = fit_head(rows, l2=0.01)
    b, loss_b = fit_head(rows, l2=0.01)
    assert np.array_equal(a.weight, b.weight) and loss_a == loss_b
    with pytest.raises(ValueError, match="features"):
        fit_head([LabelRow(0, 0.0, "rating", 1, None, None)], l2=0.01)
    with pytest.raises(ValueError, match="no labels"):
        fit_head([], l2=0.01)


def test_model_message_carries_the_newest_anchors():
    rows = rows_from(rule, 5, kind="rating") + rows_from(rule, 2, kind="preference", seed=4)
    head, _ = fit_head(rows, l2=0.01)
    msg = model_message(head, version=3, active=False, rows=rows, anchors=3, sender="feedback-0")
    msg.check()
    # the newest label is the last preference: its chosen and rejected, then the one before's chosen
    expected = head.standardize(np.stack([rows[-1].features, rows[-1].other_features, rows[-2].features]))
    np.testing.assert_allclose(msg.anchors, expected, rtol=1e-6)
    assert msg.anchor_times.tolist() == [rows[-1].created_at, rows[-1].created_at, rows[-2].created_at]
    assert (msg.version, msg.active, msg.labels) == (3, False, 7)


def test_a_rating_with_shared_credit_fits_as_its_share_of_a_rating_of_each_rollout():
    # TAMER's credit assignment: a +1 credited 1/2, 1/2 over rollouts a and b and a -1 of c (credited to c
    # twice) have the objective (1/2) [e_a / 2 + e_b / 2 + e_c] + l2 |w|^2 = (1/4) [e_a + e_b + 2 e_c] + l2 |w|^2,
    # that of whole ratings +1 a, +1 b, -1 c, -1 c over N = 4, with the same features standardised
    rng = np.random.default_rng(0)
    a, b, c = (rng.normal(size=4).astype(np.float32) for _ in range(3))
    minus = LabelRow(5, 0.0, "rating", -1, c, None, credit=[(c, 0.5), (c, 0.5)])  # c twice: c's whole label
    shared, loss = fit_head([LabelRow(1, 0.0, "rating", 1, a, None, credit=[(a, 0.5), (b, 0.5)]), minus], l2=0.01)
    whole, loss_whole = fit_head(
        [
            LabelRow(1, 0.0, "rating", 1, a, None),
            LabelRow(2, 0.0, "rating", 1, b, None),
            LabelRow(5, 0.0, "rating", -1, c, None),
            LabelRow(6, 0.0, "rating", -1, c, None),
        ],
        l2=0.01,
    )
    x = np.stack([a, b, c])
    np.testing.assert_allclose(shared.raw(x), whole.raw(x), atol=1e-5)
    assert loss == pytest.approx(loss_whole, rel=1e-6)
    # the shares matter: most of a +1's credit on a, a -1 on b: H-hat(a) > H-hat(b)
    tilted, _ = fit_head(
        [LabelRow(1, 0.0, "rating", 1, a, None, credit=[(a, 0.9), (b, 0.1)]), LabelRow(2, 0.0, "rating", -1, b, None)],
        l2=0.01,
    )
    assert tilted.raw(a[None])[0] > tilted.raw(b[None])[0]
