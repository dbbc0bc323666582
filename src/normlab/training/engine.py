"""One epoch of training and one evaluation, as plain functions returning metric dicts.

The data lives on the training device as uint8 tensors; an epoch is a seeded ``randperm``
and per-batch tensor augmentation. Metrics are accumulated on the device and read once at
the end, so a GPU is never synchronised per step.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from normlab import accel
from normlab.accel import autocast, kernels
from normlab.models import ModelConfig
from normlab.training.augment import to_input


@dataclass
class TensorData:
    """One split on the device: uint8 images (N, H, W) and int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    mean: float
    std: float

    def __len__(self) -> int:
        return len(self.labels)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator for an epoch's order and augmentation: a function of (seed, epoch)
    alone, so every variant of a suite sees the same batches (common random numbers) and a
    resumed run sees what an uninterrupted one would."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


def memory_format(device: torch.device, threads: int,
                  model: ModelConfig | None = None) -> torch.memory_format:
    """Channels-last, except on a CPU with more than one thread when torch's norms do the
    work: their backward in channels-last gains nothing from a second thread, and the
    contiguous layout is faster there. normlab's kernels (``kernels="normlab"``, one norm
    per block) are fastest in channels-last at any thread count (benchmarks/README.md).
    The model and its inputs are kept in this layout."""
    if device.type != "cpu" or threads <= 1:
        return torch.channels_last
    one_norm = model is not None and len(model.norms) == 1 and model.norms != ("none",)
    if one_norm and model.kernels == "normlab" and model.net == "seed":  # (the kernels' net)
        return torch.channels_last
    return torch.contiguous_format


