"""RayExecutor: a suite's runs as Ray tasks, on this machine or across a cluster.

Each job is one Ray task around :func:`~normlab.experiments.executors.train_job`, asking
for ``cpus_per_run`` CPUs (and ``gpus_per_run`` GPUs); Ray decides where and how many run
at once. normlab adds no scheduler of its own: this class submits every job, then waits.

Where the files go: every task writes the job's run directory itself, and this process
follows the runs by reading their metrics.jsonl (:class:`MetricsWatcher`), exactly as
for the local worker processes. On a real cluster the output folder must therefore be
**shared storage** (NFS, a cluster file system) mounted at the same path on every node and
on the machine running ``normlab suite``. That was chosen over Ray's storage option because
a run directory is more than a result: it is the checkpoint a retried task resumes from,
the lock that keeps two processes from training it, and the files the report, ``--dry-run``
and a rerun read; with shared storage all of these work unchanged, on one machine or many,
and the results never pass through Ray's object store.

Faults. A task whose worker process dies (killed, out of memory, its node lost) is retried
by Ray up to ``max_retries`` times; the retry resumes from the run's last checkpoint, so
its metrics equal an uninterrupted run's (with the same device and threads). The run's
``.lock`` holds the pid of the process that trained it: on the same machine a retry finds
that pid gone and takes the lock over. Across machines the pid means nothing to the node
the retry lands on: if no process there has that pid (the usual case) the lock is taken
over (even if the first node was only cut off from the cluster and still trains: the lock
cannot tell, as it names no machine); if one happens to, the retry fails with "being trained
by process N" and the run is reported failed: delete its ``.lock`` and rerun. An exception
raised by training is not retried (it would recur): the run is recorded as failed
(``failure.txt``, the report shows it) and every other run still completes. Rerunning the
suite retries failed runs.

A norm or network named by import path (``norm = "mypkg.norms:MyNorm"``, ``net =
"mypkg.nets:MyNet"``) is imported by each task where it runs: the tasks get PYTHONPATH
with the folders this process imports those modules from (:func:`runtime_env`), which,
like the output folder, must be at the same path on every node. A norm registered in this
session only (``register_norm``) is refused before anything starts: Ray's workers cannot
build it.

A local instance (no ``address``) listens on 127.0.0.1 only: it is started with
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (without which Ray on Linux binds the machine's
network address even when told ``--node-ip-address 127.0.0.1``) and node address
127.0.0.1, without the dashboard, and it is shut down at the end. A cluster named by
``address`` is connected to and disconnected from at the end (it keeps running); a Ray
session this process had already initialised is used and left as it is.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass

from normlab.experiments.executors import (
    Executor,
    MetricsWatcher,
    Outcome,
    check_portable,
    fail,
    import_roots,
    train_job,
)
from normlab.experiments.plan import Job
from normlab.training.events import Listener, Notice
from normlab.training.rundir import LOCK, RunDir

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
LOOPBACK_IP = "127.0.0.1"
INSTALL = "pip install 'normlab[ray]'"


def check_ray() -> None:
    """Raise a ValueError saying how to install Ray when it is missing (without importing
    it: its settings are read from the environment once, at import)."""
    if importlib.util.find_spec("ray") is None:
        raise ValueError(f"--executor ray needs Ray, which is not installed: {INSTALL}")


def import_ray():
    """The ray module, or a ValueError saying how to install it."""
    check_ray()
    import ray

    return ray


def is_loopback(address: str | None) -> bool:
    """Whether ``address`` (HOST:PORT, ray://HOST:PORT) names this machine's loopback."""
    if not address or address == "auto":
        return False
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


@dataclass
class _Task:
    """A submitted job and what its .lock held when last looked at."""

    job: Job
    lock: tuple | None  # (mtime_ns, pid text) of the run's .lock: at submission, then seen
    done: int = 0  # epochs finished at submission
    started: bool = False


def _lock_state(job: Job) -> tuple | None:
    path = RunDir(job.dir).file(LOCK)
    try:
        state = path.stat().st_mtime_ns, path.read_text().strip()
    except OSError:
        return None
    return state if state[1] else None  # created but its pid not written yet


def runtime_env(jobs: list[Job]) -> dict | None:
    """The Ray runtime environment the jobs' tasks need: for norms and networks named by
    import path (``"mypkg.norms:MyNorm"``), PYTHONPATH with the folders they are imported from here
    (then this process's PYTHONPATH), so every worker imports the same module. Like the
    output folder, those folders must be at the same path on every node. None when no job
    names a norm or network by path (the tasks run in Ray's default environment, as before)."""
    roots = import_roots(jobs)
    if not roots:
        return None
    given = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(dict.fromkeys([*roots, *given]))}}


