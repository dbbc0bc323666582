"""Executors: what trains a suite's runs, behind one seam.

An executor gets the planner's jobs and a listener, trains every job (each through
:func:`normlab.training.train`, into the job's run directory), reports progress as events
(:mod:`normlab.training.events`) and returns each run's outcome. A run that raises is
reported as failed and the others still train; Ctrl-C stops everything, keeping every
finished epoch. Nothing above this seam knows which executor ran: the same jobs give the
same run directories whichever trains them (same device and threads per run).

- :class:`SerialExecutor`: one run after another in this process (the data loaded once).
- :class:`ProcessExecutor`: N runs at once in worker processes; the parent turns what the
  workers append to metrics.jsonl into events (:class:`MetricsWatcher`).
- ``normlab.experiments.ray_executor.RayExecutor``: runs as Ray tasks, on one machine or a
  cluster.
"""

from __future__ import annotations

import abc
import os
import signal
import sys
from dataclasses import dataclass

from normlab.experiments.plan import Job
from normlab.memory import workers_preloaded
from normlab.training.events import (
    EpochFinished,
    Listener,
    RunFailed,
    RunFinished,
    RunStarted,
)
from normlab.training.rundir import FAILED, RunDir


@dataclass(frozen=True)
class Outcome:
    status: str  # train()'s "ok" | "diverged", or FAILED
    message: str = ""


class Executor(abc.ABC):
    """Trains jobs; ``device`` and ``threads`` are per run."""

    def __init__(self, device: str = "auto", threads: int | None = None) -> None:
        self.device, self.threads = device, threads

    @abc.abstractmethod
    def execute(self, jobs: list[Job], listener: Listener) -> dict[str, Outcome]:
        """Train ``jobs``; return {job.rel: Outcome}, emitting events as it goes."""


def fail(job: Job, err: BaseException | str) -> Outcome:
    """A failed run's outcome, recorded in its directory for the report."""
    message = err if isinstance(err, str) else f"{type(err).__name__}: {err}"
    RunDir(job.dir).record_failure(message)
    return Outcome(FAILED, message)


class SerialExecutor(Executor):
    """One run after another in this process, the data loaded once for all of them."""

    def execute(self, jobs: list[Job], listener: Listener) -> dict[str, Outcome]:
        from normlab.training.run import load_split_tensors, resolve_device, train

        data: dict[tuple, object] = {}
        outcomes = {}
        for job in jobs:
            key = (job.config.dataset, job.config.subset)
            try:
                if key not in data:
                    data[key] = load_split_tensors(job.config, resolve_device(self.device))
                result = train(job.config, job.dir, device=self.device, threads=self.threads,
                               data=data[key], listener=listener, name=job.rel)
                outcomes[job.rel] = Outcome(result.status, result.message)
            except Exception as err:  # one failed run must not stop the others
                outcomes[job.rel] = fail(job, err)
                listener(RunFailed(job.rel, outcomes[job.rel].message))
        return outcomes


def train_job(job: Job, device: str, threads: int | None) -> Outcome:
    """Train one job in a worker (module level, so that it pickles)."""
    from normlab.training.run import train

    result = train(job.config, job.dir, device=device, threads=threads)
    return Outcome(result.status, result.message)


