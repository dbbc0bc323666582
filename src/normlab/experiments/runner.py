"""Run a suite: plan it, hand its jobs to an executor, then build the report.

Each run goes through :func:`normlab.training.train`, which checkpoints atomically after
every epoch and skips finished runs, so a suite killed at any moment keeps every finished
epoch and rerunning the same command continues where it stopped.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from normlab.experiments.executors import (
    FAILED,
    Executor,
    Outcome,
    ProcessExecutor,
    SerialExecutor,
)
from normlab.experiments.plan import (
    MANIFEST,
    PlannedRun,
    check_conflicts,
    default_out,
    merged_manifest,
    plan,
)
from normlab.experiments.progress import ConsoleProgress, duration
from normlab.experiments.suite import Suite
from normlab.files import write_json
from normlab.reports.stats import fmt_mean_std
from normlab.tracking import check_trackers, suite_tracking
from normlab.training.events import Listener
from normlab.training.run import resolve_device
from normlab.training.rundir import TIMING_FIELDS, RunDir


def what_is_kept(runs: list[PlannedRun]) -> str:
    """What an interrupted suite keeps, in words: finished runs and completed epochs."""
    dirs = [RunDir(r.dir) for r in runs]
    return (f"{sum(d.finished() for d in dirs)} of {len(dirs)} runs are finished; completed "
            f"epochs kept: {sum(len(d.metrics()) for d in dirs)}")


def make_executor(jobs: int | None = None, device: str = "auto", threads: int | None = None,
                  runs: int | None = None) -> Executor:
    """The local executor for ``jobs`` runs at a time. By default (None): on a CPU one run
    per core (at most ``runs``), one thread each (for a 5,760-parameter model a second
    thread buys far less than a second run: benchmarks/README.md), so every run of a suite
    gets the same thread count, and so the same numbers, however many are left; on a GPU one
    run at a time."""
    if jobs is None:
        on_gpu = resolve_device(device).type == "cuda"
        jobs = 1 if on_gpu else max(1, min(os.cpu_count() or 1, runs or 1))
        threads = threads or (None if on_gpu else 1)
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    if jobs == 1:
        return SerialExecutor(device, threads)
    return ProcessExecutor(jobs, device, threads)


def run_suite(
    suite: Suite,
    out: str | Path | None = None,
    seeds: list[int] | None = None,
    *,
    executor: Executor | None = None,
    device: str = "auto",
    threads: int | None = None,
    jobs: int | None = None,
    quiet: bool = False,
    listener: Listener | None = None,
    log: Callable[[str], None] | None = None,
    track: str | Sequence[str] | None = None,
) -> Path:
    """Train every run of ``suite`` that is not finished, then build the report.

    ``out`` defaults to runs/<suite name>; ``seeds`` overrides the suite's. The executor
    defaults to :func:`make_executor` (``jobs`` runs at a time, ``device``, ``threads``).
    Progress goes to ``listener`` (default: the console), and to the trackers ``track``
    names ("wandb", "mlflow", "tensorboard": :mod:`normlab.tracking`), which also get the
    runs finished before. Returns the report's path. Everything is checked before the first
    run trains.
    """
    out = Path(out) if out is not None else default_out(suite)
    seeds = list(seeds or suite.seeds)
    started = time.perf_counter()
    runs = plan(suite, out, seeds)
    executor = executor or make_executor(jobs, device, threads, sum(r.to_train for r in runs))
    check_conflicts(runs)
    data_manifest, kept = merged_manifest(out, suite, seeds)
    check_trackers(track)  # a missing package fails before anything is written
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / MANIFEST, data_manifest)

    heads = {r.rel: f"[{i}/{len(runs)}] {r.head}" for i, r in enumerate(runs, 1)}
    console = ConsoleProgress(heads, sum(r.epochs_left for r in runs), quiet=quiet,
                              splits_runs=executor.splits_runs)
    listener = listener or console
    tracking = suite_tracking(track, suite, out, runs, listener)  # it passes events on
    listener = tracking or listener
    say = log or (lambda text: print(text, flush=True))
    if kept:
        say(f"{out / MANIFEST} keeps seeds {', '.join(map(str, kept))} of an earlier invocation")
    for r in runs:
        if not r.to_train:
            say(f"{heads[r.rel]}: skipped ({r.state})")
    to_train = [r for r in runs if r.to_train]
    try:
        if tracking is not None:  # the runs finished before: in the trackers too
            tracking.sync(r.rel for r in runs if not r.to_train)
        outcomes = executor.execute([r.job for r in to_train], listener)
    except KeyboardInterrupt:
        console.close()
        say(f"stopped: {what_is_kept(runs)}; rerun the same command to continue")
        raise
    finally:
        for line in tracking.close() if tracking is not None else []:
            say(line)
        console.close()

    from normlab.reports import build_report

    report = build_report(out)
    say(summary(suite, runs, outcomes, time.perf_counter() - started))
    say(f"report: {report}")
    failed = failed_runs(outcomes)
    if failed:
        raise ValueError(f"{len(failed)} of {len(runs)} runs failed ({', '.join(failed)}); the "
                         "others are trained and in the report; rerun the same command to retry")
    return Path(report)


def failed_runs(outcomes: dict[str, Outcome]) -> list[str]:
    return [rel for rel, o in outcomes.items() if o.status == FAILED]


def summary(suite: Suite, runs: list[PlannedRun], outcomes: dict[str, Outcome],
            seconds: float) -> str:
    """The lines printed after a suite: each run's final accuracy, then mean ± std."""
    failed = failed_runs(outcomes)
    trained = len(outcomes) - len(failed)
    lines = [f"suite {suite.name}: {len(runs)} runs ({trained} trained, "
             f"{len(runs) - len(outcomes)} already finished"
             + (f", {len(failed)} FAILED" if failed else "") + f") in {duration(seconds)}"]
    width = max(len(v.name) for v in suite.variants)
    by_variant: dict[str, list[float]] = {}
    for r in runs:
        outcome = outcomes.get(r.rel)
        status = ("skipped" if outcome is None else
                  "trained" if outcome.status == "ok" else outcome.status)
        hist = r.run.metrics()
        if not hist:
            lines.append(f"  {r.variant.name:<{width}}  seed {r.seed:<3}  {status}, no epochs")
            continue
        final, best = hist[-1]["test_acc"], max(h["test_acc"] for h in hist)
        by_variant.setdefault(r.variant.name, []).append(final)
        lines.append(f"  {r.variant.name:<{width}}  seed {r.seed:<3}  test acc final "
                     f"{final:6.2f}%  best {best:6.2f}%  ({len(hist)} epochs, {status})")
    if len(suite.seeds) > 1 or any(len(v) > 1 for v in by_variant.values()):
        lines.append("mean ± std of the final test accuracy over seeds:")
        for name, accs in by_variant.items():
            lines.append(f"  {name:<{width}}  {fmt_mean_std(accs)}%  (n={len(accs)})")
    return "\n".join(lines)


def comparable_metrics(run: str | Path) -> list[dict]:
    """A run's metrics.jsonl without the timing fields (for comparing reruns)."""
    return [{k: v for k, v in rec.items() if k not in TIMING_FIELDS}
            for rec in RunDir(run).metrics()]
