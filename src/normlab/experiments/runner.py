"""Run a suite: every variant x seed into OUT/<variant>/seed<k>, then the report.

Each run goes through :func:`normlab.training.train`, which checkpoints atomically after
every epoch and skips finished runs, so a suite killed at any moment keeps every finished
epoch and rerunning the same command continues where it stopped. ``OUT/suite.json`` (written
before anything trains) tells the report which runs belong to the suite and how to label them.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normlab.experiments.suite import Suite, Variant, run_dir
from normlab.files import write_json
from normlab.training.config import RunConfig, config_diff
from normlab.training.run import (
    CONFIG,
    is_finished,
    load_split_tensors,
    read_metrics,
    resolve_device,
    train,
)

MANIFEST = "suite.json"
TIMING_FIELDS = ("train_seconds", "test_seconds", "seconds", "images_per_second")


@dataclass
class PlannedRun:
    variant: Variant
    seed: int
    rel: str  # "bn/seed1", relative to the suite's folder
    dir: Path
    config: RunConfig
    state: str  # "new" | "partial" | "finished" | "conflict"
    epochs_done: int = 0
    detail: str = ""  # for a conflict: the fields that differ

    @property
    def epochs_left(self) -> int:
        return 0 if self.state == "finished" else self.config.protocol.epochs - self.epochs_done


def default_out(suite: Suite) -> Path:
    return Path("runs") / suite.name


def config_entry(config: RunConfig) -> dict[str, Any]:
    """A variant's config as suite.json records it: RunConfig.to_dict() without the seed."""
    entry = config.to_dict()
    entry.pop("seed")
    return entry


def manifest(suite: Suite, seeds: list[int] | tuple[int, ...]) -> dict[str, Any]:
    """The content of suite.json for ``seeds`` (the schema the report reads)."""
    return {
        "name": suite.name,
        "description": suite.description,
        "source": str(suite.source),
        "dataset": suite.dataset,
        "seeds": list(seeds),
        "variants": [
            {"name": v.name, "label": v.label, "config": config_entry(v.config)}
            for v in suite.variants
        ],
        "runs": [
            {"variant": v.name, "seed": s, "dir": run_dir(v.name, s)} for v, s in suite.runs(seeds)
        ],
    }


