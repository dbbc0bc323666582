"""normlab against the seed's pipeline, side by side in one process run: per-round ratios,
their medians, and the last line ``ratio_epoch=<x> ratio_suite=<y>``.

Both sides train the BN model with the seed protocol (batch 64, SGD 0.1/0.9, rotation ±7°)
on real MNIST. Each round runs, alternating A B A B:

* epoch: the seed pipeline (``reference_seed.py``: per-image Pillow rotation in a
  shuffling DataLoader, the seed's loop with tqdm and per-step ``.item()``) and normlab's
  engine, each for ``--steps`` steps plus one test pass, at 1 and at 2 threads. An epoch's
  time is 938 steps at the measured ms/step plus the test pass; each side is taken at its
  best thread setting of the round.
* suite: the five ``s6`` variants, ``--suite-epochs`` epochs each (default 2; the real
  suite has 20), an epoch being ``--steps`` steps plus a test pass: the seed pipeline runs
  them one after another at its best thread setting (as the seed notebook did), normlab
  trains them through its default executor for this machine (all cores, one run per core:
  ``ProcessExecutor``, which splits a run between workers at an epoch boundary so that they
  finish together), worker start-up included. With one epoch per variant no run could be
  split, and five runs on two cores would take three runs' time however they are
  scheduled; the real suite's 20 epochs split as two do.

Every measurement runs in a fresh process (spawned; data loading and a 20-step warm-up not
timed), so each side runs with the allocator it has in use (``normlab.memory``): normlab's
processes with tcmalloc preloaded when it is installed and glibc's malloc tuned, the seed's
notebook with glibc's defaults; a setting global to a process cannot leak from one side to
the other. normlab's side runs in normlab's default precision (bf16 autocast on CPUs with AMX
or AVX512-BF16, else fp32), or the one ``--precision`` names; the seed's side is always
fp32. Absolute times vary by 30% between runs on shared machines; the ratios are what the
script is for.

``--isa avx2|avx512|native`` runs both sides as a host of that kind would (``isa.py``): the
script runs itself again with ATen's and oneDNN's dispatch capped (and normlab's kernels
built for that ``-march``), every measuring process inherits it, and each side prints the
dispatch it actually got. normlab then runs in that host kind's default precision (fp32 on
AVX2 and AVX-512, which have no native bf16) unless ``--precision`` says otherwise; the
seed's side runs as its user would, fp32 on whatever torch dispatches to.

    python benchmarks/bench_vs_seed.py                 # 3 rounds of 300 steps, ~10 min
    python benchmarks/bench_vs_seed.py --quick         # 2 rounds of 100 steps, ~3 min
    python benchmarks/bench_vs_seed.py --quick --isa avx2   # as on an AVX2-only CPU
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import isa
import reference_seed as seed

from normlab import accel
from normlab.data import load_dataset
from normlab.experiments import ProcessExecutor, load_suite, plan
from normlab.memory import allocator, keep_freed_memory, workers_preloaded
from normlab.training import RunConfig, TensorData, evaluate, train_one_epoch
from normlab.training.engine import memory_format
from normlab.training.events import ignore
from normlab.training.run import make_optimizer

STEPS_PER_EPOCH = 938  # 60,000 images in batches of 64
WARMUP_STEPS = 20


def in_fresh_process(fn, *args):
    """``fn(*args)`` in a newly spawned process (see the module docstring)."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def allocator_in_use() -> str:
    keep_freed_memory()
    return allocator()


def normlab_epoch(config: RunConfig, steps: int, threads: int) -> tuple[float, float, str]:
    """(ms per training step, seconds of the test pass, the dispatch it got) of normlab's
    engine, set up as ``normlab.training.train`` sets up every process that trains."""
    keep_freed_memory()
    torch.set_num_threads(threads)
    ds = load_dataset(config.dataset)
    n = steps * 64
    train = TensorData(ds.train_images[:n], ds.train_labels[:n], ds.mean, ds.std)
    test = TensorData(ds.test_images, ds.test_labels, ds.mean, ds.std)
    torch.manual_seed(config.seed)
    model = config.make_model().to(
        memory_format=memory_format(torch.device("cpu"), threads, config.model))
    step = accel.prepare(model, config.model, config.precision, enabled=config.accel == "on")
    opt, _, _ = make_optimizer(model, config, steps)
    p = config.protocol
    warm = TensorData(train.images[:WARMUP_STEPS * 64], train.labels[:WARMUP_STEPS * 64],
                      ds.mean, ds.std)
    for data in (warm, train):
        tr = train_one_epoch(model, data, opt, seed=config.seed, epoch=1,
                             batch_size=p.batch_size, rotation=p.rotation,
                             precision=config.precision, augment=config.augment, step=step)
    te = evaluate(model, test, p.eval_batch_size, precision=config.precision)
    paths = step.paths()
    convs = ", ".join(f"{k}: {v}" for k, v in paths.get("onednn_convs", {}).items())
    took = (f"; step {paths['step']}, norms {paths['norms']}"
            + (f", convolutions on kept oneDNN primitives {convs}" if convs else ""))
    return (1000 * tr["train_seconds"] / steps, te["test_seconds"],
            isa.dispatch(kernels=True) + took)


def seed_epoch(steps: int, threads: int) -> tuple[float, float, str]:
    """:func:`seed_steps` after a warm-up of the same pipeline, in this process, and the
    dispatch it got."""
    ds = load_dataset("mnist")
    seed_steps(ds, WARMUP_STEPS, threads)
    return (*seed_steps(ds, steps, threads), isa.dispatch())


