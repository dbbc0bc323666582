"""The plan of a suite: every run with what its directory already holds, and suite.json.

``plan()`` is the one place that decides what a suite invocation trains; executors get its
jobs and never look at the folder themselves. ``OUT/suite.json`` (written before anything
trains) tells the report which runs belong to the suite and how to label them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normlab.experiments.suite import Suite, Variant, run_dir
from normlab.training.config import RunConfig, config_diff, continue_hint, from_stored
from normlab.training.rundir import FAILED, NEW, PARTIAL, RunDir

MANIFEST = "suite.json"
CONFLICT = "conflict"


@dataclass(frozen=True)
class Job:
    """One run for an executor to train: picklable, so it travels to worker processes and
    Ray tasks. ``rel`` names the run in events ("bn/seed1")."""

    rel: str
    dir: str
    config: RunConfig


@dataclass
class PlannedRun:
    variant: Variant
    seed: int
    rel: str  # "bn/seed1", relative to the suite's folder
    run: RunDir
    config: RunConfig
    state: str  # RunDir's NEW | PARTIAL | FINISHED | DIVERGED, or CONFLICT
    epochs_done: int = 0
    detail: str = ""  # for a conflict: the fields that differ

    @property
    def dir(self) -> Path:
        return self.run.path

    @property
    def to_train(self) -> bool:
        return self.state in (NEW, PARTIAL, FAILED)

    @property
    def epochs_left(self) -> int:
        return self.config.protocol.epochs - self.epochs_done if self.to_train else 0

    @property
    def job(self) -> Job:
        return Job(self.rel, str(self.dir), self.config)

    @property
    def head(self) -> str:
        """'ln seed 1'."""
        return f"{self.variant.name} seed {self.seed}"


def default_out(suite: Suite) -> Path:
    return Path("runs") / suite.name


def plan(suite: Suite, out: str | Path, seeds: list[int] | None = None) -> list[PlannedRun]:
    """Every run of the suite in training order, with what its directory already holds."""
    out = Path(out)
    planned = []
    for variant, seed in suite.runs(seeds):
        rel = run_dir(variant.name, seed)
        run = RunDir(out / rel)
        config = variant.config_for(seed)
        diffs = run.conflicts(config)
        metrics = run.metrics() if run.exists() else []
        state = CONFLICT if diffs else run.state(metrics) if run.exists() else NEW
        planned.append(PlannedRun(variant, seed, rel, run, config, state, len(metrics),
                                  "; ".join(diffs)))
    return planned


def check_conflicts(runs: list[PlannedRun]) -> None:
    bad = [r for r in runs if r.state == CONFLICT]
    if bad:
        raise ValueError(
            "run directories hold runs with other configs, so nothing was trained: "
            + "; ".join(f"{r.dir} ({r.detail})" for r in bad)
            + continue_hint([r.detail for r in bad])
            + "; use another --out or delete those directories"
        )


# ----------------------------------------------------------------------------- suite.json


def config_entry(config: RunConfig) -> dict[str, Any]:
    """A variant's config as suite.json records it: RunConfig.to_dict() without the seed."""
    entry = config.to_dict()
    entry.pop("seed")
    return entry


def manifest(suite: Suite, seeds: list[int] | tuple[int, ...]) -> dict[str, Any]:
    """The content of suite.json for ``seeds`` (the schema the report reads); its
    ``test_batch`` is written only where the suite leaves that section out."""
    out = {
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
    if not suite.test_batch:
        out["test_batch"] = False
    return out


def _canonical(entry: dict[str, Any]) -> dict[str, Any]:
    """A suite.json config entry in this version's form (older normlab wrote it flat)."""
    try:
        return config_entry(from_stored(entry))
    except (ValueError, TypeError):
        return entry


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
            old_config = _canonical(old_v[name].get("config", {}))
            for d in config_diff(old_config, new_v[name]["config"]):
                diffs.append(f"{name}: {d}")
    return diffs


def merged_manifest(out: Path, suite: Suite, seeds: list[int]) -> tuple[dict, list[int]]:
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
        hint = continue_hint(diffs)
        raise ValueError(
            f"{out} holds a different suite ({'; '.join(diffs)}){hint}; use another --out, "
            f"or delete {path} and the run directories that no longer match"
        )
    kept = [s for s in old.get("seeds", []) if s not in seeds]
    return manifest(suite, sorted({*seeds, *kept})), kept


def check_out(suite: Suite, out: str | Path, seeds: list[int] | None = None) -> None:
    """Raise ValueError if ``out`` holds a different suite or runs with other configs."""
    out = Path(out)
    seeds = list(seeds or suite.seeds)
    check_conflicts(plan(suite, out, seeds))
    merged_manifest(out, suite, seeds)


# ----------------------------------------------------------------------------- --dry-run


def _options(variant: Variant, suite: Suite) -> str:
    """The variant's model, regularizer and protocol options that differ from the defaults
    (the protocol's: from the suite's)."""
    from normlab.models import ModelConfig, norm_spec

    c = variant.config
    default = RunConfig(model=ModelConfig(net=c.model.net, net_options=c.model.net_options))
    parts = [f"net={c.model.net}"] if c.model.net != "seed" else []
    if c.model.net_options:
        parts.append(f"net_options={{{c.model.net_options.text()}}}")
    parts.append(f"norm={c.norm}")
    if c.model.norm_options:
        parts.append(f"norm_options={{{c.model.norm_options.text()}}}")
    values = {**{k: (getattr(c.model, k), getattr(default.model, k))
                 for k in ("groups", "dropout", "dropout_draw", "kernels", "eval_kernels",
                           "weight_std")},
              **{k: (getattr(c, k), getattr(default, k))
                 for k in ("l1", "l1_scope", "weight_decay", "precision", "augment",
                           "precise_bn") if hasattr(c, k)}}
    grouped = any(norm_spec(n).grouped for n in c.model.norms)
    for key, (value, base) in values.items():
        if (key == "groups" and grouped) or value != base:
            parts.append(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}")
    parts += [f"{k}={getattr(c.protocol, k)}" for k in c.protocol.__dataclass_fields__
              if getattr(c.protocol, k) != getattr(suite.protocol, k)]
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
        lines.append(f"  {v.name:<{width}}  {v.label:<{lwidth}}  {_options(v, suite)}")
    lines.append("runs (all variants for each seed in turn):")
    n = len(runs)
    for i, r in enumerate(runs, 1):
        if r.state == CONFLICT:
            state = f"CONFLICT: holds another config ({r.detail})"
        elif not r.to_train:
            hist = r.run.metrics()
            acc = f", final test acc {hist[-1]['test_acc']:.2f}%" if hist else ""
            state = f"{r.state} ({r.epochs_done} epochs{acc}): skipped"
        elif r.state == PARTIAL:
            state = f"partial ({r.epochs_done}/{r.config.protocol.epochs} epochs): resumes"
        else:
            state = "to train"
        counter = f"[{i}/{n}]"
        lines.append(f"  {counter:<{2 * len(str(n)) + 3}} {r.rel:<{width + 8}} {state}")
    left = sum(r.epochs_left for r in runs)
    todo = sum(r.to_train for r in runs)
    lines.append(f"{todo} of {n} runs to train ({left} epochs); nothing trained (--dry-run)")
    return "\n".join(lines)

