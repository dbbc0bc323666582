"""A norm layer and the dropout after it as one module, whose state dict is the norm's.

In a conv block (Conv -> ReLU -> norm -> Dropout) the dropout's 1/(1-p) scale folds into the
norm's affine (``norm(x; w, b) / (1-p)`` is ``norm(x; w/(1-p), b/(1-p))``), and the dropped
positions are zeroed in place in the norm's fresh output (BatchNorm and GroupNorm keep their
input, not their output, for the backward). So dropout costs no full pass forward and one
(the gradient with the same positions zeroed) backward, and the positions are drawn by
:func:`~normlab.models.dropout.bernoulli_positions` (about n·p random numbers instead of n;
on a GPU a dense mask is drawn on the device instead, see :mod:`normlab.models.dropout`).
Where normlab's kernels run the norm (:mod:`normlab.accel.kernels`) they take the positions
too: they zero them as they write the output, and their backward reads the gradient as 0
there, so dropout costs no pass at all, with the same numbers as zeroing copies.
The modules subclass ``nn.BatchNorm2d`` and ``nn.GroupNorm`` and only add ``p`` (and
a folded-in ReLU, :func:`fold_relu`), so a network built with them has the seed's
state-dict keys (a Dropout has none). In eval mode, and at p = 0, each is exactly its norm
(after the ReLU, where it is folded in); with ``eval_kernels`` an evaluation under
``torch.no_grad`` goes through the kernels (:func:`~normlab.accel.kernels.batch_norm_eval`,
the training kernel for GroupNorm), which agree with torch's norms to rounding.
Numerically the folded affine agrees with norm-then-scale to rounding, not bitwise: a run's
config records which draw it used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from normlab.accel import kernels
from normlab.models.dropout import (
    bernoulli_positions,
    dense_drop_,
    draws_positions,
    drop_positions,
)


def dropped_units(x: torch.Tensor, p: float) -> torch.Tensor | None:
    """The units the dropout after the norm zeroes (None at p = 0), for the kernels to zero:
    the same draw from the same generator as :func:`_drop`'s on the CPU."""
    return bernoulli_positions(x.numel(), p) if p else None


def _drop(y: torch.Tensor, p: float) -> torch.Tensor:
    """Dropout on the norm's fresh output, in place, unscaled (the scale is in the affine):
    the dropped positions on the CPU, a dense mask drawn on any other device."""
    if draws_positions(y.device):
        return drop_positions(y, bernoulli_positions(y.numel(), p), 1.0, inplace=True)
    return dense_drop_(y, p)


