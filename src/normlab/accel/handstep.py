"""The seed's network's training step by hand: its forward and backward without autograd,
bitwise autograd's.

A training step of the 5,760-parameter network at batch 64 spends about a third of its time
outside its kernels: building and walking the autograd graph (about 60 nodes), autocast's
dispatch, the module calls, the dropout's per-layer draws (eight small torch operations
each). :class:`HandStep` runs the same computation as a flat list: the forward calls the
same ATen convolutions and normlab's kernels (:mod:`normlab.accel.kernels`) under
``torch.no_grad`` and keeps what each backward needs; the backward calls what autograd's
nodes call (``convolution_backward`` with the same output mask, the kernels' backward,
``avg_pool2d_backward``, ``_log_softmax_backward_data``, ``nll_loss_backward``, the casts
autocast's ``ToCopyBackward`` makes) in reverse order, and sets each parameter's ``.grad``.
The dropout positions of all layers are drawn at once before the forward
(:func:`~normlab.models.dropout.bernoulli_positions_many`: the same numbers from the same
generator). The convolutions run on oneDNN primitives created once per layer and shape
(:mod:`normlab.accel.onednn`: torch's own oneDNN without torch's per-call set-up), each
checked against torch's convolution when created; where that check or anything else
fails, on ``F.conv2d`` and ``convolution_backward``. So the losses, gradients, running
statistics and weights equal autograd's bit for bit (the tests train both ways and
compare; :func:`normlab.accel.prepare` also checks one step of each model against
autograd before taking it).

It walks the network's own stages (:data:`normlab.models.net.STAGES`, what ``Net.forward``
walks) as :func:`normlab.accel.prepare` makes them for the kernels (``kernels="normlab"``):
every block Conv -> :class:`~normlab.accel.normdrop.FoldedReLU` -> a BatchNorm or GroupNorm
(LN, IN) with the ReLU folded in and its dropout fused, the kernels' max pooling, in
training mode, on the CPU, in channels-last, fp32 or bf16 autocast, with no hooks on the
modules or parameters. :meth:`HandStep.build` returns None for anything else (stacked
norms, ``dropout_draw="bernoulli"``, torch's norms, the zoo's and a user's norms, weight
standardization's convolutions, another device; :meth:`HandStep.refusal` says which), which
then trains through autograd. (:func:`normlab.accel.prepare` asks for no step by hand for a
norm whose :class:`~normlab.models.norms.NormSpec` says ``accel=False``.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

from normlab.accel import kernels, onednn
from normlab.accel.normdrop import (
    BatchNormDropout,
    FoldedReLU,
    FusedDropout,
    GroupNormDropout,
    MaxPool2x2,
    dropped_units,
)
from normlab.models.dropout import bernoulli_positions_many
from normlab.models.net import GAP_KERNEL, STAGES, Net

_ATEN = torch.ops.aten  # ops called by overload (``.default``): no overload resolution per call
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks",
                 "_global_backward_hooks", "_global_backward_pre_hooks")
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _hooked(model: nn.Module) -> bool:
    """Whether a hook would see the step: on a module, a parameter, or every module."""
    if any(getattr(_module, name, None) for name in _GLOBAL_HOOKS):
        return True
    if any(getattr(m, name, None) for m in model.modules() for name in _HOOKS):
        return True
    return any(getattr(p, "_backward_hooks", None) or getattr(p, "_post_accumulate_grad_hooks",
                                                              None)
               for p in model.parameters())


def _layer(m: nn.Module) -> str | None:
    """The step's name for a block's layer, or None if it takes no such layer."""
    if type(m) is nn.Conv2d:
        return "conv" if m.bias is None and m.padding_mode == "zeros" else None
    if type(m) is FoldedReLU:
        return "relu"  # applied by the norm after it
    if type(m) is FusedDropout:
        return "dropout"  # applied by the norm before it
    if type(m) is BatchNormDropout and m.relu and m.affine and m.track_running_stats:
        return "bn"
    if type(m) is GroupNormDropout and m.relu and m.affine:
        return "gn"
    return None


class HandStep:
    """``step(x, y) -> (loss, out)``: the forward, ``F.nll_loss(out, y)`` and its backward
    of a :class:`~normlab.models.Net` in training, as

        with autocast: out = model(x).float()
        loss = F.nll_loss(out, y); loss.backward()

    computes them (every parameter's ``.grad`` set to a fresh gradient, whatever it held:
    no ``zero_grad`` is needed; running statistics updated), without autograd. ``out`` and
    ``loss`` hold no graph."""

    def __init__(self, model: Net, plan: list[tuple[str, nn.Module | None]],
                 dtype: torch.dtype, direct_convs: bool = True) -> None:
        self.model = model
        self.plan = plan
        self.dtype = dtype
        self.direct_convs = direct_convs
        # input shape -> each convolution's oneDNN primitives (None: torch's F.conv2d)
        self._layers: dict[torch.Size, list[onednn.Conv | None]] = {}
        self.p = next((m.p for kind, m in plan if kind in ("bn", "gn")), 0.0)
        self._sizes: dict[torch.Size, list[int]] = {}  # input shape -> dropout layers' units
        self._convs = [m for kind, m in plan if kind == "conv"]
        norms = [(kind, m) for kind, m in plan if kind in ("bn", "gn")]
        bns = [m for kind, m in norms if kind == "bn"]
        fixed = all(m.momentum is not None for m in bns)
        self._tracked = [m.num_batches_tracked for m in bns] if fixed else None
        self._momenta = [m.momentum if kind == "bn" else None for kind, m in norms]
        # The convolutions' weights in the autocast dtype, cast in one call per step (the
        # same rounding as autocast's casts, one by one); fp32 uses the weights themselves.
        self._low = ([torch.empty_like(m.weight, dtype=dtype) for m in self._convs]
                     if dtype != torch.float32 else None)
        # Channels-last weights (a 3x3 kernel over 8 channels tells the layouts apart).
        self._channels_last = not model.convblock2[0].weight.is_contiguous()

    @classmethod
    def build(cls, model: nn.Module, precision: str, direct_convs: bool = True
              ) -> HandStep | None:
        """The step for ``model`` trained in ``precision`` ("fp32" or "bf16" autocast), or
        None where it does not apply (:meth:`refusal` says why): autograd then trains it.
        With ``direct_convs`` the convolutions run on primitives kept across steps
        (:mod:`normlab.accel.onednn`) wherever those compute torch's numbers."""
        plan = cls._plan(model, precision)
        if isinstance(plan, str):
            return None
        return cls(model, plan, torch.bfloat16 if precision == "bf16" else torch.float32,
                   direct_convs)

    @classmethod
    def refusal(cls, model: nn.Module, precision: str) -> str | None:
        """Why :meth:`build` returns None for this model, or None where it builds."""
        plan = cls._plan(model, precision)
        return plan if isinstance(plan, str) else None

    @staticmethod
    def _plan(model: nn.Module, precision: str) -> list[tuple[str, nn.Module | None]] | str:
        """The step's layers, walking the network's own stages (:data:`~normlab.models.net.
        STAGES`, what ``Net.forward`` walks), or why it takes no step for this model."""
        if type(model) is not Net or type(model).forward is not Net.forward:
            return "not normlab's Net (the step knows that network's forward only)"
        if not model.training:
            return "the model is in eval mode"
        if precision not in ("fp32", "bf16"):
            return f"precision {precision!r}"
        if _hooked(model):
            return "a hook is registered on the model, a module or a parameter"
        if not all(p.requires_grad and p.device.type == "cpu" for p in model.parameters()):
            return "a parameter is frozen or not on the CPU"
        plan: list[tuple[str, nn.Module | None]] = []
        for name in STAGES:
            stage = getattr(model, name)
            if name == "pool1":
                if type(stage) is not MaxPool2x2:
                    return "the max pooling is torch's (kernels off)"
                plan.append(("pool", None))
                continue
            if name == "gap":
                if (type(stage) is not nn.AvgPool2d or stage.kernel_size != GAP_KERNEL
                        or stage.padding != 0 or stage.ceil_mode or not stage.count_include_pad
                        or stage.divisor_override or stage.stride != GAP_KERNEL):
                    return "the average pooling is not the seed's"
                plan.append(("gap", None))
                continue
            conv = stage[0] if len(stage) else None
            if isinstance(conv, nn.Conv2d) and type(conv) is not nn.Conv2d:
                return (f"{name}'s convolution is {type(conv).__name__}, not nn.Conv2d "
                        f"(weight standardization and other convolutions train through "
                        f"autograd)")
            kinds = [_layer(m) for m in stage]
            if None in kinds or kinds[:1] != ["conv"] or kinds.count("conv") != 1:
                odd = next((m for m, k in zip(stage, kinds, strict=True) if k is None), stage)
                return (f"{name} holds a layer the step does not take: "
                        f"{type(odd).__name__} (stacked norms, torch's norms, no norm, "
                        f"nn.Dropout or a norm without affine or running statistics train "
                        f"through autograd)")
            if len(kinds) > 1 and (kinds[1:3] not in (["relu", "bn"], ["relu", "gn"])
                                   or kinds[3:] not in ([], ["dropout"])):
                return f"{name}'s layers are not Conv -> ReLU -> one norm (-> dropout)"
            plan += [(k, m) for k, m in zip(kinds, stage, strict=True)
                     if k not in ("relu", "dropout")]
        ps = {m.p for kind, m in plan if kind in ("bn", "gn")}
        if len(ps) > 1:
            return "the blocks' dropout probabilities differ"
        return plan

    def applies(self, x: torch.Tensor) -> bool:
        """Whether the step takes this input: a 4-d fp32 CPU tensor in channels-last (the
        layout the kernels need all the way through), the model's weights in it when the
        step was built (the engine builds one per epoch)."""
        return (self._channels_last and x.device.type == "cpu" and x.dim() == 4
                and x.dtype == torch.float32
                and x.is_contiguous(memory_format=torch.channels_last))

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return self._step(x, y)

    def _count_batches(self) -> list[float | None]:
        """Count a batch in every BatchNorm (one foreach add, as each module's
        ``count_batch`` would); the momenta they update their running statistics with, in
        the plan's order of the norms (None for a GroupNorm)."""
        if self._tracked is None:  # a cumulative average somewhere: the modules' own way
            return [m.count_batch() if kind == "bn" else None for kind, m in self.plan
                    if kind in ("bn", "gn")]
        if self._tracked:
            torch._foreach_add_(self._tracked, 1)
        return self._momenta

    def _drops(self, shape: torch.Size) -> list[torch.Tensor] | None:
        """Every dropout layer's positions for an input of this shape, drawn at once; None
        at p = 0, and the first time a shape is seen: the layers then draw theirs one by
        one (:func:`~normlab.accel.normdrop.dropped_units`, as the modules do) and their
        sizes are kept for the next time."""
        sizes = self._sizes.get(shape)
        if sizes is None or not self.p:
            return None
        return bernoulli_positions_many(sizes, self.p)

    def _step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = self.dtype
        new_shape = x.shape not in self._sizes  # layers' inputs checked once per shape
        drops = self._drops(x.shape)
        momenta = self._count_batches()
        sizes: list[int] = []
        tape: list[tuple] = []
        h = x.to(dtype)  # autocast's cast of the input (a no-op in fp32)
        weights = [m.weight for m in self._convs]
        if self._low is not None:
            torch._foreach_copy_(self._low, weights)
            weights = self._low
        convs = iter(weights)
        known = self._layers.get(x.shape)
        direct = iter(known) if known is not None else None
        made: list[onednn.Conv | None] = []  # the first time a shape comes
        for kind, m in self.plan:
            if kind == "conv":
                w = next(convs)
                if direct is not None:
                    layer = next(direct)
                else:  # created and checked against torch
                    layer = (onednn.conv(h, w, m.stride, m.padding, m.dilation, m.groups,
                                         bool(tape)) if self.direct_convs else None)
                    made.append(layer)
                tape.append((kind, m, h, w, not tape, layer))
                h = (layer.forward(h, w) if layer is not None else
                     F.conv2d(h, w, None, m.stride, m.padding, m.dilation, m.groups))
            elif kind in ("bn", "gn"):
                if new_shape and not kernels.applies(h, m.weight):
                    raise RuntimeError(f"HandStep: the kernels do not take {m}'s input "
                                       f"{tuple(h.shape)} {h.dtype} (a bug: build() checks)")
                i = len(sizes)
                drop = drops[i] if drops is not None else dropped_units(h, m.p)
                sizes.append(h.numel())
                drop = kernels.no_drop() if drop is None else drop
                scale = 1.0 / (1.0 - m.p)
                if kind == "bn":
                    y_, saved = kernels.bn_forward(h, m.weight, m.bias, m.running_mean,
                                                   m.running_var, momenta[i], m.eps, scale,
                                                   True, drop)
                else:
                    y_, saved = kernels.gn_forward(h, m.num_groups, m.weight, m.bias, m.eps,
                                                   scale, True, drop)
                tape.append((kind, m, h, saved, drop, scale))
                h = y_
            elif kind == "pool":
                out, picks = kernels.pool_forward(h)
                tape.append((kind, None, h.shape, picks))
                h = out
            elif kind == "gap":
                tape.append((kind, None, h))
                h = F.avg_pool2d(h, GAP_KERNEL)
        self._sizes.setdefault(x.shape, sizes)
        self._layers.setdefault(x.shape, made)
        logits = h
        low = torch.log_softmax(logits.flatten(1), -1)  # autocast runs it in bf16 on a CPU
        out = low.float()
        loss, total_weight = _ATEN.nll_loss_forward.default(out, y, None, 1, -100)
        # The backward, node by node as autograd runs it.
        g = _ATEN.nll_loss_backward.default(torch.ones_like(loss), out, y, None, 1, -100,
                                             total_weight)
        g = _ATEN._log_softmax_backward_data.default(g.to(dtype), low, 1, dtype)
        g = g.view(logits.shape)
        for kind, m, *saved in reversed(tape):
            if kind == "conv":
                h, w, first, layer = saved
                if layer is not None:
                    g, m.weight.grad = layer.backward(g, h, w, not first)
                    continue
                g, gw, _ = _ATEN.convolution_backward.default(
                    g, h, w, None, m.stride, m.padding, m.dilation, False, [0, 0], m.groups,
                    [not first, True, False])
                m.weight.grad = gw.float()
            elif kind in ("bn", "gn"):
                h, stats, drop, scale = saved
                if kind == "bn":
                    g, gw, gb = kernels.bn_backward(h, m.weight, stats, drop, g, scale, True)
                else:
                    g, gw, gb = kernels.gn_backward(h, m.num_groups, m.weight, stats, drop, g,
                                                    scale, True)
                m.weight.grad, m.bias.grad = gw, gb
            elif kind == "pool":
                shape, picks = saved
                g = kernels.pool_backward(picks, g, shape, dtype)
            elif kind == "gap":
                (h,) = saved
                g = _ATEN.avg_pool2d_backward.default(g, h, [GAP_KERNEL] * 2,
                                                       [GAP_KERNEL] * 2, [0, 0], False, True,
                                                       None)
        return loss, out
