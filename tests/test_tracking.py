"""Experiment tracking with the real libraries: a two-variant suite with --jobs 2 and
--track wandb --track mlflow, killed (-9) mid-suite and rerun, then read back with the
libraries' own readers (W&B's `wandb leet inspect` on the offline run files, decoded into
W&B's own Record protobufs; MLflow's client on its store): the runs, their groups, configs
and per-epoch metrics equal metrics.jsonl, in the same tracker runs, no epoch twice. Then
`normlab track` after the fact, a tracker that fails, a missing package, --tensorboard."""

import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import no_report, require_tool, suite_toml
from normlab.cli import build_parser, main
from normlab.experiments import load_suite, run_suite
from normlab.tracking import Tracking
from normlab.tracking.consumer import epoch_metrics, flat_config
from normlab.training import RunConfig, RunDir
from normlab.training.events import EpochFinished, Notice, RunFinished, RunStarted

RUNS = ("bn/seed1", "gn/seed1")
EPOCHS = 3
TRACKER_ENV = ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "MLFLOW_TRACKING_URI",
               "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID", "MLFLOW_ALLOW_FILE_STORE")


def need(module: str) -> None:
    require_tool(importlib.util.find_spec(module) is not None,
                 f"{module} (pip install 'normlab[{module}]')")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    """The trackers' defaults, whatever the machine running the tests has set."""
    for name in TRACKER_ENV:
        monkeypatch.delenv(name, raising=False)


# ----------------------------------------------------------------------------- readers


def wandb_records(path: Path) -> list:
    """A .wandb transaction log as W&B's own Record protobufs, read by W&B's own reader
    (`wandb leet inspect`, which prints the records as protobuf text when not on a tty)."""
    from google.protobuf import text_format
    from wandb.proto import wandb_internal_pb2

    text = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", str(path)],
                          capture_output=True, text=True, check=True).stdout
    records = []
    for chunk in re.split(r"^# record \d+: \w+\n", text, flags=re.M):
        if chunk.strip():
            records.append(text_format.Parse(chunk, wandb_internal_pb2.Record()))
    return records


def _items(items) -> dict:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json)
            for item in items}


def wandb_run(run_dir: Path) -> dict:
    """Everything the offline W&B files of a normlab run hold, across its offline-run
    folders (one per invocation that trained it), in start order."""
    segments = []
    for log in run_dir.glob("wandb/offline-run-*/run-*.wandb"):
        records = wandb_records(log)
        runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        if not runs:  # killed before W&B wrote its first block: nothing reached the disk
            continue
        start = runs[0].start_time.seconds + runs[0].start_time.nanos / 1e9
        segments.append((start, log, records))
    segments.sort(key=lambda s: s[0])
    out = {"ids": [], "rows": [], "summary": {}, "config": {}, "segments": len(segments),
           "runs": []}
    for _, log, records in segments:
        for r in records:
            kind = r.WhichOneof("record_type")
            if kind == "run":
                out["ids"].append(r.run.run_id)
                out["runs"].append(r.run)
                out["config"].update(_items(r.run.config.update))
            elif kind == "config":
                out["config"].update(_items(r.config.update))
            elif kind == "history":
                out["rows"].append(_items(r.history.item))
            elif kind == "summary":
                out["summary"].update(_items(r.summary.update))
        out.setdefault("files", []).extend(
            str(p.relative_to(log.parent)) for p in sorted(log.parent.rglob("*")) if p.is_file())
    out["config"].pop("_wandb", None)
    return out


