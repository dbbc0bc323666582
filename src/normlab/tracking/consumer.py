"""The trackers' shared consumer: one listener that feeds the event stream to W&B, MLflow
and TensorBoard.

:class:`Tracking` wraps the listener a command already has (the console, a notebook's
bars): every event goes there first, then to each tracker. It runs where the events are,
in the process that started the command (for ``--jobs N`` and Ray too: the workers need no
tracker set-up). Per run it opens the tracker's run when the run starts (or continues the
one an earlier invocation opened: its id is kept in the run directory's tracking.json),
logs every epoch the tracker does not hold yet (so a run resumed after a kill -9 continues
the same tracker run, with no epoch twice and none missing: the epochs are caught up from
metrics.jsonl), and at the end logs the final metrics, the misclassified gallery and the
confusion matrix (the report's figures). A tracker that raises is reported once (a Notice
on the stream) and is off for the rest of the command; training never stops for it.
"""

from __future__ import annotations

import abc
import importlib.util
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from normlab.files import write_json
from normlab.training.events import (
    EpochFinished,
    Event,
    Listener,
    Notice,
    RunFailed,
    RunFinished,
    RunStarted,
)
from normlab.training.rundir import RunDir

STATE = "tracking.json"  # in the run directory (and the suite's folder): each tracker's ids
METRIC_SKIP = ("epoch", "first_bad_step")  # the step itself, and a flag, not a metric


@dataclass(frozen=True)
class RunInfo:
    """What the trackers name a run by. ``key`` is its name in the event stream."""

    key: str
    dir: Path
    name: str  # "bn seed 1"
    label: str  # the variant's label, for the figures' titles
    seed: int
    variant: str | None = None  # None: a single run, not part of a suite
    suite: str | None = None
    config: dict | None = None  # RunConfig.to_dict(); None: read config.json


@dataclass(frozen=True)
class SuiteRun:
    variant: str
    label: str
    seed: int
    config: dict | None = None  # the planned RunConfig.to_dict() (config.json may not exist
    # yet when a worker process has not started the run)


@dataclass(frozen=True)
class SuiteInfo:
    """A suite's folder as the trackers see it: its name and its runs by event name."""

    name: str
    root: Path
    dataset: str
    runs: dict[str, SuiteRun]  # by rel ("bn/seed1")


@dataclass
class Handle:
    """One tracker's open run: how many epochs it holds and whether it was finished."""

    run: RunInfo
    state: dict  # this tracker's part of the run's tracking.json (saved by the consumer)
    logged: int = 0
    finished: bool = False
    obj: Any = None  # the tracker's own run object


class Tracker(abc.ABC):
    """One experiment tracker behind the consumer. ``open`` creates the tracker's run or
    continues the one ``state`` names, and says how many epochs it holds; ``save`` writes
    ``state`` to the run directory at once (before a tracker call that a kill could
    interrupt)."""

    name: ClassVar[str]  # as --track names it
    title: ClassVar[str]  # as people write it
    module: ClassVar[str]  # the package it needs
    extra: ClassVar[str]  # normlab's extra that installs it

    def __init__(self, suite: SuiteInfo | None) -> None:
        self.suite = suite

    def done(self, run: RunInfo, state: dict) -> bool:
        """Whether ``state`` says the tracker already holds the finished run (no need to
        open it)."""
        return bool(state.get("finished"))

    @abc.abstractmethod
    def open(self, run: RunInfo, state: dict, save: Callable[[], None]) -> Handle: ...

    @abc.abstractmethod
    def log_epochs(self, handle: Handle, records: list[dict],
                   probes: dict[int, list[dict]] | None = None) -> None:
        """The epochs' metrics.jsonl lines, in order; with ``probes``, each epoch's probe
        records (probes.jsonl's lines, by epoch: :func:`probe_scalars` flattens one)."""

    @abc.abstractmethod
    def finish(self, handle: Handle, history: Sequence[dict], status: str,
               figures: dict[str, tuple[bytes, str]]) -> None:
        """The final metrics and the figures ({key: (png, caption)}); the run ends."""

    @abc.abstractmethod
    def stop(self, handle: Handle, error: str | None) -> None:
        """The run ends unfinished: it failed (``error``) or the command stops; a later
        invocation continues it."""

    def close(self) -> list[str]:
        """The end of the command; lines that say where the runs are."""
        return []


