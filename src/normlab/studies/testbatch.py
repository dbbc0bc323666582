"""Test-batch dependence: how a trained network's test accuracy depends on the test batch
when its norms normalise with the batch's own statistics.

From each finished run's checkpoint the network is rebuilt (``RunConfig.make_model``, the
plain model: torch's norms) and its test accuracy computed in five modes:

- ``running``: eval mode, the running statistics (what every test accuracy of a run is);
- ``mixed 1000 / 8 / 2``: the norms in training mode, so each normalises with the test
  batch's own statistics (Batch Renormalization: its training forward, r and d against
  its running statistics), over batches of 1000, 8 and 2 images of one fixed shuffled
  order of the test set (the same for every run: common random numbers); dropout off, and
  every buffer restored after each batch, so each batch sees the trained running
  statistics and none leaks into the next;
- ``single class``: the same, over batches holding one class only: each class's test
  images split into the fewest nearly equal batches of at most 1000 (MNIST's classes have
  892 to 1135 test images: one batch per class, two for the digit 1).

A norm without batch statistics (GN, LN, IN, FRN, RMSNorm, EvoNorm-S0, none) computes the
same function in both modes: its accuracies must not move, and the section shows them
beside the batch-statistics norms (BN, BRN, GBN, EvoNorm-B0) as the control. For such a
network (no module with running statistics) one training-mode pass gives each image's
output whatever batch it sits in, so it is computed once for the four batch modes; the
eval-mode pass is its own (dropout aside, the same function: measured, not assumed).

(Ghost BN's training forward splits any batch into its virtual batches, so its mixed
batches of 1000 are normalised a virtual batch at a time; the report says so.)

Cost: batches of 2 would be 5,000 forward passes of the network over MNIST's test set.
Instead the batches are packed into passes of about 1000 images (:func:`packs`) and only
the batch-statistics norms compute batch by batch (:func:`per_batch`): every other layer
computes each image by itself anyway. Five passes over the test set, in the model's
training layout and precision, on one thread, with the allocator training gets
(:mod:`normlab.memory`: each layer's pass allocates megabytes, which glibc's defaults page
in afresh): 8.5 s per seed-net BN run and 3.1 s per GN run on a 2-core Zen 3, 29 and 10 s
for ResNet-8 (``benchmarks/testbatch_cost.py``; 1.5-2x faster than glibc's defaults). A
suite of many deep networks can leave the section out (``test_batch = false``). Each run's numbers
are cached beside its checkpoint (:data:`CACHE`), keyed by the checkpoint's epoch, the
run's config, the test images and :data:`VERSION`, so a report built again costs nothing
and a retrained or extended run is computed again; a line per run computed goes to
``progress`` (stderr by default).

:func:`test_batch_parts` gives the report its section (blocks and figure) for any suite,
every sentence generated from the numbers.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import nn

from normlab.reports.collect import FINISHED, SuiteResults, VariantResults
from normlab.reports.doc import Block, Bullets, Heading, Para, Table
from normlab.reports.figures import model_label, norm_key, save
from normlab.reports.page import Image
from normlab.reports.stats import Paired, holm, mean, paired_difference, sample_std, t975
from normlab.studies.precise import _training_forward, stat_modules

TITLE = "Test-batch dependence"
FIGURE = "test_batch.png"
CACHE = "testbatch.json"
VERSION = 2  # of the method: a cache written by another version is computed again
MIXED = (1000, 8, 2)  # mixed batch sizes, largest first
CLASS_BATCH = 1000  # the most images in a single-class batch
ORDER_SEED = 0  # the mixed batches' shuffled order (the same for every run)
MODES = ("running", *(f"mixed{b}" for b in MIXED), "class")
MODE_NAMES = {"running": "running statistics", **{f"mixed{b}": f"mixed batches of {b}"
                                                  for b in MIXED},
              "class": "single-class batches"}
MODE_TICKS = {"running": "running\nstatistics", **{f"mixed{b}": f"mixed\nbatch {b}"
                                                   for b in MIXED},
              "class": "single-class\nbatches"}
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")

Progress = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- computing


def mixed_batches(n: int, size: int) -> list[torch.Tensor]:
    """Batches of ``size`` test indices in one fixed shuffled order (:data:`ORDER_SEED`);
    the last one smaller where ``size`` does not divide ``n``."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(ORDER_SEED))
    return list(order.split(size))


