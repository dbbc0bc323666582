"""The Ray executor: the same results as the local executors, faults (a killed worker is
retried and resumes from its checkpoint; a run that keeps failing is reported failed while
the others complete), and a real cluster started with ``ray start``, driven by the CLI.

Real MNIST, 300 training images. Every Ray started here listens on 127.0.0.1 only
(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 and node address 127.0.0.1, checked from /proc), and
only the processes these tests started are stopped or killed, by pid (never `ray stop`,
never a kill by name). Without Ray the Ray tests skip (fail under CI=true); the CLI checks
at the end need no Ray.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from conftest import no_report, require_tool, set_ray_environment, suite_toml
from normlab.cli import main
from normlab.experiments import comparable_metrics, load_suite, run_suite
from normlab.experiments.ray_executor import LOOPBACK_ENV, RayExecutor
from normlab.reports.collect import FAILED, FINISHED, load_results
from normlab.reports.tables import results_csv
from normlab.training import RunDir
from normlab.training.events import Notice, RunFailed, RunFinished, RunStarted
from normlab.training.run import train
from normlab.training.rundir import LOCK, TIMING_FIELDS

HAVE_RAY = importlib.util.find_spec("ray") is not None
RAY_CLI = str(Path(sys.executable).with_name("ray"))

TINY = suite_toml(("bn", {"label": "BN", "norm": "bn"}),
                  ("gn", {"label": "GN (2 groups)", "norm": "gn", "groups": 2}),
                  description="BN against GN on 300 images, 1 epoch")

# bn is killed once mid-run (retried, resumes); gn is left alone; broken has a corrupt
# checkpoint on disk (training raises every time: not retried); doomed is killed at every
# attempt (fails once Ray's retries are spent).
FAULTS = suite_toml(("bn", {"norm": "bn"}), ("gn", {"norm": "gn"}), ("broken", {"norm": "ln"}),
                    ("doomed", {"norm": "in"}), epochs=3)


def need_ray() -> None:
    require_tool(HAVE_RAY, "Ray (pip install 'normlab[ray]')")


@pytest.fixture(scope="module", autouse=True)
def ray_environment():
    """Every Ray of this module in the tests' Ray environment (conftest)."""
    with pytest.MonkeyPatch.context() as mp:
        set_ray_environment(mp.setenv)
        yield


