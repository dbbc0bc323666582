"""How long ``make run`` (the s6 suite, 5 seeds: 25 runs x 20 epochs) takes on a host of a
given kind, from a short sitting of the real suite on this one.

It trains the s6 variants (BN, GN, LN, BN + L1, BN + L1 at the seed's lambda) on the full
training set for ``--epochs`` epochs each (default 2), through normlab's default executor
for a 2-core machine (two runs at once, one thread each, runs split at epoch boundaries),
under the forced dispatch of ``--isa`` (``isa.py``) and that host kind's default precision.
Each epoch's seconds (its training and its test pass, as metrics.jsonl records them) then
give the estimate the suite's own progress line makes: the epochs left, over the runs at
once, at the mean seconds of one run's epoch -- for 500 epochs two at a time, 250 times the
mean epoch. It prints the variants' epoch seconds, the wall time of the sitting and the
estimate; the load average before and after (a sitting on a shared machine runs slow), and
the same estimate from the workers' CPU time (start-up included), which another process
on the machine does not inflate.

    python benchmarks/suite_estimate.py --isa avx2          # as on a 2-core AVX2 host
    python benchmarks/suite_estimate.py --isa native --epochs 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import isa

MAKE_RUN_EPOCHS = 5 * 5 * 20  # variants x seeds x epochs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    isa.add_arguments(parser)
    parser.add_argument("--epochs", type=int, default=2, help="epochs per variant (default 2)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (default 2)")
    args = parser.parse_args()
    precision = isa.apply(args)
    from normlab.experiments import ProcessExecutor, load_suite, plan
    from normlab.training.events import ignore

    suite = load_suite("s6").map_configs(lambda c: dataclasses.replace(
        c, precision=precision or c.precision,
        protocol=dataclasses.replace(c.protocol, epochs=args.epochs)))
    load = os.getloadavg()[0]
    print(f"s6, {args.epochs} epoch(s) per variant, {args.jobs} runs at once, 1 thread each; "
          f"{isa.dispatch(kernels=True)}; precision {precision or 'default'}; load {load:.2f}",
          flush=True)
    with tempfile.TemporaryDirectory() as out:
        jobs = [r.job for r in plan(suite, out, [1])]
        start = time.perf_counter()
        cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
        outcomes = ProcessExecutor(args.jobs, threads=1).execute(jobs, ignore)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the workers, joined
        cpu_seconds = (after.ru_utime + after.ru_stime) - (cpu.ru_utime + cpu.ru_stime)
        if any(o.status != "ok" for o in outcomes.values()):
            raise SystemExit(f"a run failed: {outcomes}")
        seconds, fastest = [], []
        for job in jobs:
            lines = (Path(job.dir) / "metrics.jsonl").read_text().splitlines()
            records = [json.loads(line) for line in lines]
            epoch = [r["seconds"] for r in records]
            seconds += epoch
            fastest.append(min(epoch))
            print(f"  {job.rel:<28} " + ", ".join(
                f"{r['train_seconds']:.1f} + {r['test_seconds']:.1f} s" for r in records),
                flush=True)
    per_epoch = MAKE_RUN_EPOCHS / args.jobs / 60  # minutes of make run per second of epoch
    mean, median = statistics.mean(seconds), statistics.median(seconds)
    quick = statistics.mean(fastest)
    print(f"wall {wall:.0f} s for {len(seconds)} epochs; epoch (train + test) mean {mean:.1f} "
          f"s, median {median:.1f} s, each variant's fastest {quick:.1f} s on average -> make "
          f"run (5 seeds, {MAKE_RUN_EPOCHS} epochs, {args.jobs} at once) about "
          f"{mean * per_epoch:.0f} min at the mean (the suite's own estimate), "
          f"{median * per_epoch:.0f} min at the median, {quick * per_epoch:.0f} min at the "
          f"fastest (an undisturbed machine); a 45-minute make run needs "
          f"{45 / per_epoch:.1f} s per epoch; load {os.getloadavg()[0]:.2f}", flush=True)
    on_cpu = cpu_seconds / len(seconds)
    print(f"the workers' CPU time: {cpu_seconds:.0f} s, {on_cpu:.1f} s per epoch with their "
          f"start-up (one thread each: what an epoch takes when no other process wants the "
          f"cores) -> make run about {on_cpu * per_epoch:.0f} min", flush=True)


if __name__ == "__main__":
    main()