def final_metrics(history: Sequence[dict]) -> dict[str, float]:
    """What a finished run adds to its per-epoch metrics."""
    last = history[-1] if history else {}
    out = {f"final_{k}": float(last[k]) for k in ("test_acc", "test_loss", "train_acc",
                                                   "train_loss") if k in last}
    accs = [r["test_acc"] for r in history if math.isfinite(r.get("test_acc", math.nan))]
    if accs:
        out["best_test_acc"] = float(max(accs))
    out["total_seconds"] = float(sum(r.get("seconds", 0.0) for r in history))
    return out


def epoch_metrics(record: dict) -> dict[str, float]:
    """The numbers of one metrics.jsonl line that trackers plot (epoch is the step)."""
    return {k: float(v) for k, v in record.items()
            if k not in METRIC_SKIP and isinstance(v, int | float) and not isinstance(v, bool)}


def probe_scalars(record: dict) -> dict[str, float]:
    """One probes.jsonl line (:mod:`normlab.probes`) as named numbers: per probed layer its
    input's percentiles, mean and std and its first unit's percentiles, per weight its norm,
    relative update and gradient norm (``probe/<layer or weight>/<quantity>``)."""
    out: dict[str, float] = {}
    for layer, stats in record.get("activations", {}).items():
        for key in ("p15", "p50", "p85", "mean", "std"):
            out[f"probe/{layer}/{key}"] = float(stats[key])
        for key, value in stats["unit"].items():
            out[f"probe/{layer}/unit_{key}"] = float(value)
    for name, weight in record.get("weights", {}).items():
        out[f"probe/{name}/norm"] = float(weight["norm"])
        if weight["update"] is not None:
            out[f"probe/{name}/update"] = float(weight["update"])
    for name, norm in record.get("gradients", {}).items():
        if norm is not None:
            out[f"probe/{name}/grad_norm"] = float(norm)
    return out


def probes_by_epoch(run_dir: Path, epochs: Iterable[int]) -> dict[int, list[dict]]:
    """The run's probe records of ``epochs`` (none without probes.jsonl)."""
    from normlab import probes

    wanted = set(epochs)
    out: dict[int, list[dict]] = {}
    for record in probes.read(run_dir):
        if record["epoch"] in wanted:
            out.setdefault(record["epoch"], []).append(record)
    return out


