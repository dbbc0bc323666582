"""Progress as events: what training reports, whoever trains and whoever listens.

``train()`` emits them for one run; an executor (serial, worker processes, Ray) emits the
same ones for every run of a suite, naming each run by ``run`` (its folder relative to the
suite's, or the run directory itself for a single run). A console renderer, a notebook's
progress bars and a log file all consume this one stream.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RunStarted:
    run: str
    epochs_done: int  # > 0 when the run resumes
    epochs: int


@dataclass(frozen=True)
class StepsDone:
    """Within an epoch: ``images`` of ``total`` seen (emitted every few steps, in-process)."""

    run: str
    epoch: int
    images: int
    total: int


@dataclass(frozen=True)
class EpochFinished:
    run: str
    record: dict  # the epoch's line of metrics.jsonl
    epochs: int


@dataclass(frozen=True)
class RunFinished:
    run: str
    status: str  # "ok" | "diverged"
    history: tuple[dict, ...]
    message: str = ""
    skipped: bool = False  # already finished before this call


@dataclass(frozen=True)
class RunPaused:
    """The run stopped after ``epoch`` (checkpointed) so that an executor's workers finish
    together; a RunStarted follows when it goes on."""

    run: str
    epoch: int
    epochs: int


@dataclass(frozen=True)
class RunFailed:
    run: str
    error: str


@dataclass(frozen=True)
class Notice:
    """Something the user should know that is not an error (e.g. a resume on another device)."""

    run: str
    message: str


Event = (RunStarted | StepsDone | EpochFinished | RunPaused | RunFinished | RunFailed
         | Notice)
Listener = Callable[[Event], None]


def ignore(event: Event) -> None:
    """The listener that listens to nothing."""
