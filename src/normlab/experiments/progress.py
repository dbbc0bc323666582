"""The console's view of the event stream: a live bar in a terminal, lines in a log.

In a terminal (``live``) a tqdm bar counts the epochs left to train (runs done / running /
failed beside it, time left from tqdm's rate), a second bar follows the images of the
current epoch when they are reported, and each finished epoch and run leaves one line.
Anywhere else (a log file, CI) there is no bar, and each finished epoch is one line with
the suite's time left. Nothing needs a terminal.
"""

from __future__ import annotations

import heapq
import sys
from typing import TextIO

from normlab.training.events import (
    EpochFinished,
    Event,
    Notice,
    RunFailed,
    RunFinished,
    RunPaused,
    RunStarted,
    StepsDone,
)


def duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, sec = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def epoch_line(record: dict, epochs: int) -> str:
    return (
        f"epoch {record['epoch']:>2}/{epochs}  train loss {record['train_loss']:.4f} "
        f"acc {record['train_acc']:.2f}%  test loss {record['test_loss']:.4f} "
        f"acc {record['test_acc']:.2f}%  lr {record['lr']:.3g}  {record['seconds']:.1f}s "
        f"({record['images_per_second']:.0f} img/s)"
    )


class ConsoleProgress:
    """A listener for the events of one run or a suite's runs.

    ``heads`` names each run for the lines (``{"bn/seed1": "[1/10] bn seed 1"}``); with
    ``epochs_left`` (the epochs this invocation has to train) the lines carry the time left.
    ``quiet`` keeps errors and notices only. ``bar`` is the tqdm class (``tqdm.auto.tqdm``
    in a notebook); ``live`` defaults to whether ``stream`` is a terminal.
    """

    def __init__(self, heads: dict[str, str] | None = None, epochs_left: int | None = None, *,
                 quiet: bool = False, out: TextIO | None = None, stream: TextIO | None = None,
                 live: bool | None = None, bar=None, splits_runs: bool = False) -> None:
        self.heads = heads or {}
        self.splits_runs = splits_runs
        self.epochs_left = epochs_left
        self.quiet = quiet
        self.out = out or sys.stdout
        self.stream = stream or sys.stderr
        self.live = (not quiet and self.stream.isatty()) if live is None else live
        if bar is None:
            from tqdm import tqdm as bar
        self._bar_class = bar
        self.epochs_done = 0
        self.epoch_seconds: list[float] = []  # one run's epochs, wall seconds, in order
        self.remaining: dict[str, int] = {}  # epochs left of each started run
        self.run_epochs = 0  # epochs of a run, as the last one started
        self.slots = 1  # the most runs that have run at once
        self.running: set[str] = set()
        self.done = self.failed = 0
        self._suite_bar = self._epoch_bar = None

    # ------------------------------------------------------------------ output

    def _head(self, run: str) -> str:
        return self.heads.get(run, run)

    def line(self, text: str, *, error: bool = False) -> None:
        if self.quiet and not error:
            return
        stream = self.stream if error else self.out
        if self.live and self._bars_open():
            self._bar_class.write(text, file=stream)
        else:
            print(text, file=stream, flush=True)

    def _bars_open(self) -> bool:
        return self._suite_bar is not None or self._epoch_bar is not None

    def time_left(self) -> str:
        """The suite's time left: the epochs left, spread over as many runs at once as have
        run together so far, at the recent wall time of one run's epoch. Whole runs go to a
        slot, the way the executor hands them out, unless it splits runs between slots
        (``splits_runs``: then the slots finish together, or the longest run decides).
        Wall time per finished epoch of the suite would run low once fewer runs than slots
        are left."""
        if self.epochs_left is None:
            return ""
        left = max(self.epochs_left - self.epochs_done, 0)
        if not self.epoch_seconds:
            return "estimating time left"
        recent = self.epoch_seconds[-20:]
        per_epoch = sum(recent) / len(recent)
        if self.splits_runs:
            unstarted = left - sum(self.remaining.values()) > 0
            longest = max([*self.remaining.values(), self.run_epochs if unstarted else 0])
            return f"about {duration(max(left / self.slots, longest) * per_epoch)} left"
        loads = [self.remaining.get(r, 0) for r in self.running]
        queued = max(left - sum(loads), 0)
        loads += [0] * max(self.slots - len(loads), 0)  # slots >= 1: never empty
        heapq.heapify(loads)
        while queued > 0:
            chunk = min(queued, self.run_epochs or queued)
            heapq.heapreplace(loads, loads[0] + chunk)
            queued -= chunk
        return f"about {duration(max(loads) * per_epoch)} left"

    def _suite(self):
        if self.live and self.epochs_left and self._suite_bar is None:
            self._suite_bar = self._bar_class(
                total=self.epochs_left, desc="epochs", unit="epoch", file=self.stream,
                dynamic_ncols=True, position=0)
        return self._suite_bar

    def _refresh(self) -> None:
        bar = self._suite()
        if bar is not None:
            bar.set_postfix_str(f"runs {self.done} done, {len(self.running)} running, "
                                f"{self.failed} failed", refresh=True)

    # ------------------------------------------------------------------ events

    def __call__(self, event: Event) -> None:
        handler = getattr(self, f"_on_{type(event).__name__}", None)
        if handler is not None:
            handler(event)

    def _on_RunStarted(self, e: RunStarted) -> None:
        self.running.add(e.run)
        self.slots = max(self.slots, len(self.running))
        self.remaining[e.run] = max(e.epochs - e.epochs_done, 0)
        self.run_epochs = e.epochs
        resume = f", resuming after epoch {e.epochs_done}" if e.epochs_done else ""
        left = self.time_left()
        self.line(f"{self._head(e.run)}: started{resume}" + (f"  ({left})" if left else ""))
        self._refresh()

    def _on_StepsDone(self, e: StepsDone) -> None:
        if not self.live:
            return
        if self._epoch_bar is None:
            self._epoch_bar = self._bar_class(
                total=e.total, desc=f"epoch {e.epoch}", unit="img", leave=False,
                file=self.stream, dynamic_ncols=True, position=1 if self._suite() else 0)
        self._epoch_bar.n = e.images
        self._epoch_bar.refresh()
        if e.images >= e.total:
            self._close_epoch_bar()

    def _close_epoch_bar(self) -> None:
        if self._epoch_bar is not None:
            self._epoch_bar.close()
            self._epoch_bar = None

    def _on_EpochFinished(self, e: EpochFinished) -> None:
        self._close_epoch_bar()
        self.epochs_done += 1
        self.epoch_seconds.append(float(e.record.get("seconds", 0.0)))
        self.remaining[e.run] = max(e.epochs - int(e.record.get("epoch", 0)), 0)
        if not self.heads:  # a single run: the full epoch line
            self.line(epoch_line(e.record, e.epochs))
        else:
            r = e.record
            left = self.time_left()
            self.line(f"{self._head(e.run)}  epoch {r['epoch']}/{e.epochs}  test acc "
                      f"{r['test_acc']:.2f}%  loss {r['test_loss']:.4f}  {r['seconds']:.1f} s"
                      + (f"  (suite: {left})" if left else ""))
        if self._suite_bar is not None:
            self._suite_bar.update(1)
        self._refresh()

    def _on_RunPaused(self, e: RunPaused) -> None:
        self.running.discard(e.run)
        self.line(f"{self._head(e.run)}: paused after epoch {e.epoch}/{e.epochs}; it goes on "
                  f"when a worker is free (the workers then finish together)")
        self._refresh()

    def _on_RunFinished(self, e: RunFinished) -> None:
        self.running.discard(e.run)
        self.done += 1
        if e.message:
            self.line(f"{self._head(e.run)}: {e.message}", error=True)
        elif not self.heads:  # a single run: its command says how it ended
            pass
        elif e.skipped:
            self.line(f"{self._head(e.run)}: skipped (finished)")
        elif e.history:
            self.line(f"{self._head(e.run)}: done, final test accuracy "
                      f"{e.history[-1]['test_acc']:.2f}%")
        self._refresh()

    def _on_RunFailed(self, e: RunFailed) -> None:
        self.running.discard(e.run)
        self.failed += 1
        self.line(f"{self._head(e.run)}: FAILED: {e.error}", error=True)
        self._refresh()

    def _on_Notice(self, e: Notice) -> None:
        self.line(f"{self._head(e.run)}: warning: {e.message}", error=True)

    def close(self) -> None:
        self._close_epoch_bar()
        if self._suite_bar is not None:
            self._suite_bar.close()
            self._suite_bar = None
