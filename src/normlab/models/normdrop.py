"""A norm layer and the dropout after it as one module, whose state dict is the norm's.

In a conv block (Conv -> ReLU -> norm -> Dropout) the dropout's 1/(1-p) scale folds into the
norm's affine (``norm(x; w, b) / (1-p)`` is ``norm(x; w/(1-p), b/(1-p))``), and the dropped
positions are zeroed in place in the norm's fresh output (BatchNorm and GroupNorm keep their
input, not their output, for the backward). So dropout costs no full pass forward and one
(the gradient with the same positions zeroed) backward, and the positions are drawn by
:func:`~normlab.models.dropout.bernoulli_positions` (about n·p random numbers instead of n;
on a GPU a dense mask is drawn on the device instead, see :mod:`normlab.models.dropout`).
The modules subclass ``nn.BatchNorm2d`` and ``nn.GroupNorm`` and only add ``p``, so a
network built with them has the seed's state-dict keys (a Dropout has none). In eval mode,
and at p = 0, each is exactly its norm. Numerically the folded affine agrees with norm-then-
scale to rounding, not bitwise: a run's config records which draw it used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from normlab.models.dropout import (
    bernoulli_positions,
    dense_drop_,
    draws_positions,
    drop_positions,
)


def _drop(y: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout on the norm's fresh output, in place, unscaled (the scale is in the affine):
    the dropped positions on the CPU, a dense mask drawn on any other device."""
    if draws_positions(y.device):
        return drop_positions(y, bernoulli_positions(y.numel(), p), 1.0, inplace=True)
    return dense_drop_(y, p)


class BatchNormDropout(nn.BatchNorm2d):
    """``BatchNorm2d(channels)`` followed by dropout(p)."""

    def __init__(self, channels: int, p: float) -> None:
        super().__init__(channels)
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return super().forward(x)
        s = 1.0 / (1.0 - self.p)
        self.num_batches_tracked.add_(1)  # as _BatchNorm.forward does in training
        y = F.batch_norm(x, self.running_mean, self.running_var, self.weight * s,
                         self.bias * s, True, self.momentum, self.eps)
        return _drop(y, self.p)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}"


class GroupNormDropout(nn.GroupNorm):
    """``GroupNorm(groups, channels)`` followed by dropout(p) (normlab's LN and IN too)."""

    def __init__(self, groups: int, channels: int, p: float) -> None:
        super().__init__(groups, channels)
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return super().forward(x)
        s = 1.0 / (1.0 - self.p)
        y = F.group_norm(x, self.num_groups, self.weight * s, self.bias * s, self.eps)
        return _drop(y, self.p)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}"


def with_dropout(norm: nn.Module, p: float) -> nn.Module | None:
    """``norm`` (a fresh BatchNorm2d or GroupNorm) fused with the dropout after it, or None
    when it is neither (the caller then appends a separate dropout)."""
    if type(norm) is nn.BatchNorm2d:
        return BatchNormDropout(norm.num_features, p)
    if type(norm) is nn.GroupNorm:
        return GroupNormDropout(norm.num_groups, norm.num_channels, p)
    return None
