"""Tests for services/learner/normalization.py."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from streamrl.services.learner.normalization import RunningMeanStd


def test_matches_numpy_on_concatenated_batches():
    rng = np.random.default_rng(20)
    batches = [rng.normal(3.0, 2.0, size=n) for n in (1, 7, 64, 3, 250)]
    rms = RunningMeanStd()
    seen: list[np.ndarray] = []
    for batch in batches:
        rms.update(torch.tensor(batch, dtype=torch.float32).reshape(-1, 1))
        seen.append(batch.astype(np.float32).astype(np.float64))
        allv = np.concatenate(seen)
        assert rms.count == allv.size
        assert rms.mean == pytest.approx(allv.mean(), abs=1e-12)
        assert rms.var == pytest.approx(allv.var(), abs=1e-11)  # population (ddof=0)
        assert rms.std == pytest.approx(allv.std(), abs=1e-11)


def test_hand_computed_two_batches():
    # [1, 2] then [3, 4, 5]: all = 1..5, mean 3, population var (4+1+0+1+4)/5 = 2
    rms = RunningMeanStd()
    rms.update(torch.tensor([1.0, 2.0]))
    assert (rms.count, rms.mean, rms.var) == (2.0, 1.5, 0.25)
    rms.update(torch.tensor([3.0, 4.0, 5.0]))
    assert (rms.count, rms.mean, rms.var) == (5.0, 3.0, 2.0)


def test_initial_state_and_empty_update():
    rms = RunningMeanStd()
    assert (rms.count, rms.mean, rms.var) == (0.0, 0.0, 1.0)
    rms.update(torch.empty(0))
    assert (rms.count, rms.mean, rms.var) == (0.0, 0.0, 1.0)
    x = torch.tensor([0.5, -2.0])
    torch.testing.assert_close(rms.normalize(x), x / math.sqrt(1 + 1e-8))


def test_normalize_with_clip_and_center():
    rms = RunningMeanStd(epsilon=0.0)
    rms.update(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))  # mean 3, var 2
    x = torch.tensor([3.0, 5.0, 30.0, -30.0])
    s = math.sqrt(2.0)
    # (x - 3)/sqrt(2) = [0, 1.41421, 19.09, -23.33] -> clip 5
    torch.testing.assert_close(rms.normalize(x, clip=5.0), torch.tensor([0.0, 2 / s, 5.0, -5.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(rms.normalize(x, center=False), x / s, atol=1e-6, rtol=0)
    assert rms.normalize(x.double()).dtype == torch.float64
    with pytest.raises(ValueError, match="clip"):
        rms.normalize(x, clip=0.0)


def test_state_dict_round_trip_through_json():
    rms = RunningMeanStd()
    rms.update(torch.tensor([0.1, 0.7, -2.5]))
    state = json.loads(json.dumps(rms.state_dict()))
    assert all(type(v) is float for v in state.values())
    other = RunningMeanStd()
    other.load_state_dict(state)
    assert (other.count, other.mean, other.var) == (rms.count, rms.mean, rms.var)
    # continued updates agree
    for r in (rms, other):
        r.update(torch.tensor([4.0, 5.0]))
    assert (other.count, other.mean, other.var) == (rms.count, rms.mean, rms.var)


def test_rejects_bad_input():
    rms = RunningMeanStd()
    with pytest.raises(ValueError, match="NaN or inf"):
        rms.update(torch.tensor([1.0, math.nan]))
    assert rms.count == 0.0  # rejected batch left no trace
    with pytest.raises(ValueError, match="missing"):
        rms.load_state_dict({"count": 1.0, "mean": 0.0})
    with pytest.raises(ValueError, match="var >= 0"):
        rms.load_state_dict({"count": 1.0, "mean": 0.0, "var": -1.0})
    with pytest.raises(ValueError, match="non-finite"):
        rms.load_state_dict({"count": 1.0, "mean": math.inf, "var": 1.0})
