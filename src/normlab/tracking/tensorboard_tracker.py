"""TensorBoard: scalars per epoch and the final figures, in the run directory's tensorboard/.

The scalars are those ``--tensorboard`` has always written (loss/train, loss/test,
accuracy/train, accuracy/test, lr, at step = epoch) plus the epoch's timings, and a probed
run's probes (``probe/...``, at step = the training step each was taken at); at the end
the report's misclassified gallery and confusion matrix as images. The epochs logged are
kept in tracking.json, so a resumed run adds only the epochs after them.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

from normlab.tracking.consumer import Handle, RunInfo, Tracker, probe_scalars

TIMINGS = ("seconds", "train_seconds", "test_seconds", "images_per_second")


def writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ValueError("--track tensorboard needs the tensorboard package: "
                         "pip install 'normlab[tensorboard]'") from err
    return SummaryWriter


class TensorBoardTracker(Tracker):
    name = "tensorboard"
    title = "TensorBoard"
    module = "tensorboard"
    extra = "tensorboard"

    def __init__(self, suite) -> None:
        super().__init__(suite)
        self.dirs: list[str] = []

    def done(self, run: RunInfo, state: dict) -> bool:
        return bool(state.get("finished")) and any((run.dir / "tensorboard").glob("events.*"))

    def open(self, run: RunInfo, state: dict, save: Callable[[], None]) -> Handle:
        path = run.dir / "tensorboard"
        if not any(path.glob("events.*")):
            state.update(logged=0, finished=False)  # none written yet, or deleted since
        writer = writer_class()(str(path))
        self.dirs.append(str(path))
        return Handle(run, state, int(state.get("logged", 0)), bool(state.get("finished")),
                      writer)

    def log_epochs(self, handle: Handle, records: list[dict],
                   probes: dict[int, list[dict]] | None = None) -> None:
        writer = handle.obj
        for record in records:
            for probe in (probes or {}).get(int(record["epoch"]), []):  # at training steps
                for key, value in probe_scalars(probe).items():
                    writer.add_scalar(key, value, int(probe["step"]))
            epoch = int(record["epoch"])
            for split in ("train", "test"):
                writer.add_scalar(f"loss/{split}", record[f"{split}_loss"], epoch)
                writer.add_scalar(f"accuracy/{split}", record[f"{split}_acc"], epoch)
            writer.add_scalar("lr", record["lr"], epoch)
            for key in TIMINGS:
                if key in record:
                    writer.add_scalar(f"time/{key}", record[key], epoch)
            handle.state["logged"] = epoch
        writer.flush()

    def finish(self, handle: Handle, history: Sequence[dict], status: str,
               figures: dict[str, tuple[bytes, str]]) -> None:
        import numpy as np
        from PIL import Image

        writer = handle.obj
        step = int(history[-1]["epoch"]) if history else 0
        for key, (png, _) in figures.items():
            image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
            writer.add_image(key, image, step, dataformats="HWC")
        writer.close()
        handle.state["finished"] = True

    def stop(self, handle: Handle, error: str | None) -> None:
        handle.obj.close()

    def close(self) -> list[str]:
        if not self.dirs:
            return []
        where = self.dirs[0] if len(self.dirs) == 1 else (
            str(self.suite.root) if self.suite else self.dirs[0])
        return [f"TensorBoard: `tensorboard --logdir {where}`"]
