"""Read a suite directory: suite.json (or the run folders it implies) and each run's files.

Nothing here assumes the suite is complete: a run may be missing (no config.json yet),
unfinished (metrics so far, no predictions.pt: still training, or stopped), failed (its
last attempt raised) or finished. Every file is read through :class:`RunDir`.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from normlab.training.config import RunConfig, from_stored
from normlab.training.rundir import CONFIG, DIVERGED, FAILED, FINISHED, METRICS, RunDir

__all__ = ["FAILED", "FINISHED", "MISSING", "UNFINISHED", "RunResults", "SuiteResults",
           "VariantResults", "load_results"]

# A run's state as the report words it (results.csv's run_state column), besides RunDir's
# FINISHED and FAILED.
MISSING, UNFINISHED = "missing", "unfinished"


@dataclass
class RunResults:
    """One run of a suite, as its directory holds it now."""

    variant: str
    seed: int
    run: RunDir
    config: RunConfig | None = None  # None: not started (or a config this version can't read)
    metrics: list[dict[str, Any]] = field(default_factory=list)

    @property
    def dir(self) -> Path:
        return self.run.path

    @property
    def state(self) -> str:
        """:meth:`RunDir.state` in the report's words: finished (diverged runs too: they
        finished early), failed, unfinished (started: a config, maybe epochs) or missing."""
        state = self.run.state(self.metrics)
        if state in (FINISHED, DIVERGED, FAILED):
            return FINISHED if state == DIVERGED else state
        return MISSING if self.config is None else UNFINISHED

    @property
    def training(self) -> bool:
        """Whether a live process holds the run's lock (on this machine) right now."""
        return self.state == UNFINISHED and self.run.training()

    def progress(self, epochs: int | None) -> str:
        """'training now, epoch 3 of 20 done' / 'stopped after epoch 3 of 20'."""
        of = f" of {epochs}" if epochs else ""
        if self.training:
            return f"training now, {len(self.metrics)}{of} epochs done"
        if not self.metrics:
            return "stopped before its first epoch"
        # a run trained by a process that holds no lock looks stopped: the age tells
        age = time.time() - self.run.file(METRICS).stat().st_mtime
        ago = f"{age / 60:.0f} min" if age < 5400 else f"{age / 3600:.1f} h"
        return f"stopped after epoch {len(self.metrics)}{of}, last written {ago} ago"

    @property
    def final(self) -> dict[str, Any] | None:
        return self.metrics[-1] if self.metrics else None

    @property
    def diverged(self) -> bool:
        return any(m.get("status") == "diverged" for m in self.metrics)

    def series(self, key: str) -> np.ndarray:
        return np.array([float(m[key]) for m in self.metrics], dtype=float)

    def predictions(self) -> dict[str, np.ndarray] | None:
        data = self.run.predictions()
        return None if data is None else {k: v.numpy() for k, v in data.items()}


@dataclass
class VariantResults:
    name: str
    label: str
    config: RunConfig | None  # the variant's config (seed 1); None if this version can't read it
    runs: list[RunResults] = field(default_factory=list)

    @property
    def l1(self) -> float:
        return self.config.l1 if self.config else 0.0

    @property
    def epochs(self) -> int | None:
        return self.config.protocol.epochs if self.config else None

    @property
    def finished(self) -> list[RunResults]:
        return [r for r in self.runs if r.state == FINISHED]

    @property
    def with_metrics(self) -> list[RunResults]:
        return [r for r in self.runs if r.metrics]

    @cached_property
    def parameters(self) -> int | None:
        """Trainable parameter count of the variant's model (None if it cannot be built)."""
        from normlab.models import count_parameters

        return None if self.config is None else int(count_parameters(self.config.make_model()))


@dataclass
class SuiteResults:
    root: Path
    name: str
    description: str
    source: str
    dataset: str
    seeds: list[int]
    variants: list[VariantResults]
    test_batch: bool = True  # False: the suite leaves the test-batch section out

    @property
    def runs(self) -> list[RunResults]:
        return [r for v in self.variants for r in v.runs]

    def by_state(self, state: str) -> list[RunResults]:
        return [r for r in self.runs if r.state == state]


def _load_run(variant: str, seed: int, run_dir: Path) -> RunResults:
    run = RunDir(run_dir)
    try:
        config = run.config()
    except ValueError:
        return RunResults(variant, seed, run)  # unreadable: treat as missing
    return RunResults(variant, seed, run, config, run.metrics() if config else [])


def _variant_config(entry: dict[str, Any]) -> RunConfig | None:
    try:
        return from_stored(entry)
    except (ValueError, TypeError):  # a config this version cannot read
        return None


def _from_manifest(root: Path, manifest: dict[str, Any]) -> SuiteResults:
    variants = {
        v["name"]: VariantResults(v["name"], v.get("label") or v["name"],
                                  _variant_config(v.get("config", {})))
        for v in manifest.get("variants", [])
    }
    for entry in manifest.get("runs", []):
        variant = variants.get(entry["variant"])
        if variant is None:
            raise ValueError(f"suite.json: run {entry} names unknown variant {entry['variant']!r}")
        variant.runs.append(_load_run(variant.name, int(entry["seed"]), root / entry["dir"]))
    for v in variants.values():
        v.runs.sort(key=lambda r: r.seed)
    return SuiteResults(
        root=root,
        name=manifest.get("name", root.name),
        description=manifest.get("description", ""),
        source=manifest.get("source", ""),
        dataset=manifest.get("dataset") or _first_dataset(variants.values()),
        seeds=[int(s) for s in manifest.get("seeds", [])],
        variants=list(variants.values()),
        test_batch=manifest.get("test_batch", True) is not False,
    )


def _discover(root: Path) -> SuiteResults:
    found: dict[str, dict[int, Path]] = {}
    for cfg in sorted(root.glob(f"*/seed*/{CONFIG}")):
        match = re.fullmatch(r"seed(\d+)", cfg.parent.name)
        if match:
            found.setdefault(cfg.parent.parent.name, {})[int(match.group(1))] = cfg.parent
    if not found:
        raise ValueError(
            f"{root} holds no suite.json and no run directories (<variant>/seed<k>/{CONFIG})"
        )
    seeds = sorted({s for by_seed in found.values() for s in by_seed})
    variants = []
    for name, by_seed in found.items():
        runs = [_load_run(name, s, by_seed.get(s, root / name / f"seed{s}")) for s in seeds]
        config = next((r.config for r in runs if r.config is not None), None)
        if config is not None:
            config = dataclasses.replace(config, seed=1)
        variants.append(VariantResults(name, name, config, runs))
    return SuiteResults(root, root.name, "", "", _first_dataset(variants), seeds, variants)


def _first_dataset(variants) -> str:
    return next((v.config.dataset for v in variants if v.config), "mnist")


def load_results(root: str | Path) -> SuiteResults:
    """The suite at ``root``: from suite.json if present, else from its run folders."""
    from normlab.experiments.plan import MANIFEST

    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory")
    manifest = root / MANIFEST
    if manifest.exists():
        try:
            data = json.loads(manifest.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{manifest} is not valid JSON: {err}") from err
        return _from_manifest(root, data)
    return _discover(root)
