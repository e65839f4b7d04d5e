"""Tests for services/learner/kl_control.py."""

from __future__ import annotations

import math

import pytest

from streamrl.services.learner.kl_control import (
    AdaptiveKLController,
    FixedKLController,
    make_kl_controller,
)


def test_adaptive_hand_computed_sequence():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    # KL 9: e = clip(9/6 - 1 = 0.5, -0.2, 0.2) = 0.2 -> beta = 0.2 * (1 + 0.2*256/10000) = 0.201024
    ctl.update(9.0, 256)
    assert ctl.value == pytest.approx(0.201024, abs=1e-12)
    # KL 6.6: e = 0.1 -> * (1 + 0.1*256/10000) = * 1.00256 -> 0.20153862144
    ctl.update(6.6, 256)
    assert ctl.value == pytest.approx(0.201024 * 1.00256, abs=1e-12)
    # KL 0: e = clip(-1) = -0.2 -> * (1 - 0.2*1000/10000) = * 0.98
    ctl.update(0.0, 1000)
    assert ctl.value == pytest.approx(0.201024 * 1.00256 * 0.98, abs=1e-12)
    # KL on target: unchanged
    before = ctl.value
    ctl.update(6.0, 5000)
    assert ctl.value == before


def test_adaptive_converges_direction():
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=100)
    for _ in range(10):
        ctl.update(5.0, 10)  # KL too high -> beta grows by (1 + 0.2*0.1) each step
    assert ctl.value == pytest.approx(0.1 * 1.02**10, abs=1e-12)


def test_fixed_never_changes():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 10**6)
    ctl.update(0.0, 10**6)
    assert ctl.value == 0.05


def test_make_kl_controller_picks_type():
    fixed = make_kl_controller(0.1, None, 10000)
    adaptive = make_kl_controller(0.1, 6.0, 10000)
    assert isinstance(fixed, FixedKLController) and fixed.value == 0.1
    assert isinstance(adaptive, AdaptiveKLController)
    assert (adaptive.value, adaptive.target, adaptive.horizon) == (0.1, 6.0, 10000)


def test_state_dict_round_trip():
    ctl = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(9.0, 256)
    state = ctl.state_dict()
    assert state == {"value": pytest.approx(0.201024, abs=1e-12)}
    restored = AdaptiveKLController(0.2, target=6.0, horizon=10000)
    restored.load_state_dict(state)
    assert restored.value == ctl.value
    # the fixed coefficient comes from config: a checkpoint does not override it
    fixed = FixedKLController(0.05)
    fixed.load_state_dict({"value": 0.3})
    assert fixed.value == 0.05 and fixed.state_dict() == {"value": 0.05}


def test_errors():
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, target=0.0, horizon=10)
    with pytest.raises(ValueError, match="horizon"):
        AdaptiveKLController(0.1, target=1.0, horizon=0)
    with pytest.raises(ValueError, match="init_kl_coef"):
        AdaptiveKLController(-0.1, target=1.0, horizon=10)
    with pytest.raises(ValueError, match="kl_coef"):
        FixedKLController(math.nan)
    ctl = AdaptiveKLController(0.1, target=1.0, horizon=10)
    with pytest.raises(ValueError, match="current_kl"):
        ctl.update(math.nan, 1)
    with pytest.raises(ValueError, match="n_steps"):
        ctl.update(1.0, -1)
    with pytest.raises(ValueError, match="value"):
        ctl.load_state_dict({})
    with pytest.raises(ValueError, match="value"):
        ctl.load_state_dict({"value": -1.0})


def test_per_sequence_kl_sums_tokens_and_averages_sequences():
    import torch

    from streamrl.services.learner.kl_control import per_sequence_kl
    from support import fill_garbage, ragged_mask

    kl = torch.tensor([[0.1, 0.2, 0.3], [1.0, 0.0, 0.0]])
    mask = ragged_mask([3, 1], 3)
    # sequences: 0.6 and 1.0 -> mean 0.8 nats per sequence (the per-token mean would be 1.6 / 4 = 0.4)
    assert per_sequence_kl(fill_garbage(kl, mask), mask).item() == pytest.approx(0.8, abs=1e-7)


def test_adaptive_controller_reaches_its_target_in_nats_per_sequence():
    """Closed loop: a policy that drifts from the reference in inverse proportion to beta
    (per-token KL 0.05 / beta) on completions of 10, 20 and 30 tokens. Fed the learner's
    statistic, the controller settles where the KL *per sequence* is the target (6 nats);
    the per-token mean there is 6 / 20 = 0.3, which a per-token target of 6 would never reach."""
    import torch

    from streamrl.services.learner.kl_control import per_sequence_kl
    from support import ragged_mask

    mask = ragged_mask([10, 20, 30], 30)
    ctl = make_kl_controller(0.05, 6.0, 60)
    for _ in range(400):
        kl_tokens = torch.full((3, 30), 0.05 / ctl.value) * mask
        ctl.update(float(per_sequence_kl(kl_tokens, mask)), 3)
    kl_tokens = torch.full((3, 30), 0.05 / ctl.value) * mask
    assert float(per_sequence_kl(kl_tokens, mask)) == pytest.approx(6.0, rel=0.02)
    assert float(kl_tokens.sum() / mask.sum()) == pytest.approx(0.3, rel=0.02)
    assert ctl.value == pytest.approx(0.05 * 20 / 6.0, rel=0.02)