class BatchNormDropout(nn.BatchNorm2d):
    """``BatchNorm2d(channels)`` followed by dropout(p) (p may be 0).

    With ``relu=True`` the ReLU before the norm is folded in too (the block then holds a
    :class:`FoldedReLU` where the ReLU was), and in training a channels-last CPU input
    goes through normlab's kernel (:mod:`normlab.accel.kernels`): ReLU, statistics,
    normalisation and the dropout's scale in two passes forward and two backward.
    With ``eval_kernels`` too an evaluation under ``torch.no_grad`` of such an input (one
    pass, from the running statistics). Elsewhere (eval mode otherwise, another layout or
    device) it is ``F.relu`` then torch's norm. (:class:`GroupNormDropout` likewise; its
    evaluation is its training forward without the dropout.)
    """

    def __init__(self, channels: int, p: float, relu: bool = False,
                 eval_kernels: bool = False) -> None:
        super().__init__(channels)
        self.p = float(p)
        self.relu = bool(relu)
        self.eval_kernels = bool(eval_kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _in_eval_kernels(self, x):
            return kernels.batch_norm_eval(x, self.weight, self.bias, self.running_mean,
                                           self.running_var, self.eps, relu=True)
        if self.training and self.relu and kernels.applies(x, self.weight):
            return kernels.batch_norm(x, self.weight, self.bias, self.running_mean,
                                      self.running_var, self.count_batch(), self.eps,
                                      scale=1.0 / (1.0 - self.p), relu=True,
                                      drop=dropped_units(x, self.p))
        if self.relu:
            x = F.relu(x)
        if not self.training or self.p == 0.0:
            return super().forward(x)
        s = 1.0 / (1.0 - self.p)
        self.num_batches_tracked.add_(1)  # as _BatchNorm.forward does in training
        y = F.batch_norm(x, self.running_mean, self.running_var, self.weight * s,
                         self.bias * s, True, self.momentum, self.eps)
        return _drop(y, self.p)

    def count_batch(self) -> float:
        """Count a training batch, as ``_BatchNorm.forward`` does; returns the momentum its
        running statistics are updated with."""
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # a cumulative moving average
            return 1.0 / float(self.num_batches_tracked)
        return self.momentum

    def extra_repr(self) -> str:
        return _extra_repr(self, super().extra_repr())


def _in_eval_kernels(norm: BatchNormDropout | GroupNormDropout, x: torch.Tensor) -> bool:
    """Whether an evaluation forward goes through the kernels: eval mode without autograd
    (``torch.no_grad``, as :func:`~normlab.training.engine.evaluate` runs), a folded ReLU,
    ``eval_kernels`` on and an input the kernels take."""
    return (not norm.training and norm.eval_kernels and norm.relu
            and not torch.is_grad_enabled() and kernels.applies(x, norm.weight))


def _extra_repr(norm: BatchNormDropout | GroupNormDropout, base: str) -> str:
    return (f"{base}, p={norm.p}" + (", relu=True" if norm.relu else "")
            + (", eval_kernels=True" if norm.eval_kernels else ""))


class FoldedReLU(nn.Identity):
    """Where a block's ReLU was when the norm after it applies the ReLU itself (a
    :class:`BatchNormDropout` or :class:`GroupNormDropout` with ``relu=True``): the identity,
    holding the ReLU's place so the block's layer indices (and state-dict keys) stay the
    seed's."""

    def extra_repr(self) -> str:
        return "applied by the norm after it"


class GroupNormDropout(nn.GroupNorm):
    """``GroupNorm(groups, channels)`` followed by dropout(p) (normlab's LN and IN too);
    ``relu=True`` as :class:`BatchNormDropout`'s."""

    def __init__(self, groups: int, channels: int, p: float, relu: bool = False,
                 eval_kernels: bool = False) -> None:
        super().__init__(groups, channels)
        self.p = float(p)
        self.relu = bool(relu)
        self.eval_kernels = bool(eval_kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _in_eval_kernels(self, x):
            return kernels.group_norm(x, self.num_groups, self.weight, self.bias, self.eps,
                                      relu=True)
        s = 1.0 / (1.0 - self.p)
        if self.training and self.relu and kernels.applies(x, self.weight):
            return kernels.group_norm(x, self.num_groups, self.weight, self.bias, self.eps,
                                      scale=s, relu=True, drop=dropped_units(x, self.p))
        if self.relu:
            x = F.relu(x)
        if not self.training or self.p == 0.0:
            return super().forward(x)
        y = F.group_norm(x, self.num_groups, self.weight * s, self.bias * s, self.eps)
        return _drop(y, self.p)

    def extra_repr(self) -> str:
        return _extra_repr(self, super().extra_repr())


def fold_relu(layers: list[nn.Module], eval_kernels: bool = False) -> None:
    """In a block ``[Conv, ReLU, norm, ...]`` whose norm is a BatchNorm or a GroupNorm, move
    the ReLU into the norm (in place): the norm becomes its ``...Dropout`` module with
    ``relu=True`` (its dropout, if any, kept) and the ReLU a :class:`FoldedReLU`; with
    ``eval_kernels`` its evaluation goes through the kernels too (under ``torch.no_grad``).
    Any other block is left as it is."""
    if len(layers) < 3 or type(layers[1]) is not nn.ReLU:
        return
    norm = layers[2]
    p = getattr(norm, "p", 0.0)
    if type(norm) in (nn.BatchNorm2d, BatchNormDropout):
        layers[2] = BatchNormDropout(norm.num_features, p, relu=True,
                                     eval_kernels=eval_kernels)
    elif type(norm) in (nn.GroupNorm, GroupNormDropout):
        layers[2] = GroupNormDropout(norm.num_groups, norm.num_channels, p, relu=True,
                                     eval_kernels=eval_kernels)
    else:
        return
    layers[1] = FoldedReLU()


def with_dropout(norm: nn.Module, p: float) -> nn.Module | None:
    """``norm`` (a fresh BatchNorm2d or GroupNorm) fused with the dropout after it, or None
    when it is neither (the caller then appends a separate dropout)."""
    if type(norm) is nn.BatchNorm2d:
        return BatchNormDropout(norm.num_features, p)
    if type(norm) is nn.GroupNorm:
        return GroupNormDropout(norm.num_groups, norm.num_channels, p)
    return None
