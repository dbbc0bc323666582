"""One run directory: its files, its config, its metrics, its state and its lock.

    config.json     {"run": RunConfig.to_dict(), "normlab": ..., "device": ..., "threads": ...}
    metrics.jsonl   one JSON line per finished epoch (appended while the run trains)
    checkpoint.pt   after every epoch, written atomically, with every RNG state
    predictions.pt  the last epoch's test predictions: its presence means "finished"
    .lock           the pid of the process training it now
    failure.txt     why the last attempt failed (written by an executor; gone once it trains)

``train()`` writes through it, the suite planner and the report read through it.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from normlab.files import atomic_write, write_json, write_text
from normlab.training.config import RunConfig, config_diff, from_stored

CONFIG, METRICS, CHECKPOINT, PREDICTIONS, LOCK, FAILURE = (
    "config.json", "metrics.jsonl", "checkpoint.pt", "predictions.pt", ".lock", "failure.txt",
)
# A run's states: nothing trained yet; some epochs; finished; finished because it diverged;
# its last attempt failed (an error, not a divergence: rerunning retries it).
NEW, PARTIAL, FINISHED, DIVERGED, FAILED = "new", "partial", "finished", "diverged", "failed"
# Fields of a metrics record that measure time, not the run: they differ between reruns.
TIMING_FIELDS = ("train_seconds", "test_seconds", "seconds", "images_per_second",
                 "precise_seconds")
# Final test accuracy (%) below which a 10-class run "sits at chance" (1.5 x the 10% of
# guessing): training stops there, and the report flags it.
CHANCE_ACC = 15.0


class RunDir:
    """The run directory at ``path`` (which need not exist yet)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    def file(self, name: str) -> Path:
        return self.path / name

    # ------------------------------------------------------------------ reading

    def exists(self) -> bool:
        """Whether a run was ever started here (config.json written)."""
        return self.file(CONFIG).exists()

    def stored(self) -> dict[str, Any] | None:
        """config.json as a dict, or None when absent or unreadable."""
        try:
            data = json.loads(self.file(CONFIG).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return data if isinstance(data, dict) and isinstance(data.get("run"), dict) else None

    def config(self) -> RunConfig | None:
        """The run's config (any format normlab has written), or None when there is none.
        Raises ValueError for a config.json this version cannot read."""
        stored = self.stored()
        if stored is None:
            return None
        try:
            return from_stored(stored["run"])
        except (ValueError, TypeError) as err:
            raise ValueError(f"{self.file(CONFIG)}: unreadable run config: {err}") from err

    def metrics(self) -> list[dict]:
        """metrics.jsonl, one dict per epoch. The file is appended to while the run trains,
        so a half-written last line ends the list instead of raising."""
        try:
            text = self.file(METRICS).read_text()
        except FileNotFoundError:
            return []
        records = []
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
        return records

    def finished(self) -> bool:
        return self.file(PREDICTIONS).exists()

    def state(self, metrics: list[dict] | None = None) -> str:
        """NEW, PARTIAL, FINISHED, DIVERGED or FAILED (``metrics`` if already read)."""
        metrics = self.metrics() if metrics is None else metrics
        if self.finished():
            diverged = any(m.get("status") == "diverged" for m in metrics)
            return DIVERGED if diverged else FINISHED
        if self.failure() is not None:
            return FAILED
        return PARTIAL if metrics else NEW

    def failure(self) -> str | None:
        """Why the last attempt failed, or None."""
        try:
            return self.file(FAILURE).read_text().strip()
        except FileNotFoundError:
            return None

    def record_failure(self, message: str) -> None:
        write_text(self.file(FAILURE), message + "\n")

    def conflicts(self, config: RunConfig) -> list[str]:
        """The fields in which the run stored here differs from ``config`` (none if no run)."""
        stored = self.config()
        return [] if stored is None else config_diff(stored.to_dict(), config.to_dict())

    def lock_holder(self) -> int | None:
        """The pid of the live process (on this machine) training this run, else None."""
        try:
            pid = int(self.file(LOCK).read_text().strip() or 0)
        except (OSError, ValueError):
            return None
        if pid <= 0:
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:  # alive, another user's
            return pid
        return pid

    def training(self) -> bool:
        return not self.finished() and self.lock_holder() is not None

    def predictions(self) -> dict[str, torch.Tensor] | None:
        path = self.file(PREDICTIONS)
        if not path.exists():
            return None
        return torch.load(path, weights_only=True, map_location="cpu")

    # ------------------------------------------------------------------ writing

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """One process trains a run directory at a time: a second one is refused, not let in
        to interleave checkpoints. A lock left by a killed process (pid gone) is taken over."""
        self.path.mkdir(parents=True, exist_ok=True)
        path = self.file(LOCK)
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                break
            except FileExistsError:
                pid = self.lock_holder()
                if pid is None:
                    path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                raise ValueError(
                    f"{self.path} is being trained by process {pid}; wait for it or stop it"
                ) from None
        else:
            raise ValueError(f"could not lock {self.path}")
        try:
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            self.file(FAILURE).unlink(missing_ok=True)  # a new attempt
            yield
        finally:
            path.unlink(missing_ok=True)

    def write_config(self, config: RunConfig, meta: dict[str, Any]) -> None:
        write_json(self.file(CONFIG), {"run": config.to_dict(), **meta})

    def record_paths(self, paths: dict[str, Any]) -> None:
        """Write the acceleration paths the run's steps took (:meth:`normlab.accel.Step.
        paths`) into config.json, beside the config (not part of what resume compares)."""
        stored = self.stored()
        if stored is not None and stored.get("paths") != paths:
            write_json(self.file(CONFIG), {**stored, "paths": paths})

    def write_metrics(self, history: list[dict]) -> None:
        write_text(self.file(METRICS), "".join(json.dumps(r) + "\n" for r in history))

    def append_metrics(self, record: dict) -> None:
        with open(self.file(METRICS), "a") as fh:
            fh.write(json.dumps(record) + "\n")

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        atomic_write(self.file(CHECKPOINT), lambda tmp: torch.save(state, tmp))

    def load_checkpoint(self, device: torch.device) -> dict[str, Any] | None:
        path = self.file(CHECKPOINT)
        if not path.exists():
            return None
        return torch.load(path, map_location=device, weights_only=True)

    def save_predictions(self, predictions: dict[str, torch.Tensor]) -> None:
        atomic_write(self.file(PREDICTIONS), lambda tmp: torch.save(predictions, tmp))
