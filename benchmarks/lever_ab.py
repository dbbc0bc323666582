"""What one speed lever is worth per epoch, A against B in one process, and proof that it
changes no number.

Two copies of the same model (same initial weights, same optimizer) train side by side
through ``train_one_epoch`` as ``normlab train`` sets it up: A with the engine as it is, B
with the engine wrapped by the lever (``--lever``: a name below, or ``module:function``
taking ``train_one_epoch`` and returning its replacement). Each round trains both for the
same epoch (the same batches, the same global RNG state for the dropout draws), in the
order A B or B A (alternating, so neither side always runs first), and checks that both
returned the same losses, accuracy and L1 term and hold the same weights, bit for bit: a
lever that moves a number stops the script. It prints each round's seconds per epoch and
the ratio A / B (> 1: the lever pays), and the median of the ratios, in wall time and in
the process's CPU time (with one thread, the CPU time leaves out the time another process
held the core: the steadier figure on a shared machine).

The levers (``--lever``): ``none`` (A against A: the sitting's noise), ``gc`` (the cyclic
collector disabled and the heap frozen for the epoch), ``sgd`` (the optimizer's step as the
foreach calls torch's SGD makes, without its Python wrappers), ``cpuinfo`` (/proc/cpuinfo
read once, not on every ``kernels.library()`` call), ``python`` (sgd and cpuinfo).

``--isa`` forces a host kind's dispatch (``isa.py``); ``--concurrent 2`` runs a second
identical process alongside (a second run training at the same time, as ``make run`` trains
two runs at once on two cores), whose figures are printed too. The load average before and
after is printed: another process on a 2-core machine disturbs a sitting.

    python benchmarks/lever_ab.py --lever gc --isa avx2 --threads 1 --rounds 6
    python benchmarks/lever_ab.py --lever gc --concurrent 2 --isa avx2
    python benchmarks/lever_ab.py --lever gc --threads 2        # native dispatch, bf16 here
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import isa

LEVERS = {
    "none": "lever_ab:unchanged",  # A against A: the sitting's noise
    "gc": "lever_ab:collector_paused",
    "sgd": "lever_ab:sgd_direct",
    "cpuinfo": "lever_ab:cpu_id_read_once",
    "python": "lever_ab:python_per_step",  # sgd and cpuinfo together
}


def python_per_step(train_one_epoch):
    """The Python-per-step levers together: :func:`sgd_direct` and
    :func:`cpu_id_read_once`."""
    return sgd_direct(cpu_id_read_once(train_one_epoch))


def cpu_id_read_once(train_one_epoch):
    """``kernels._cpu_id`` (which ``kernels.march()`` reads on every ``library()`` call,
    ``rotate_normalize`` making one per step) read from /proc/cpuinfo once, not per call."""
    import functools

    from normlab.accel import kernels

    def wrapped(*args, **kwargs):
        read = kernels._cpu_id
        kernels._cpu_id = functools.cache(read)
        try:
            return train_one_epoch(*args, **kwargs)
        finally:
            kernels._cpu_id = read

    return wrapped


def unchanged(train_one_epoch):
    return train_one_epoch


def collector_paused(train_one_epoch):
    """The cyclic garbage collector out of the epoch: the process's objects frozen
    (``gc.freeze``: no collection walks them) and the collector disabled for the call, both
    undone after it, also on an exception; a caller's own ``gc.disable``/``gc.freeze`` is
    left as it was. (Measured: no collection runs during an epoch anyway, see the
    ``cyclic collections`` line, so it changes nothing; not part of normlab.)"""

    def wrapped(*args, **kwargs):
        enabled, frozen = gc.isenabled(), gc.get_freeze_count()
        gc.disable()
        if not frozen:
            gc.freeze()
        try:
            return train_one_epoch(*args, **kwargs)
        finally:
            if not frozen:
                gc.unfreeze()
            if enabled:
                gc.enable()

    return wrapped


def sgd_direct(train_one_epoch):
    """``optimizer.step()`` of a plain foreach SGD (the engine's: no hooks, dense grads on
    one device and dtype, a float lr, no maximize) as the foreach calls torch's
    ``_multi_tensor_sgd`` makes, without ``Optimizer.step``'s wrappers, its grouping and its
    per-parameter state walk; the first step (no momentum buffers yet) is torch's."""
    import functools

    import torch
    from torch.optim import optimizer as _optimizer

    @torch.no_grad()
    def step(opt, fallback):
        groups = opt.param_groups
        if (_optimizer._global_optimizer_pre_hooks or _optimizer._global_optimizer_post_hooks
                or opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks):
            return fallback()
        plan = []
        for g in groups:
            params = [p for p in g["params"] if p.grad is not None]
            if g["momentum"]:
                bufs = [opt.state[p].get("momentum_buffer") for p in params]
                if any(b is None for b in bufs):
                    return fallback()  # torch creates the buffers
            else:
                bufs = None
            plan.append((g, params, bufs))
        opt._opt_called = True  # what the LR scheduler's wrapper of step() records
        for g, params, bufs in plan:
            grads = [p.grad for p in params]
            if g["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=g["weight_decay"])
            if bufs is not None:
                torch._foreach_mul_(bufs, g["momentum"])
                torch._foreach_add_(bufs, grads, alpha=1 - g["dampening"])
                if g["nesterov"]:
                    torch._foreach_add_(grads, bufs, alpha=g["momentum"])
                else:
                    grads = bufs
            torch._foreach_add_(params, grads, alpha=-g["lr"])
        return None

    def plain(opt) -> bool:
        return type(opt) is torch.optim.SGD and all(
            g["foreach"] and not g["maximize"] and not g["differentiable"] and not g["fused"]
            and not isinstance(g["lr"], torch.Tensor) for g in opt.param_groups)

    def wrapped(model, data, optimizer, **kwargs):
        if not plain(optimizer):
            return train_one_epoch(model, data, optimizer, **kwargs)
        had = "step" in optimizer.__dict__
        fallback = optimizer.step
        optimizer.step = functools.partial(step, optimizer, fallback)
        try:
            return train_one_epoch(model, data, optimizer, **kwargs)
        finally:
            if had:
                optimizer.step = fallback
            else:
                del optimizer.step

    return wrapped


class Collections:
    """The cyclic collector's runs and their seconds, per side (``gc.callbacks``)."""

    def __init__(self) -> None:
        self.side, self.start = "", 0.0
        self.count = {"A": 0, "B": 0}
        self.seconds = {"A": 0.0, "B": 0.0}
        gc.callbacks.append(self)

    def __call__(self, phase: str, info: dict) -> None:
        if not self.side:
            return
        if phase == "start":
            self.start = time.perf_counter()
        else:
            self.count[self.side] += 1
            self.seconds[self.side] += time.perf_counter() - self.start


def resolve(name: str):
    module, _, fn = LEVERS.get(name, name).partition(":")
    return getattr(__import__(module, fromlist=[fn]), fn)


def sides(args):
    """Both sides' model, optimizer, ``train_one_epoch`` and its keyword arguments, as
    ``normlab train`` sets a run up (``profile_engine.prepared``), on the same data."""
    import torch
    from profile_engine import prepared

    from normlab.training import RunConfig, train_one_epoch

    config = RunConfig.from_options(norm=args.norm, precision=args.precision or
                                    isa.precision(args.isa), l1=args.l1 or None)
    lever = resolve(args.lever)
    out, data = {}, None
    for side, train in (("A", train_one_epoch), ("B", lever(train_one_epoch))):
        torch.manual_seed(config.seed)  # the same weights on both sides
        model, opt, data, kwargs = prepared(config, args.threads, args.steps, data)
        out[side] = (model, opt, train, kwargs)
    return config, data, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lever", default="gc", help=f"one of {', '.join(LEVERS)} or "
                                                      "module:function")
    parser.add_argument("--isa", default=None, choices=tuple(isa.ISAS))
    parser.add_argument("--norm", default="bn")
    parser.add_argument("--precision", default=None, choices=("fp32", "bf16"))
    parser.add_argument("--l1", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=300, help="steps per epoch")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--concurrent", type=int, default=1,
                        help="identical processes running at once (default 1)")
    parser.add_argument("--tag", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    isa.reexec(args.isa)
    others = []
    if args.concurrent > 1:
        argv = [a for a in sys.argv[1:]]
        i = argv.index("--concurrent")
        del argv[i : i + 2]
        others = [subprocess.Popen([sys.executable, sys.argv[0], *argv, "--tag", f"[{k}] "])
                  for k in range(2, args.concurrent + 1)]
    import torch

    load = os.getloadavg()[0]
    config, data, side = sides(args)
    tag = args.tag or ("[1] " if others else "")
    print(f"{tag}lever {args.lever}: {config.norm}, {config.precision}, {args.threads} "
          f"thread(s), {args.steps} steps/epoch, {isa.dispatch(kernels=True)}, "
          f"{args.concurrent} process(es); load {load:.2f}", flush=True)
    ratios, cpu_ratios = [], []
    collections = Collections()
    for r in range(args.rounds + 1):  # round 0 warms both up (not counted)
        rng = torch.get_rng_state()
        got = {}
        for s in ("AB" if r % 2 else "BA"):
            model, opt, train, kwargs = side[s]
            torch.set_rng_state(rng)
            collections.side = s if r else ""
            cpu = time.process_time()
            got[s] = train(model, data, opt, epoch=r + 1, **kwargs)
            collections.side = ""
            got[s]["cpu_seconds"] = time.process_time() - cpu
        keys = ("train_loss", "train_acc", "train_l1", "first_bad_step")
        same = all(got["A"][k] == got["B"][k] for k in keys) and all(
            torch.equal(a, b) for a, b in zip(side["A"][0].state_dict().values(),
                                              side["B"][0].state_dict().values(), strict=True))
        if not same:
            raise SystemExit(f"{tag}round {r}: the lever changed the numbers: "
                             f"A {[got['A'][k] for k in keys]} B {[got['B'][k] for k in keys]}")
        a, b = got["A"]["train_seconds"], got["B"]["train_seconds"]
        ca, cb = got["A"]["cpu_seconds"], got["B"]["cpu_seconds"]
        if r:
            ratios.append(a / b)
            cpu_ratios.append(ca / cb)
        print(f"{tag}round {r}{' (warm-up)' if not r else ''}: wall A {a:.2f} s, B {b:.2f} s "
              f"({1000 * a / args.steps:.2f} / {1000 * b / args.steps:.2f} ms/step) -> "
              f"{a / b:.3f}; CPU A {ca:.2f} s, B {cb:.2f} s -> {ca / cb:.3f}; "
              f"loss {got['A']['train_loss']:.6f} equal", flush=True)
    print(f"{tag}median A/B over {len(ratios)} rounds: wall {statistics.median(ratios):.3f} "
          f"(min {min(ratios):.3f}, max {max(ratios):.3f}), process CPU time "
          f"{statistics.median(cpu_ratios):.3f} (min {min(cpu_ratios):.3f}, max "
          f"{max(cpu_ratios):.3f}); numbers bitwise equal; load {os.getloadavg()[0]:.2f}",
          flush=True)
    print(f"{tag}cyclic collections during the timed epochs: "
          + ", ".join(f"{s} {collections.count[s]} ({1000 * collections.seconds[s]:.1f} ms)"
                      for s in "AB"), flush=True)
    for other in others:
        other.wait()
    time.sleep(0)


if __name__ == "__main__":
    main()
