"""Padded-tensor helpers shared by the generator and the learner.

Conventions:

- A *mask* is a tensor of the same shape as the data, ``bool`` or numeric; a
  non-zero entry (``True`` / ``1``) marks a real entry, zero marks padding.
- Padded entries may hold garbage (NaN, inf, 1e30). Every reduction here
  replaces them with a constant through ``torch.where`` *before* any arithmetic
  (multiplying by the mask would not do: ``NaN * 0 == NaN``), so garbage never
  reaches a value or a gradient, and the gradient reaching a padded entry is
  exactly 0.
- Statistics are over real entries only; the variance is the *population*
  variance (divide by the count). A reduction over no real entry gives 0.
- Ragged sequences become ``[B, L]`` tensors with :func:`pad_right` (real
  entries first: the learner's layout) or :func:`pad_left` (real entries last:
  what batched generation with a KV cache needs).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "bool_mask",
    "check_right_padded",
    "fill_padding",
    "linear_fp32",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "pad_left",
    "pad_right",
]


def bool_mask(mask: Tensor, shape: torch.Size | tuple[int, ...] | None = None, *, name: str = "mask") -> Tensor:
    """``mask`` as a bool tensor (non-zero = real), after checking its shape.

    Args:
        mask: bool or numeric tensor.
        shape: the shape ``mask`` must have, or ``None`` for any.
        name: used in the error message.

    Returns:
        A bool tensor of the same shape (``mask`` itself when already bool).

    Raises:
        ValueError: ``shape`` is given and ``mask`` has another shape.
    """
    if shape is not None and tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {tuple(shape)}")
    return mask if mask.dtype == torch.bool else mask != 0


def check_right_padded(mask: Tensor) -> None:
    """Raise unless every row of the ``[B, T]`` mask is real entries then padding (1...10...0).

    Raises:
        ValueError: a real entry follows a padded one in some row.
    """
    m = bool_mask(mask)
    if m.dim() == 2 and m.shape[1] > 1 and bool((m[:, 1:] & ~m[:, :-1]).any()):
        raise ValueError(
            "mask must be right-padded (each row: real tokens first, then padding); "
            "found a real token after a padded one"
        )


def fill_padding(x: Tensor, mask: Tensor, value: float = 0.0) -> Tensor:
    """``x`` with padded entries replaced by ``value`` (their gradient is exactly 0).

    Args:
        x: any tensor.
        mask: same shape (or broadcastable to it), bool or numeric, non-zero = real.
        value: the constant put in padded entries.

    Returns:
        A new tensor, dtype and shape of ``x``.
    """
    m = bool_mask(mask)
    return torch.where(m, x, torch.as_tensor(value, dtype=x.dtype, device=x.device))


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of the real entries of ``x`` (over everything, or over ``dim``).

    Raises:
        ValueError: ``mask`` does not have the shape of ``x``.
    """
    xs = fill_padding(x, bool_mask(mask, x.shape))
    return xs.sum() if dim is None else xs.sum(dim=dim)


def _count(m: Tensor, dim: int | None, dtype: torch.dtype) -> Tensor:
    n = m.sum() if dim is None else m.sum(dim=dim)
    return n.clamp(min=1).to(dtype)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Masked mean ``sum(x over real) / max(count(real), 1)``.

    Args:
        x: float tensor, typically ``[B, T]``.
        mask: same shape, bool or numeric, non-zero = real.
        dim: ``None`` reduces over every entry (a 0-d result: the batch-wide token
            mean); an ``int`` reduces over that dimension (``dim=1`` of ``[B, T]``
            gives per-row means ``[B]``).

    Returns:
        The mean, dtype of ``x``; 0 where no entry is real. Differentiable.

    Raises:
        ValueError: ``mask`` does not have the shape of ``x``.
    """
    m = bool_mask(mask, x.shape)
    return masked_sum(x, m, dim) / _count(m, dim, x.dtype)


def masked_var(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Masked population variance ``mean((x - mean)^2)`` over real entries.

    Args:
        x, mask, dim: as :func:`masked_mean`.

    Returns:
        The variance, dtype of ``x``; 0 where no entry is real. Differentiable.

    Raises:
        ValueError: ``mask`` does not have the shape of ``x``.
    """
    m = bool_mask(mask, x.shape)
    mean = masked_mean(x, m, dim)
    centred = fill_padding(x - (mean if dim is None else mean.unsqueeze(dim)), m)
    return masked_mean(centred * centred, m, dim)