def _layout(model: nn.Module) -> torch.memory_format:
    """The layout the model's weights are in (see :func:`memory_format`), read off the first
    convolution whose weight tells the two apart (more than one input channel, a k x k
    kernel with k > 1)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m.in_channels > 1 and m.kernel_size != (1, 1):
            return torch.contiguous_format if m.weight.is_contiguous() else torch.channels_last
    return torch.contiguous_format


def l1_parameters(model: nn.Module, scope: str) -> list[torch.Tensor]:
    if scope == "conv":
        return [m.weight for m in model.modules() if isinstance(m, nn.Conv2d)]
    return [p for p in model.parameters() if p.requires_grad]


def l1_penalty(params: list[torch.Tensor]) -> torch.Tensor:
    """sum |w| over the covered parameters: built once, then added to the loss once."""
    return torch.stack([p.abs().sum() for p in params]).sum()


@torch.no_grad()
def add_l1_gradient(params: list[torch.Tensor], l1: float) -> None:
    """Add the gradient of ``l1 * l1_penalty(params)`` to the parameters' gradients, as
    backpropagating it with the loss would, bitwise: autograd's chain gives
    ``fl32(l1) * sgn(w)`` (exact: sgn is -1, 0 or 1) and accumulates it into the gradient
    with one addition, which is what this does, in two foreach ops instead of about 70
    autograd nodes and kernels (a parameter without a gradient gets the term alone)."""
    grads, terms = [], []
    for p, sign in zip(params, torch._foreach_sign(params), strict=True):
        if p.grad is None:
            p.grad = sign.mul_(l1)
        else:
            grads.append(p.grad)
            terms.append(sign)
    if grads:
        torch._foreach_add_(grads, terms, alpha=l1)


def train_one_epoch(
    model: nn.Module,
    data: TensorData,
    optimizer: torch.optim.Optimizer,
    *,
    seed: int,
    epoch: int,
    batch_size: int,
    rotation: float,
    l1: float = 0.0,
    l1_params: list[torch.Tensor] | None = None,
    step_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    on_step: Callable[[int], None] | None = None,
    precision: str = "fp32",
    augment: str = "aten",
    step: accel.Step | None = None,
    hand_step: bool = True,
    prober=None,
) -> dict[str, float]:
    """Train for one epoch; returns mean train loss (NLL), accuracy %, L1 term, seconds.

    ``step`` computes each batch's loss and gradients: the one :func:`normlab.accel.prepare`
    gave for this model (a run prepares it once). Without it one is prepared for the model
    as it is (no module swapped): by hand where the step takes the model (the same numbers
    as autograd, bit for bit, faster), else through autograd; ``hand_step=False`` trains
    everything through autograd (for benchmarks and the tests that compare the two).

    ``augment`` says what rotates and normalises the training images on a CPU: ``"aten"``
    (:func:`~normlab.training.augment.to_input`, torch's ops) or ``"normlab"`` (the C
    kernel, :func:`~normlab.accel.kernels.rotate_normalize`, one pass).

    ``step_scheduler`` is stepped after every batch (one-cycle); per-epoch schedulers are
    the caller's. ``on_step(images_seen)`` is called after every batch (it must not read
    tensors: that would synchronise a GPU).
    ``first_bad_step`` is the index of the first batch whose loss was not finite, or -1.

    ``prober`` (a :class:`~normlab.probes.Prober`) records what happens inside the network
    at the steps it is due (counted over the run, from 0 at the first step of epoch 1);
    it changes no number the epoch computes.
    """
    start = time.perf_counter()
    model.train()
    device = data.images.device
    layout = _layout(model)
    n = len(data)
    gen = epoch_generator(seed, epoch)
    order = torch.randperm(n, generator=gen).to(device)
    angles = ((torch.rand(n, generator=gen) * 2 - 1) * rotation).to(device)
    steps = -(-n // batch_size)
    # Per step: its mean loss (and with L1 its total) and its predictions, one write each,
    # read once at the end (no host read per step, so a GPU is never synchronised).
    losses = torch.empty(steps, device=device)
    totals = torch.empty(steps, device=device) if l1 else losses
    predicted = torch.empty(n, device=device, dtype=torch.long)
    l1_sum = torch.zeros((), device=device)
    in_c = augment == "normlab" and device.type == "cpu" and bool(rotation)
    if step is None:
        step = accel.prepare(model, None, precision, enabled=hand_step)
    for i, begin in enumerate(range(0, n, batch_size)):
        idx = order[begin : begin + batch_size]
        if in_c:
            x = kernels.rotate_normalize(data.images, idx, angles[idx], data.mean, data.std)
            x = x.contiguous(memory_format=layout)
        else:
            x = to_input(data.images[idx], data.mean, data.std,
                         angles[idx] if rotation else None, memory_format=layout)
        y = data.labels[idx]
        probing = prober is not None and prober.due((epoch - 1) * steps + i)
        if probing:  # a forward of its own, all it changed put back
            prober.before_step(x, y, (epoch - 1) * steps + i, epoch,
                               optimizer.param_groups[0]["lr"])
        loss, out = step(x, y)  # the forward, the loss and its backward (.grad set)
        total = loss.detach()
        if l1:  # loss + l1 * sum|w|, its gradient added by hand (the same bits, faster)
            with torch.no_grad():
                penalty = l1_penalty(l1_params)
                total = total + l1 * penalty
                l1_sum += penalty * len(idx)
            add_l1_gradient(l1_params, l1)
        if probing:
            prober.before_update()
        optimizer.step()
        if probing:
            prober.after_update()
        if step_scheduler is not None:
            step_scheduler.step()
        losses[i] = loss.detach()
        if l1:
            totals[i] = total
        predicted[begin : begin + len(idx)] = out.argmax(1)
        if on_step is not None:
            on_step(begin + len(idx))
    bad = (~torch.isfinite(totals)).nonzero()
    return {
        "train_loss": float(_summed(losses, n, batch_size)) / n,
        "train_acc": 100.0 * (predicted == data.labels[order]).sum().item() / n,
        "train_l1": l1_sum.item() / n,
        "first_bad_step": int(bad[0]) if len(bad) else -1,
        "train_seconds": time.perf_counter() - start,
    }


def _summed(losses: torch.Tensor, n: int, batch_size: int) -> np.float32:
    """Sum over the steps of the mean loss times the batch's size, added one step after
    another in float32: bitwise the running ``loss_sum += loss * len(batch)`` that normlab
    0.6 and before kept on the device (``np.add.accumulate`` adds in order)."""
    sizes = np.full(len(losses), batch_size, dtype=np.float32)
    sizes[-1] = n - batch_size * (len(losses) - 1)
    return np.add.accumulate(losses.cpu().numpy() * sizes, dtype=np.float32)[-1]


@torch.no_grad()
def evaluate(
    model: nn.Module, data: TensorData, batch_size: int = 1000, *, predictions: bool = False,
    precision: str = "fp32", forward=None,
) -> dict:
    """Test loss (mean NLL) and accuracy %; with ``predictions`` also per-image predicted
    class, true class and confidence (the predicted class's probability). ``forward``
    computes the model's output for a batch (default: the model; a run passes its
    accelerated step's :meth:`~normlab.accel.Step.infer`, the same numbers)."""
    forward = model if forward is None else forward
    start = time.perf_counter()
    model.eval()
    device = data.images.device
    layout = _layout(model)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.long)
    preds, confs = [], []
    for begin in range(0, len(data), batch_size):
        x = to_input(data.images[begin : begin + batch_size], data.mean, data.std,
                     memory_format=layout)
        y = data.labels[begin : begin + batch_size]
        with autocast(device, precision):
            out = forward(x).float()
        loss_sum += F.nll_loss(out, y, reduction="sum").double()
        conf, pred = out.max(1)
        correct += (pred == y).sum()
        if predictions:
            preds.append(pred)
            confs.append(conf.exp())
    metrics: dict = {
        "test_loss": loss_sum.item() / len(data),
        "test_acc": 100.0 * correct.item() / len(data),
        "test_seconds": time.perf_counter() - start,
    }
    if predictions:
        metrics["predictions"] = {
            "pred": torch.cat(preds).cpu(),
            "target": data.labels.cpu(),
            "confidence": torch.cat(confs).float().cpu(),
        }
    return metrics