def write(folder: Path, text: str, name: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def comparable_csv(text: str) -> list[dict]:
    """results.csv without its timing columns."""
    return [{k: v for k, v in row.items() if k not in TIMING_FIELDS}
            for row in csv.DictReader(io.StringIO(text))]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_suite(write(tmp_path_factory.mktemp("tiny"), TINY, "tiny.toml"))


@pytest.fixture(scope="module")
def serial(mnist, tiny, tmp_path_factory):
    """The tiny suite through the local serial executor, one thread, with its report."""
    out = tmp_path_factory.mktemp("serial") / "tiny"
    run_suite(tiny, out, device="cpu", threads=1, quiet=True, log=lambda _: None)
    return out


# ----------------------------------------------------------------------------- /proc helpers


def children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (Linux /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for kid in parents.get(todo.pop(), []):
            found.append(kid)
            todo.append(kid)
    return found


LOOPBACK_HEX = {"0100007F", "00000000000000000000000001000000",
                "0000000000000000FFFF00000100007F"}


def listening(pids: list[int]) -> list[str]:
    """The local addresses (hex, as /proc/net shows them) that ``pids`` listen on."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            continue
    found = []
    for table in ("tcp", "tcp6", "udp", "udp6"):
        try:
            lines = Path(f"/proc/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            tcp_listen = table.startswith("tcp") and fields[3] == "0A"
            if (tcp_listen or table.startswith("udp")) and fields[9] in inodes:
                found.append(f"{table} {fields[1]}")
    return found


def not_loopback(addresses: list[str]) -> list[str]:
    return [a for a in addresses if a.split()[1].split(":")[0] not in LOOPBACK_HEX]


def lock_pid(run: Path) -> int | None:
    try:
        return int((run / LOCK).read_text().strip() or 0) or None
    except (OSError, ValueError):
        return None


def kill_our_worker(pid: int) -> bool:
    """SIGKILL ``pid`` if it is a Ray worker this test process started (a descendant)."""
    if pid not in children(os.getpid()):
        return False
    try:
        if not Path(f"/proc/{pid}/comm").read_text().startswith("ray::"):
            return False
        os.kill(pid, signal.SIGKILL)
    except (OSError, ProcessLookupError):
        return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- local Ray


def test_a_local_ray_instance_gives_the_serial_results(tiny, serial, tmp_path, monkeypatch):
    need_ray()
    no_report(monkeypatch)
    events: list = []
    out = tmp_path / "tiny"
    run_suite(tiny, out, executor=RayExecutor(num_cpus=2, threads=1, device="cpu"),
              listener=events.append, log=lambda _: None)

    ray = sys.modules["ray"]
    assert not ray.is_initialized()  # it started Ray, so it stopped it
    assert comparable_csv(results_csv(load_results(out))) == comparable_csv(
        (serial / "results.csv").read_text())
    for rel in ("bn/seed1", "gn/seed1"):
        assert comparable_metrics(out / rel) == comparable_metrics(serial / rel)
        kinds = [type(e).__name__ for e in events if e.run == rel]
        assert kinds == ["RunStarted", "EpochFinished", "RunFinished"], kinds
        stored = json.loads((out / rel / "config.json").read_text())
        assert (stored["threads"], stored["device"]) == (1, "cpu")


def test_a_killed_worker_is_retried_and_a_failing_run_is_reported(mnist, tmp_path):
    need_ray()
    suite = load_suite(write(tmp_path, FAULTS, "faults.toml"))
    out = tmp_path / "faults"
    # broken: its directory holds its config and a corrupt checkpoint, so training raises
    broken = RunDir(out / "broken" / "seed1")
    broken.path.mkdir(parents=True)
    broken.write_config(suite.variant("broken").config_for(1), {})
    broken.file("checkpoint.pt").write_bytes(b"not a checkpoint")

    stop, killed, seen = threading.Event(), {"bn": [], "doomed": []}, {}
    sockets: list[str] = []

    def killer() -> None:
        while not stop.is_set():
            bn = RunDir(out / "bn" / "seed1")
            pid = lock_pid(bn.path)
            if pid and not killed["bn"] and len(bn.metrics()) == 1 and kill_our_worker(pid):
                killed["bn"].append(pid)  # mid-epoch 2: its checkpoint holds epoch 1
                seen["bn epoch 1"] = bn.metrics()[0]
                sockets.extend(listening([os.getpid(), *children(os.getpid())]))
            pid = lock_pid(out / "doomed" / "seed1")
            if pid and pid not in killed["doomed"] and kill_our_worker(pid):
                killed["doomed"].append(pid)
            time.sleep(0.05)

    executor = RayExecutor(num_cpus=2, threads=1, device="cpu", max_retries=1)
    executor.POLL_SECONDS = 0.2
    events: list = []
    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        with pytest.raises(ValueError, match=r"2 of 4 runs failed \(broken/seed1, doomed/seed1\)"):
            run_suite(suite, out, executor=executor, listener=events.append,
                      log=lambda _: None)
    finally:
        stop.set()
        thread.join()

    # bn: killed once mid-run, retried by Ray, resumed from its checkpoint
    assert len(killed["bn"]) == 1
    reference = tmp_path / "reference-bn"
    train(suite.variant("bn").config_for(1), reference, device="cpu", threads=1)
    assert comparable_metrics(out / "bn" / "seed1") == comparable_metrics(reference)
    # epoch 1 came back from the checkpoint, timings and all: it was not trained again
    assert RunDir(out / "bn" / "seed1").metrics()[0] == seen["bn epoch 1"]
    retried = [e for e in events if isinstance(e, Notice) and e.run == "bn/seed1"]
    assert retried and "Ray retried it" in retried[0].message
    assert "resuming after epoch 1" in retried[0].message
    finished = {e.run: e.status for e in events if isinstance(e, RunFinished)}
    assert finished == {"bn/seed1": "ok", "gn/seed1": "ok"}

    # broken raised (not retried); doomed's worker died at each of its 2 attempts
    failed = {e.run: e.error for e in events if isinstance(e, RunFailed)}
    assert set(failed) == {"broken/seed1", "doomed/seed1"}
    assert "Error" in failed["broken/seed1"].split(":")[0]
    assert len(killed["doomed"]) == 2 and "died 2 times" in failed["doomed/seed1"]
    starts = [e for e in events if isinstance(e, RunStarted) and e.run == "broken/seed1"]
    assert len(starts) == 1
    results = load_results(out)
    assert {f"{r.variant}/seed{r.seed}": r.state for r in results.runs} == {
        "bn/seed1": FINISHED, "gn/seed1": FINISHED, "broken/seed1": FAILED,
        "doomed/seed1": FAILED}
    assert RunDir(out / "broken" / "seed1").failure() == failed["broken/seed1"]

    # every Ray process listened on the loopback only
    assert sockets and not not_loopback(sockets), sockets


# ----------------------------------------------------------------------------- a real cluster


def start_node(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([RAY_CLI, "start", "--block", "--node-ip-address", "127.0.0.1",
                             "--num-cpus", "1", "--disable-usage-stats", *args],
                            stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, **LOOPBACK_ENV})


def wait_for_text(node: subprocess.Popen, log: Path, text: str, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end and node.poll() is None:
        if text in log.read_text():
            return True
        time.sleep(0.25)
    return text in log.read_text()


def stop_nodes(nodes: list[subprocess.Popen]) -> None:
    """SIGTERM each `ray start --block` we started (it stops what it started), then SIGKILL
    whatever of their processes is left, by pid."""
    pids = [p for node in nodes for p in [node.pid, *children(node.pid)]]
    for node in nodes:
        if node.poll() is None:
            node.terminate()
    end = time.monotonic() + 30
    for node in nodes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            node.wait(timeout=max(0.1, end - time.monotonic()))
    while time.monotonic() < end and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.2)
    for pid in pids:
        if Path(f"/proc/{pid}").exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for node in nodes:
        if node.poll() is None:
            node.wait(timeout=10)


def test_a_ray_cluster_started_with_ray_start_runs_a_suite_from_the_cli(
        mnist, tiny, serial, tmp_path, capsys):
    """`ray start --head` as a subprocess, then a second node with `ray start --address`
    when Ray allows it: Ray 2.60 refuses to join a node while
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, which is what keeps every Ray process on the
    loopback, so here the head alone (1 CPU) runs the suite."""
    need_ray()
    port = free_port()
    # Ray's unix sockets live under the temp dir: keep its path short
    temp = Path(tempfile.mkdtemp(prefix="nlray", dir="/tmp"))
    nodes = [start_node(["--head", "--port", str(port), "--include-dashboard", "false",
                         "--ray-client-server-port", str(free_port()),
                         "--dashboard-agent-listen-port", str(free_port()),
                         "--temp-dir", str(temp)], tmp_path / "head.log")]
    try:
        assert wait_for_text(nodes[0], tmp_path / "head.log", "Ray runtime started", 120), (
            (tmp_path / "head.log").read_text())
        worker_log = tmp_path / "worker.log"
        nodes.append(start_node(["--address", f"127.0.0.1:{port}"], worker_log))
        joined = wait_for_text(nodes[1], worker_log, "Ray runtime started", 60)
        if not joined:
            assert "Multi-node Ray clusters are not supported" in worker_log.read_text(), (
                worker_log.read_text())
        ours = [p for node in nodes for p in [node.pid, *children(node.pid)]]
        assert not not_loopback(listening(ours)), listening(ours)

        out = tmp_path / "cluster"
        code = main(["suite", str(tiny.source), "--out", str(out), "--ray-address",
                     f"127.0.0.1:{port}", "--threads", "1", "--device", "cpu", "--quiet"])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        assert "suite tiny: 2 runs (2 trained" in captured.out
        assert (out / "report.html").exists()
        assert comparable_csv((out / "results.csv").read_text()) == comparable_csv(
            (serial / "results.csv").read_text())
    finally:
        stop_nodes(nodes)
        shutil.rmtree(temp, ignore_errors=True)
    assert not any(Path(f"/proc/{p}").exists() for p in ours)


# ----------------------------------------------------------------------------- the CLI


def test_ray_options_need_the_ray_executor(tmp_path, capsys):
    path = write(tmp_path, TINY, "tiny.toml")
    assert main(["suite", str(path), "--executor", "local", "--ray-address", "auto"]) == 2
    assert "--ray-address: only with --executor ray" in capsys.readouterr().err
    assert main(["suite", str(path), "--cpus-per-run", "2"]) == 2
    assert "--cpus-per-run: only with --executor ray" in capsys.readouterr().err
    assert main(["suite", str(path), "--executor", "ray", "--jobs", "2"]) == 2
    assert "--jobs is for the local executor" in capsys.readouterr().err
    if HAVE_RAY:
        assert main(["suite", str(path), "--executor", "ray", "--device", "cuda"]) == 2
        assert "needs --gpus-per-run" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["suite", str(path), "--executor", "ray", "--cpus-per-run", "0"])
    assert not (tmp_path / "runs").exists()


def test_without_ray_the_ray_executor_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # importlib finds no ray
    path = write(tmp_path, TINY, "tiny.toml")
    out = tmp_path / "out"
    assert main(["suite", str(path), "--executor", "ray", "--out", str(out)]) == 2
    assert "pip install 'normlab[ray]'" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(ValueError, match=r"pip install 'normlab\[ray\]'"):
        RayExecutor()
