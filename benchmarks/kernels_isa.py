"""Per-kernel times of two builds of ``kernels.c`` for one ``-march`` (default
x86-64-v3): the seed network's ReLU -> norm layers (batch 64) forward and backward, fp32
and bf16, BatchNorm and GroupNorm, and the 2x2 max pooling, one thread, the builds
alternating, median of ``--rounds``.

    python benchmarks/kernels_isa.py HEAD WORKTREE --march x86-64-v3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from kernels_ab import NET, compile_revision, use

from normlab.accel import kernels
from normlab.models.dropout import bernoulli_positions


def cases(dtype):
    torch.manual_seed(0)
    layers = []
    for shape in NET:
        x = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)
        c = shape[1]
        layers.append((x, torch.rand(c) + 0.5, torch.randn(c), torch.zeros(c), torch.ones(c),
                       bernoulli_positions(x.numel(), 0.01), torch.randn_like(x)))
    saved = [kernels.bn_forward(x, w, b, m, v, 0.1, 1e-5, 1 / 0.99, True, d)[1]
             for x, w, b, m, v, d, _ in layers]
    gsaved = [kernels.gn_forward(x, 2, w, b, 1e-5, 1 / 0.99, True, d)[1]
              for x, w, b, m, v, d, _ in layers]
    pool_x = [x for x, *_ in layers[:2]]

    def bn_fwd():
        for x, w, b, m, v, d, _ in layers:
            kernels.bn_forward(x, w, b, m, v, 0.1, 1e-5, 1 / 0.99, True, d)

    def bn_bwd():
        for (x, w, _, _, _, d, g), s in zip(layers, saved, strict=True):
            kernels.bn_backward(x, w, s, d, g, 1 / 0.99, True)

    def gn_fwd():
        for x, w, b, _m, _v, d, _ in layers:
            kernels.gn_forward(x, 2, w, b, 1e-5, 1 / 0.99, True, d)

    def gn_bwd():
        for (x, w, _, _, _, d, g), s in zip(layers, gsaved, strict=True):
            kernels.gn_backward(x, 2, w, s, d, g, 1 / 0.99, True)

    def bn_eval():
        for x, w, b, m, v, *_ in layers:
            kernels.batch_norm_eval(x, w, b, m, v, 1e-5, relu=True)

    def pool():
        for x in pool_x:
            kernels.pool_forward(x)

    return {"bn fwd (stats+affine)": bn_fwd, "bn bwd (grad_stats+grad_input)": bn_bwd,
            "gn fwd": gn_fwd, "gn bwd": gn_bwd, "bn eval": bn_eval, "pool fwd": pool}


def seconds(fn, reps=60):
    for _ in range(5):
        fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a")
    parser.add_argument("b")
    parser.add_argument("--march", default="x86-64-v3", choices=kernels.MARCHES)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        builds = {n: compile_revision(rev, Path(tmp), args.march, n)
                  for n, rev in (("A", args.a), ("B", args.b))}
        for dtype in (torch.float32, torch.bfloat16):
            for _ in range(args.rounds):
                for n, lib in builds.items():
                    use(lib)
                    for name, fn in cases(dtype).items():
                        times.setdefault((dtype, name, n), []).append(seconds(fn))
    print(f"-march={args.march}, A = {args.a}, B = {args.b}; ms, median of {args.rounds}")
    for (dtype, name, n), t in times.items():
        if n == "A":
            a, b = statistics.median(t), statistics.median(times[dtype, name, "B"])
            print(f"  {str(dtype)[6:]:9s} {name:32s} A {1e3 * a:7.3f}  B {1e3 * b:7.3f}  "
                  f"A/B {a / b:5.2f}")


if __name__ == "__main__":
    main()
