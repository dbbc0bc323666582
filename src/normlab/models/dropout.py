"""Dropout that draws only the dropped positions: the same distribution at a fraction of
the cost when p is small.

``nn.Dropout`` on the CPU draws one random number per unit (``bernoulli_``), divides the
mask by 1 - p and multiplies: three full passes forward and one backward, and the draw is
by far the most expensive (at p = 0.01, 99% of it decides "keep").

Here the dropped units are the points of a Bernoulli(p) process over the units in logical
(row-major, NCHW) order, generated from its gaps: the distances between consecutive
dropped units are i.i.d. Geometric(p) on {1, 2, ...}, so ``cumsum(gaps) - 1`` restricted
to ``[0, n)`` is exactly the set of units a per-unit Bernoulli(p) draw would drop (each
unit dropped independently with probability p; about n·p draws instead of n). The gaps
come from ``Tensor.geometric_`` in float64 on torch's global generator (or the one
passed), so ``torch.manual_seed`` fixes the mask; the positions are in logical order, so
the mask does not depend on the memory format (contiguous or channels-last). The
survivors are scaled by 1 / (1 - p), and the backward zeroes the same positions and
applies the same scale (a custom autograd Function), so the gradient equals that of
``x * mask / (1 - p)``.

On other devices (CUDA) the mask is dense, one Bernoulli(1 - p) draw per unit made on the
device (:func:`dense_drop_`): random numbers there cost about one memory pass, and
positions drawn on the host would need a host-to-device copy per layer and step, which
synchronises the GPU. :func:`draws_positions` says which a device gets; both drop each unit
independently with probability p, and a run's numbers differ between CPU and GPU anyway
(other generators, other kernels).

``SparseDropout(p, inplace=False)`` is a drop-in for ``nn.Dropout`` (same arguments,
identity in eval mode and at p = 0, zeros at p = 1): one full pass forward (the scale) and
one backward. Where a norm precedes the dropout, :mod:`normlab.accel.normdrop` fuses the
two and saves that pass too.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from normlab.eager import eager

__all__ = [
    "SparseDropout", "bernoulli_positions", "bernoulli_positions_many", "dense_drop_",
    "draws_positions", "drop_positions", "sparse_dropout",
]


def draws_positions(device: torch.device) -> bool:
    """Whether dropout on ``device`` draws the dropped positions on the host (the CPU) or a
    dense mask on the device (everything else; see the module)."""
    return device.type == "cpu"


def dense_drop_(x: torch.Tensor, p: float) -> torch.Tensor:
    """Zero each unit of ``x`` in place independently with probability p (no rescaling),
    with a mask drawn on ``x``'s device: no host read, no host-to-device copy."""
    return x.mul_(torch.empty_like(x).bernoulli_(1.0 - p))


def _chunk(n: int, p: float) -> int:
    """How many gaps :func:`bernoulli_positions` draws first for n units: enough to pass n
    with overwhelming probability (more are drawn if not)."""
    mean = n * p
    return int(mean + 8.0 * math.sqrt(mean) + 16)


