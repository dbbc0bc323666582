"""Acceleration behind one seam: what makes a training step fast without changing what the
model means.

:mod:`normlab.models` is plain PyTorch (``Net``: Conv -> ReLU -> norm -> dropout blocks,
``nn.MaxPool2d``, ``F.log_softmax``). The engine asks :func:`prepare` for its training step
and gets a :class:`Step` that:

- swaps, in place, each block's norm and the dropout after it for one fused module and, with
  ``kernels="normlab"``, folds the ReLU into it so normlab's C kernels compute ReLU -> norm
  -> dropout (:mod:`normlab.accel.normdrop`, :mod:`normlab.accel.kernels`). A swapped
  module shares the parameters and buffers of the one it replaces and keeps every setting,
  or the block stays as it is. The fused modules agree with the plain ones to rounding:
  ``ModelConfig.kernels`` and ``dropout_draw`` are part of a run's config, as always;
- trains the network by hand where it can (:class:`~normlab.accel.handstep.HandStep`: its
  forward and backward without autograd, convolutions on oneDNN primitives kept across
  steps, :mod:`normlab.accel.onednn`), after one step of it has been checked against
  autograd bit for bit on this model; elsewhere through autograd;
- runs the test pass's forward in chunks of :data:`EVAL_CHUNK` images where that was
  checked to give the whole batch's logits bit for bit (:meth:`Step.infer`: a batch of
  1,000 images overflows a CPU's caches; chunks of 250 take 0.56 of its time on a forced
  AVX2 host);
- records which paths it took (:meth:`Step.paths`, written into the run's config.json).

``RunConfig.accel = "off"`` (``--accel off``) leaves the model plain and trains it through
autograd with torch's norms. :func:`report` says, for this host, what each path would be
and why (``normlab info``). The hand step and the fused modules know the seed's network;
every other network (:mod:`normlab.models.nets`) trains through autograd, and its paths
say so.

This package reads :mod:`normlab.models` and nothing of :mod:`normlab.training`, which
calls it (the precision a run defaults to is decided here, from what the CPU computes).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from normlab.models.config import ModelConfig
from normlab.models.net import STAGES

ACCEL = ("on", "off")
EVAL_CHUNK = 250  # images per forward in a CPU test pass (benchmarks/eval_chunks.py)
# fp32, or bf16 autocast (AMX / AVX512-BF16 CPUs, recent GPUs): convolutions in bfloat16,
# the loss, the norms' statistics and the weights in float32.
PRECISIONS = ("fp32", "bf16")
# oneDNN's ISA caps (ONEDNN_MAX_CPU_ISA) below which it computes no bf16 natively
_NO_BF16_ISAS = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI")


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX or AVX512-BF16), where oneDNN's bf16
    convolutions are fast; elsewhere bf16 is emulated and slower than fp32. A cap set by
    ``ONEDNN_MAX_CPU_ISA`` below AVX512-BF16 counts as the CPU (the dispatch another host
    gets, forced on this one)."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in _NO_BF16_ISAS:
        return False
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch >= 2.2
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def default_precision() -> str:
    """bf16 autocast on a CPU that computes bf16 natively (an s6 epoch about 1.3x faster,
    the same 20-epoch accuracy within seed-to-seed noise for BN, GN and LN:
    benchmarks/README.md), else fp32. A config stores the precision it resolved to, so a
    run resumes, and is compared, in the precision it started with."""
    return "bf16" if native_bf16() else "fp32"


def autocast(device: torch.device, precision: str):
    """The forward pass's precision: bf16 autocast, or (fp32) nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def autograd_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference step: the forward under autocast, ``F.nll_loss`` and its backward
    (every parameter's ``.grad`` set afresh). Returns ``(loss, out)``."""
    with autocast(x.device, precision):
        out = model(x)
    loss = F.nll_loss(out.float(), y)
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss, out


def left_to_autograd(config: ModelConfig) -> str | None:
    """Why ``config``'s model trains through autograd whatever this host has (None: the
    step by hand may take it): a network other than the seed's (named), a norm whose
    :class:`~normlab.models.norms.NormSpec` says ``accel=False`` (named), or weight
    standardization's convolutions."""
    from normlab.models.norms import norm_spec

    if config.net != "seed":
        return (f"net {config.net!r} trains through autograd (the step by hand and the "
                "fused modules take the seed's network only)")
    refused = [name for name in config.norms if not norm_spec(name).accel]
    if refused == ["none"]:
        return "norm 'none': the step by hand takes blocks with one norm (BN, LN, GN, IN) only"
    if refused:
        names = ", ".join(repr(n) for n in refused if n != "none")
        return (f"norm {names} is left to autograd (its NormSpec has accel=False: the step "
                f"by hand and the fused modules take BN, LN, GN and IN only)")
    if config.weight_std:
        return ("weight standardization (weight_std): the convolutions are StdConv2d, not "
                "nn.Conv2d, and are left to autograd")
    return None


def accelerate(model: nn.Module, config: ModelConfig) -> dict[str, str]:
    """Swap ``model``'s modules, in place, for the fused ones ``config`` asks for (see the
    module); returns what was done to each block (or why not), by stage name. The blocks
    of a norm whose spec has ``accel=False`` are left as they are."""
    from normlab.accel.normdrop import fold_pool, fuse_block
    from normlab.models.norms import norm_spec

    if config.net != "seed":
        return {}  # the fused modules know the seed's blocks only
    kernels_on = config.kernels == "normlab"
    refused = [name for name in config.norms if not norm_spec(name).accel and name != "none"]
    done: dict[str, str] = {}
    for name in STAGES:
        stage = getattr(model, name, None)
        if isinstance(stage, nn.Sequential):
            if refused and len(stage) > 1:  # a conv block (a transition is one conv)
                done[name] = f"as it is (norm {', '.join(map(repr, refused))}: accel=False)"
            else:
                done[name] = fuse_block(stage, kernels_on, config.eval_kernels == "normlab")
        elif name == "pool1" and kernels_on and stage is not None:
            done[name] = "normlab kernel" if fold_pool(model, name) else "torch's"
    return done


def accelerated_net(config: ModelConfig) -> nn.Module:
    """``config``'s network with the modules :func:`accelerate` swaps in."""
    from normlab.models import build_model

    model = build_model(config)
    accelerate(model, config)
    return model


@dataclass
class Step:
    """``step(x, y) -> (loss, out)``: one training step of ``model`` (the forward, the NLL
    loss, the backward; every parameter's ``.grad`` set), by hand where :attr:`hand` takes
    the input, else through autograd. The optimizer's step is the caller's."""

    model: nn.Module
    precision: str
    accel: str = "on"
    hand: object | None = None  # a HandStep
    why_autograd: str | None = None
    blocks: dict[str, str] = field(default_factory=dict)
    hand_steps: int = 0
    autograd_steps: int = 0
    eval_chunks: dict = field(default_factory=dict)  # input shape -> chunk size, or 0: whole
    compiled: nn.Module | None = None  # the model under torch.compile (accel.compiled)
    compile: str = "off"  # what the run's config asked for
    compile_failed: str | None = None  # why the compiled step was given up
    compiled_steps: int = 0
    _compiled_ran: set = field(default_factory=set)  # (shape, training) it has run

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.hand is not None and self.hand.applies(x):
            self.hand_steps += 1
            return self.hand(x, y)
        if self.compiled is not None:
            done = self._try_compiled(
                x, lambda: autograd_step(self.compiled, x, y, self.precision))
            if done is not None:
                self.compiled_steps += 1
                return done
        self.autograd_steps += 1
        return autograd_step(self.model, x, y, self.precision)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """The evaluation forward: compiled where the step is, else the model."""
        if self.compiled is not None:
            out = self._try_compiled(x, lambda: self.compiled(x))
            if out is not None:
                return out
        return self.model(x)

    def _try_compiled(self, x: torch.Tensor, run):
        """``run()`` with the compiled model; the first time for each input shape and mode
        (when it compiles) the model's gradients, buffers and the random generator are
        kept, and a failure restores them, gives the compiled model up (the run's paths
        say why) and returns None."""
        key = (tuple(x.shape), self.model.training)
        if key in self._compiled_ran:
            return run()
        restore = _keep(self.model)
        try:
            result = run()
        except Exception as err:  # a compilation that fails: autograd from here on
            restore()
            self.compiled = None
            first = (str(err).strip().splitlines() or [""])[0][:300]
            self.compile_failed = f"{type(err).__name__}: {first}"
            return None
        self._compiled_ran.add(key)
        return result

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """The model's forward for evaluation (the caller sets eval mode, no-grad and
        autocast), in chunks of :data:`EVAL_CHUNK` images on a CPU. The first batch of
        each shape goes through both ways, and chunks are used for that shape only if they
        gave the whole batch's output bit for bit (each image's logits must not depend on
        the images beside it: true of the seed's network in eval mode where every kernel
        computes an image alike in any batch, checked rather than assumed)."""
        forward = self._forward
        if self.accel != "on" or x.device.type != "cpu" or len(x) <= EVAL_CHUNK:
            return forward(x)
        chunk = self.eval_chunks.get(x.shape)
        if chunk is None:
            whole = forward(x)
            parts = torch.cat([forward(part) for part in x.split(EVAL_CHUNK)])
            self.eval_chunks[x.shape] = EVAL_CHUNK if torch.equal(whole, parts) else 0
            return whole
        if chunk == 0:
            return forward(x)
        return torch.cat([forward(part) for part in x.split(chunk)])

    def paths(self) -> dict:
        """The paths the steps so far took, for config.json: the step (hand or autograd,
        with counts and why autograd), each input shape's convolutions on kept oneDNN
        primitives (``"7/7"``), the blocks' norms (normlab's kernels or torch's), the
        precision."""
        from normlab.accel.normdrop import BatchNormDropout, GroupNormDropout

        counts = {"hand": self.hand_steps, "compiled": self.compiled_steps,
                  "autograd": self.autograd_steps}
        step = "+".join(name for name, n in counts.items() if n) or "none yet"
        norms = [m for m in self.model.modules() if isinstance(m, nn.BatchNorm2d | nn.GroupNorm)]
        on_kernels = [m for m in norms if isinstance(m, BatchNormDropout | GroupNormDropout)
                      and m.relu]
        paths: dict = {
            "accel": self.accel, "precision": self.precision, "step": step,
            "hand_steps": self.hand_steps, "autograd_steps": self.autograd_steps,
            "norms": ("normlab kernels" if norms and len(on_kernels) == len(norms) else
                      "torch" if not on_kernels else
                      f"normlab kernels for {len(on_kernels)} of {len(norms)}"),
        }
        if self.why_autograd:
            paths["why_autograd"] = self.why_autograd
        if self.compile != "off":  # what the step the hand step does not take became
            paths["compile"] = (f"{self.compile} failed, autograd since: "
                                f"{self.compile_failed}" if self.compile_failed else
                                self.compile)
            paths["compiled_steps"] = self.compiled_steps
        if self.hand is not None:
            paths["onednn_convs"] = {
                "x".join(map(str, shape)): f"{sum(c is not None for c in layers)}/{len(layers)}"
                for shape, layers in self.hand._layers.items() if layers}
        if self.eval_chunks:
            paths["test_forward"] = {
                "x".join(map(str, shape)): (f"chunks of {chunk}" if chunk else
                                            f"whole (chunks of {EVAL_CHUNK} differ)")
                for shape, chunk in self.eval_chunks.items()}
        if self.blocks:
            paths["blocks"] = self.blocks
        return paths


def prepare(model: nn.Module, config: ModelConfig | None, precision: str, *,
            enabled: bool = True, check: bool = True, compile: str = "off") -> Step:
    """The training step for ``model`` (see the module). With ``config`` its modules are
    first swapped as :func:`accelerate` does (``None``: taken as they are). With
    ``enabled=False`` every step goes through autograd and nothing is swapped. With
    ``check`` the hand step is taken only after one step of it on a small random batch has
    equalled autograd's bit for bit on this model (the model, its gradients, running
    statistics and the random generator's state are restored after). A network other than
    the seed's, a norm whose spec has ``accel=False``, and weight standardization's
    convolutions are left to autograd, and the step's :meth:`~Step.paths` say so by name
    (``why_autograd``); with ``compile="inductor"`` (``RunConfig.compile``) those steps,
    and the test pass's forward, run under torch.compile (:mod:`normlab.accel.compiled`)."""
    if not enabled:
        return Step(model, precision, "off", why_autograd="acceleration off (--accel off)")
    from normlab.accel.handstep import HandStep

    why = left_to_autograd(config) if config is not None else None
    if why is not None and compile == "inductor":  # the plain model, all of it compiled
        from normlab.accel.compiled import compile_model, unavailable

        reason = unavailable()
        step = Step(model, precision, "on", None, why, compile=compile, compile_failed=reason)
        if reason is None:
            step.compiled = compile_model(model)
        return step
    blocks = accelerate(model, config) if config is not None else {}
    hand = None
    if why is None:
        hand = HandStep.build(model, precision)
        why = None if hand is not None else HandStep.refusal(model, precision)
    if hand is not None and check:
        why = _disagreement(model, hand, precision)
        hand = None if why else hand
    return Step(model, precision, "on", hand, why, blocks)


def _keep(model: nn.Module):
    """Keep ``model``'s gradients, a copy of its buffers (running statistics) and the random
    generator's state; returns the function that puts them back."""
    params, buffers = list(model.parameters()), list(model.buffers())
    saved = ([p.grad for p in params], [b.clone() for b in buffers], torch.get_rng_state())

    def restore() -> None:
        with torch.no_grad():
            for p, g in zip(params, saved[0], strict=True):
                p.grad = g
            for b, v in zip(buffers, saved[1], strict=True):
                b.copy_(v)
        torch.set_rng_state(saved[2])

    return restore


def _disagreement(model: nn.Module, hand, precision: str) -> str | None:
    """Why one hand step on a random batch of 4 differs from autograd's (None: bit for bit
    the same loss, output, gradients and running statistics), all state restored."""
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    x = x.contiguous(memory_format=torch.channels_last)
    if not hand.applies(x):
        return None  # the model's layout: its steps go through autograd anyway
    y = torch.arange(4)
    params = list(model.parameters())
    buffers = list(model.buffers())
    restore = _keep(model)
    try:
        loss, out = autograd_step(model, x, y, precision)
        ref = [loss, out.float(), *(p.grad for p in params), *(b.clone() for b in buffers)]
        restore()
        loss, out = hand(x, y)
        got = [loss, out.float(), *(p.grad for p in params), *buffers]
        same = all(a is not None and b is not None and torch.equal(a, b)
                   for a, b in zip(ref, got, strict=True))
    finally:
        restore()
        hand._layers.pop(x.shape, None)  # the check's batch is no shape training sees
        hand._sizes.pop(x.shape, None)
    return None if same else ("the step by hand differs from autograd on this model "
                              "(has Net.forward changed?)")


def report() -> list[tuple[str, str]]:
    """For this host: each path and what it would be, with why (``normlab info``)."""
    from normlab.accel.hostinfo import describe

    return describe()