def manifest_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What makes ``new`` a different suite from the one whose suite.json is ``old``
    (labels, names, descriptions and seeds may change; variants and configs may not)."""
    diffs = []
    if old.get("dataset") != new["dataset"]:
        diffs.append(f"dataset: {old.get('dataset')!r} -> {new['dataset']!r}")
    old_v = {v["name"]: v for v in old.get("variants", [])}
    new_v = {v["name"]: v for v in new["variants"]}
    removed = [n for n in old_v if n not in new_v]
    added = [n for n in new_v if n not in old_v]
    if removed:
        diffs.append(f"variants no longer in the suite: {', '.join(removed)}")
    if added:
        diffs.append(f"new variants: {', '.join(added)}")
    if not removed and not added and list(old_v) != list(new_v):
        diffs.append(f"variant order: {', '.join(old_v)} -> {', '.join(new_v)}")
    for name in new_v:
        if name in old_v:
            for d in config_diff(old_v[name].get("config", {}), new_v[name]["config"]):
                diffs.append(f"{name}: {d}")
    return diffs


def _merged_manifest(out: Path, suite: Suite, seeds: list[int]) -> tuple[dict, list[int]]:
    """suite.json to write: the new one, keeping the seeds of earlier invocations (their run
    directories are still there). Refuses a suite.json of a different suite."""
    path = out / MANIFEST
    if not path.exists():
        return manifest(suite, seeds), []
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path} is not valid JSON ({err}); delete it or use another --out"
        ) from err
    diffs = manifest_differences(old, manifest(suite, seeds))
    if diffs:
        raise ValueError(
            f"{out} holds a different suite ({'; '.join(diffs)}); use another --out, "
            f"or delete {path} and the run directories that no longer match"
        )
    kept = [s for s in old.get("seeds", []) if s not in seeds]
    return manifest(suite, sorted({*seeds, *kept})), kept


def plan(suite: Suite, out: str | Path, seeds: list[int] | None = None) -> list[PlannedRun]:
    """Every run of the suite in training order, with what its directory already holds."""
    out = Path(out)
    planned = []
    for variant, seed in suite.runs(seeds):
        rel = run_dir(variant.name, seed)
        path = out / rel
        config = variant.config_for(seed)
        state, done, detail = "new", 0, ""
        if (path / CONFIG).exists():
            saved = json.loads((path / CONFIG).read_text())["run"]
            diffs = config_diff(saved, config.to_dict())
            if diffs:
                state, detail = "conflict", "; ".join(diffs)
            elif is_finished(path):
                state, done = "finished", len(read_metrics(path))
            else:
                done = len(read_metrics(path))
                state = "partial" if done else "new"
        planned.append(PlannedRun(variant, seed, rel, path, config, state, done, detail))
    return planned


def _check_conflicts(runs: list[PlannedRun]) -> None:
    bad = [r for r in runs if r.state == "conflict"]
    if bad:
        raise ValueError(
            "run directories hold runs with other configs, so nothing was trained: "
            + "; ".join(f"{r.dir} ({r.detail})" for r in bad)
            + "; use another --out or delete those directories"
        )


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, sec = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _options(variant: Variant) -> str:
    """The variant's model and regularizer options that differ from RunConfig's defaults."""
    defaults = RunConfig.__dataclass_fields__
    parts = [f"norm={variant.config.norm}"]
    for key in ("groups", "dropout", "l1", "l1_scope", "weight_decay"):
        value = getattr(variant.config, key)
        if (key == "groups" and variant.config.norm == "gn") or value != defaults[key].default:
            parts.append(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)


def _protocol_line(suite: Suite) -> str:
    from normlab.training.protocols import PROTOCOLS

    p = suite.protocol
    base = PROTOCOLS[p.name]
    changed = [f"{k}={getattr(p, k)}" for k in p.__dataclass_fields__
               if getattr(p, k) != getattr(base, k)]
    over = f" with {', '.join(changed)}" if changed else ""
    return (f"protocol {p.name}{over} ({p.epochs} epochs, batch {p.batch_size}, lr {p.lr:g}, "
            f"momentum {p.momentum:g}, scheduler {p.scheduler}, rotation ±{p.rotation:g}°)")


def format_plan(suite: Suite, out: str | Path, seeds: list[int] | None = None) -> str:
    """The resolved plan (for --dry-run): settings, variants, runs and their state."""
    out = Path(out)
    seeds = list(seeds or suite.seeds)
    runs = plan(suite, out, seeds)
    lines = [
        f"suite {suite.name}  ({suite.source})",
        f"  {suite.dataset}, "
        + (f"first {suite.subset:,} training images, " if suite.subset else "")
        + f"seeds {', '.join(map(str, seeds))}",
        f"  {_protocol_line(suite)}",
        f"  output {out}",
        "variants:",
    ]
    width = max(len(v.name) for v in suite.variants)
    lwidth = max(len(v.label) for v in suite.variants)
    for v in suite.variants:
        lines.append(f"  {v.name:<{width}}  {v.label:<{lwidth}}  {_options(v)}")
    lines.append("runs (all variants for each seed in turn):")
    n = len(runs)
    for i, r in enumerate(runs, 1):
        if r.state == "finished":
            hist = read_metrics(r.dir)
            acc = f", final test acc {hist[-1]['test_acc']:.2f}%" if hist else ""
            state = f"finished ({r.epochs_done} epochs{acc}): skipped"
        elif r.state == "partial":
            state = f"partial ({r.epochs_done}/{r.config.protocol.epochs} epochs): resumes"
        elif r.state == "conflict":
            state = f"CONFLICT: holds another config ({r.detail})"
        else:
            state = "to train"
        counter = f"[{i}/{n}]"
        lines.append(f"  {counter:<{2 * len(str(n)) + 3}} {r.rel:<{width + 8}} {state}")
    left = sum(r.epochs_left for r in runs if r.state != "conflict")
    todo = sum(r.state in ("new", "partial") for r in runs)
    lines.append(f"{todo} of {n} runs to train ({left} epochs); nothing trained (--dry-run)")
    return "\n".join(lines)


def check_out(suite: Suite, out: str | Path, seeds: list[int] | None = None) -> None:
    """Raise ValueError if ``out`` holds a different suite or runs with other configs."""
    out = Path(out)
    seeds = list(seeds or suite.seeds)
    _check_conflicts(plan(suite, out, seeds))
    _merged_manifest(out, suite, seeds)


def run_suite(
    suite: Suite,
    out: str | Path | None = None,
    seeds: list[int] | None = None,
    *,
    device: str = "auto",
    threads: int | None = None,
    quiet: bool = False,
    jobs: int = 1,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Train every run of ``suite`` that is not finished, then build the report.

    ``out`` defaults to runs/<suite name>; ``seeds`` overrides the suite's. ``jobs`` > 1
    trains that many runs at once in worker processes (each run's numbers are the same as
    when trained alone with the same thread count). Returns the path of the report.
    Everything is checked before the first run trains.
    """
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    log = log or (lambda msg: print(msg, flush=True))
    out = Path(out) if out is not None else default_out(suite)
    seeds = list(seeds or suite.seeds)
    started = time.perf_counter()
    runs = plan(suite, out, seeds)
    _check_conflicts(runs)
    data_manifest, kept = _merged_manifest(out, suite, seeds)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / MANIFEST, data_manifest)
    if kept:
        log(f"{out / MANIFEST} keeps seeds {', '.join(map(str, kept))} of an earlier invocation")

    to_train = [r for r in runs if r.state != "finished"]
    for r in runs:
        if r.state == "finished":
            log(f"{_head(runs, r)}: skipped (finished)")
    if threads is None and jobs > 1:  # share the cores instead of oversubscribing them
        threads = max(1, (os.cpu_count() or 1) // jobs)
    train_args = {"device": device, "threads": threads, "quiet": quiet or jobs > 1}
    if jobs > 1 and len(to_train) > 1:
        trained = _train_parallel(runs, to_train, jobs, train_args, log)
    else:
        trained = _train_serial(runs, to_train, train_args, log)
    results = [(r, *trained[r.rel]) if r.rel in trained else (r, "skipped", read_metrics(r.dir))
               for r in runs]

    from normlab.reports import build_report

    report = build_report(out)
    log(_summary(suite, results, time.perf_counter() - started))
    log(f"report: {report}")
    return Path(report)


def _eta(left_epochs: int, seconds: float, epochs: int) -> str:
    """Time left from the wall seconds per epoch trained so far in this invocation."""
    if not epochs:
        return "estimating…"
    return f"about {_duration(left_epochs * seconds / epochs)} left"


def _train_serial(runs, to_train, train_args, log) -> dict[str, tuple[str, list[dict]]]:
    """One run after another in this process, the data loaded once for all of them."""
    data = None
    seconds, epochs, out = 0.0, 0, {}
    for r in to_train:
        left = sum(x.epochs_left for x in to_train[to_train.index(r):])
        resume = f", resuming after epoch {r.epochs_done}" if r.state == "partial" else ""
        log(f"{_head(runs, r)}{resume} -> {r.dir}  ({_eta(left, seconds, epochs)})")
        if data is None:
            data = load_split_tensors(r.config, resolve_device(train_args["device"]))
        t0 = time.perf_counter()
        try:
            result = train(r.config, r.dir, data=data, **train_args)
        except KeyboardInterrupt:
            _log_stop(runs, [r], log)
            raise
        seconds += time.perf_counter() - t0
        epochs += max(len(result.history) - r.epochs_done, 0)
        out[r.rel] = (_status(result.status), result.history)
    return out


def _train_one(config: RunConfig, directory: str, train_args: dict) -> str:
    """A worker process's job (module level, so that it pickles); returns the run's status."""
    return train(config, directory, **train_args).status


def _epochs_on_disk(runs: list[PlannedRun]) -> tuple[int, int]:
    """(epochs trained by this invocation, epochs still to train), read from metrics.jsonl:
    runs still in flight in worker processes count with the epochs they have finished."""
    done = left = 0
    for r in runs:
        n = len(read_metrics(r.dir))
        done += max(n - r.epochs_done, 0)
        left += 0 if is_finished(r.dir) else max(r.config.protocol.epochs - n, 0)
    return done, left


def _train_parallel(runs, to_train, jobs, train_args, log) -> dict[str, tuple[str, list[dict]]]:
    """``jobs`` runs at a time in worker processes; a line as each one starts and ends."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    ctx = multiprocessing.get_context("spawn")  # no forked torch thread pools
    started = time.perf_counter()
    out, pending = {}, {}
    queue = list(to_train)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        try:
            while queue or pending:
                while queue and len(pending) < jobs:
                    r = queue.pop(0)
                    done, left = _epochs_on_disk(to_train)
                    log(f"{_head(runs, r)} started -> {r.dir}  "
                        f"({_eta(left, time.perf_counter() - started, done)})")
                    pending[pool.submit(_train_one, r.config, str(r.dir), train_args)] = r
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    r = pending.pop(future)
                    history = read_metrics(r.dir)
                    out[r.rel] = (_status(future.result()), history)
                    log(f"{_head(runs, r)} done: final test accuracy "
                        f"{history[-1]['test_acc']:.2f}%")
        except BaseException as err:
            pool.shutdown(wait=True, cancel_futures=True)
            if isinstance(err, KeyboardInterrupt):
                _log_stop(runs, list(pending.values()), log)
            raise
    return out


def _log_stop(runs: list[PlannedRun], current: list[PlannedRun], log) -> None:
    names = ", ".join(_head(runs, r) for r in current)
    done = sum(1 for x in runs if is_finished(x.dir))
    log(f"stopped during {names}: {done} of {len(runs)} runs are finished and kept, and every "
        "completed epoch is checkpointed; rerun the same command to continue")


def _head(runs: list[PlannedRun], r: PlannedRun) -> str:
    """'[3/10] ln seed 1': which run of how many."""
    return f"[{runs.index(r) + 1}/{len(runs)}] {r.variant.name} seed {r.seed}"


def _status(run_status: str) -> str:
    """The summary's word for a run trained now: train()'s "ok" reads as "trained"."""
    return "diverged" if run_status == "diverged" else "trained"


def _summary(
    suite: Suite, results: list[tuple[PlannedRun, str, list[dict]]], seconds: float
) -> str:
    trained = sum(s != "skipped" for _, s, _ in results)
    lines = [f"suite {suite.name}: {len(results)} runs ({trained} trained, "
             f"{len(results) - trained} already finished) in {_duration(seconds)}"]
    width = max(len(v.name) for v in suite.variants)
    by_variant: dict[str, list[float]] = {}
    for r, status, hist in results:
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
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            lines.append(f"  {name:<{width}}  {statistics.mean(accs):6.2f} ± {std:.2f}%  "
                         f"(n={len(accs)})")
    return "\n".join(lines)


def comparable_metrics(run: str | Path) -> list[dict]:
    """A run's metrics.jsonl without the timing fields (for comparing reruns)."""
    return [{k: v for k, v in rec.items() if k not in TIMING_FIELDS} for rec in read_metrics(run)]
