"""MLflow: one MLflow run per normlab run, under a parent run per suite.

The store is MLflow's own choice: $MLFLOW_TRACKING_URI when set, else MLflow's default in
the current folder. In MLflow 3.17 (the version the tests pin) that default is a SQLite file,
``mlflow.db``, with the artifacts in ``mlruns/``; its older file store (``file:./mlruns``)
is refused unless MLFLOW_ALLOW_FILE_STORE=true, and works with it (the tests push to one).
``mlflow ui`` started in the same folder shows the runs. The experiment is
$MLFLOW_EXPERIMENT_NAME (or _ID) when set, else the suite's name ("normlab" for a single
run); one normlab creates is tagged as model training, so MLflow's UI opens it on its runs.

A run gets the RunConfig as params (dotted keys: ``model.norm``, ``protocol.lr``), its
suite, variant and seed as tags, every metric of metrics.jsonl per epoch (step = epoch),
and at the end the final metrics and the report's figures as artifacts
(``figures/misclassified.png``, ``figures/confusion_matrix.png``). The store itself says
what a resumed run already holds: the run is found again by its tag
``normlab.run_key`` (its id is also kept in tracking.json), and its metric history gives
the epochs logged, so a run interrupted at any point (kill -9 included) is continued with
no epoch twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from normlab import __version__
from normlab.tracking.consumer import (
    STATE,
    Handle,
    RunInfo,
    Tracker,
    epoch_metrics,
    final_metrics,
    flat_config,
    probe_scalars,
    run_config,
)
from normlab.training.rundir import RunDir

PARENT_TAG = "mlflow.parentRunId"
# MLflow's UI opens an experiment of this kind on its runs (training runs compared), not on
# the GenAI overview of traces it shows an experiment it cannot place
KIND = {"mlflow.experimentKind": "custom_model_development"}


def now_ms() -> int:
    return int(time.time() * 1000)


def mtime_ms(path: Path) -> int:
    """When ``path`` was last written (now when it does not exist), in ms."""
    try:
        return int(path.stat().st_mtime * 1000)
    except OSError:
        return now_ms()


def started(run: RunInfo) -> int:
    """When the run started training, in ms: now for a run with no epoch yet, else its last
    epoch's end less the seconds its epochs took (a run pushed later gets its own times)."""
    history = RunDir(run.dir).metrics()
    if not history:
        return now_ms()
    return mtime_ms(run.dir / "metrics.jsonl") - int(
        sum(float(r.get("seconds", 0.0)) for r in history) * 1000)


def key_of(path: Path) -> str:
    """A tag value that names a folder (search filters need no quoting of it)."""
    return hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:20]


def _quiet(names=("mlflow.store.db.utils", "alembic")) -> None:
    """MLflow's lines about setting up its database would interleave with the progress."""
    for name in names:
        logger = logging.getLogger(name)
        if logger.level in (logging.NOTSET, logging.INFO):
            logger.setLevel(logging.WARNING)


