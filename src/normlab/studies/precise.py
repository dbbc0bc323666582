"""PreciseBN: the running statistics of the batch-statistics norms recalibrated on training
batches, after Wu & Johnson (2021), "Rethinking 'Batch' in BatchNorm", section 3.

A norm that trains on batch statistics (BN, BRN, GBN, EvoNorm-B0) evaluates with running
averages of them, an exponential moving average over the last few hundred steps: each term
was computed with the weights of its step, so the average lags behind the weights the test
pass uses. Recalibrating replaces it by the population statistics of the weights as they
are: the running buffers of every such norm are set to the plain average, over a fixed set
of training batches, of the statistics the norm's own training forward computes on them
(``torch.optim.swa_utils.update_bn``'s definition: its cumulative average, ``momentum=None``).

How (one loop for every norm): a norm with running statistics is found by its attributes,
a ``running_mean`` or ``running_var`` tensor buffer and a ``momentum`` (``nn.BatchNorm2d``,
the accelerator's ``BatchNormDropout`` that replaces it, the zoo's norms, a user's own),
not by its class: ``update_bn`` takes ``_BatchNorm`` instances only. Each batch is a
training forward with the norm's momentum set to 1, so that its update leaves exactly that
batch's statistics in its buffers (``(1 - 1) * old + 1 * new``; EvoNorm-B0's unbiased
variance too); they are summed in float64 and the buffers end as the mean. Before each
batch the buffers hold the estimate so far (the trained ones before the first): a norm
whose training forward reads its running statistics (Batch Renormalization's r and d) sees
the recalibrated estimate converge as the batches go.

The choices, and why:

- **Batches**: up to :data:`BATCHES` full batches of the run's training batch size (200 x
  64 = 12,800 of MNIST's 60,000 images; all full batches of a smaller subset), the
  statistics the norms trained on. A norm that splits a batch into virtual batches
  (``virtual_batch``, Ghost BN) updates once per virtual batch, so for such a model the
  same images go through in batches of the virtual size: the average is then over every
  virtual batch's statistics, not the last of each.
- **Which images**: a ``randperm`` of the training split drawn from a generator of its own
  (a function of the run's seed alone: :func:`recalibration_generator`), never the
  training generator, so the run's own numbers cannot move; the same images after every
  epoch (an epoch's precise accuracy differs from the last one's by the weights only) and
  for every variant of a suite with that seed (common random numbers).
- **No augmentation**: the recalibrated statistics serve the test pass, which sees
  unrotated images; the rotation is a training regulariser and would shift the statistics
  toward rotated digits. (It also keeps the draw free of the augmentation's randomness.)
- **No dropout**: the norms are in training mode, the dropout is not (the accelerator's
  fused norm+dropout modules get p = 0): the statistics are those of the activations the
  test pass normalises. Torch's random generators are saved and restored around the
  recalibration all the same.
- **On a copy** of the model (5,760 parameters: copying costs nothing measurable): the
  trained model, its buffers and the optimizer are never touched.

Cost: 12,800 training images forward and the test pass again, about 1.2 s per epoch of
the full MNIST protocol (bf16, one thread of a loaded 2-core host) against about 9 s of
training and 0.4 s of test: some 13% more per epoch. A model without such norms is
evaluated again as it is (the same numbers).
"""

from __future__ import annotations

import contextlib
import copy
import time
from collections.abc import Iterator

import torch
from torch import nn

BATCHES = 200  # the most training batches a recalibration uses
_BUFFERS = ("running_mean", "running_var")
# the recalibration's generator is seeded apart from every epoch_generator(seed, epoch)
_SEED_BASE = 2**40


def stat_modules(model: nn.Module) -> list[nn.Module]:
    """The modules whose evaluation reads running statistics they update in training: a
    ``running_mean`` or ``running_var`` tensor buffer, a ``momentum`` attribute, and
    ``track_running_stats`` not False (BN, and the accelerator's ``BatchNormDropout`` that
    replaces it, BRN, GBN, EvoNorm-B0, a user's norm built the same way)."""
    return [m for m in model.modules()
            if running_buffers(m) and hasattr(m, "momentum")
            and getattr(m, "track_running_stats", True) is not False]


def running_buffers(module: nn.Module) -> list[str]:
    """The names of ``module``'s running-statistics buffers (``running_mean``,
    ``running_var``) that are tensors."""
    return [name for name in _BUFFERS if isinstance(getattr(module, name, None), torch.Tensor)]


def recalibration_generator(seed: int) -> torch.Generator:
    """The generator that draws a run's recalibration images: its own (never the training
    generator), a function of the run's seed alone."""
    return torch.Generator().manual_seed(_SEED_BASE + seed)


def batch_size_for(model: nn.Module, batch_size: int) -> int:
    """The recalibration's batch size: the training batch size, or the smallest virtual
    batch of a norm that splits its batch (Ghost BN's ``virtual_batch``), if smaller."""
    virtual = [int(v) for m in stat_modules(model)
               if isinstance(v := getattr(m, "virtual_batch", None), int) and v > 0]
    return min([batch_size, *virtual])


