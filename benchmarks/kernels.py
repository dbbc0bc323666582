"""normlab's ReLU -> norm kernels as a lever (``normlab.accel.kernels``): ``--kernels
normlab`` against ``--kernels aten`` (torch's ReLU and norms), for each norm of the s6
suite, in the settings normlab trains in.

Each measurement is a fresh ``normlab train`` process (seed protocol, one epoch of the
first ``--images`` MNIST training images, normlab's default allocator), its
``train_seconds`` read from metrics.jsonl. Settings: one process on 1 thread; one process
on 2 threads (``normlab train``'s best on 2 cores); and two processes at once on 1 thread
each (what ``normlab suite`` runs on 2 cores; both processes' seconds are averaged). The
two kernel choices alternate (A B A B ...), ``--rounds`` rounds; the table gives the
median seconds per 60,000 images and the ratio aten / normlab.

    python benchmarks/kernels.py                            # bn gn ln, fp32, 3 rounds
    python benchmarks/kernels.py --precision bf16 --norms bn gn
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from allocator import seconds_per_60k, start_epoch, untimed_metrics

SETTINGS = {"1 thread": (1, 1), "2 threads": (1, 2), "2 at once x 1 thread": (2, 1)}


def measure(norm: str, kernels: str, setting: str, args, folder: Path) -> float:
    processes, threads = SETTINGS[setting]
    outs = [folder / f"{norm}-{kernels}-{setting.replace(' ', '')}-{i}" for i in range(processes)]
    options = ["--norm", norm, "--kernels", kernels, "--threads", str(threads),
               "--precision", args.precision]
    running = [start_epoch(out, args.images, options) for out in outs]
    if any(p.wait() for p in running):
        raise SystemExit(f"normlab train failed: {norm} {kernels} {setting}")
    return statistics.mean(seconds_per_60k(out, args.images) for out in outs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=12_800)
    parser.add_argument("--norms", nargs="+", default=["bn", "gn", "ln"])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    args = parser.parse_args()
    times: dict[tuple[str, str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for norm in args.norms:
                for setting in args.settings:
                    for kernels in ("aten", "normlab"):
                        folder = Path(tmp) / f"round{r}"
                        t = measure(norm, kernels, setting, args, folder)
                        times.setdefault((norm, setting, kernels), []).append(t)
                    print(f"round {r + 1} {norm} {setting}: aten "
                          f"{times[norm, setting, 'aten'][-1]:.1f} s, normlab "
                          f"{times[norm, setting, 'normlab'][-1]:.1f} s", flush=True)
        first = Path(tmp) / "round0"
        same = all(untimed_metrics(p) == untimed_metrics(first / p.name)
                   for p in Path(tmp).glob("round*/*"))
    print(f"\nseconds per 60,000 training images ({args.precision}), median of "
          f"{args.rounds} rounds:")
    print(f"  {'norm':4s} {'setting':22s} {'aten':>7s} {'normlab':>8s}  ratio")
    for norm in args.norms:
        for setting in args.settings:
            a = statistics.median(times[norm, setting, "aten"])
            n = statistics.median(times[norm, setting, "normlab"])
            print(f"  {norm:4s} {setting:22s} {a:6.1f}s {n:7.1f}s  {a / n:.2f}x")
    print(f"each run's metrics (timing aside) identical across rounds: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