def seed_steps(ds, steps: int, threads: int) -> tuple[float, float]:
    """(ms per training step, seconds of the test pass) of the seed's pipeline."""
    loader = seed.make_loader(ds.train_images, ds.train_labels, seed=1)
    model, opt, _ = seed.make_model_and_optimizer(seed=1)
    stats = seed.train_epoch(model, loader, opt, max_steps=steps, threads=threads,
                             progress_file=io.StringIO())
    start = time.perf_counter()
    seed.test(model, ds.test_images, ds.test_labels, threads=threads)
    return 1000 * stats["seconds"] / stats["steps"], time.perf_counter() - start


def epoch_seconds(ms_per_step: float, test_seconds: float) -> float:
    return STEPS_PER_EPOCH * ms_per_step / 1000 + test_seconds


def seed_suite(steps: int, threads: int, variants: int, epochs: int) -> float:
    """Wall seconds of the seed pipeline over ``variants`` models, one after another (in one
    process, as the notebook ran them; the data loaded beforehand), ``epochs`` epochs of
    ``steps`` steps and a test pass each."""
    ds = load_dataset("mnist")
    start = time.perf_counter()
    for _ in range(variants):
        loader = seed.make_loader(ds.train_images, ds.train_labels, seed=1)
        model, opt, _ = seed.make_model_and_optimizer(seed=1)
        for _ in range(epochs):
            seed.train_epoch(model, loader, opt, max_steps=steps, threads=threads,
                             progress_file=io.StringIO())
            seed.test(model, ds.test_images, ds.test_labels, threads=threads)
    return time.perf_counter() - start


def normlab_suite(steps: int, precision: str, epochs: int) -> float:
    """Wall seconds of normlab training the s6 variants, ``epochs`` epochs of ``steps``
    steps each, through its default executor for this machine (one run per core, one
    thread each)."""
    suite = load_suite("s6").map_configs(lambda c: dataclasses.replace(
        c, subset=steps * 64, precision=precision,
        protocol=dataclasses.replace(c.protocol, epochs=epochs)))
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as out:
        jobs = [r.job for r in plan(suite, out, [1])]
        start = time.perf_counter()
        outcomes = ProcessExecutor(min(cores, len(jobs)), threads=1).execute(jobs, ignore)
        seconds = time.perf_counter() - start
    if any(o.status != "ok" for o in outcomes.values()):
        raise SystemExit(f"a normlab run failed: {outcomes}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--suite-epochs", type=int, default=2,
                        help="epochs of --steps steps per variant in the suite (default 2)")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 100 steps")
    isa.add_arguments(parser)  # --isa: both sides; --precision: normlab's side
    args = parser.parse_args()
    precision = isa.apply(args)  # before anything is measured: every process inherits it
    if args.quick:
        args.rounds, args.steps = 2, 100
    load_dataset("mnist")  # fetched and cached before anything is timed
    config = RunConfig.from_options(precision=precision)
    args.precision = config.precision
    with workers_preloaded():
        malloc = in_fresh_process(allocator_in_use)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, capability "
          f"{torch.backends.cpu.get_cpu_capability()}; normlab: dropout "
          f"{config.model.dropout_draw}, kernels {config.model.kernels}, {args.precision}, "
          f"malloc {malloc}; {args.rounds} "
          f"rounds of {args.steps} steps"
          + (f"; forced dispatch {args.isa}: {isa.ISAS[args.isa] or 'none'}" if args.isa else ""),
          flush=True)
    epoch_ratios, suite_ratios = [], []
    for r in range(1, args.rounds + 1):
        times, got = {}, {}
        for threads in (1, 2):
            *measured, got["seed"] = in_fresh_process(seed_epoch, args.steps, threads)
            times[("seed", threads)] = epoch_seconds(*measured)
            with workers_preloaded():  # as the normlab command and its workers start
                *measured, got["normlab"] = in_fresh_process(normlab_epoch, config,
                                                             args.steps, threads)
            times[("normlab", threads)] = epoch_seconds(*measured)
        if r == 1:
            for side in ("seed", "normlab"):
                print(f"dispatch {side}: {got[side]}", flush=True)
        best = {side: min((times[(side, t)], t) for t in (1, 2)) for side in ("seed", "normlab")}
        epoch_ratios.append(best["seed"][0] / best["normlab"][0])
        t_seed = best["seed"][1]
        seed_wall = in_fresh_process(seed_suite, args.steps, t_seed, 5, args.suite_epochs)
        normlab_wall = normlab_suite(args.steps, args.precision, args.suite_epochs)
        suite_ratios.append(seed_wall / normlab_wall)
        print(f"round {r}: epoch (938 steps + test): seed "
              + ", ".join(f"{times[('seed', t)]:.1f} s @{t}t" for t in (1, 2))
              + "; normlab " + ", ".join(f"{times[('normlab', t)]:.1f} s @{t}t" for t in (1, 2))
              + f" -> {epoch_ratios[-1]:.2f}x;  suite of 5 x {args.suite_epochs} x {args.steps} "
              f"steps: seed "
              f"{seed_wall:.1f} s @{t_seed}t, normlab {normlab_wall:.1f} s "
              f"-> {suite_ratios[-1]:.2f}x", flush=True)
    print(f"median over {args.rounds} rounds: epoch {statistics.median(epoch_ratios):.2f}x, "
          f"suite {statistics.median(suite_ratios):.2f}x")
    print(f"ratio_epoch={statistics.median(epoch_ratios):.2f} "
          f"ratio_suite={statistics.median(suite_ratios):.2f}")


if __name__ == "__main__":
    main()