def masked_whiten(x: Tensor, mask: Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Masked whitening ``(x - mean) / sqrt(var + eps)`` over all real entries (the
    advantage normalisation of PPO implementations: CleanRL ``norm_adv``, TRL
    ``masked_whiten``).

    Args:
        x: float tensor (any shape).
        mask: same shape, bool or numeric, non-zero = real.
        shift_mean: subtract the mean (True) or add it back, scaling only (False).
        eps: added to the variance.

    Returns:
        Same shape and dtype as ``x``, 0 at padded entries (all zeros when no entry
        is real). Differentiable.

    Raises:
        ValueError: ``mask`` does not have the shape of ``x``.
    """
    m = bool_mask(mask, x.shape)
    mean = masked_mean(x, m)
    var = masked_var(x, m)
    out = fill_padding(x - mean, m) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return fill_padding(out, m)


def linear_fp32(layer: torch.nn.Module, x: Tensor) -> Tensor:
    """``layer(x)`` computed in float32 whatever autocast is active: the output projection
    to the vocabulary and the value heads, whose outputs become log-probs, ratios and value
    targets. Under bf16 autocast a ``Linear`` multiplies in bf16 (8 mantissa bits) before
    any later ``.float()``: on SmolLM2 that moved per-token log-probs by 0.03 nats on
    average, 0.15 at most. The body of the model may stay in bf16; only this layer is
    upcast (input and weights), and gradients flow to the layer's float32 weights as usual.

    Args:
        layer: an ``nn.Linear`` (any other module is called on the float32 input with
            autocast off, so it runs in its parameters' dtype).
        x: ``[..., in_features]`` float tensor of any float dtype.

    Returns:
        ``[..., out_features]`` float32.
    """
    with torch.autocast(x.device.type, enabled=False):
        if isinstance(layer, torch.nn.Linear):
            bias = layer.bias.float() if layer.bias is not None else None
            return torch.nn.functional.linear(x.float(), layer.weight.float(), bias)
        return layer(x.float()).float()


Row = Sequence[float] | Sequence[int] | np.ndarray | Tensor


def _pad(
    rows: Sequence[Row], value: float, dtype: torch.dtype | None, width: int | None, left: bool
) -> tuple[Tensor, Tensor]:
    if not rows:
        raise ValueError("cannot pad an empty list of sequences")
    tensors = [r if isinstance(r, Tensor) else torch.as_tensor(np.asarray(r)) for r in rows]
    for i, t in enumerate(tensors):
        if t.dim() != 1:
            raise ValueError(f"sequence {i} has shape {tuple(t.shape)}; expected one dimension")
    lengths = torch.tensor([t.numel() for t in tensors])
    longest = int(lengths.max())
    width = longest if width is None else width
    if width < longest:
        raise ValueError(f"width {width} is shorter than the longest sequence ({longest})")
    dtype = dtype if dtype is not None else tensors[0].dtype
    out = torch.full((len(tensors), width), value, dtype=dtype)
    cat = torch.cat([t.to(dtype) for t in tensors])
    columns = torch.arange(width).unsqueeze(0)
    if left:
        mask = columns >= (width - lengths).unsqueeze(1)
    else:
        mask = columns < lengths.unsqueeze(1)
    out[mask] = cat  # boolean indexing fills row by row, in order
    return out, mask


def pad_right(
    rows: Sequence[Row], *, value: float = 0, dtype: torch.dtype | None = None, width: int | None = None
) -> tuple[Tensor, Tensor]:
    """Stack ragged 1-D sequences into ``[B, L]``, real entries first.

    Args:
        rows: B sequences (lists, numpy arrays or 1-D tensors), any lengths >= 0.
        value: the padding value.
        dtype: of the result (default: the first row's dtype).
        width: ``L`` (default: the longest row).

    Returns:
        ``(padded, mask)``: ``padded`` ``[B, L]`` on the CPU, row b holds
        ``rows[b]`` at positions ``0 .. len-1``; ``mask`` ``[B, L]`` bool, True on
        those positions.

    Raises:
        ValueError: no rows; a row that is not 1-D; ``width`` below the longest row.
    """
    return _pad(rows, value, dtype, width, left=False)


def pad_left(
    rows: Sequence[Row], *, value: float = 0, dtype: torch.dtype | None = None, width: int | None = None
) -> tuple[Tensor, Tensor]:
    """Stack ragged 1-D sequences into ``[B, L]``, real entries last (left padding, so
    batched generation continues every row from the right edge).

    Args and errors as :func:`pad_right`; row b holds ``rows[b]`` at positions
    ``L - len .. L - 1`` and ``mask`` is True there.
    """
    return _pad(rows, value, dtype, width, left=True)