class MetricsWatcher:
    """Turns what other processes append to the runs' metrics.jsonl into events, so an
    executor whose workers cannot call back (worker processes, Ray tasks on other machines
    sharing the output folder) still reports every epoch as it finishes."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.seen: dict[str, int] = {}
        self.jobs: dict[str, Job] = {}

    def start(self, job: Job) -> None:
        done = len(RunDir(job.dir).metrics())
        self.seen[job.rel], self.jobs[job.rel] = done, job
        self.listener(RunStarted(job.rel, done, job.config.protocol.epochs))

    def poll(self) -> None:
        for rel in list(self.jobs):
            self._emit_new(rel)

    def _emit_new(self, rel: str) -> list[dict]:
        history = RunDir(self.jobs[rel].dir).metrics()
        for record in history[self.seen[rel]:]:
            self.listener(EpochFinished(rel, record, self.jobs[rel].config.protocol.epochs))
        self.seen[rel] = max(self.seen[rel], len(history))
        return history

    def forget(self, rel: str) -> None:
        """Stop watching a run that will be started again."""
        self._emit_new(rel)
        del self.jobs[rel]

    def finish(self, rel: str, outcome: Outcome) -> None:
        history = self._emit_new(rel)
        del self.jobs[rel]
        if outcome.status == FAILED:
            self.listener(RunFailed(rel, outcome.message))
        else:
            self.listener(RunFinished(rel, outcome.status, tuple(history), outcome.message))


def _die_with_parent(parent: int) -> None:
    """Worker initializer: on Linux, have the kernel send SIGTERM to this worker when the
    parent dies, even by SIGKILL, so no orphan keeps training (and holding its run's lock).
    A worker killed this way loses only its unfinished epoch."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the prctl took effect
        os._exit(1)


def _stop_workers(pool) -> None:
    """Terminate the pool's workers (the parent was interrupted): every completed epoch is
    already checkpointed, a checkpoint is replaced atomically, and a dead worker's lock is
    seen as stale, so only the epochs in progress are lost."""
    for process in list(getattr(pool, "_processes", {}).values()):
        if process.is_alive():
            process.terminate()


class ProcessExecutor(Executor):
    """``jobs`` runs at a time in spawned worker processes (no forked torch thread pools).
    With ``threads`` unset each run gets cores / jobs threads. If the parent is interrupted
    (Ctrl-C, SIGTERM) or dies, the workers stop too."""

    POLL_SECONDS = 1.0
    ATTEMPTS = 2  # a run whose worker died is retried once (it resumes from its checkpoint)

    def __init__(self, jobs: int, device: str = "auto", threads: int | None = None) -> None:
        if jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {jobs}")
        super().__init__(device, threads or max(1, (os.cpu_count() or 1) // jobs))
        self.jobs = jobs

    def execute(self, jobs: list[Job], listener: Listener) -> dict[str, Outcome]:
        with workers_preloaded():  # workers start with tcmalloc when it is installed
            return self._execute(jobs, listener)

    def _execute(self, jobs: list[Job], listener: Listener) -> dict[str, Outcome]:
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
        from concurrent.futures.process import BrokenProcessPool

        ctx = multiprocessing.get_context("spawn")
        watcher, outcomes, queue = MetricsWatcher(listener), {}, list(jobs)
        attempts = dict.fromkeys((job.rel for job in jobs), 0)
        pending: dict = {}

        def new_pool():
            return ProcessPoolExecutor(max_workers=self.jobs, mp_context=ctx,
                                       initializer=_die_with_parent, initargs=(os.getpid(),))

        pool = new_pool()
        try:
            while queue or pending:
                while queue and len(pending) < self.jobs:
                    job = queue.pop(0)
                    attempts[job.rel] += 1
                    watcher.start(job)
                    pending[pool.submit(train_job, job, self.device, self.threads)] = job
                finished, _ = wait(pending, timeout=self.POLL_SECONDS,
                                   return_when=FIRST_COMPLETED)
                watcher.poll()
                broken = False
                for future in finished:
                    job = pending.pop(future)
                    err = future.exception()
                    died = isinstance(err, BrokenProcessPool)
                    broken |= died
                    if died and attempts[job.rel] < self.ATTEMPTS:
                        watcher.forget(job.rel)
                        queue.insert(0, job)  # a worker died (maybe another's): try again
                        continue
                    outcome = future.result() if err is None else fail(job, err)
                    outcomes[job.rel] = outcome
                    watcher.finish(job.rel, outcome)
                if broken:  # a worker died: the pool is unusable, start a fresh one
                    pool.shutdown(wait=True, cancel_futures=True)
                    pool = new_pool()
        except BaseException:
            _stop_workers(pool)
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return outcomes