def recalibration_images(n: int, batch_size: int, seed: int, batches: int = BATCHES
                         ) -> torch.Tensor:
    """The indices (into a training split of ``n`` images) of the images a recalibration
    uses: the first ``min(batches, n // batch_size) * batch_size`` of a seeded
    ``randperm`` (full batches only; at least one batch, however small the split)."""
    count = max(1, min(batches, n // batch_size)) * batch_size
    return torch.randperm(n, generator=recalibration_generator(seed))[: min(count, n)]


@contextlib.contextmanager
def _training_forward(model: nn.Module) -> Iterator[None]:
    """The model in training mode with dropout off (dropout modules in eval mode, the
    accelerator's fused norm+dropout modules at p = 0) and torch's random generators saved;
    every module's mode, every p and the generators restored after."""
    from normlab.accel.normdrop import BatchNormDropout, GroupNormDropout
    from normlab.models.dropout import SparseDropout

    modes = [(m, m.training) for m in model.modules()]
    fused = [(m, m.p) for m in model.modules()
             if isinstance(m, BatchNormDropout | GroupNormDropout)]
    devices = [d for d in {b.device for b in model.buffers()} if d.type == "cuda"]
    try:
        with torch.random.fork_rng(devices=devices):
            model.train()
            for m in model.modules():
                if isinstance(m, nn.modules.dropout._DropoutNd | SparseDropout):
                    m.eval()
            for m, _ in fused:
                m.p = 0.0
            yield
    finally:
        for m, p in fused:
            m.p = p
        for m, training in modes:
            m.training = training


@torch.no_grad()
def recalibrate(model: nn.Module, inputs, precision: str = "fp32") -> int:
    """Set, in place, every :func:`stat_modules` module's running statistics to the mean
    over ``inputs`` (an iterable of input batches, already normalised and in the model's
    layout) of the statistics its training forward computes on them; dropout off (see the
    module). Returns the number of batches. Every module's mode and momentum, and torch's
    random generators, are as they were after."""
    from normlab.accel import autocast

    modules = stat_modules(model)
    sums = {(id(m), name): None for m in modules for name in running_buffers(m)}
    momenta = [m.momentum for m in modules]
    count = 0
    try:
        with _training_forward(model):
            for m in modules:
                m.momentum = 1.0  # the update leaves this batch's statistics in the buffers
            for x in inputs:
                if count:  # the estimate so far, for a forward that reads it (BRN)
                    for m in modules:
                        for name in running_buffers(m):
                            total = sums[id(m), name]
                            getattr(m, name).copy_(total / count)
                with autocast(x.device, precision):
                    model(x)
                count += 1
                for m in modules:
                    for name in running_buffers(m):
                        value = getattr(m, name).double()
                        key = (id(m), name)
                        sums[key] = value.clone() if sums[key] is None else sums[key] + value
            if count:
                for m in modules:
                    for name in running_buffers(m):
                        getattr(m, name).copy_(sums[id(m), name] / count)
    finally:
        for m, momentum in zip(modules, momenta, strict=True):
            m.momentum = momentum
    return count


def recalibrated(model: nn.Module, data, batch_size: int, seed: int, precision: str = "fp32",
                 batches: int = BATCHES) -> nn.Module:
    """A copy of ``model`` with its running statistics recalibrated on images of ``data``
    (a :class:`~normlab.training.engine.TensorData`, the training split) as the module
    describes; ``model`` itself is not touched."""
    from normlab.training.augment import to_input
    from normlab.training.engine import _layout

    clone = copy.deepcopy(model)
    size = batch_size_for(clone, batch_size)
    idx = recalibration_images(len(data), batch_size, seed, batches).to(data.images.device)
    layout = _layout(clone)

    def inputs():
        for begin in range(0, len(idx) - size + 1, size):
            part = idx[begin : begin + size]
            yield to_input(data.images[part], data.mean, data.std, memory_format=layout)

    if stat_modules(clone):
        recalibrate(clone, inputs(), precision)
    clone.eval()
    return clone


def precise_evaluate(model: nn.Module, train_data, test_data, *, batch_size: int, seed: int,
                     eval_batch_size: int = 1000, precision: str = "fp32",
                     batches: int = BATCHES) -> dict[str, float]:
    """The test pass of a recalibrated copy of ``model`` (:func:`recalibrated`):
    ``test_acc_precise``, ``test_loss_precise`` and ``precise_seconds`` (recalibration plus
    test pass). A model without batch-statistics norms is evaluated as it is."""
    from normlab.training.engine import evaluate

    start = time.perf_counter()
    clone = recalibrated(model, train_data, batch_size, seed, precision, batches)
    te = evaluate(clone, test_data, eval_batch_size, precision=precision)
    return {"test_acc_precise": te["test_acc"], "test_loss_precise": te["test_loss"],
            "precise_seconds": time.perf_counter() - start}


def population_statistics(model: nn.Module, inputs) -> dict[str, torch.Tensor]:
    """For tests and teaching: each BatchNorm's input statistics over ``inputs`` computed
    directly, as ``update_bn`` defines them: the mean over batches of the batch mean and of
    the unbiased batch variance per channel (in float64), keyed ``"<module name>.running_mean"``
    and ``".running_var"``. The model runs in training mode; dropout off, running
    buffers restored. (A norm that applies the ReLU before it, the accelerator's
    ``relu=True``, is seen after that ReLU.)"""
    seen: dict[str, list[torch.Tensor]] = {}
    norms = {name: m for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    saved = {k: v.clone() for k, v in model.state_dict().items()}

    def hook(name):
        def record(module, args):
            x = args[0].double()
            if getattr(module, "relu", False):
                x = x.clamp_min(0)
            n = x.numel() / x.shape[1]
            mean = x.mean(dim=(0, 2, 3))
            var = x.var(dim=(0, 2, 3), unbiased=False) * n / max(n - 1, 1)
            seen.setdefault(f"{name}.running_mean", []).append(mean)
            seen.setdefault(f"{name}.running_var", []).append(var)
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in norms.items()]
    try:
        with torch.no_grad(), _training_forward(model):
            for x in inputs:
                model(x)
    finally:
        for h in handles:
            h.remove()
        model.load_state_dict(saved)
    return {k: torch.stack(v).mean(0) for k, v in seen.items()}
