"""Executors: what trains a suite's runs, behind one seam.

An executor gets the planner's jobs and a listener, trains every job (each through
:func:`normlab.training.train`, into the job's run directory), reports progress as events
(:mod:`normlab.training.events`) and returns each run's outcome. A run that raises is
reported as failed and the others still train; Ctrl-C stops everything, keeping every
finished epoch. Nothing above this seam knows which executor ran: the same jobs give the
same run directories whichever trains them (same device and threads per run).

- :class:`SerialExecutor`: one run after another in this process (the data loaded once).
- :class:`ProcessExecutor`: N runs at once in worker processes; the parent turns what the
  workers append to metrics.jsonl into events (:class:`MetricsWatcher`). It may split a
  run between workers at an epoch boundary (:func:`split_plan`), so that N slots finish
  together: five runs on two cores take two and a half runs' time, not three.
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
    RunPaused,
    RunStarted,
)
from normlab.training.rundir import FAILED, RunDir


@dataclass(frozen=True)
class Outcome:
    status: str  # train()'s "ok" | "diverged", or FAILED
    message: str = ""


class Executor(abc.ABC):
    """Trains jobs; ``device`` and ``threads`` are per run. ``splits_runs``: whether it may
    train a run in parts on different workers (for the time-left estimate)."""

    splits_runs = False

    def __init__(self, device: str = "auto", threads: int | None = None) -> None:
        self.device, self.threads = device, threads

    @abc.abstractmethod
    def execute(self, jobs: list[Job], listener: Listener) -> dict[str, Outcome]:
        """Train ``jobs``; return {job.rel: Outcome}, emitting events as it goes."""


def session_norms(jobs: list[Job]) -> list[str]:
    """The jobs' norms registered with ``register_norm`` in this process, which no other
    process can build (a norm named by import path can be)."""
    from normlab.models.imports import is_path
    from normlab.models.norms import built_in

    return sorted({n for job in jobs for n in job.config.model.norms
                   if not built_in(n) and not is_path(n)})


def check_portable(jobs: list[Job], where: str) -> None:
    """Raise a ValueError before anything trains when a job's norm lives in this session
    only (:func:`session_norms`): ``where`` (worker processes, Ray workers) cannot build it."""
    names = session_norms(jobs)
    if names:
        raise ValueError(
            f"norm {', '.join(map(repr, names))} was registered in this session "
            f"(register_norm), which {where} do not see; name it by import path instead, "
            f"norm = \"package.module:Attr\" (importable there: PYTHONPATH or an installed "
            f"package), or train in this process (jobs=1)")


def import_paths(jobs: list[Job]) -> list[str]:
    """The import paths (``"package.module:Attr"``) the jobs' norms and networks are
    named by, in first-seen order."""
    from normlab.models.imports import is_path

    paths: list[str] = []
    for job in jobs:
        for name in (*job.config.model.norms, job.config.model.net):
            if is_path(name) and name not in paths:
                paths.append(name)
    return paths


def import_roots(jobs: list[Job]) -> list[str]:
    """The folders from which the jobs' norms and networks named by import path are
    imported here (the folder holding each one's top-level module or package), in
    first-seen order."""
    import importlib
    from pathlib import Path

    roots: list[str] = []
    for name in import_paths(jobs):
        top = importlib.import_module(name.split(":")[0].split(".")[0])
        where = list(getattr(top, "__path__", []) or [])
        path = Path(where[0]) if where else Path(top.__file__ or "")
        root = str(path.parent.resolve())
        if root not in roots:
            roots.append(root)
    return roots


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


PAUSED = "paused"  # a chunk's outcome when its run has epochs left for a later chunk


def train_job(job: Job, device: str, threads: int | None, until: int | None = None) -> Outcome:
    """Train one job in a worker (module level, so that it pickles), up to epoch ``until``
    (None: to the end)."""
    from normlab.training.run import train

    result = train(job.config, job.dir, device=device, threads=threads, until=until)
    return Outcome(PAUSED if result.paused else result.status, result.message)


@dataclass(frozen=True)
class Chunk:
    """Epochs ``first``..``until`` of the job ``rel``, planned to start at ``start`` (in
    epochs) on slot ``slot``."""

    rel: str
    first: int
    until: int
    start: int
    slot: int


def split_plan(left: list[tuple[str, int, int]], slots: int) -> list[Chunk]:
    """Chunks for runs ``(rel, epochs done, epochs in all)`` on ``slots`` workers, in the
    order to hand them out, by McNaughton's wrap-around rule: with epochs of equal cost
    every slot finishes at T = max(ceil(total left / slots), longest run), and at most
    ``slots - 1`` runs are split, each in two chunks that never overlap in time (the one
    planned first in time takes the earlier epochs). Runs with nothing left come first (the
    worker only finds them finished)."""
    chunks = [Chunk(rel, total + 1, total, 0, 0) for rel, done, total in left if done >= total]
    todo = [(rel, done, total) for rel, done, total in left if done < total]
    if not todo:
        return chunks
    span = max(-(-sum(total - done for _, done, total in todo) // slots),
               max(total - done for _, done, total in todo))
    planned, slot, at = [], 0, 0
    for rel, done, total in todo:
        size = total - done
        room = span - at
        if size <= room:
            planned.append(Chunk(rel, done + 1, total, at, slot))
            at += size
        else:  # McNaughton: the first epochs open the next slot, the rest close this one
            head = size - room
            planned.append(Chunk(rel, done + 1, done + head, 0, slot + 1))
            planned.append(Chunk(rel, done + head + 1, total, at, slot))
            slot, at = slot + 1, head
            continue
        if at == span:
            slot, at = slot + 1, 0
    return chunks + sorted(planned, key=lambda c: (c.start, c.slot))


class MetricsWatcher:
    """Turns what other processes append to the runs' metrics.jsonl into events, so an
    executor whose workers cannot call back (worker processes, Ray tasks on other machines
    sharing the output folder) still reports every epoch as it finishes."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.seen: dict[str, int] = {}
        self.jobs: dict[str, Job] = {}

    def start(self, job: Job, done: int | None = None) -> None:
        """Follow ``job``, which had ``done`` epochs when it was handed out (default: as
        many as its metrics.jsonl holds now); the epochs after those are reported as they
        appear, even those finished before this call."""
        if done is None:
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

    def pause(self, rel: str) -> None:
        """A run stopped at an epoch boundary to balance the workers; it goes on later."""
        history = self._emit_new(rel)
        self.listener(RunPaused(rel, len(history), self.jobs[rel].config.protocol.epochs))

    def resume(self, job: Job) -> None:
        """A paused run goes on."""
        self.listener(RunStarted(job.rel, self.seen[job.rel], job.config.protocol.epochs))

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
    (Ctrl-C, SIGTERM) or dies, the workers stop too. Runs are handed out in chunks of
    epochs by :func:`split_plan`: a split run stops at an epoch boundary (checkpointed, as
    after an interruption) and goes on later, in another worker, to the same numbers."""

    splits_runs = True
    POLL_SECONDS = 1.0
    ATTEMPTS = 2  # a run whose worker died is retried once (it resumes from its checkpoint)

    def __init__(self, jobs: int, device: str = "auto", threads: int | None = None) -> None:
        if jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {jobs}")
        super().__init__(device, threads or max(1, (os.cpu_count() or 1) // jobs))
        self.jobs = jobs

    def execute(self, jobs: list[Job], listener: Listener) -> dict[str, Outcome]:
        # Spawned workers get this process's sys.path: a norm's import path resolves there.
        check_portable(jobs, "worker processes")
        with workers_preloaded():  # workers start with tcmalloc when it is installed
            return self._execute(jobs, listener)

    def _execute(self, jobs: list[Job], listener: Listener) -> dict[str, Outcome]:
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
        from concurrent.futures.process import BrokenProcessPool

        ctx = multiprocessing.get_context("spawn")
        by_rel = {job.rel: job for job in jobs}
        left = [(job.rel, len(RunDir(job.dir).metrics()), job.config.protocol.epochs)
                for job in jobs]
        queue = split_plan(left, self.jobs)
        watcher, outcomes = MetricsWatcher(listener), {}
        attempts = dict.fromkeys(by_rel, 0)
        pending: dict = {}  # future -> chunk

        def new_pool():
            return ProcessPoolExecutor(max_workers=self.jobs, mp_context=ctx,
                                       initializer=_die_with_parent, initargs=(os.getpid(),))

        def next_chunk() -> Chunk | None:
            """The first chunk in plan order whose run is not being trained now."""
            busy = {c.rel for c in pending.values()}
            for i, chunk in enumerate(queue):
                if chunk.rel not in busy:
                    return queue.pop(i)
            return None

        pool = new_pool()
        try:
            while queue or pending:
                while len(pending) < self.jobs and (chunk := next_chunk()) is not None:
                    job = by_rel[chunk.rel]
                    if job.rel in watcher.jobs:
                        watcher.resume(job)
                    else:
                        attempts[job.rel] += 1
                        watcher.start(job)
                    until = None if chunk.until >= job.config.protocol.epochs else chunk.until
                    future = pool.submit(train_job, job, self.device, self.threads, until)
                    pending[future] = chunk
                finished, _ = wait(pending, timeout=self.POLL_SECONDS,
                                   return_when=FIRST_COMPLETED)
                watcher.poll()
                broken = False
                for future in finished:
                    chunk = pending.pop(future)
                    job = by_rel[chunk.rel]
                    err = future.exception()
                    died = isinstance(err, BrokenProcessPool)
                    broken |= died
                    if died and attempts[job.rel] < self.ATTEMPTS:
                        watcher.forget(job.rel)
                        queue.insert(0, chunk)  # a worker died (maybe another's): try again
                        continue
                    outcome = future.result() if err is None else fail(job, err)
                    if outcome.status == PAUSED:
                        watcher.pause(job.rel)
                        continue
                    queue = [c for c in queue if c.rel != job.rel]  # ended early: diverged
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
