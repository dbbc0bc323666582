"""Two builds of ``kernels.c`` side by side: the same numbers (bit for bit), and which is
faster. For changes to the C kernels that must not change a run, and for the builds other
CPUs get (``--march-a``, ``--march-b``: one of ``kernels.MARCHES``).

Each revision's ``src/normlab/accel/kernels.c`` (``git show REV:...``; ``WORKTREE`` for
the file as it is now) is compiled with normlab's flags for its ``-march`` (default
``$NORMLAB_MARCH``, else ``native``) into a temporary folder and loaded in turn in this
process. Both builds get the same inputs: BatchNorm and GroupNorm (1, 2
and C groups) forward and backward, with and without the folded ReLU and a dropout's
positions (sorted, as normlab draws them, and shuffled), the eval-mode BatchNorm and the
2x2 max pooling, fp32 and bf16, in shapes of the seed's network and odd ones (a partial
last block), with a NaN, a -NaN and a -0.0 in every input (and outputs in the denormal
range); and the training images' rotation (angles from 0 to 180 degrees, odd image sizes).
Every output is compared bit for bit, except that all NaNs count as one: a NaN's sign and
payload come from the operand order the compiler picks, which IEEE leaves open (two builds
of the same source for other CPUs differ there too). Then the seed network's five ReLU ->
BatchNorm layers at batch 64 (bf16, p = 0.01, one thread) are timed with each build,
alternating, median of ``--rounds``.

    python benchmarks/kernels_ab.py HEAD WORKTREE
    python benchmarks/kernels_ab.py 961a7c5 HEAD --rounds 9
    python benchmarks/kernels_ab.py HEAD HEAD --march-a x86-64 --march-b native

:func:`outputs` and :func:`differing` are also what tests/test_dispatch.py compares the
builds for every ``-march`` with.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from normlab.accel import kernels
from normlab.models.dropout import bernoulli_positions

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "src/normlab/accel/kernels.c"
SHAPES = [(4, 8, 26, 26), (3, 16, 24, 24), (5, 12, 10, 10), (2, 14, 8, 8), (3, 3, 5, 7),
          (2, 24, 3, 3), (7, 14, 1, 1)]
NET = [(64, 8, 26, 26), (64, 16, 24, 24), (64, 12, 10, 10), (64, 14, 8, 8), (64, 14, 8, 8)]


def compile_revision(rev: str, folder: Path, arch: str | None = None,
                     name: str | None = None) -> Path:
    """``rev``'s kernels.c built for ``arch`` (default :func:`kernels.march`) as
    ``folder/name.so``."""
    source = folder / f"{name or rev.replace('/', '_')}.c"
    if rev == "WORKTREE":
        source.write_bytes((ROOT / SOURCE).read_bytes())
    else:
        source.write_bytes(subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{SOURCE}"],
                                          check=True, capture_output=True).stdout)
    target = source.with_suffix(".so")
    subprocess.run([kernels.compiler(), *kernels.flags(arch), "-o", str(target), str(source),
                    "-lm"], check=True)
    return target


def use(library: Path) -> None:
    """Load ``library`` as normlab's kernels (kernels.py's signatures, its caches reset)."""
    kernels.library_for.cache_clear()
    kernels._function.cache_clear()
    kernels.build = lambda cc=None, source=None, arch=None: library


def outputs(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    for dtype in (torch.float32, torch.bfloat16):
        for n, c, h, w in SHAPES:
            x = (torch.randn(n, c, h, w, generator=g) * 2 + 0.3).to(dtype)
            special = torch.randint(0, x.numel(), (3,), generator=g)
            x.view(-1)[special] = torch.tensor([float("nan"), -float("nan"), -0.0], dtype=dtype)
            x = x.contiguous(memory_format=torch.channels_last)
            grad = torch.randn(n, c, h, w, generator=g).to(dtype).contiguous(
                memory_format=torch.channels_last)
            weight, bias = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
            torch.manual_seed(seed)
            for relu in (False, True):
                drawn = bernoulli_positions(x.numel(), 0.1)
                shuffled = drawn[torch.randperm(len(drawn), generator=g)]
                for drop in (drawn, shuffled, kernels.no_drop()):
                    mean, var = torch.zeros(c), torch.ones(c)
                    y, saved = kernels.bn_forward(x, weight, bias, mean, var, 0.1, 1e-5, 1.1,
                                                  relu, drop)
                    out += [y, saved, mean, var,
                            *kernels.bn_backward(x, weight, saved, drop, grad, 1.1, relu)]
                    for groups in sorted({1, 2, c} & {d for d in range(1, c + 1) if c % d == 0}):
                        y, saved = kernels.gn_forward(x, groups, weight, bias, 1e-5, 1.1, relu,
                                                      drop)
                        out += [y, saved, *kernels.gn_backward(x, groups, weight, saved, drop,
                                                               grad, 1.1, relu)]
                out.append(kernels.batch_norm_eval(x, weight, bias, mean, var, 1e-5, relu=relu))
                tiny = torch.full_like(weight, 3e-39)  # outputs in the denormal range
                out.append(kernels.batch_norm_eval(x, tiny, bias * 0, mean * 0, var, 1e-5,
                                                   relu=relu))
            if h % 2 == 0 and w % 2 == 0:
                y, picks = kernels.pool_forward(x)
                half = grad[:, :, : h // 2, : w // 2].contiguous(memory_format=torch.channels_last)
                out += [y, picks, kernels.pool_backward(picks, half, x.shape, dtype)]
    for h, w in ((28, 28), (13, 21), (32, 9)):  # the training images' rotation
        images = torch.randint(0, 256, (40, h, w), dtype=torch.uint8, generator=g)
        idx = torch.randint(0, 40, (70,), generator=g)
        degrees = torch.cat([torch.tensor([0.0, 7.0, -7.0, 45.0, 90.0, -180.0, 1e-6]),
                             (torch.rand(63, generator=g) * 2 - 1) * 30])
        out.append(kernels.rotate_normalize(images, idx, degrees, 0.1307, 0.3081))
    return [t.clone() for t in out]


def raw(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t``, every NaN written as one."""
    t = t.contiguous()
    if t.is_floating_point():
        t = torch.where(torch.isnan(t), torch.full_like(t, float("nan")), t)
    return t.view(torch.uint8) if t.dtype != torch.uint8 else t