def class_batches(labels: torch.Tensor, most: int = CLASS_BATCH) -> list[torch.Tensor]:
    """Per class, its test indices (in test order) in the fewest nearly equal batches of at
    most ``most`` images."""
    out = []
    labels = labels.cpu()
    for c in torch.unique(labels).tolist():
        idx = (labels == c).nonzero().flatten()
        out += list(idx.tensor_split(math.ceil(len(idx) / most)))
    return out


def packs(batches: list[torch.Tensor], most: int = 1000
          ) -> list[tuple[torch.Tensor, list[int]]]:
    """Consecutive batches packed into forward passes of at most ``most`` images (at least
    one batch each): (their indices, one after the other; their sizes)."""
    out: list[tuple[list[torch.Tensor], list[int]]] = []
    for idx in batches:
        if not out or sum(out[-1][1]) + len(idx) > most:
            out.append(([], []))
        out[-1][0].append(idx)
        out[-1][1].append(len(idx))
    return [(torch.cat(parts), sizes) for parts, sizes in out]


@contextlib.contextmanager
def per_batch(modules: list[nn.Module], sizes: list[list[int]]) -> Iterator[None]:
    """Each module in ``modules`` (the batch-statistics norms) computes its forward batch
    by batch: its input, a pack of several test batches, is split by ``sizes[0]`` (the
    pack's batch sizes, set by the caller before each pass), the module's own forward runs
    on each batch, and its buffers are restored after each (so every batch sees the trained
    running statistics). Every other module sees the whole pack at once: they compute each
    image by itself, so packing changes nothing but the number of calls (5,000 forward
    passes of the network for batches of 2 on 10,000 images become 10, with 5,000 calls of
    each norm)."""
    def wrap(m: nn.Module):
        forward = m.forward
        buffers = list(m.buffers())
        saved = [b.clone() for b in buffers]

        def batch_by_batch(x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            outs = []
            for part in x.split(sizes[0]):
                outs.append(forward(part, *args, **kwargs))
                for b, v in zip(buffers, saved, strict=True):
                    b.copy_(v)
            return torch.cat(outs)

        return batch_by_batch

    for m in modules:
        m.forward = wrap(m)
    try:
        yield
    finally:
        for m in modules:
            del m.forward


@torch.no_grad()
def batch_statistics_accuracy(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                              batches: list[torch.Tensor], precision: str = "fp32") -> float:
    """Accuracy (%) over ``batches`` (index tensors into ``inputs``/``labels``) with the
    model's norms in training mode, each batch normalised by its own statistics
    (:func:`per_batch`), dropout off, every buffer as it was after each batch and torch's
    generators after all."""
    from normlab.accel import autocast

    correct = torch.zeros((), dtype=torch.long, device=labels.device)
    sizes: list[list[int]] = [[]]
    with _training_forward(model), per_batch(stat_modules(model), sizes):
        for idx, pack_sizes in packs(batches):
            idx = idx.to(labels.device)
            sizes[0] = pack_sizes
            with autocast(inputs.device, precision):
                out = model(inputs[idx])
            correct += (out.argmax(1) == labels[idx]).sum()
    return 100.0 * correct.item() / sum(len(b) for b in batches)


def mode_accuracies(model: nn.Module, test, precision: str = "fp32") -> dict[str, float]:
    """The test accuracy (%) of ``model`` in each of :data:`MODES` on ``test`` (a
    :class:`~normlab.training.engine.TensorData`)."""
    from normlab.training.augment import to_input
    from normlab.training.engine import _layout, evaluate

    acc = {"running": evaluate(model, test, 1000, precision=precision)["test_acc"]}
    inputs = to_input(test.images, test.mean, test.std, memory_format=_layout(model))
    if not stat_modules(model):
        # nothing normalises with a batch's statistics: each image's training-mode output
        # is its own whatever batch it sits in (the packing's premise), so one pass gives
        # every mode's accuracy, the same images counted each time
        same = batch_statistics_accuracy(model, inputs, test.labels,
                                         mixed_batches(len(test), MIXED[0]), precision)
        model.eval()
        return {**acc, **{mode: same for mode in MODES if mode != "running"}}
    for size in MIXED:
        acc[f"mixed{size}"] = batch_statistics_accuracy(
            model, inputs, test.labels, mixed_batches(len(test), size), precision)
    acc["class"] = batch_statistics_accuracy(model, inputs, test.labels,
                                             class_batches(test.labels), precision)
    model.eval()
    return acc


def uses_batch_statistics(config) -> bool:
    """Whether the run's norms normalise with batch statistics in training (the norm
    registry's ``batch_stats``)."""
    from normlab.models.norms import norm_spec

    return any(norm_spec(n).batch_stats for n in config.model.norms)


def _cache_key(config, epoch: int, size: int | None) -> dict:
    """What a cached result must match: the method's version, the checkpoint's epoch, the
    run's config and the test images (``None``: the dataset's whole test split)."""
    return {"version": VERSION, "epoch": epoch, "test_images": size or "all",
            "config": config.to_dict()}


def _cached(run, config, epoch: int, test=None) -> dict | None:
    """The run's cached result (``{"accuracy", "seconds"}``) if its key matches, else None."""
    key = _cache_key(config, epoch, None if test is None else len(test))
    try:
        stored = json.loads(run.file(CACHE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(stored, dict) or stored.get("key") != key:
        return None
    return {"accuracy": stored["accuracy"], "seconds": stored["seconds"]}


class NoCheckpoint(ValueError):
    """A finished run without the checkpoint of its last epoch (nothing to evaluate)."""


def run_accuracies(run, config, test, *, epoch: int, device: torch.device | str = "cpu",
                   size: int | None = None) -> dict:
    """A finished run's accuracies per mode computed from its checkpoint (``run``: its
    :class:`~normlab.training.rundir.RunDir`; ``epoch``: its last epoch, which the
    checkpoint must hold) on ``test``, and cached in :data:`CACHE` beside it (``size``:
    the number of test images when ``test`` is a subset; None: the whole test split).
    Returns ``{"accuracy": {mode: %}, "seconds": s}``."""
    from normlab.files import write_json
    from normlab.memory import keep_freed_memory
    from normlab.training.engine import memory_format

    keep_freed_memory()  # as training does: five passes allocate megabyte blocks each layer
    start = time.perf_counter()
    device = torch.device(device)
    ckpt = run.load_checkpoint(device)
    if ckpt is None or ckpt.get("epoch") != epoch:
        raise NoCheckpoint(f"{run.path}: checkpoint of epoch "
                           f"{None if ckpt is None else ckpt.get('epoch')}, metrics of {epoch}")
    layout = memory_format(device, torch.get_num_threads(), config.model)  # as it trained
    model = config.make_model().to(device, memory_format=layout)
    model.load_state_dict(ckpt["model"])
    acc = mode_accuracies(model, test, config.precision)
    seconds = time.perf_counter() - start
    with contextlib.suppress(OSError):  # a run folder this user cannot write: not kept
        write_json(run.file(CACHE), {"key": _cache_key(config, epoch, size), "accuracy": acc,
                                     "seconds": seconds})
    return {"accuracy": acc, "seconds": seconds}


# ----------------------------------------------------------------------------- a suite


@dataclass
class Row:
    """One variant: its accuracies per mode, per finished seed."""

    variant: VariantResults
    batch_stats: bool
    by_seed: dict[int, dict[str, float]] = field(default_factory=dict)
    seconds: list[float] = field(default_factory=list)  # computing time of runs not cached
    cached: int = 0
    left_out: list[str] = field(default_factory=list)  # "seed 2 (diverged)", ...
    family: dict | None = None  # mode -> its change, Holm-adjusted (adjust())

    @property
    def label(self) -> str:
        return self.variant.label

    def values(self, mode: str) -> list[float]:
        return [acc[mode] for _, acc in sorted(self.by_seed.items())]

    def seeds_of(self, mode: str) -> dict[int, float]:
        return {seed: acc[mode] for seed, acc in self.by_seed.items()}

    def change(self, mode: str) -> Paired | None:
        """The paired change from the running-statistics accuracy to ``mode``'s; once
        :func:`adjust` has run, Holm-adjusted with the study's other changes."""
        if self.family is not None:
            return self.family.get(mode)
        return paired_difference(self.seeds_of(mode), self.seeds_of("running"))


def adjust(rows: list[Row]) -> int:
    """Every change the verdict rests on (each batch-statistics variant's, in each mode),
    Holm-adjusted as one family; returns the family's size."""
    family = []
    for row in rows:
        row.family = None
        row.family = {m: row.change(m) for m in MODES[1:]}
        family += list(row.family.values())
    holm(family)
    return sum(1 for c in family if c is not None and c.p is not None)


def collect(suite: SuiteResults, *, test=None, device: str = "cpu",
            progress: Progress | None = _stderr, workers: int | None = None) -> list[Row]:
    """Every variant's accuracies per mode over its finished (not diverged) runs, from the
    caches or computed (``test``: the test split to use, a TensorData; default: the
    suite's dataset's, loaded only when some run is not cached). With the dataset's own
    test split on the CPU and :data:`POOL_FROM` or more runs to compute, they are computed
    ``workers`` at a time (default: one per core) in spawned processes of one thread each,
    as the suite trained them."""
    rows, todo = [], []
    for v in suite.variants:
        if v.config is None:
            continue
        row = Row(v, uses_batch_statistics(v.config))
        for r in v.runs:
            if r.state != FINISHED or not r.metrics or r.config is None:
                row.left_out.append(f"seed {r.seed} ({r.state})")
            elif r.diverged:
                row.left_out.append(f"seed {r.seed} (diverged)")
            else:
                got = _cached(r.run, r.config, len(r.metrics), test)
                if got is None:
                    todo.append((row, r))
                else:
                    row.cached += 1
                    row.by_seed[r.seed] = got["accuracy"]
        rows.append(row)

    def done(i: int, row: Row, r, got: dict | None) -> None:
        if progress is not None:
            progress(f"test-batch study: {row.variant.name}/seed{r.seed} "
                     f"({i} of {len(todo)} to compute)")
        if got is None:  # deleted, or a folder copied without its checkpoints
            row.left_out.append(f"seed {r.seed} (no checkpoint of its last epoch)")
        else:
            row.seconds.append(got["seconds"])
            row.by_seed[r.seed] = got["accuracy"]

    workers = workers or os.cpu_count() or 1
    if test is None and str(device) == "cpu" and workers > 1 and len(todo) >= POOL_FROM:
        from normlab.memory import workers_preloaded

        ctx = multiprocessing.get_context("spawn")
        with workers_preloaded(), ProcessPoolExecutor(  # tcmalloc, as suite workers have
                max_workers=min(workers, len(todo)), mp_context=ctx,
                initializer=_one_thread) as pool:
            futures = {pool.submit(_computed, str(r.run.path), r.config.to_dict(),
                                   len(r.metrics), suite.dataset): (row, r)
                       for row, r in todo}
            for i, future in enumerate(as_completed(futures), 1):
                done(i, *futures[future], future.result())
    else:
        split = None
        for i, (row, r) in enumerate(todo, 1):
            if split is None:
                split = test if test is not None else _test_split(suite.dataset, device)
            try:
                got = run_accuracies(r.run, r.config, split, epoch=len(r.metrics),
                                     device=device, size=None if test is None else len(test))
            except NoCheckpoint:
                got = None
            done(i, row, r, got)
    for row in rows:
        row.by_seed = dict(sorted(row.by_seed.items()))
    return rows


POOL_FROM = 4  # uncached runs from which collect computes in worker processes


def _test_split(dataset: str, device="cpu"):
    from normlab.data import load_dataset
    from normlab.training.engine import TensorData

    ds = load_dataset(dataset)
    return TensorData(ds.test_images.to(device), ds.test_labels.to(device), ds.mean, ds.std)


def _one_thread() -> None:
    torch.set_num_threads(1)


_SPLITS: dict = {}  # a worker process's test split, loaded once


def _computed(path: str, config: dict, epoch: int, dataset: str) -> dict | None:
    """In a worker process: :func:`run_accuracies` of the run at ``path`` (None when it
    has no checkpoint of ``epoch``)."""
    from normlab.training.config import from_stored
    from normlab.training.rundir import RunDir

    if dataset not in _SPLITS:
        _SPLITS[dataset] = _test_split(dataset)
    try:
        return run_accuracies(RunDir(path), from_stored(config), _SPLITS[dataset], epoch=epoch)
    except NoCheckpoint:
        return None


# ----------------------------------------------------------------------------- figure


def test_batch_figure(rows: list[Row], dataset: str) -> Figure:
    """Test accuracy (%) per mode, one line per variant (the mean over seeds; the seeds as
    dots): the batch-statistics norms on the left, the others on the right, on one scale."""
    groups = [(title, members) for title, members in (
        ("norms with batch statistics", [r for r in rows if r.batch_stats and r.by_seed]),
        ("norms without batch statistics", [r for r in rows
                                            if not r.batch_stats and r.by_seed]))
        if members]
    tall = max(len(members) if len(members) <= len(COLOURS) else len(_norms(members))
               for _, members in groups)  # legend rows
    fig = Figure(figsize=(5.2 * len(groups) + 1.0, 4.8 + 0.2 * math.ceil(tall / 2)),
                 layout="constrained")
    axes = fig.subplots(1, len(groups), sharey=True, squeeze=False)[0]
    x = np.arange(len(MODES))
    for ax, (title, members) in zip(axes, groups, strict=True):
        many = len(members) > len(COLOURS)  # a large suite: a colour and a legend per norm
        if many:
            _norm_lines(ax, x, members)
        colours = itertools.cycle(COLOURS)
        for row in [] if many else members:
            colour = next(colours)
            means = [mean(row.values(m)) for m in MODES]
            ax.plot(x, means, color=colour, marker="o", markersize=5, linewidth=1.6,
                    label=f"{row.label} ({len(row.by_seed)} seed"
                          f"{'s' if len(row.by_seed) != 1 else ''})")
            for i, m in enumerate(MODES):
                values = row.values(m)
                if len(values) > 1:
                    ax.scatter(np.full(len(values), x[i]), values, color=colour, s=10,
                               alpha=0.45, linewidths=0)
        ax.set_xticks(x, [MODE_TICKS[m] for m in MODES], fontsize=9)
        ax.set_title(title, fontsize=10.5)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=9,
                  frameon=False)  # below the axes: no line hidden behind it
    axes[0].set_ylabel("test accuracy %")
    name = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}.get(dataset, dataset)
    fig.suptitle(f"Test accuracy on {name} with running statistics and with the test "
                 "batch's own (line: mean over seeds; dots: seeds)", fontsize=11)
    return fig


def _norms(members: list[Row]) -> dict[str, list[Row]]:
    """The rows by their norm, each group under its norm's label ("GN (2 groups) + WS")."""
    by_key: dict[str, list[Row]] = {}
    for row in members:
        by_key.setdefault(norm_key(row.variant.config.model), []).append(row)
    return {model_label(rows[0].variant.config.model): rows for rows in by_key.values()}


def _norm_lines(ax, x, members: list[Row]) -> None:
    """One thin line per variant (its mean over seeds), coloured by its norm, one legend
    entry per norm: a suite of dozens of variants (lr-range) stays readable."""
    for colour, (norm, rows) in zip(itertools.cycle(COLOURS), _norms(members).items()):
        for i, row in enumerate(rows):
            ax.plot(x, [mean(row.values(m)) for m in MODES], color=colour, marker="o",
                    markersize=3, linewidth=1.0, alpha=0.7,
                    label=f"{norm} ({len(rows)} variants)" if i == 0 else None)


# ----------------------------------------------------------------------------- words


def _pts(x: float) -> str:
    return f"{x:+.2f}".replace("+0.00", "0.00").replace("-0.00", "0.00")


def _cell(values: list[float]) -> str:
    """"98.91 ± 0.12": the mean and the half-width of its 95% t interval over seeds."""
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    half = t975(len(values) - 1) * (sample_std(values) or 0.0) / math.sqrt(len(values))
    return f"{mean(values):.2f} ± {half:.2f}"


def _change_text(change: Paired) -> str:
    text = f"{_pts(change.mean)} points"
    if change.interval is None:
        return text + ", one seed: no interval"
    lo, hi = change.interval
    return text + f", 95% interval [{_pts(lo)}, {_pts(hi)}]"


def _moves(change: Paired | None) -> bool | None:
    """True: resolved (Holm-adjusted); False: not resolved; None: one seed, no test."""
    if change is None or change.interval is None:
        return None
    return not change.within_noise


def _row_text(row: Row) -> str:
    parts = [f"{row.label}: {mean(row.values('running')):.2f}% with running statistics"]
    for m in MODES[1:]:
        change = row.change(m)
        parts.append(f"{MODE_NAMES[m]} {mean(row.values(m)):.2f}% ({_change_text(change)})")
        parts[-1] += {True: " — moves", False: " — not resolved", None: ""}[_moves(change)]
    return "; ".join(parts) + "."


def _largest(rows: list[Row], moving_only: bool = False) -> tuple[Row, str, Paired] | None:
    """The (row, mode, change) of the largest change from the running statistics (among
    the resolved changes, with ``moving_only``)."""
    found = [(r, m, c) for r in rows for m in MODES[1:] if (c := r.change(m)) is not None
             and (not moving_only or _moves(c))]
    return max(found, key=lambda t: abs(t[2].mean), default=None)


def _headline(stats: list[Row], others: list[Row]) -> str:
    spread = max((abs(v - acc["running"]) for r in others for acc in r.by_seed.values()
                  for v in acc.values()), default=None)
    names = ", ".join(r.label for r in others)
    if len(others) > len(COLOURS):  # dozens of variants: name their norms, not each
        norms = list(_norms(others))
        names = f"{len(others)} variants of {', '.join(norms)}"
    if others and spread == 0:
        control = (f"The norms without batch statistics ({names}) give exactly the same "
                   "accuracy in every mode, as they must.")
    elif others:
        control = (f"**But** the norms without batch statistics ({names}) moved by up to "
                   f"{spread:.2f} points between modes, which a norm that normalises each "
                   "image by itself should not do: look into it before reading the rest.")
    else:
        control = "No variant without batch statistics is here to serve as the control."
    if not stats:
        return ("No variant of this suite normalises with batch statistics, so nothing "
                "here depends on the test batch. " + control)
    moved = [_moves(r.change(m)) for r in stats for m in MODES[1:]]
    row, mode, change = _largest(stats, moving_only=any(moved))
    where = (f"largest change{' resolved' if any(moved) else ''}: {row.label} over "
             f"{MODE_NAMES[mode]}, {mean(row.values('running')):.2f}% → "
             f"{mean(row.values(mode)):.2f}%, {_change_text(change)}")
    if any(moved):
        head = ("**Yes**: with the test batch's own statistics the accuracy of the norms "
                f"that use batch statistics depends on the test batch ({where}).")
    elif all(m is None for m in moved):
        head = (f"With one finished seed per variant there are no intervals ({where}): "
                "these numbers show the direction, not whether it exceeds seed noise "
                "(--seeds 3).")
    else:
        head = ("**No**: no change from the running statistics is resolved with the "
                f"family-wise error held by Holm ({where}).")
    return head + " " + control


def _norm_notes(stats: list[Row]) -> list[str]:
    """What the training forward of the zoo's batch-statistics norms means here, for those
    present."""
    def having(norm: str) -> list[str]:
        return [r.label for r in stats if norm in r.variant.config.model.norms]

    notes = []
    if brn := having("brn"):
        notes.append(f"{', '.join(brn)}: Batch Renormalization's training forward corrects the "
                     "batch's statistics toward the running ones (its r and d): unclipped "
                     "it computes its eval forward exactly, so it can move only where r or "
                     "d reach their limits (r_max, d_max).")
    if gbn := having("gbn"):
        sizes = sorted({m.virtual_batch for r in stats if r.label in gbn
                        for m in r.variant.config.make_model().modules()
                        if isinstance(getattr(m, "virtual_batch", None), int)})
        notes.append(f"{', '.join(gbn)}: Ghost BatchNorm's training forward splits every batch "
                     f"into virtual batches of {' / '.join(map(str, sizes))} images, so a "
                     "batch larger than that is normalised a virtual batch at a time.")
    return notes


def test_batch_blocks(rows: list[Row]) -> list[Block]:
    """The table and the analysis (the report's section, under :data:`TITLE`)."""
    measured = [r for r in rows if r.by_seed]
    stats = [r for r in measured if r.batch_stats]
    others = [r for r in measured if not r.batch_stats]
    tested = adjust(stats)
    header = ["variant", "batch statistics", *(MODE_NAMES[m] for m in MODES), "seeds"]
    table = Table(header, [
        [r.label, "yes" if r.batch_stats else "no", *(_cell(r.values(m)) for m in MODES),
         str(len(r.by_seed))] for r in [*stats, *others]], "ll" + "r" * (len(MODES) + 1))
    blocks: list[Block] = [
        Para("Test accuracy (%) of each variant's final checkpoint, mean ± the half-width of "
             "its 95% Student-t interval over the finished seeds (the single value for one "
             "seed). **Running statistics**: eval mode, as every other accuracy of this "
             "report. **Mixed batches of 1000, 8, 2**: the norms in training mode, each test "
             "batch normalised by its own statistics (dropout off, the running statistics "
             "untouched), the test set in one fixed shuffled order. **Single-class "
             f"batches**: the same, each batch one class only (each class's test images in "
             f"the fewest nearly equal batches of at most {CLASS_BATCH})."),
        table,
        Para(_headline(stats, others)),
    ]
    if stats:
        blocks += [Heading("From running statistics to the test batch's own", 3),
                   Bullets([_row_text(r) for r in stats])]
    notes = _norm_notes(stats)
    if notes:
        blocks.append(Para(" ".join(notes)))
    blocks.append(Para("Intervals: the paired Student-t 95% interval of the change from the "
                       "running-statistics accuracy, over seeds (each seed's checkpoint is "
                       "evaluated in every mode, so the differences are paired). A change "
                       f"is called only where its Holm-adjusted p, over the {tested} changes "
                       "of the batch-statistics variants as one family, is below 0.05."))
    left = [f"{r.label}: {', '.join(r.left_out)}" for r in rows if r.left_out]
    if left:
        blocks.append(Para("Left out: " + "; ".join(left) + "."))
    seconds = [s for r in rows for s in r.seconds]
    cached = sum(r.cached for r in rows)
    runs = sum(len(r.by_seed) for r in rows)
    timing = f"{runs} checkpoint{'s' if runs != 1 else ''}: {cached} from their caches"
    if seconds:
        timing += (f", {len(seconds)} computed now in {mean(seconds):.1f} s each on average "
                   f"(five passes over the test set; {CACHE} beside each checkpoint keeps "
                   "the numbers)")
    blocks.append(Para(timing + "."))
    return blocks


def test_batch_parts(suite: SuiteResults, figs_dir: str | Path, *, test=None,
                     device: str = "cpu", progress: Progress | None = _stderr
                     ) -> tuple[list[Block], list[Image]] | None:
    """The report's test-batch section (blocks to render under :data:`TITLE`, and the
    figure, written into ``figs_dir``), or None when no run of ``suite`` has finished.
    ``test`` replaces the dataset's test split (tests use a subset); ``progress`` gets a
    line per checkpoint computed (not cached). A suite whose file sets ``test_batch =
    false`` gets a sentence saying so instead, and nothing is computed."""
    if not suite.test_batch:
        return [Para("Not computed: this suite's file sets test_batch = false (the section "
                     "evaluates every finished checkpoint in five modes, which for a suite "
                     "of many or deep networks is the slow part of the report). To add it, "
                     "delete that line from the file and run the suite again into the same "
                     "folder: its runs are finished, so only the report is built.")], []
    rows = collect(suite, test=test, device=device, progress=progress)
    if not any(r.by_seed for r in rows):
        return None
    path = save(test_batch_figure(rows, suite.dataset), Path(figs_dir) / FIGURE)
    image = Image(path, "Test accuracy with running statistics and with the test batch's own",
                  "Test accuracy (%) of each variant's final checkpoint in five modes: running "
                  "statistics (eval mode), the test batch's own statistics over mixed batches "
                  "of 1000, 8 and 2, and over single-class batches; left the norms that use "
                  "batch statistics, right the others. Line: mean over seeds; dots: seeds.")
    return test_batch_blocks(rows), [image]


# named test_* by the report's convention (batch_size_parts, ...): not tests for pytest
test_batch_figure.__test__ = test_batch_blocks.__test__ = test_batch_parts.__test__ = False
