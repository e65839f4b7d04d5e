"""Tests for common/tensors.py: hand-computed masked statistics, padding layouts, and
garbage (NaN, inf, 1e30) in padded entries that must reach no value and no gradient."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from streamrl.common.tensors import (
    bool_mask,
    check_right_padded,
    fill_padding,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    pad_left,
    pad_right,
)
from support import fill_garbage, ragged_mask

ATOL = 1e-6


# --------------------------------------------------------------------------- masks


def test_bool_mask_converts_and_checks_shape():
    m = torch.tensor([[1.0, 0.0, 2.0]])
    assert bool_mask(m).tolist() == [[True, False, True]]
    b = torch.tensor([[True, False]])
    assert bool_mask(b) is b
    with pytest.raises(ValueError, match=r"mask has shape \(1, 2\), expected \(2, 2\)"):
        bool_mask(b, (2, 2))


def test_check_right_padded():
    check_right_padded(ragged_mask([3, 0, 1], 3))
    with pytest.raises(ValueError, match="right-padded"):
        check_right_padded(torch.tensor([[1, 0, 1]]))


def test_fill_padding_value_and_zero_gradient():
    x = torch.tensor([1.0, math.nan, math.inf], requires_grad=True)
    m = torch.tensor([True, False, False])
    out = fill_padding(x, m, value=-7.0)
    assert out.tolist() == [1.0, -7.0, -7.0]
    out.sum().backward()
    assert x.grad.tolist() == [1.0, 0.0, 0.0]


# --------------------------------------------------------------------------- statistics


def test_masked_sum_and_mean_hand_computed_all_and_per_row():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.float32)
    assert masked_sum(x, mask).item() == 7.0
    torch.testing.assert_close(masked_sum(x, mask, dim=1), torch.tensor([3.0, 4.0]))
    # all: (1 + 2 + 4) / 3 = 7/3; per row: [(1+2)/2, 4/1] = [1.5, 4]
    assert masked_mean(x, mask).item() == pytest.approx(7 / 3, abs=ATOL)
    torch.testing.assert_close(masked_mean(x, mask.bool(), dim=1), torch.tensor([1.5, 4.0]))


def test_masked_mean_empty_mask_is_zero_and_garbage_ignored():
    x = torch.tensor([[math.nan, math.inf]])
    assert masked_mean(x, torch.zeros(1, 2, dtype=torch.bool)).item() == 0.0
    x2 = torch.tensor([[2.0, math.nan], [math.inf, -math.inf]], requires_grad=True)
    m2 = torch.tensor([[True, False], [False, False]])
    out = masked_mean(x2, m2)
    out.backward()
    assert out.item() == 2.0
    torch.testing.assert_close(x2.grad, torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    # a row with no real entry gives 0 in the per-row mean
    torch.testing.assert_close(masked_mean(x2.detach(), m2, dim=1), torch.tensor([2.0, 0.0]))


def test_masked_statistics_reject_mismatched_mask():
    for fn in (masked_sum, masked_mean, masked_var, masked_whiten):
        with pytest.raises(ValueError, match="shape"):
            fn(torch.zeros(2, 3), torch.ones(2, 2))


def test_masked_var_hand_computed_population_variance():
    # row 0 real [1, 2, 3] -> mean 2, var 2/3; row 1 real [4] -> var 0; all: [1,2,3,4] -> var 1.25
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
    mask = ragged_mask([3, 1], 3)
    assert masked_var(x, mask).item() == pytest.approx(1.25, abs=1e-12)
    torch.testing.assert_close(masked_var(x, mask, dim=1), torch.tensor([2 / 3, 0.0], dtype=torch.float64))
    assert masked_var(x, torch.zeros_like(mask)).item() == 0.0


def test_masked_var_matches_torch_on_real_entries_and_ignores_garbage():
    g = torch.Generator().manual_seed(3)
    mask = ragged_mask([5, 2, 7, 1], 7)
    x = torch.randn(4, 7, generator=g, dtype=torch.float64) * 2 + 1
    expected = x[mask].var(unbiased=False)
    assert masked_var(x, mask).item() == pytest.approx(expected.item(), abs=1e-12)
    garbage = fill_garbage(x, mask).requires_grad_(True)
    value = masked_var(garbage, mask)
    assert value.item() == pytest.approx(expected.item(), abs=1e-12)
    value.backward()
    assert torch.isfinite(garbage.grad).all() and (garbage.grad[~mask] == 0).all()
    for row in range(4):
        real = x[row][mask[row]]
        assert masked_var(x, mask, dim=1)[row].item() == pytest.approx(real.var(unbiased=False).item(), abs=1e-12)


def test_masked_whiten_hand_computed():
    # real [1, 2, 3]: mean 2, population var 2/3 -> (x-2)/sqrt(2/3) = [-1.2247449, 0, 1.2247449]
    x = torch.tensor([[1.0, 2.0, 3.0, math.nan]])
    mask = ragged_mask([3], 4)
    k = 1 / math.sqrt(2 / 3 + 1e-8)
    torch.testing.assert_close(masked_whiten(x, mask), torch.tensor([[-k, 0.0, k, 0.0]]), atol=ATOL, rtol=0)
    # shift_mean=False keeps the mean 2: [2 - k, 2, 2 + k]
    torch.testing.assert_close(
        masked_whiten(x, mask, shift_mean=False), torch.tensor([[2 - k, 2.0, 2 + k, 0.0]]), atol=ATOL, rtol=0
    )


def test_masked_whiten_statistics_garbage_and_gradient():
    g = torch.Generator().manual_seed(14)
    mask = ragged_mask([6, 2, 4], 6)
    x = torch.randn(3, 6, generator=g, dtype=torch.float64) * 3 + 5
    out = masked_whiten(x, mask)
    real = out[mask]
    assert real.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert real.var(unbiased=False).item() == pytest.approx(1.0, abs=1e-7)
    garbage = fill_garbage(x, mask).requires_grad_(True)
    assert torch.equal(masked_whiten(garbage, mask.float()), out)
    masked_whiten(garbage, mask).pow(3).sum().backward()
    assert torch.isfinite(garbage.grad).all() and (garbage.grad[~mask] == 0).all()
    empty = torch.zeros(3, 6, dtype=torch.bool)
    assert torch.equal(masked_whiten(x, empty), torch.zeros(3, 6, dtype=torch.float64))


# --------------------------------------------------------------------------- padding


def test_pad_right_exact_layout_from_mixed_inputs():
    rows = [[5, 6, 7], np.array([8], dtype=np.int32), torch.tensor([9, 10])]
    padded, mask = pad_right(rows, value=-1, dtype=torch.long)
    assert padded.dtype == torch.long
    assert padded.tolist() == [[5, 6, 7], [8, -1, -1], [9, 10, -1]]
    assert mask.tolist() == [[True] * 3, [True, False, False], [True, True, False]]
    wide, wide_mask = pad_right([[1.5], []], value=0.0, dtype=torch.float32, width=3)
    assert wide.tolist() == [[1.5, 0.0, 0.0], [0.0, 0.0, 0.0]] and wide.dtype == torch.float32
    assert wide_mask.tolist() == [[True, False, False], [False] * 3]


def test_pad_left_exact_layout():
    padded, mask = pad_left([[5, 6, 7], [8], [9, 10]], value=0, dtype=torch.long)
    assert padded.tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert mask.tolist() == [[True] * 3, [False, False, True], [False, True, True]]


def test_padding_dtype_defaults_to_first_row_and_errors():
    padded, _ = pad_right([np.array([1.25], dtype=np.float32), np.array([2.5, 3.0], dtype=np.float32)])
    assert padded.dtype == torch.float32 and padded.tolist() == [[1.25, 0.0], [2.5, 3.0]]
    with pytest.raises(ValueError, match="empty list"):
        pad_right([])
    with pytest.raises(ValueError, match="one dimension"):
        pad_left([torch.zeros(2, 2)])
    with pytest.raises(ValueError, match="shorter than the longest"):
        pad_right([[1, 2, 3]], width=2)


def test_pad_round_trip_random_ragged():
    g = np.random.default_rng(0)
    rows = [g.integers(0, 100, size=n) for n in (0, 4, 1, 9, 3)]
    for pad, left in ((pad_right, False), (pad_left, True)):
        padded, mask = pad(rows, value=-5)
        assert mask.sum(1).tolist() == [len(r) for r in rows]
        assert (padded[~mask] == -5).all()
        for i, r in enumerate(rows):
            assert padded[i][mask[i]].tolist() == r.tolist()
            if len(r):  # the real entries are contiguous, at the chosen edge
                where = mask[i].nonzero().flatten()
                assert (where[-1] == padded.shape[1] - 1) if left else (where[0] == 0)