def flat_config(config: dict, prefix: str = "") -> dict[str, Any]:
    """A nested RunConfig dict as dotted keys (model.norm, protocol.lr, ...)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def run_config(run: RunInfo) -> dict:
    """The run's whole RunConfig (``to_dict()``): the planned one, else config.json's."""
    if run.config is not None:
        return dict(run.config)
    stored = RunDir(run.dir).stored()
    return dict(stored["run"]) if stored else {}


def tracker_classes() -> dict[str, type[Tracker]]:
    from normlab.tracking.mlflow_tracker import MLflowTracker
    from normlab.tracking.tensorboard_tracker import TensorBoardTracker
    from normlab.tracking.wandb_tracker import WandbTracker

    return {t.name: t for t in (WandbTracker, MLflowTracker, TensorBoardTracker)}


TRACKERS = ("wandb", "mlflow", "tensorboard")


def check_trackers(names: str | Iterable[str] | None) -> list[str]:
    """``names`` checked (unknown ones and missing packages raise a ValueError saying what
    to do), without repeats, in order."""
    if names is None:
        return []
    if isinstance(names, str):
        names = [names]
    chosen = list(dict.fromkeys(names))
    classes = tracker_classes()
    for name in chosen:
        if name not in classes:
            raise ValueError(f"unknown tracker {name!r}; choose from {', '.join(TRACKERS)}")
        cls = classes[name]
        if importlib.util.find_spec(cls.module) is None:
            raise ValueError(f"--track {name} needs the {cls.module} package, which is not "
                             f"installed: pip install 'normlab[{cls.extra}]'")
    return chosen


class TestImages:
    """The test images of each dataset, loaded once, for the galleries."""

    def __init__(self) -> None:
        self.loaded: dict[str, Any] = {}

    def get(self, dataset: str):
        if dataset not in self.loaded:
            from normlab.reports.build import load_test_images

            try:
                self.loaded[dataset] = load_test_images(dataset)
            except (ValueError, OSError, ImportError):
                self.loaded[dataset] = None  # no gallery; the confusion matrix still
        return self.loaded[dataset]


def run_figures(run: RunInfo, images: TestImages) -> dict[str, tuple[bytes, str]]:
    """The report's gallery of the most confident mistakes and its confusion matrix of a
    finished run, as PNGs with their captions ({} without predictions)."""
    from normlab.data.dataset import CLASSES
    from normlab.reports.figures import plot_confusion, plot_mistakes, png_bytes

    data = RunDir(run.dir).predictions()
    if data is None:
        return {}
    preds = {k: v.numpy() for k, v in data.items()}
    dataset = run_config(run).get("dataset", "mnist")
    wrong = int((preds["pred"] != preds["target"]).sum())
    test = images.get(dataset)
    classes = test[1] if test is not None else CLASSES.get(dataset, tuple(map(str, range(10))))
    head = f"{run.label}, seed {run.seed}"
    figures = {}
    if test is not None and len(test[0]) == len(preds["target"]):
        title = f"{head}: the 10 most confident of {wrong} mistakes"
        figures["misclassified"] = (png_bytes(plot_mistakes(test[0], classes, preds, title)),
                                    title)
    title = f"{head}: {wrong} errors of {len(preds['target'])}"
    figures["confusion_matrix"] = (
        png_bytes(plot_confusion(preds["pred"], preds["target"], classes, title)), title)
    return figures


def first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    text = text[0] if text else ""
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


@dataclass
class _Run:
    info: RunInfo
    state: dict = field(default_factory=dict)  # the whole tracking.json


class Tracking:
    """A listener: passes every event to ``listener``, then feeds the trackers ``names``
    (checked: a missing package raises a ValueError saying how to install it).

    ``suite`` names a suite's runs (events name them by their folder relative to
    ``suite.root``); without it an event's run is the run directory itself (``train``).
    Call :meth:`close` at the end of the command (it ends the tracker runs left open, as
    interrupted, and returns lines that say where the runs are).
    """

    def __init__(self, names: str | Iterable[str], listener: Listener, *,
                 suite: SuiteInfo | None = None) -> None:
        chosen = check_trackers(names)
        classes = tracker_classes()
        self.listener = listener
        self.suite = suite
        self.trackers: list[Tracker] = [classes[n](suite) for n in chosen]
        self.off: set[str] = set()
        self.runs: dict[str, _Run] = {}
        self.handles: dict[tuple[str, str], Handle] = {}
        self.images = TestImages()

    def __bool__(self) -> bool:
        return bool(self.trackers)

    # ------------------------------------------------------------------ runs

    def _info(self, key: str) -> RunInfo:
        if self.suite is not None and key in self.suite.runs:
            r = self.suite.runs[key]
            return RunInfo(key, self.suite.root / key, f"{r.variant} seed {r.seed}", r.label,
                           r.seed, r.variant, self.suite.name, r.config)
        path = Path(key)
        stored = RunDir(path).stored() or {"run": {}}
        seed = int(stored["run"].get("seed", 0) or 0)
        try:
            from normlab.experiments.suite import default_label

            config = RunDir(path).config()
            label = default_label(config) if config is not None else path.name
        except (ValueError, TypeError):
            label = path.name
        return RunInfo(key, path, path.name, label, seed)

    def _run(self, key: str) -> _Run:
        if key not in self.runs:
            info = self._info(key)
            try:
                state = json.loads((info.dir / STATE).read_text())
            except (OSError, json.JSONDecodeError):
                state = {}
            self.runs[key] = _Run(info, state if isinstance(state, dict) else {})
        return self.runs[key]

    def _save(self, run: _Run) -> None:
        write_json(run.info.dir / STATE, run.state)

    def _guard(self, tracker: Tracker, key: str, action: Callable[[], Any]) -> Any:
        """``action``, or None once the tracker has failed: reported once, then it is off."""
        if tracker.name in self.off:
            return None
        try:
            return action()
        except Exception as err:  # a tracker never stops training
            self.off.add(tracker.name)
            self.listener(Notice(key, f"{tracker.title} failed ({first_line(err)}); "
                                      f"training goes on without {tracker.title} for the rest "
                                      "of this command"))
            return None

    def _done(self, tracker: Tracker, run: _Run) -> bool:
        """Whether the tracker is off or holds ``run`` finished (by the run's state)."""
        done = self._guard(tracker, run.info.key,
                           lambda: tracker.done(run.info, run.state.get(tracker.name, {})))
        return tracker.name in self.off or bool(done)

    def _handle(self, tracker: Tracker, key: str) -> Handle | None:
        """The tracker's run for ``key``, opened (or continued) on first use; None when the
        tracker is off or already holds the run finished (then it is not opened)."""
        handle = self.handles.get((tracker.name, key))
        if handle is None and tracker.name not in self.off:
            run = self._run(key)
            state = run.state.setdefault(tracker.name, {})
            if self._done(tracker, run):
                return None
            handle = self._guard(tracker, key,
                                 lambda: tracker.open(run.info, state, lambda: self._save(run)))
            if handle is not None:
                self.handles[(tracker.name, key)] = handle
                self._save(run)
        return handle

    def _catch_up(self, tracker: Tracker, handle: Handle, records: Iterable[dict]) -> None:
        """Log the epochs the tracker does not hold yet, in order."""
        new = [r for r in records if int(r["epoch"]) > handle.logged]
        if not new or handle.finished:
            return

        def log() -> None:
            found = probes_by_epoch(handle.run.dir, (int(r["epoch"]) for r in new))
            tracker.log_epochs(handle, new, found or None)
            handle.logged = int(new[-1]["epoch"])

        self._guard(tracker, handle.run.key, log)
        self._save(self._run(handle.run.key))

    # ------------------------------------------------------------------ events

    def __call__(self, event: Event) -> None:
        self.listener(event)
        if isinstance(event, RunStarted):
            self._started(event.run)
        elif isinstance(event, EpochFinished):
            for tracker in self.trackers:
                handle = self._handle(tracker, event.run)
                if handle is not None:
                    self._catch_up(tracker, handle, [event.record])
        elif isinstance(event, RunFinished):
            self._finished(event.run, event.status, event.history)
        elif isinstance(event, RunFailed):
            self._stop(event.run, event.error)

    def _started(self, key: str) -> None:
        history = None
        for tracker in self.trackers:
            handle = self._handle(tracker, key)
            if handle is not None and not handle.finished:
                history = RunDir(self._run(key).info.dir).metrics() if history is None else history
                self._catch_up(tracker, handle, history)  # epochs an earlier parent missed

    def _finished(self, key: str, status: str, history: Sequence[dict]) -> None:
        run, figures = self._run(key), None
        for tracker in self.trackers:
            handle = self._handle(tracker, key)
            if handle is None or handle.finished:
                continue
            self._catch_up(tracker, handle, history)
            if figures is None:
                figures = self._figures(run.info)

            def finish(tracker=tracker, handle=handle, figures=figures) -> None:
                tracker.finish(handle, history, status, figures)
                handle.finished = True

            self._guard(tracker, key, finish)
            self._save(run)
            self.handles.pop((tracker.name, key), None)

    def _figures(self, info: RunInfo) -> dict[str, tuple[bytes, str]]:
        try:
            return run_figures(info, self.images)
        except Exception as err:  # a figure that cannot be drawn: the metrics still go
            self.listener(Notice(info.key, f"tracking: no figures ({first_line(err)})"))
            return {}

    def _stop(self, key: str, error: str | None) -> None:
        for tracker in self.trackers:
            handle = self.handles.pop((tracker.name, key), None)
            if handle is not None and not handle.finished:
                self._guard(tracker, key, lambda t=tracker, h=handle: t.stop(h, error))
                self._save(self._run(key))

    # ------------------------------------------------------------------ whole folders

    def sync(self, keys: Iterable[str]) -> None:
        """Bring the trackers up to date with runs that no event will report (finished
        before this command, or trained by another process): their epochs, and for finished
        runs the final metrics and figures. Runs a tracker already holds finished are not
        opened."""
        for key in keys:
            run = self._run(key)
            rundir = RunDir(run.info.dir)
            if not rundir.exists():
                continue
            if rundir.finished() and all(self._done(t, run) for t in self.trackers):
                continue
            history = rundir.metrics()
            if not history and not rundir.finished():
                continue
            self._started(key)
            if rundir.finished():
                status = history[-1].get("status", "ok") if history else "ok"
                self._finished(key, status, history)

    def close(self) -> list[str]:
        """End the tracker runs left open (the command stopped before they finished: a rerun
        continues them) and the trackers; lines that say where the runs are."""
        for key in dict.fromkeys(key for _, key in self.handles):
            self._stop(key, None)
        lines = []
        for tracker in self.trackers:
            result = self._guard(tracker, "tracking", tracker.close)
            lines += result or []
        return lines


def suite_info(name: str, root: str | Path, dataset: str,
               runs: Iterable[tuple[str, SuiteRun]]) -> SuiteInfo:
    """A :class:`SuiteInfo` from (rel, :class:`SuiteRun`) pairs."""
    return SuiteInfo(name, Path(root), dataset, dict(runs))
