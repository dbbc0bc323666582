"""Weights & Biases: one W&B run per normlab run, offline unless WANDB_MODE says otherwise.

A run is grouped by its suite (``group``) and variant (``job_type``), named "bn seed 1",
and gets the whole RunConfig as its config. Every epoch is one history row at step = epoch
(the metrics of metrics.jsonl: accuracies, losses, lr, timings); at the end the summary
gets the final metrics and the rows the report's misclassified gallery and confusion
matrix as W&B images. The project is $WANDB_PROJECT, else "normlab".

The run's files go into the normlab run directory (``<run>/wandb/``, or $WANDB_DIR when
set); ``wandb sync <run>/wandb/offline-run-*`` uploads them later, no account needed
before. The W&B run id is written to the run directory's tracking.json before the run is
created, so a resumed normlab run continues the same W&B run: online through W&B's resume,
offline as another offline-run folder with the same id (``wandb sync`` uploads a run's
folders in order, into that one run), holding only the epochs not logged before. W&B
writes an offline file in 32 KiB blocks, so after a kill -9 the file lacks what W&B had
not written yet: a run resumed after one reads back (with W&B's own reader) the epochs its
earlier folders hold, and logs the others again from metrics.jsonl.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
import string
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from normlab.tracking.consumer import (
    Handle,
    RunInfo,
    Tracker,
    epoch_metrics,
    final_metrics,
    probe_scalars,
    run_config,
)

OFFLINE_MODES = ("offline", "dryrun")
LOG_HEADER = 7  # bytes: a .wandb file that holds no record


def new_id() -> str:
    """A W&B run id: 8 of [a-z0-9], as W&B makes them (its generator is not public API)."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def wandb_dir(run: RunInfo) -> Path:
    """Where W&B keeps the run's folders: $WANDB_DIR/wandb, else the run directory's."""
    return Path(os.environ.get("WANDB_DIR") or run.dir) / "wandb"


def folders(where: Path, run_id: str) -> list[Path]:
    """The folders of W&B run ``run_id`` (one per invocation that logged to it)."""
    return sorted(p for p in where.glob(f"*-{run_id}") if p.is_dir() and not p.is_symlink())


def offline_epochs(where: Path, run_id: str) -> int | None:
    """The last epoch the offline files of W&B run ``run_id`` hold (0: none), read by W&B's
    own reader (``wandb leet inspect``, which prints each record as protobuf text when its
    output is not a terminal); None when they cannot be read."""
    from google.protobuf import text_format
    from wandb.proto import wandb_internal_pb2

    last = 0
    for folder in folders(where, run_id):
        log = folder / f"run-{run_id}.wandb"
        if not log.exists() or log.stat().st_size <= LOG_HEADER:
            continue  # nothing but the header reached the disk
        try:
            text = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", str(log)],
                                  capture_output=True, text=True, check=True,
                                  timeout=120).stdout
            for chunk in re.split(r"^# record \d+: history\n", text, flags=re.M)[1:]:
                record = text_format.Parse(chunk.split("\n# record ", 1)[0],
                                           wandb_internal_pb2.Record())
                for item in record.history.item:
                    if (item.key or "/".join(item.nested_key)) == "epoch":
                        last = max(last, int(json.loads(item.value_json)))
        except (OSError, subprocess.SubprocessError, text_format.ParseError, ValueError):
            return None
    return last


def mode() -> str:
    """The W&B mode this process uses: $WANDB_MODE, else offline."""
    return os.environ.get("WANDB_MODE") or "offline"


def probe_row(records: list[dict]) -> dict:
    """An epoch's probe records as W&B takes them on the epoch axis: the last record's
    numbers (:func:`probe_scalars`), and histograms across the network over the epoch's
    probe steps: every weight's relative update, every gradient norm, and every probed
    layer's median input."""
    import wandb

    row: dict = dict(probe_scalars(records[-1]))
    pools = {"probe/hist/update": [w["update"] for r in records
                                   for w in r.get("weights", {}).values()],
             "probe/hist/grad_norm": [g for r in records for g in r.get("gradients", {})
                                      .values()],
             "probe/hist/input_p50": [a["p50"] for r in records
                                      for a in r.get("activations", {}).values()]}
    for key, values in pools.items():
        values = [v for v in values if v is not None]
        if values:
            row[key] = wandb.Histogram(values)
    return row