def mlflow_runs(uri: str, experiment: str) -> tuple[object, dict]:
    """The parent run and {normlab run dir: child run} of ``experiment``, by MLflow's client."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no experiment {experiment!r} in {uri}"
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    children = {r.data.tags["normlab.run_dir"]: r for r in runs if r not in parents}
    return parents[0], children


def metric_steps(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


# ----------------------------------------------------------------------------- the suite


@pytest.fixture(scope="module")
def tracked(mnist, tmp_path_factory):
    """The suite killed (-9) once a tracker holds an epoch, then rerun to the end: the
    first invocation a `normlab suite` process, the rerun in this process."""
    need("wandb")
    need("mlflow")
    root = tmp_path_factory.mktemp("tracked")
    path = root / "study.toml"
    path.write_text(suite_toml(("bn", {"norm": "bn"}), ("gn", {"norm": "gn", "groups": 2}),
                               epochs=EPOCHS))
    out = root / "out"
    env = {k: v for k, v in os.environ.items() if k not in TRACKER_ENV}
    parent = subprocess.Popen(
        [sys.executable, "-m", "normlab", "suite", str(path), "--out", str(out), "--jobs", "2",
         "--threads", "1", "--quiet", "--track", "wandb", "--track", "mlflow"],
        cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    children: list[int] = []
    try:
        deadline = time.monotonic() + 180
        while not any(_state(out / r).get("wandb", {}).get("logged", 0) >= 1 for r in RUNS):
            assert parent.poll() is None and time.monotonic() < deadline, parent.stdout.read()
            time.sleep(0.05)
        children = [int(e) for e in os.listdir("/proc") if e.isdigit()
                    and _ppid(e) == parent.pid]  # the workers and W&B's service
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=60)
        deadline = time.monotonic() + 30
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in children), "a child outlived its suite"
    finally:
        for pid in [*children, parent.pid]:  # stop what this test started
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        parent.wait()
    before = {r: json.loads(json.dumps(_state(out / r))) for r in RUNS}
    partial = [r for r in RUNS if not RunDir(out / r).finished()]
    assert partial, "the kill came after the suite had finished: nothing to resume"
    log: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # MLflow's default store is in the current folder
        no_report(mp)
        run_suite(load_suite(path), out, jobs=2, threads=1, quiet=True, log=log.append,
                  track=["wandb", "mlflow"])
    uri = "sqlite:///" + str(root / "mlflow.db")
    return {"root": root, "out": out, "before": before, "partial": partial, "log": log,
            "uri": uri}


def _state(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "tracking.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _ppid(pid: str) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_wandb_holds_each_run_once_with_every_epoch_once(tracked):
    out = tracked["out"]
    resumed = 0
    for rel in RUNS:
        run_dir = out / rel
        metrics = RunDir(run_dir).metrics()
        assert [m["epoch"] for m in metrics] == list(range(1, EPOCHS + 1))
        wb = wandb_run(run_dir)
        wandb_id = tracked["before"][rel]["wandb"]["id"]
        # the same W&B run across the kill: every offline folder carries the id kept before
        assert set(wb["ids"]) == {wandb_id} and _state(run_dir)["wandb"]["id"] == wandb_id
        folders = list(run_dir.glob(f"wandb/offline-run-*-{wandb_id}"))
        if rel in tracked["partial"]:  # one offline folder per invocation, one W&B run id
            assert len(folders) == 2 and len(list(run_dir.glob("wandb/offline-run-*"))) == 2
            resumed += 1
        for run in wb["runs"]:
            variant = rel.split("/")[0]
            assert (run.project, run.run_group, run.job_type, run.display_name) == (
                "normlab", "study", variant, f"{variant} seed 1")
        assert wb["config"] == RunDir(run_dir).stored()["run"]  # the whole RunConfig
        rows = [r for r in wb["rows"] if "epoch" in r]
        assert [r["epoch"] for r in rows] == [m["epoch"] for m in metrics]  # none twice
        assert [r["_step"] for r in rows] == [m["epoch"] for m in metrics]
        for row, record in zip(rows, metrics, strict=True):
            assert {k: row[k] for k in epoch_metrics(record)} == epoch_metrics(record)
        images = [r for r in wb["rows"] if "confusion_matrix/_type" in r]
        assert len(images) == 1 and images[0]["misclassified/_type"] == "image-file"
        assert images[0]["_step"] == EPOCHS
        assert wb["summary"]["final_test_acc"] == metrics[-1]["test_acc"]
        assert wb["summary"]["status"] == "ok" and _state(run_dir)["wandb"]["finished"]
        assert any(f.startswith("files/media/images/confusion_matrix_") for f in wb["files"])
    assert resumed == len(tracked["partial"]) >= 1
    assert any("W&B: 2 runs saved offline" in line for line in tracked["log"])


def test_mlflow_holds_the_suite_under_one_parent_every_epoch_once(tracked):
    from mlflow import MlflowClient

    out, uri = tracked["out"], tracked["uri"]
    parent, children = mlflow_runs(uri, "study")
    assert parent.info.run_name == "study" and parent.info.status == "FINISHED"
    assert sorted(children) == sorted(str((out / r).resolve()) for r in RUNS)
    client = MlflowClient(uri)
    for rel in RUNS:
        run_dir = out / rel
        child = children[str(run_dir.resolve())]
        variant = rel.split("/")[0]
        # the run opened before the kill goes on: no second MLflow run for it
        assert child.info.run_id == tracked["before"][rel]["mlflow"][uri]["run_id"]
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.run_name == f"{variant} seed 1" and child.info.status == "FINISHED"
        assert child.data.tags["normlab.variant"] == variant
        stored = RunDir(run_dir).stored()["run"]
        assert child.data.params == {k: str(v) for k, v in flat_config(stored).items()}
        metrics = RunDir(run_dir).metrics()
        for key in epoch_metrics(metrics[0]):
            assert metric_steps(uri, child.info.run_id, key) == [
                (m["epoch"], float(m[key])) for m in metrics], key  # step = epoch, once each
        assert child.data.metrics["best_test_acc"] == max(m["test_acc"] for m in metrics)
        figures = {a.path for a in client.list_artifacts(child.info.run_id, "figures")}
        assert figures == {"figures/misclassified.png", "figures/confusion_matrix.png"}
    assert any(line.startswith("MLflow: 2 runs in ") for line in tracked["log"])


def test_push_a_folder_after_the_fact_then_again_adds_nothing(tracked, tmp_path, monkeypatch,
                                                              capsys):
    """`normlab track` into another store (MLflow's file store, by MLFLOW_TRACKING_URI) and
    TensorBoard: the same runs and epochs; pushing again logs nothing new."""
    need("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tracked["out"]
    uri = (tmp_path / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert main(["track", str(out), "--to", "mlflow", "--to", "tensorboard"]) == 0
    assert f"mlflow ui --backend-store-uri {uri}" in capsys.readouterr().out
    parent, children = mlflow_runs(uri, "study")
    ids = {k: r.info.run_id for k, r in children.items()}
    for rel in RUNS:
        metrics = RunDir(out / rel).metrics()
        child = children[str((out / rel).resolve())]
        assert metric_steps(uri, child.info.run_id, "test_acc") == [
            (m["epoch"], m["test_acc"]) for m in metrics]
        events = EventAccumulator(str(out / rel / "tensorboard"))
        events.Reload()
        assert [(e.step, e.value) for e in events.Scalars("accuracy/test")] == [
            (m["epoch"], pytest.approx(m["test_acc"])) for m in metrics]
        assert set(events.Tags()["images"]) == {"misclassified", "confusion_matrix"}
    assert main(["track", str(out), "--to", "mlflow", "--to", "tensorboard"]) == 0
    parent2, children2 = mlflow_runs(uri, "study")
    assert parent2.info.run_id == parent.info.run_id
    assert {k: r.info.run_id for k, r in children2.items()} == ids
    for rel in RUNS:
        child = children2[str((out / rel).resolve())]
        assert len(metric_steps(uri, child.info.run_id, "test_acc")) == EPOCHS
    # tracking.json is not believed over the store: a run it calls finished that the store
    # does not hold (a store deleted or replaced since) is pushed again
    from normlab.tracking.mlflow_tracker import MLflowTracker

    tracker, info = MLflowTracker(None), Tracking(["mlflow"], print)._info(str(out / RUNS[0]))
    state = json.loads((out / RUNS[0] / "tracking.json").read_text())["mlflow"]
    assert tracker.done(info, state)
    state[uri]["run_id"] = "0" * 32
    assert not tracker.done(info, state)


# ----------------------------------------------------------------------------- failures


def fake_run(path: Path, epochs: int = 2) -> list[dict]:
    """A run directory with a config and ``epochs`` lines of metrics (no training)."""
    run = RunDir(path)
    run.path.mkdir(parents=True)
    run.write_config(RunConfig(subset=300), {"normlab": "test"})
    records = [{"epoch": e, "lr": 0.1, "train_loss": 1.0 / e, "train_acc": 50.0 + e,
                "test_loss": 0.9 / e, "test_acc": 60.0 + e, "seconds": 1.5, "status": "ok"}
               for e in range(1, epochs + 1)]
    run.write_metrics(records)
    return records


def test_a_failing_tracker_is_reported_once_and_training_goes_on(tmp_path, monkeypatch):
    need("mlflow")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://nowhere")
    records = fake_run(tmp_path / "run")
    seen: list = []
    tracking = Tracking(["mlflow"], seen.append)
    key = str(tmp_path / "run")
    events = [RunStarted(key, 0, 2), *(EpochFinished(key, r, 2) for r in records),
              RunFinished(key, "ok", tuple(records))]
    for event in events:
        tracking(event)  # nothing raises
    tracking.close()
    notices = [e for e in seen if isinstance(e, Notice)]
    assert len(notices) == 1 and "MLflow failed" in notices[0].message
    assert "training goes on" in notices[0].message
    assert [e for e in seen if not isinstance(e, Notice)] == events  # every event passed on


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_a_missing_package_is_one_line_saying_how_to_install(tracker, tmp_path, monkeypatch,
                                                             capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == tracker else real(name, *a))
    path = tmp_path / "study.toml"
    path.write_text(suite_toml(("bn", {"norm": "bn"})))
    out = tmp_path / "out"
    assert main(["suite", str(path), "--out", str(out), "--track", tracker]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"pip install 'normlab[{tracker}]'" in err
    assert not out.exists()  # nothing written before the check
    assert main(["train", "--out", str(tmp_path / "run"), "--track", tracker]) == 2
    assert f"pip install 'normlab[{tracker}]'" in capsys.readouterr().err


def test_tensorboard_flag_is_track_tensorboard():
    parser = build_parser()
    for verb in (["train", "--out", "x"], ["suite", "s6"]):
        assert parser.parse_args([*verb, "--tensorboard"]).track == ["tensorboard"]
        args = parser.parse_args([*verb, "--track", "wandb", "--track", "mlflow"])
        assert args.track == ["wandb", "mlflow"]


def test_a_killed_wandb_run_is_read_back_and_continued(tmp_path):
    """After a kill -9 the offline file holds fewer epochs than were given to W&B (it is
    written in 32 KiB blocks): the next open reads back what the files hold, with W&B's
    reader, and logs the rest; every epoch once, across the folders of one W&B run."""
    need("wandb")
    from normlab.tracking.consumer import RunInfo
    from normlab.tracking.wandb_tracker import WandbTracker, offline_epochs

    records = fake_run(tmp_path / "run", epochs=3)
    info = RunInfo(str(tmp_path / "run"), tmp_path / "run", "run", "BN", 1)
    tracker, state = WandbTracker(None), {}
    handle = tracker.open(info, state, lambda: None)
    tracker.log_epochs(handle, records[:2])
    tracker.stop(handle, None)  # the first folder holds epochs 1 and 2
    deadline = time.monotonic() + 30  # W&B's service closes the file just after finish()
    while offline_epochs(tmp_path / "run" / "wandb", state["id"]) != 2:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    state.update(logged=3, closed=False)  # as if killed after W&B was given epoch 3
    handle = tracker.open(info, state, lambda: None)
    assert handle.logged == 2  # read back from the files, not taken from the state
    tracker.log_epochs(handle, records[2:])
    tracker.finish(handle, records, "ok", {})
    wb = wandb_run(tmp_path / "run")
    assert set(wb["ids"]) == {state["id"]} and wb["segments"] == 2
    assert [r["epoch"] for r in wb["rows"] if "epoch" in r] == [1, 2, 3]


def test_train_tracks_one_run(mnist, tmp_path, monkeypatch):
    """`normlab train --track mlflow --tensorboard`: the run in MLflow's default store of the
    current folder (experiment "normlab"), and TensorBoard scalars in the run directory."""
    need("mlflow")
    need("tensorboard")
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "quick"
    assert main(["train", "--out", str(out), "--subset", "300", "--epochs", "1", "--threads",
                 "1", "--quiet", "--track", "mlflow", "--tensorboard"]) == 0
    metrics = RunDir(out).metrics()
    client = MlflowClient("sqlite:///" + str(tmp_path / "mlflow.db"))
    (run,) = client.search_runs([client.get_experiment_by_name("normlab").experiment_id])
    assert run.info.run_name == "quick" and run.info.status == "FINISHED"
    assert metric_steps(client.tracking_uri, run.info.run_id, "test_loss") == [
        (m["epoch"], m["test_loss"]) for m in metrics]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss/train")] == [1]


def test_a_probed_run_sends_its_probes_to_every_tracker(tmp_path, monkeypatch):
    """`--probe`: TensorBoard and MLflow get each probe at its training step, W&B the last
    probe of each epoch on the epoch axis with histograms across the network; the values
    are probes.jsonl's."""
    for module in ("mlflow", "tensorboard", "wandb"):
        need(module)
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from normlab import probes
    from normlab.tracking.consumer import probe_scalars

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "probed"
    assert main(["train", "--out", str(out), "--subset", "500", "--epochs", "1", "--threads",
                 "1", "--quiet", "--probe", "all", "--probe-every", "4", "--track", "mlflow",
                 "--track", "wandb", "--tensorboard"]) == 0
    records = probes.read(out)
    assert [r["step"] for r in records] == [0, 4]  # 8 steps of 64
    key = "probe/convblock1.2/p50"
    want = [(r["step"], probe_scalars(r)[key]) for r in records]
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    got = events.Scalars(key)
    assert [e.step for e in got] == [s for s, _ in want]
    assert [e.value for e in got] == pytest.approx([v for _, v in want], rel=1e-6)
    assert len(events.Scalars("probe/convblock2.0.weight/update")) == 2
    client = MlflowClient("sqlite:///" + str(tmp_path / "mlflow.db"))
    (run,) = client.search_runs([client.get_experiment_by_name("normlab").experiment_id])
    assert metric_steps(client.tracking_uri, run.info.run_id, key) == want
    wb = wandb_run(out)
    row = next(r for r in wb["rows"] if key in r)
    assert row["epoch"] == 1 and row[key] == pytest.approx(want[-1][1])
    assert row["probe/hist/update/_type"] == "histogram"  # (W&B writes it as nested keys)
    updates = [w["update"] for r in records for w in r["weights"].values()]
    assert sum(row["probe/hist/update/values"]) == len(updates) == 14  # 7 weights x 2 probes
    assert row["probe/hist/update/bins"][0] == pytest.approx(min(updates))
