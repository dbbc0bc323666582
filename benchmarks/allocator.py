"""The memory allocator as a lever (``normlab.memory``): glibc's malloc with its defaults,
glibc as normlab tunes it (``NORMLAB_MALLOC=glibc``: freed blocks up to 32 MB kept in the
heap), normlab's default (tcmalloc preloaded by the ``normlab`` command, glibc tuned too),
and jemalloc and tcmalloc preloaded by hand with nothing else.

Each measurement is a fresh ``normlab train`` process (BN, seed protocol, one epoch of the
first ``--images`` MNIST training images, ``--threads`` threads), its ``train_seconds``
read from metrics.jsonl; allocators alternate (A B C A B C ...), ``--rounds`` rounds, and
the table gives the median seconds per 60,000 images and the ratio to glibc. A step
allocates a fresh activation and gradient for every layer; the allocators differ in
whether those megabyte blocks come back to the OS (and page-fault on reuse) or stay cached.

    python benchmarks/allocator.py                     # 3 rounds, 1 thread, 12,800 images
    python benchmarks/allocator.py --threads 2 --precision bf16

Needs the Debian packages libjemalloc2 and libtcmalloc-minimal4 (allocators not found are
left out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

LIBS = Path("/usr/lib/x86_64-linux-gnu")
# name -> the library preloaded by hand (None: none) and NORMLAB_MALLOC ("": unset)
ALLOCATORS = {"glibc": (None, "system"), "glibc tuned": (None, "glibc"), "normlab": (None, ""),
              "jemalloc": (LIBS / "libjemalloc.so.2", "system"),
              "tcmalloc": (LIBS / "libtcmalloc_minimal.so.4", "system")}


def start_epoch(out: Path, images: int, options: list[str],
                env: dict[str, str] | None = None) -> subprocess.Popen:
    """A fresh ``normlab train`` process: one epoch of the first ``images`` MNIST images
    into ``out``, with ``options`` (--threads, --precision, ...)."""
    return subprocess.Popen([sys.executable, "-m", "normlab", "train", "--out", str(out),
                             "--quiet", "--subset", str(images), "--epochs", "1", *options],
                            env=env, stdout=subprocess.DEVNULL)


def seconds_per_60k(out: Path, images: int) -> float:
    """The run's training seconds, per 60,000 images."""
    return json.loads((out / "metrics.jsonl").read_text())["train_seconds"] * 60_000 / images


def one_epoch(preload: Path | None, mode: str, args: argparse.Namespace, out: Path) -> float:
    """Seconds of training per 60,000 images in a fresh process using ``preload``."""
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "NORMLAB_MALLOC")}
    if mode:
        env["NORMLAB_MALLOC"] = mode
    if preload is not None:
        env["LD_PRELOAD"] = str(preload)
    proc = start_epoch(out, args.images, ["--threads", str(args.threads),
                                          "--precision", args.precision], env)
    if proc.wait():
        raise SystemExit(f"normlab train failed ({proc.returncode})")
    return seconds_per_60k(out, args.images)


def untimed_metrics(out: Path) -> dict:
    from normlab.training.rundir import TIMING_FIELDS

    record = json.loads((out / "metrics.jsonl").read_text())
    return {k: v for k, v in record.items() if k not in TIMING_FIELDS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--images", type=int, default=12_800)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    args = parser.parse_args()
    present = {k: v for k, v in ALLOCATORS.items() if v[0] is None or v[0].exists()}
    times: dict[str, list[float]] = {k: [] for k in present}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, (lib, mode) in present.items():
                times[name].append(one_epoch(lib, mode, args, Path(tmp) / f"{name}-{r}"))
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items()),
                  flush=True)
        same = len({json.dumps(untimed_metrics(Path(tmp) / f"{name}-{r}"), sort_keys=True)
                    for name in present for r in range(args.rounds)}) == 1
    base = statistics.median(times["glibc"])
    print(f"\nseconds per 60,000 training images ({args.threads} thread(s), {args.precision}),"
          f" median of {args.rounds} rounds:")
    for name, values in times.items():
        m = statistics.median(values)
        print(f"  {name:11s} {m:6.1f} s  (range {min(values):.1f}-{max(values):.1f})  "
              f"{base / m:.2f}x glibc")
    print(f"metrics (timing aside) identical in every process: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