@eager  # data-dependent sizes and a host read: kept out of compiled graphs
def bernoulli_positions(
    n: int, p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Sorted int64 indices in [0, n) of the points of a Bernoulli(p) process: each index
    is in the result independently with probability p (the gap method, see the module)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    if n <= 0 or p == 0.0:
        return torch.empty(0, dtype=torch.long)
    if p == 1.0:
        return torch.arange(n)
    chunk = _chunk(n, p)
    ends: list[torch.Tensor] = []
    offset = 0.0
    while True:
        gaps = torch.empty(chunk, dtype=torch.float64).geometric_(p, generator=generator)
        # positions = offset + cumsum(gaps) - 1. A uniform draw of exactly 0 gives an
        # infinite gap (probability 2**-53 per gap): "no further point below n".
        pos = gaps.cumsum_(0).add_(offset - 1.0)
        last = float(pos[-1])
        if last >= n:
            ends.append(pos[: int(torch.searchsorted(pos, float(n)))])  # sorted: a cut
            break
        ends.append(pos)
        offset = last + 1.0
    pos = torch.cat(ends) if len(ends) > 1 else ends[0]
    return pos.to(torch.long)


@eager
def bernoulli_positions_many(ns: list[int], p: float) -> list[torch.Tensor]:
    """``[bernoulli_positions(n, p) for n in ns]`` on torch's global generator, bitwise, in
    one draw: the gaps of every call are drawn at once (``geometric_`` draws one number
    after another, so one draw of the summed chunks is the calls' draws in turn) and
    summed per call in numpy (integers in float64: exact, as torch's sums are; an infinite
    gap cuts the same way). Should a call's chunk not pass its n (the rare case in which
    :func:`bernoulli_positions` draws more before the next call's gaps), the generator is
    reset and the calls made one by one. For a network's dropout layers, drawn before its
    forward: about n·p numbers and a few small numpy operations per layer instead of eight
    torch operations."""
    if not 0.0 < p < 1.0 or any(n <= 0 for n in ns):
        return [bernoulli_positions(n, p) for n in ns]
    chunks = [_chunk(n, p) for n in ns]
    generator = torch.default_generator
    state = generator.get_state()
    gaps = torch.empty(sum(chunks), dtype=torch.float64).geometric_(p).numpy()
    out, begin = [], 0
    for n, chunk in zip(ns, chunks, strict=True):
        pos = np.cumsum(gaps[begin : begin + chunk])
        begin += chunk
        pos -= 1.0
        if not pos[-1] >= n:  # this call would have drawn more here: one by one instead
            generator.set_state(state)
            return [bernoulli_positions(n, p) for n in ns]
        out.append(torch.from_numpy(pos[: np.searchsorted(pos, float(n))].astype(np.int64)))
    return out


def _is_dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill a block of storage exactly once, in any dim order."""
    expected = 1
    for stride, size in sorted(
        (st, sz) for sz, st in zip(t.shape, t.stride(), strict=True) if sz != 1
    ):
        if stride != expected:
            return False
        expected *= size
    return True


def _flat_offsets(t: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
    """Storage offsets (relative to ``t``'s first element) of the logical (row-major)
    indices ``positions``; None if ``t`` is not dense and non-overlapping."""
    if t.is_contiguous():
        return positions
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        _, c, h, w = t.shape  # logical i = (n*C + c)*HW + hw -> storage (n*HW + hw)*C + c
        hw_size = h * w
        q = torch.div(positions, hw_size, rounding_mode="floor")
        hw = positions - q * hw_size
        img = torch.div(q, c, rounding_mode="floor")
        return (img * hw_size + hw) * c + (q - img * c)
    if not _is_dense(t):
        return None
    offsets = torch.zeros_like(positions)
    rest = positions
    for size, stride in zip(reversed(t.shape), reversed(t.stride()), strict=True):
        q = torch.div(rest, size, rounding_mode="floor")
        offsets += (rest - q * size) * stride
        rest = q
    return offsets


def _zero_(t: torch.Tensor, positions: torch.Tensor, offsets=None) -> torch.Tensor | None:
    """Zero the units at logical indices ``positions`` of ``t`` in place; returns the
    storage offsets used (None for a tensor that is not dense), for reuse."""
    if positions.numel() == 0:
        return None
    positions = positions.to(t.device)  # drawn on the CPU; a no-op for CPU tensors
    if offsets is None:
        offsets = _flat_offsets(t, positions)
    if offsets is None:
        t[torch.unravel_index(positions, t.shape)] = 0
    else:
        t.as_strided((t.numel(),), (1,)).index_fill_(0, offsets, 0)
    return offsets


class _DropPositions(torch.autograd.Function):
    """y = x * scale with the given positions zeroed; backward: the same on the grad."""

    @staticmethod
    def forward(ctx, x, positions, scale: float, inplace: bool):
        if inplace:
            out = x.mul_(scale) if scale != 1.0 else x
            ctx.mark_dirty(x)
        else:
            out = x * scale if scale != 1.0 else x.clone()
        offsets = _zero_(out, positions)
        ctx.save_for_backward(positions, offsets)
        ctx.layout = (out.shape, out.stride())
        ctx.scale = scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        positions, offsets = ctx.saved_tensors
        grad_in = grad * ctx.scale if ctx.scale != 1.0 else grad.clone()
        if (grad_in.shape, grad_in.stride()) != ctx.layout:
            offsets = None  # another layout: recompute
        _zero_(grad_in, positions, offsets)
        return grad_in, None, None, None


@eager
def drop_positions(
    x: torch.Tensor, positions: torch.Tensor, scale: float = 1.0, inplace: bool = False
) -> torch.Tensor:
    """``x * scale`` with the units at logical indices ``positions`` zeroed; differentiable
    (the backward zeroes the same positions of the gradient and scales it)."""
    return _DropPositions.apply(x, positions, float(scale), inplace)


def sparse_dropout(
    x: torch.Tensor,
    p: float = 0.5,
    training: bool = True,
    inplace: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``F.dropout`` in distribution: each unit zeroed independently with probability p,
    survivors scaled by 1 / (1 - p); the mask drawn by ``bernoulli_positions``."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return x.mul_(0.0) if inplace else x * 0.0
    if not draws_positions(x.device):
        return F.dropout(x, p, True, inplace)  # a dense mask on the device
    positions = bernoulli_positions(x.numel(), p, generator)
    return drop_positions(x, positions, 1.0 / (1.0 - p), inplace)


class SparseDropout(nn.Module):
    """Drop-in for ``nn.Dropout(p, inplace)`` drawing only the dropped positions."""

    def __init__(self, p: float = 0.5, inplace: bool = False) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
        self.p = float(p)
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_dropout(x, self.p, self.training, self.inplace)

    def extra_repr(self) -> str:
        return f"p={self.p}, inplace={self.inplace}"