class RayExecutor(Executor):
    """Every job as one Ray task (``cpus_per_run`` CPUs, ``gpus_per_run`` GPUs each).

    ``address``: None starts a local Ray instance with ``num_cpus`` CPUs (default: all),
    on 127.0.0.1 only; ``"auto"``, ``"HOST:6379"`` or ``"ray://HOST:10001"`` (Ray Client,
    ``pip install 'ray[client]'``) connect to a running cluster. ``threads`` per run
    defaults to ``cpus_per_run``; ``device="auto"`` means a GPU when ``gpus_per_run`` asks
    for one, else the CPU. A task whose worker dies is retried ``max_retries`` times,
    resuming from its checkpoint.
    """

    POLL_SECONDS = 1.0

    def __init__(self, address: str | None = None, cpus_per_run: float = 1,
                 gpus_per_run: float = 0, device: str = "auto", threads: int | None = None,
                 num_cpus: int | None = None, max_retries: int = 2) -> None:
        if cpus_per_run <= 0:
            raise ValueError(f"cpus per run must be > 0, got {cpus_per_run}")
        if gpus_per_run < 0:
            raise ValueError(f"gpus per run must be >= 0, got {gpus_per_run}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        check_ray()
        super().__init__(device, threads or max(1, int(cpus_per_run)))
        self.address, self.num_cpus = address, num_cpus
        self.cpus_per_run, self.gpus_per_run, self.max_retries = (
            cpus_per_run, gpus_per_run, max_retries)

    # ------------------------------------------------------------------ connecting

    def connect(self):
        """Initialise Ray; return (ray, whether this call started it)."""
        local = self.address is None or is_loopback(self.address)
        if local:  # before ray is imported: its constants read the environment once
            os.environ.update(LOOPBACK_ENV)
        ray = import_ray()
        if ray.is_initialized():
            return ray, False
        options = {"logging_level": logging.WARNING}
        if self.address is None:
            options.update(num_cpus=self.num_cpus, include_dashboard=False,
                           _node_ip_address=LOOPBACK_IP)
        elif local and not self.address.startswith("ray://"):
            options.update(_node_ip_address=LOOPBACK_IP)
        try:  # "local": a new instance, even when a `ray start` cluster runs on this machine
            ray.init(self.address or "local", **options)
        except ConnectionError as err:
            raise ValueError(
                f"could not connect to the Ray cluster at {self.address}: {err}; if the cluster "
                "uses token authentication (the default of `ray start` when a token exists), "
                "set RAY_AUTH_MODE=token and give its token (RAY_AUTH_TOKEN, or the head's "
                "~/.ray/auth_token)") from err
        return ray, True

    # ------------------------------------------------------------------ running

    def execute(self, jobs: list[Job], listener: Listener) -> dict[str, Outcome]:
        if not jobs:
            return {}
        check_portable(jobs, "Ray workers")
        ray, started = self.connect()
        try:
            return self._run(ray, jobs, listener)
        finally:
            if started:
                ray.shutdown()

    def _run(self, ray, jobs: list[Job], listener: Listener) -> dict[str, Outcome]:
        task = ray.remote(num_cpus=self.cpus_per_run, num_gpus=self.gpus_per_run,
                          max_retries=self.max_retries, retry_exceptions=False)(train_job)
        env = runtime_env(jobs)
        if env:
            task = task.options(runtime_env=env)
        watcher = MetricsWatcher(listener)
        # Ray gives a task the GPUs it asked for; one that asked for none trains on the CPU
        device = "cpu" if self.device == "auto" and not self.gpus_per_run else self.device
        # A task may train an epoch before a poll sees it start: what was done before it
        # is counted at submission, so that every later epoch is reported.
        tasks = [_Task(job, _lock_state(job), len(RunDir(job.dir).metrics())) for job in jobs]
        pending = {task.remote(t.job, device, self.threads): t for t in tasks}
        outcomes: dict[str, Outcome] = {}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=len(pending),
                                   timeout=self.POLL_SECONDS)
                watcher.poll()  # the epochs finished since the last poll, then the runs
                for ref in done:
                    t = pending.pop(ref)
                    if not t.started:  # started and ended between two polls
                        t.started = True
                        watcher.start(t.job, t.done)
                    outcome = self._outcome(ray, ref, t.job)
                    outcomes[t.job.rel] = outcome
                    watcher.finish(t.job.rel, outcome)
                for t in pending.values():  # then the runs that started since
                    self._follow(t, watcher, listener)
        except BaseException:  # Ctrl-C (or a bug here): stop the tasks, keep their epochs
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
        return outcomes

    def _follow(self, t: _Task, watcher: MetricsWatcher, listener: Listener) -> None:
        """A run has started when a process took its lock after submission (queued tasks
        wait for a free CPU); a new lock while it runs means Ray retried it."""
        lock = _lock_state(t.job)
        if lock is None or lock == t.lock:
            return
        if not t.started:
            t.started = True
            watcher.start(t.job, t.done)
        elif t.lock is not None and lock[1] != t.lock[1]:
            epochs = len(RunDir(t.job.dir).metrics())
            listener(Notice(t.job.rel, f"its worker (pid {t.lock[1]}) died; Ray retried it in "
                                       f"pid {lock[1]}, resuming after epoch {epochs}"))
        t.lock = lock

    def _outcome(self, ray, ref, job: Job) -> Outcome:
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as err:  # training raised: not retried
            cause = err.cause if isinstance(err.cause, BaseException) else err
            return fail(job, cause)
        except ray.exceptions.RayError as err:  # the worker died once more than retried
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            return fail(job, f"{type(err).__name__}: the Ray worker died "
                             f"{self.max_retries + 1} times ({first})")

