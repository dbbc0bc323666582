"""Profile one training step through autograd with torch.profiler (the step by hand that
``normlab train`` takes is profiled by ``profile_engine.py``).

The step is the body of ``train_one_epoch``'s loop (``to_input`` with rotation, forward,
NLL, backward, SGD step, the on-device loss/accuracy sums), on real MNIST, seed protocol:
BN model, dropout 0.01, batch 64, SGD(0.1, momentum 0.9), model channels-last as
``normlab.training.run`` builds it. For each thread count: warm-up steps, then ``--steps``
profiled steps; prints wall ms/step (unprofiled, measured just before) and the top ops by
self CPU time with their shares of the profiled total.

    python benchmarks/profile_step.py                    # 1 and 2 threads, 100 steps
    python benchmarks/profile_step.py --threads 1 --dropout 0 --top 25
    python benchmarks/profile_step.py --dropout-impl fold --bf16 --contiguous
    python benchmarks/profile_step.py --dropout-impl kernels --norm gn --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile, record_function

from normlab.accel import accelerated_net
from normlab.data import load_dataset
from normlab.models import ModelConfig
from normlab.training.augment import to_input

sys.path.insert(0, str(Path(__file__).parent))
from levers import replace_dropout, seed_net  # the same models as levers.py


def make_step(model, opt, images, labels, mean, std, rotation=7.0, batch=64, seed=1,
              bf16=False, channels_last=True):
    gen = torch.Generator().manual_seed(seed)
    n = len(labels)
    order = torch.randperm(n, generator=gen)
    angles = (torch.rand(n, generator=gen) * 2 - 1) * rotation
    loss_sum = torch.zeros(())
    correct = torch.zeros((), dtype=torch.long)
    state = {"i": 0}

    def step():
        nonlocal loss_sum, correct
        begin = (state["i"] * batch) % (n - batch)
        state["i"] += 1
        idx = order[begin : begin + batch]
        with record_function("data: to_input"):
            x = to_input(images[idx], mean, std, angles[idx])
            if not channels_last:
                x = x.contiguous()
        y = labels[idx]
        with record_function("forward"), torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            out = model(x)
            loss = F.nll_loss(out.float(), y)
        opt.zero_grad(set_to_none=True)
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            opt.step()
        with record_function("metrics"):
            loss_sum += loss.detach() * len(idx)
            correct += (out.argmax(1) == y).sum()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--dropout", type=float, default=0.01)
    parser.add_argument("--contiguous", action="store_true", help="model not channels-last")
    parser.add_argument("--dropout-impl", choices=["aten", "sparse", "fold", "kernels"],
                        default="aten",
                        help="nn.Dropout (the seed's), SparseDropout, the norm fused with "
                        "its dropout (normlab.accel.normdrop), or that with the ReLU folded "
                        "in too and normlab's C kernels (the network normlab.accel trains, "
                        "here through autograd)")
    parser.add_argument("--norm", default="bn", choices=["bn", "gn", "ln"])
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--top", type=int, default=18)
    args = parser.parse_args()
    ds = load_dataset("mnist")
    for threads in args.threads:
        torch.set_num_threads(threads)
        torch.manual_seed(1)
        if args.dropout_impl == "kernels":  # the fused modules normlab.accel swaps in
            model = accelerated_net(ModelConfig(norms=(args.norm,), dropout=args.dropout,
                                                kernels="normlab"))
        else:
            model = seed_net(args.dropout, args.norm)  # nn.Dropout, torch's ReLU and norms
            if args.dropout_impl != "aten":
                replace_dropout(model, fold=args.dropout_impl == "fold")
        if not args.contiguous:
            model = model.to(memory_format=torch.channels_last)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        step = make_step(model, opt, ds.train_images, ds.train_labels, ds.mean, ds.std,
                         bf16=args.bf16, channels_last=not args.contiguous)
        for _ in range(30):
            step()
        t = time.perf_counter()
        for _ in range(args.steps):
            step()
        wall = (time.perf_counter() - t) / args.steps * 1e3
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                step()
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        print(f"\n=== {threads} thread(s), {args.norm}, dropout {args.dropout}, "
              f"{'contiguous' if args.contiguous else 'channels-last'}, "
              f"dropout impl {args.dropout_impl}{', bf16 autocast' if args.bf16 else ''}: "
              f"{wall:.2f} ms/step unprofiled; profiled self-CPU total "
              f"{total / args.steps / 1e3:.2f} ms/step ===")
        regions = [e for e in events if e.key in
                   ("data: to_input", "forward", "backward", "optimizer", "metrics")]
        for e in sorted(regions, key=lambda e: -e.cpu_time_total):
            print(f"  region {e.key:<16} {e.cpu_time_total / args.steps / 1e3:6.2f} ms/step "
                  f"(inclusive; 'backward' covers the autograd ops it runs)")
        ops = sorted((e for e in events if e.key not in {r.key for r in regions}),
                     key=lambda e: -e.self_cpu_time_total)
        print(f"  {'op (self CPU)':<48} {'ms/step':>8} {'share':>7} {'calls/step':>10}")
        for e in ops[: args.top]:
            print(f"  {e.key[:48]:<48} {e.self_cpu_time_total / args.steps / 1e3:8.3f} "
                  f"{100 * e.self_cpu_time_total / total:6.1f}% "
                  f"{e.count / args.steps:10.1f}")


if __name__ == "__main__":
    main()