class MLflowTracker(Tracker):
    name = "mlflow"
    title = "MLflow"
    module = "mlflow"
    extra = "mlflow"

    def __init__(self, suite) -> None:
        super().__init__(suite)
        self._client = None
        self.uri: str | None = None
        self.experiment_id: str | None = None
        self.experiment_name = ""
        self.parent: str | None = None
        self.count = 0
        self.starts: dict[str, int] = {}  # run id -> when its training started (ms)

    # ------------------------------------------------------------------ the store

    def client(self):
        if self._client is None:
            from mlflow import MlflowClient

            _quiet()
            self._client = MlflowClient(self._uri())
        return self._client

    def _uri(self) -> str:
        if self.uri is None:
            import mlflow

            self.uri = mlflow.get_tracking_uri()
        return self.uri

    def done(self, run: RunInfo, state: dict) -> bool:
        """Whether the store holds the run finished (tracking.json says so, and the store
        still has it: a store deleted or moved since gets the run again)."""
        mine = state.get(self._uri(), {})
        if not mine.get("finished") or not mine.get("run_id"):
            return False
        try:
            found = self.client().get_run(mine["run_id"])
        except Exception:  # not in this store, or a store that fails: open() tries again
            return False  # and reports what fails
        return (found.info.lifecycle_stage == "active"
                and found.data.tags.get("normlab.finished") == "true")

    def experiment(self) -> str:
        if self.experiment_id is None:
            client = self.client()
            if os.environ.get("MLFLOW_EXPERIMENT_ID"):
                self.experiment_id = os.environ["MLFLOW_EXPERIMENT_ID"]
                self.experiment_name = client.get_experiment(self.experiment_id).name
            else:
                name = (os.environ.get("MLFLOW_EXPERIMENT_NAME")
                        or (self.suite.name if self.suite else "normlab"))
                found = client.get_experiment_by_name(name)
                self.experiment_id = (found.experiment_id if found is not None
                                      else client.create_experiment(name, tags=KIND))
                self.experiment_name = name
        return self.experiment_id

    def _find(self, state: dict, tag: str, key: str):
        """The run ``state`` names, else the one tagged ``tag`` = ``key``, else None."""
        from mlflow.exceptions import MlflowException

        client = self.client()
        run_id = state.get("run_id")
        if run_id:
            try:
                run = client.get_run(run_id)
                if run.info.lifecycle_stage == "active":
                    return run
            except MlflowException:
                pass
        found = client.search_runs([self.experiment()], f"tags.`{tag}` = '{key}'",
                                   max_results=1)
        return found[0] if found else None

    def _running(self, run) -> None:
        if run.info.status != "RUNNING":
            self.client().update_run(run.info.run_id, status="RUNNING")

    def _parent(self) -> str | None:
        """The suite's parent run (created, or continued, on first use)."""
        if self.suite is None:
            return None
        if self.parent is None:
            from mlflow.entities import Param, RunTag

            from normlab.files import write_json

            path = self.suite.root / STATE
            try:
                saved = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError):
                saved = {}
            mine = saved.setdefault("mlflow", {}).setdefault(self._uri(), {})
            run = self._find(mine, "normlab.suite_key", key_of(self.suite.root))
            client = self.client()
            if run is None:
                run = client.create_run(self.experiment(), run_name=self.suite.name, tags={
                    "normlab.suite_key": key_of(self.suite.root),
                    "normlab.suite_dir": str(self.suite.root.resolve()),
                    "normlab.suite": self.suite.name, "normlab.version": __version__})
                client.log_batch(run.info.run_id, params=[
                    Param("suite", self.suite.name), Param("dataset", self.suite.dataset),
                    Param("variants", ", ".join(dict.fromkeys(
                        r.variant for r in self.suite.runs.values())))], synchronous=True)
            self._running(run)
            seeds = sorted({r.seed for r in self.suite.runs.values()})
            client.log_batch(run.info.run_id, tags=[
                RunTag("normlab.seeds", ", ".join(map(str, seeds)))], synchronous=True)
            self.parent = run.info.run_id
            mine["run_id"] = self.parent
            write_json(path, saved)
        return self.parent

    # ------------------------------------------------------------------ runs

    def open(self, run: RunInfo, state: dict, save: Callable[[], None]) -> Handle:
        from mlflow.entities import Param

        client = self.client()
        self.experiment()
        mine = state.setdefault(self._uri(), {})
        found = self._find(mine, "normlab.run_key", key_of(run.dir))
        if found is None:
            tags = {"normlab.run_key": key_of(run.dir), "normlab.run_dir": str(run.dir.resolve()),
                    "normlab.seed": str(run.seed), "normlab.label": run.label,
                    "normlab.version": __version__}
            if run.suite is not None:
                tags |= {"normlab.suite": run.suite, "normlab.variant": run.variant or ""}
            parent = self._parent()
            if parent is not None:
                tags[PARENT_TAG] = parent
            found = client.create_run(self.experiment(), run_name=run.name, tags=tags,
                                      start_time=started(run))
        else:
            self._parent()  # the suite's parent goes on too
        run_id = found.info.run_id
        self.starts[run_id] = found.info.start_time or started(run)
        if not found.data.params:  # new, or killed between creating it and this
            params = [Param(k, str(v)) for k, v in flat_config(run_config(run)).items()]
            for i in range(0, len(params), 100):  # MLflow takes 100 params per batch
                client.log_batch(run_id, params=params[i:i + 100], synchronous=True)
        mine["run_id"] = run_id
        finished = found.data.tags.get("normlab.finished") == "true"
        mine["finished"] = finished
        if not finished:
            self._running(found)
        history = client.get_metric_history(run_id, "test_acc")
        logged = max((m.step for m in history), default=0)
        self.count += 1
        return Handle(run, state, logged, finished, run_id)

    def log_epochs(self, handle: Handle, records: list[dict],
                   probes: dict[int, list[dict]] | None = None) -> None:
        from mlflow.entities import Metric

        # an epoch's time: the run's start plus the seconds of the epochs up to it (the same
        # whether the run is tracked as it trains or pushed later)
        start, elapsed = self.starts.setdefault(handle.obj, started(handle.run)), 0.0
        at = {}
        for r in RunDir(handle.run.dir).metrics():
            elapsed += float(r.get("seconds", 0.0))
            at[int(r["epoch"])] = start + int(elapsed * 1000)
        metrics = [Metric(key, value, at.get(int(r["epoch"]), now_ms()), int(r["epoch"]))
                   for r in records for key, value in epoch_metrics(r).items()]
        # a probed run's probes, at the training step each was taken at (their own axis)
        metrics += [Metric(key, value, at.get(int(r["epoch"]), now_ms()), int(probe["step"]))
                    for r in records for probe in (probes or {}).get(int(r["epoch"]), [])
                    for key, value in probe_scalars(probe).items()]
        for i in range(0, len(metrics), 1000):  # MLflow takes 1000 metrics per batch
            self.client().log_batch(handle.obj, metrics=metrics[i:i + 1000], synchronous=True)

    def finish(self, handle: Handle, history: Sequence[dict], status: str,
               figures: dict[str, tuple[bytes, str]]) -> None:
        from mlflow.entities import Metric, RunTag

        client, run_id = self.client(), handle.obj
        step = int(history[-1]["epoch"]) if history else 0
        end = mtime_ms(handle.run.dir / "predictions.pt")
        client.log_batch(run_id, metrics=[
            Metric(k, v, end, step) for k, v in final_metrics(history).items()],
            tags=[RunTag("normlab.status", status)], synchronous=True)
        if figures:
            with tempfile.TemporaryDirectory() as tmp:
                for key, (png, _) in figures.items():
                    (Path(tmp) / f"{key}.png").write_bytes(png)
                client.log_artifacts(run_id, tmp, "figures")
        client.set_tag(run_id, "normlab.finished", "true")
        client.set_terminated(run_id, "FINISHED", end_time=end)
        handle.state.setdefault(self._uri(), {})["finished"] = True

    def stop(self, handle: Handle, error: str | None) -> None:
        client = self.client()
        if error:
            client.set_tag(handle.obj, "normlab.error", error[:5000])
        client.set_terminated(handle.obj, "FAILED" if error else "KILLED",
                              end_time=mtime_ms(handle.run.dir / "metrics.jsonl"))

    def close(self) -> list[str]:
        if self.parent is not None:
            runs = [self.suite.root / rel for rel in self.suite.runs]
            done = all((path / "predictions.pt").exists() for path in runs)
            self.client().set_terminated(self.parent, "FINISHED" if done else "KILLED")
        if not self.count:
            return []
        where = self._uri()
        if where.startswith(("http://", "https://")):
            see = f"open {where}"
        elif os.environ.get("MLFLOW_TRACKING_URI"):
            see = f"`mlflow ui --backend-store-uri {where}`"
        else:
            see = f"`mlflow ui` started in {os.getcwd()}"
        return [f"MLflow: {self.count} run{'s' if self.count != 1 else ''} in {where}, "
                f"experiment {self.experiment_name!r}; to see them: {see}"]
