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
a folded-in ReLU): :func:`fuse_block` swaps them in for a plain block's norm, sharing its
parameters and buffers and keeping every setting (or leaving the block as it is), with
:class:`FusedDropout` and :class:`FoldedReLU` holding the dropout's and the ReLU's places,
so the network keeps the seed's state-dict keys. In eval mode, and at p = 0, each is
exactly its norm (after the ReLU, where it is folded in); with ``eval_kernels`` an evaluation under
``torch.no_grad`` goes through the kernels (:func:`~normlab.accel.kernels.batch_norm_eval`,
the training kernel for GroupNorm), which agree with torch's norms to rounding.
Numerically the folded affine agrees with norm-then-scale to rounding, not bitwise: a run's
config.json records the paths it took (:func:`normlab.accel.prepare`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from normlab.accel import kernels
from normlab.models.dropout import (
    SparseDropout,
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
                 eval_kernels: bool = False, **settings) -> None:
        super().__init__(channels, **settings)
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
                 eval_kernels: bool = False, **settings) -> None:
        super().__init__(groups, channels, **settings)
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


class FusedDropout(nn.Identity):
    """Where a block's dropout was when the norm before it applies it (a
    :class:`BatchNormDropout` or :class:`GroupNormDropout` with ``p``): the identity,
    holding the dropout's place in the block."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = float(p)

    def extra_repr(self) -> str:
        return f"p={self.p}, applied by the norm before it"


class MaxPool2x2(nn.MaxPool2d):
    """``nn.MaxPool2d(2, 2)`` by normlab's kernel where it applies (a channels-last CPU
    tensor: :func:`~normlab.accel.kernels.max_pool_2x2`), torch's elsewhere: the same
    numbers either way, the kernel's in one pass with a byte per output kept for the
    backward."""

    def __init__(self) -> None:
        super().__init__(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.pool_applies(x):
            return kernels.max_pool_2x2(x)
        return super().forward(x)


# Attributes a swapped module adds to the module it replaces; every other one must be equal.
_ADDED = {"p", "relu", "eval_kernels"}
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
          "_state_dict_hooks", "_load_state_dict_pre_hooks")


def _plain_settings(m: nn.Module) -> dict:
    return {k: v for k, v in vars(m).items()
            if not k.startswith("_") and k not in _ADDED and k != "training"}


def _swappable(m: nn.Module) -> bool:
    """Whether ``m`` can be replaced at all: no hooks (a swap would drop them)."""
    return not any(getattr(m, name, None) for name in _HOOKS)


def _fused_norm(norm: nn.Module, p: float, relu: bool, eval_kernels: bool
                ) -> nn.Module | None:
    """``norm`` (exactly an ``nn.BatchNorm2d`` or ``nn.GroupNorm``, or an earlier fused
    one) as its fused module, sharing its parameters and buffers and with every setting
    the same (eps, momentum, ...); None where it cannot be (no affine or no running
    statistics: the fused modules fold the dropout's scale into the affine; a hook; another
    class, whose forward may differ)."""
    if not _swappable(norm) or not getattr(norm, "affine", False):
        return None
    relu = relu or getattr(norm, "relu", False)
    if type(norm) in (nn.BatchNorm2d, BatchNormDropout):
        if not norm.track_running_stats:
            return None
        new = BatchNormDropout(norm.num_features, p, relu=relu, eval_kernels=eval_kernels,
                               eps=norm.eps, momentum=norm.momentum)
        buffers = ("running_mean", "running_var", "num_batches_tracked")
    elif type(norm) in (nn.GroupNorm, GroupNormDropout):
        new = GroupNormDropout(norm.num_groups, norm.num_channels, p, relu=relu,
                               eval_kernels=eval_kernels, eps=norm.eps)
        buffers = ()
    else:
        return None
    new.weight, new.bias = norm.weight, norm.bias  # the same Parameters: optimizers keep them
    for name in buffers:
        setattr(new, name, getattr(norm, name))
    new.train(norm.training)
    if _plain_settings(new) != _plain_settings(norm):  # a setting this swap does not know
        return None
    return new


def fuse_block(block: nn.Sequential, kernels_on: bool, eval_kernels: bool) -> str:
    """Fuse a conv block ``[Conv, ReLU, norm(s)..., dropout]`` in place (the layers keep
    their indices, so the state-dict keys stay the seed's): a :class:`SparseDropout` after
    a BatchNorm or GroupNorm into that norm (its scale folded into the affine, its
    positions zeroed in the norm's output), and with ``kernels_on`` the ReLU into the first
    norm (normlab's C kernels then compute ReLU -> norm -> dropout). Returns what was done
    or why not, in a few words."""
    layers = list(block)
    done = []
    if len(layers) >= 3 and type(layers[-1]) is SparseDropout and layers[-1].p > 0:
        fused = _fused_norm(layers[-2], layers[-1].p, False, False)
        if fused is not None:
            layers[-2], layers[-1] = fused, FusedDropout(layers[-1].p)
            done.append("dropout fused")
    if kernels_on and len(layers) >= 3 and type(layers[1]) is nn.ReLU and _swappable(layers[1]):
        fused = _fused_norm(layers[2], getattr(layers[2], "p", 0.0), True, eval_kernels)
        if fused is not None:
            layers[1], layers[2] = FoldedReLU(), fused
            done.append("ReLU folded")
    for i, layer in enumerate(layers):
        if block[i] is not layer:
            block[i] = layer
    return ", ".join(done) or "as it is"


def fold_pool(model: nn.Module, name: str) -> bool:
    """Replace ``model.<name>``, an ``nn.MaxPool2d(2, 2)`` with torch's defaults otherwise,
    by :class:`MaxPool2x2` (the same numbers); whether it did."""
    pool = getattr(model, name)
    if type(pool) is not nn.MaxPool2d or not _swappable(pool):
        return False
    new = MaxPool2x2()
    if _plain_settings(new) != _plain_settings(pool):
        return False
    new.train(pool.training)
    setattr(model, name, new)
    return True