class WandbTracker(Tracker):
    name = "wandb"
    title = "W&B"
    module = "wandb"
    extra = "wandb"

    def __init__(self, suite) -> None:
        super().__init__(suite)
        self.dirs: list[str] = []  # the offline folders written by this command

    def done(self, run: RunInfo, state: dict) -> bool:
        """Whether the run was finished in W&B (offline: and its folders are still there)."""
        if not state.get("finished"):
            return False
        return mode() not in OFFLINE_MODES or bool(folders(wandb_dir(run), state["id"]))

    def open(self, run: RunInfo, state: dict, save: Callable[[], None]) -> Handle:
        import wandb

        offline = mode() in OFFLINE_MODES
        if "id" not in state:
            state.update(id=new_id(), logged=0, finished=False, closed=True)
        elif offline and not folders(wandb_dir(run), state["id"]):
            state.update(logged=0, finished=False, closed=True)  # its files were deleted
        elif offline and not state.get("closed", True):
            # the last invocation was killed: W&B writes its offline file in 32 KiB blocks,
            # so the epochs it was given since the last full block are not in the file
            held = offline_epochs(wandb_dir(run), state["id"])
            if held is not None:
                state["logged"] = held
        state["closed"] = False
        save()  # before W&B has the run: a kill after this continues the same id
        settings = wandb.Settings(silent=True, console="off", reinit="create_new")
        wb = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "normlab",
            id=state["id"],
            resume=None if offline else "allow",  # offline: W&B ignores it, with a warning
            mode=None if os.environ.get("WANDB_MODE") else "offline",
            dir=None if os.environ.get("WANDB_DIR") else str(run.dir),
            name=run.name,
            group=run.suite,
            job_type=run.variant or "train",
            config=run_config(run),
            settings=settings,
        )
        wb.define_metric("epoch")
        wb.define_metric("*", step_metric="epoch")
        if offline and getattr(wb.settings, "sync_dir", None):
            self.dirs.append(str(wb.settings.sync_dir))
        return Handle(run, state, int(state.get("logged", 0)), bool(state.get("finished")), wb)

    def log_epochs(self, handle: Handle, records: list[dict],
                   probes: dict[int, list[dict]] | None = None) -> None:
        for record in records:
            epoch = int(record["epoch"])
            row = {"epoch": epoch, **epoch_metrics(record)}
            taken = (probes or {}).get(epoch)
            if taken:
                row.update(probe_row(taken))
            handle.obj.log(row, step=epoch)
            handle.state["logged"] = epoch

    def finish(self, handle: Handle, history: Sequence[dict], status: str,
               figures: dict[str, tuple[bytes, str]]) -> None:
        import wandb
        from PIL import Image

        wb = handle.obj
        if figures:
            step = int(history[-1]["epoch"]) if history else 0
            wb.log({key: wandb.Image(Image.open(io.BytesIO(png)), caption=caption)
                    for key, (png, caption) in figures.items()}, step=step)
        wb.summary.update({**final_metrics(history), "status": status})
        wb.finish(exit_code=0)
        handle.state.update(finished=True, closed=True)

    def stop(self, handle: Handle, error: str | None) -> None:
        if error:
            handle.obj.summary.update({"status": "failed", "error": error})
        handle.obj.finish(exit_code=1)
        handle.state["closed"] = True  # finish() has W&B write the rest of the file

    def close(self) -> list[str]:
        if not self.dirs:
            return []
        if os.environ.get("WANDB_DIR"):
            where = os.path.join(os.environ["WANDB_DIR"], "wandb")
        elif self.suite is not None:
            where = os.path.join(str(self.suite.root), "*", "seed*", "wandb")
        else:
            where = os.path.dirname(self.dirs[0])
        runs = len(self.dirs)
        return [f"W&B: {runs} run{'s' if runs != 1 else ''} saved offline in {where}; upload "
                f"with `wandb sync {os.path.join(where, 'offline-run-*')}`"]