def differing(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[int]:
    """The indices of the outputs that are not the same bit for bit (NaNs as one)."""
    assert len(a) == len(b)
    return [i for i, (x, y) in enumerate(zip(a, b, strict=True))
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(raw(x), raw(y))]


def step_seconds(rounds_of: int = 200) -> float:
    """Seconds of the network's five ReLU -> BatchNorm layers, forward and backward."""
    layers = []
    torch.manual_seed(0)
    for shape in NET:
        x = torch.randn(shape).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        c = shape[1]
        layers.append((x, torch.rand(c) + 0.5, torch.randn(c), torch.zeros(c), torch.ones(c),
                       bernoulli_positions(x.numel(), 0.01), torch.randn_like(x)))

    def once():
        for x, w, b, mean, var, drop, grad in layers:
            _, saved = kernels.bn_forward(x, w, b, mean, var, 0.1, 1e-5, 1 / 0.99, True, drop)
            kernels.bn_backward(x, w, saved, drop, grad, 1 / 0.99, True)

    for _ in range(20):
        once()
    start = time.perf_counter()
    for _ in range(rounds_of):
        once()
    return (time.perf_counter() - start) / rounds_of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", help="a git revision, or WORKTREE")
    parser.add_argument("b", help="a git revision, or WORKTREE")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--march-a", choices=kernels.MARCHES, help="A's -march")
    parser.add_argument("--march-b", choices=kernels.MARCHES, help="B's -march")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        builds = {name: compile_revision(rev, Path(tmp), arch, name)
                  for name, rev, arch in (("A", args.a, args.march_a),
                                          ("B", args.b, args.march_b))}
        results = {}
        for name, library in builds.items():
            use(library)
            results[name] = [t for seed in range(4) for t in outputs(seed)]
        different = differing(results["A"], results["B"])
        print(f"{len(results['A'])} outputs compared: "
              + ("bit for bit the same (NaNs as one)" if not different
                 else f"{len(different)} DIFFER (first: {different[:8]})"))
        times: dict[str, list[float]] = {"A": [], "B": []}
        for r in range(1, args.rounds + 1):
            for name, library in builds.items():
                use(library)
                times[name].append(step_seconds())
            print(f"round {r}: A {1e3 * times['A'][-1]:.3f} ms, B {1e3 * times['B'][-1]:.3f} ms",
                  flush=True)
    a, b = statistics.median(times["A"]), statistics.median(times["B"])
    print(f"A: {args.a} (-march={args.march_a or kernels.march()})  "
          f"B: {args.b} (-march={args.march_b or kernels.march()})")
    print(f"median, five ReLU -> BatchNorm layers forward + backward (batch 64, bf16): "
          f"A {1e3 * a:.3f} ms, B {1e3 * b:.3f} ms; A/B = {a / b:.3f}")
    if different:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
