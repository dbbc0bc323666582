"""Read a suite directory: suite.json (or the run folders it implies) and each run's files.

Nothing here assumes the suite is complete: a run may be missing (no config.json yet),
unfinished (metrics so far, no predictions.pt: still training, or stopped) or finished.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from normlab.training.run import CONFIG, LOCK, METRICS, PREDICTIONS, read_metrics

MISSING, UNFINISHED, FINISHED = "missing", "unfinished", "finished"



@dataclass
class Run:
    variant: str
    seed: int
    dir: Path
    config: dict[str, Any] | None = None  # the RunConfig dict from config.json
    metrics: list[dict[str, Any]] = field(default_factory=list)

    @property
    def state(self) -> str:
        if self.config is None:
            return MISSING
        return FINISHED if (self.dir / PREDICTIONS).exists() else UNFINISHED

    @property
    def training(self) -> bool:
        """Whether a live process holds the run's lock (on this machine) right now."""
        if self.state != UNFINISHED:
            return False
        try:
            pid = int((self.dir / LOCK).read_text().strip() or 0)
        except (OSError, ValueError):
            return False
        if pid <= 0:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # alive, another user's
            return True
        return True

    def progress(self, epochs: int | None) -> str:
        """'training now, epoch 3 of 20 done' / 'stopped after epoch 3 of 20'."""
        of = f" of {epochs}" if epochs else ""
        if self.training:
            return f"training now, {len(self.metrics)}{of} epochs done"
        if not self.metrics:
            return "stopped before its first epoch"
        # a run trained by a process that holds no lock looks stopped: the age tells
        age = time.time() - (self.dir / METRICS).stat().st_mtime
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
        path = self.dir / PREDICTIONS
        if not path.exists():
            return None
        data = torch.load(path, weights_only=True, map_location="cpu")
        return {k: v.numpy() for k, v in data.items()}


@dataclass
class Variant:
    name: str
    label: str
    config: dict[str, Any]  # the RunConfig dict without "seed"
    runs: list[Run] = field(default_factory=list)

    @property
    def l1(self) -> float:
        return float(self.config.get("l1", 0.0) or 0.0)

    @property
    def epochs(self) -> int | None:
        return (self.config.get("protocol") or {}).get("epochs")

    @property
    def finished(self) -> list[Run]:
        return [r for r in self.runs if r.state == FINISHED]

    @property
    def with_metrics(self) -> list[Run]:
        return [r for r in self.runs if r.metrics]

    @cached_property
    def parameters(self) -> int | None:
        """Trainable parameter count of the variant's model (None if it cannot be built)."""
        from normlab.models import count_parameters
        from normlab.training.config import RunConfig

        try:
            model = RunConfig.from_dict({**self.config, "seed": 1}).make_model()
        except (ValueError, TypeError, KeyError):  # a config this version cannot build
            return None
        return int(count_parameters(model))


@dataclass
class Suite:
    root: Path
    name: str
    description: str
    source: str
    dataset: str
    seeds: list[int]
    variants: list[Variant]

    @property
    def runs(self) -> list[Run]:
        return [r for v in self.variants for r in v.runs]

    def by_state(self, state: str) -> list[Run]:
        return [r for r in self.runs if r.state == state]


def _load_run(variant: str, seed: int, run_dir: Path) -> Run:
    run = Run(variant, seed, run_dir)
    cfg = run_dir / CONFIG
    if cfg.exists():
        try:
            run.config = json.loads(cfg.read_text())["run"]
        except (json.JSONDecodeError, KeyError):
            return run  # unreadable: treat as missing
        run.metrics = read_metrics(run_dir)
    return run


def _without_seed(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k != "seed"}


def _from_manifest(root: Path, manifest: dict[str, Any]) -> Suite:
    variants = {
        v["name"]: Variant(v["name"], v.get("label") or v["name"],
                           _without_seed(v.get("config", {})))
        for v in manifest.get("variants", [])
    }
    for entry in manifest.get("runs", []):
        variant = variants.get(entry["variant"])
        if variant is None:
            raise ValueError(f"suite.json: run {entry} names unknown variant {entry['variant']!r}")
        variant.runs.append(_load_run(variant.name, int(entry["seed"]), root / entry["dir"]))
    for v in variants.values():
        v.runs.sort(key=lambda r: r.seed)
    return Suite(
        root=root,
        name=manifest.get("name", root.name),
        description=manifest.get("description", ""),
        source=manifest.get("source", ""),
        dataset=manifest.get("dataset") or _first_dataset(variants.values()),
        seeds=[int(s) for s in manifest.get("seeds", [])],
        variants=list(variants.values()),
    )


def _discover(root: Path) -> Suite:
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
        config = next(r.config for r in runs if r.config is not None)
        variants.append(Variant(name, name, _without_seed(config), runs))
    return Suite(root, root.name, "", "", _first_dataset(variants), seeds, variants)


def _first_dataset(variants) -> str:
    return next((v.config.get("dataset") for v in variants if v.config.get("dataset")), "mnist")


def load_suite(root: str | Path) -> Suite:
    """The suite at ``root``: from suite.json if present, else from its run folders."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory")
    manifest = root / "suite.json"
    if manifest.exists():
        try:
            data = json.loads(manifest.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{manifest} is not valid JSON: {err}") from err
        return _from_manifest(root, data)
    return _discover(root)
