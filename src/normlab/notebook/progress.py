"""Progress in a notebook: :class:`NotebookProgress` (the event stream as ``tqdm.auto`` bars)
and :func:`_watching`, which turns a ``progress`` argument into the listener a training call
gets, closes its bars, and says what an interrupt kept.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from normlab.training.events import (
    EpochFinished,
    Event,
    Listener,
    Notice,
    RunFailed,
    RunFinished,
    RunPaused,
    RunStarted,
    StepsDone,
    ignore,
)


class NotebookProgress:
    """A listener that draws the event stream as ``tqdm.auto`` bars: widgets in Jupyter and
    Colab, text bars elsewhere; nothing needs a terminal.

    With ``runs`` (a suite) one bar counts the suite's runs (``done`` of them finished
    before); each run that trains gets a bar of its epochs, whose note says how far the
    current epoch is and the last epoch's test accuracy. ``heads`` names the runs.
    Warnings and failures are printed. ``bar`` is the tqdm class (default ``tqdm.auto``).
    """

    def __init__(self, heads: dict[str, str] | None = None, runs: int = 0, done: int = 0, *,
                 bar=None, leave: bool = True) -> None:
        if bar is None:
            from tqdm.auto import tqdm as bar
        self.bar, self.heads, self.leave = bar, heads or {}, leave
        self.failed = 0
        self.epoch_bars: dict[str, Any] = {}
        self.runs_bar = (bar(total=runs, initial=done, desc="runs", unit="run")
                         if runs else None)
        self._note_runs()

    def __call__(self, event: Event) -> None:
        handler = getattr(self, f"_on_{type(event).__name__}", None)
        if handler is not None:
            handler(event)

    def _note_runs(self) -> None:
        if self.runs_bar is not None:
            running = len(self.epoch_bars)
            parts = [f"{running} training"] if running else []
            if self.failed:
                parts.append(f"{self.failed} failed")
            self.runs_bar.set_postfix_str(", ".join(parts), refresh=True)

    def _on_RunStarted(self, e: RunStarted) -> None:
        if e.run in self.epoch_bars:  # a paused run goes on
            self.epoch_bars[e.run].set_postfix_str(f"resumed after epoch {e.epochs_done}",
                                                   refresh=True)
            return
        bar = self.bar(total=e.epochs, initial=e.epochs_done, desc=self.heads.get(e.run, e.run),
                       unit="epoch", leave=self.leave)
        if e.epochs_done:
            bar.set_postfix_str(f"resumed after epoch {e.epochs_done}", refresh=True)
        self.epoch_bars[e.run] = bar
        self._note_runs()

    def _on_StepsDone(self, e: StepsDone) -> None:
        bar = self.epoch_bars.get(e.run)
        if bar is not None:
            bar.set_postfix_str(f"epoch {e.epoch}: {e.images:,} of {e.total:,} images",
                                refresh=True)

    def _on_EpochFinished(self, e: EpochFinished) -> None:
        bar = self.epoch_bars.get(e.run)
        if bar is not None:
            r = e.record
            bar.set_postfix_str(f"test acc {r['test_acc']:.2f}%, loss {r['test_loss']:.4f}",
                                refresh=False)
            bar.update(1)

    def _on_RunPaused(self, e: RunPaused) -> None:
        bar = self.epoch_bars.get(e.run)
        if bar is not None:
            bar.set_postfix_str(f"paused after epoch {e.epoch}: goes on when a worker is free",
                                refresh=True)

    def _end_run(self, run: str) -> None:
        bar = self.epoch_bars.pop(run, None)
        if bar is not None:
            bar.close()
        if self.runs_bar is not None:
            self.runs_bar.update(1)
        self._note_runs()

    def _on_RunFinished(self, e: RunFinished) -> None:
        self._end_run(e.run)
        if e.message:
            self._say(f"{self.heads.get(e.run, e.run)}: {e.message}", error=True)
        elif e.skipped:
            self._say(f"{self.heads.get(e.run, e.run)}: already finished "
                      f"({len(e.history)} epochs); nothing to train")

    def _on_RunFailed(self, e: RunFailed) -> None:
        self.failed += 1
        self._end_run(e.run)
        self._say(f"{self.heads.get(e.run, e.run)}: FAILED: {e.error}", error=True)

    def _on_Notice(self, e: Notice) -> None:
        self._say(f"{self.heads.get(e.run, e.run)}: warning: {e.message}", error=True)

    def _say(self, text: str, *, error: bool = False) -> None:
        print(text, file=sys.stderr if error else sys.stdout, flush=True)

    def close(self) -> None:
        """Close every bar (an unfinished one stays, marked as stopped)."""
        for run in list(self.epoch_bars):
            self.epoch_bars.pop(run).close()
        if self.runs_bar is not None:
            self.runs_bar.close()
            self.runs_bar = None


def _listener(progress: bool | Listener, make: Callable[[], NotebookProgress]):
    """(listener, the bars to close or None) for a ``progress`` argument."""
    if progress is True:
        bars = make()
        return bars, bars
    if progress is False or progress is None:
        return ignore, None
    if callable(progress):
        return progress, None
    raise ValueError(f"progress must be True, False or a listener (a callable taking an "
                     f"event), got {progress!r}")


@contextmanager
def _watching(progress: bool | Listener, make: Callable[[], NotebookProgress],
              kept: Callable[[], str]) -> Iterator[Listener]:
    """The listener for a ``progress`` argument while a cell trains (the bars ``make``
    makes when it is True, closed at the end). Interrupting the kernel prints
    "Interrupted. <kept()>; run this cell again to continue." below the bars."""
    listener, bars = _listener(progress, make)
    try:
        yield listener
    except KeyboardInterrupt:
        if bars is not None:
            bars.close()
        print(f"Interrupted. {kept()}; run this cell again to continue.",
              file=sys.stderr, flush=True)
        raise
    finally:
        if bars is not None:
            bars.close()
