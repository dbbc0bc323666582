"""A run directory: config.json, metrics.jsonl, checkpoint.pt, predictions.pt.

``train(config, out)`` trains into ``out`` and is idempotent: an unfinished run resumes
from its last complete epoch (with every RNG state restored, so the metrics equal those of
an uninterrupted run), a finished one is not retrained, and a directory holding a different
config is refused.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from normlab import __version__
from normlab.files import atomic_write, write_json, write_text
from normlab.training.config import RunConfig, config_diff
from normlab.training.engine import TensorData, evaluate, l1_parameters, train_one_epoch

CONFIG, METRICS, CHECKPOINT, PREDICTIONS, LOCK = (
    "config.json", "metrics.jsonl", "checkpoint.pt", "predictions.pt", ".lock",
)
CHANCE_MIN_STEPS = 100  # the chance-level check needs a real first epoch, not a tiny subset


@dataclass
class RunResult:
    out: Path
    history: list[dict] = field(default_factory=list)
    status: str = "ok"  # "ok" | "diverged"
    message: str = ""
    skipped: bool = False  # already finished before this call


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA device is available")
    return torch.device(name)


def load_split_tensors(config: RunConfig, device: torch.device) -> tuple[TensorData, TensorData]:
    from normlab.data import load_dataset

    ds = load_dataset(config.dataset)
    n = config.subset or len(ds.train_labels)
    train = TensorData(
        ds.train_images[:n].to(device), ds.train_labels[:n].to(device), ds.mean, ds.std
    )
    test = TensorData(ds.test_images.to(device), ds.test_labels.to(device), ds.mean, ds.std)
    return train, test


def read_metrics(out: str | Path) -> list[dict]:
    """A run's metrics.jsonl, one dict per epoch. The file is appended to while the run
    trains, so a half-written last line ends the list instead of raising."""
    path = Path(out) / METRICS
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def is_finished(out: Path) -> bool:
    return (Path(out) / PREDICTIONS).exists()


@contextlib.contextmanager
def _run_lock(out: Path) -> Iterator[None]:
    """One process trains a run directory at a time: a second one is refused, not let in to
    interleave checkpoints. A lock left by a killed process (its pid is gone) is taken over."""
    lock = out / LOCK
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                pid = int(lock.read_text() or 0)
                os.kill(pid, 0)
            except (ValueError, ProcessLookupError, FileNotFoundError):
                lock.unlink(missing_ok=True)  # stale: its process is gone
                continue
            except PermissionError:
                pass  # alive, someone else's
            raise ValueError(
                f"{out} is being trained by process {pid}; wait for it or stop it"
            ) from None
    else:
        raise ValueError(f"could not lock {out}")
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        yield
    finally:
        lock.unlink(missing_ok=True)


def _check_config(out: Path, config: RunConfig, meta: dict) -> None:
    path = out / CONFIG
    if path.exists():
        stored = json.loads(path.read_text())
        saved = stored["run"]
        if (out / CHECKPOINT).exists() and not is_finished(out):
            for key in ("device", "threads"):  # both change the floating-point sums
                if key in stored and stored[key] != meta[key]:
                    print(f"{out}: warning: started with {key} {stored[key]}, resumed with "
                          f"{meta[key]}; the metrics will not equal an uninterrupted run's "
                          f"(pass --{key} {stored[key]} for that)", file=sys.stderr)
        diffs = config_diff(saved, config.to_dict())
        if diffs:
            raise ValueError(
                f"{out} holds a run with a different config ({'; '.join(diffs)}); "
                "use another --out or delete that directory"
            )
    else:
        write_json(path, {"run": config.to_dict(), **meta})


def _divergence(record: dict, steps_done: int, n_classes: int = 10) -> str:
    if record["first_bad_step"] >= 0 or not (
        math.isfinite(record["train_loss"]) and math.isfinite(record["test_loss"])
    ):
        step = record["first_bad_step"]
        where = f", step {step}" if step >= 0 else ""
        return (
            f"diverged: loss became nan/inf at epoch {record['epoch']}{where}; "
            "try a smaller learning rate or L1 lambda"
        )
    if steps_done >= CHANCE_MIN_STEPS and record["test_acc"] < 150.0 / n_classes:
        return (
            f"diverged: test accuracy {record['test_acc']:.2f}% is at chance level after "
            f"epoch {record['epoch']}; try a smaller learning rate or L1 lambda"
        )
    return ""


def _make_optimizer(model, config: RunConfig, steps_per_epoch: int):
    p = config.protocol
    opt = torch.optim.SGD(
        model.parameters(), lr=p.lr, momentum=p.momentum, nesterov=p.nesterov,
        weight_decay=config.weight_decay,
    )
    per_epoch = per_step = None
    if p.scheduler == "step":
        per_epoch = torch.optim.lr_scheduler.StepLR(opt, step_size=p.step_size, gamma=p.gamma)
    elif p.scheduler == "onecycle":
        per_step = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=p.lr, epochs=p.epochs, steps_per_epoch=steps_per_epoch
        )
    return opt, per_epoch, per_step


def train(
    config: RunConfig,
    out: str | Path,
    *,
    device: str = "auto",
    threads: int | None = None,
    quiet: bool = False,
    tensorboard: bool = False,
    data: tuple[TensorData, TensorData] | None = None,
    log: Callable[[str], None] | None = None,
) -> RunResult:
    """Train ``config`` into the run directory ``out`` (resuming or skipping as needed)."""
    out = Path(out)
    log = log or (lambda msg: None if quiet else print(msg, flush=True))
    if tensorboard:
        _summary_writer_class()  # fail before anything is written when it is missing
    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    out.mkdir(parents=True, exist_ok=True)
    with _run_lock(out):
        return _train_locked(config, out, dev, quiet, tensorboard, data, log)


def _train_locked(config, out, dev, quiet, tensorboard, data, log) -> RunResult:
    meta = {"normlab": __version__, "torch": torch.__version__, "device": str(dev),
            "threads": torch.get_num_threads()}
    _check_config(out, config, meta)
    if is_finished(out):
        history = read_metrics(out)
        status = history[-1].get("status", "ok") if history else "ok"
        return RunResult(out, history, status, history[-1].get("message", ""), skipped=True)

    train_data, test_data = data or load_split_tensors(config, dev)
    writer = _summary_writer_class()(str(out / "tensorboard")) if tensorboard else None
    p = config.protocol
    steps_per_epoch = -(-len(train_data) // p.batch_size)
    torch.manual_seed(config.seed)
    model = config.make_model().to(dev, memory_format=torch.channels_last)
    opt, per_epoch, per_step = _make_optimizer(model, config, steps_per_epoch)
    covered = l1_parameters(model, config.l1_scope)
    history: list[dict] = []
    ckpt_path = out / CHECKPOINT
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=dev, weights_only=True)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        for sched, key in ((per_epoch, "per_epoch"), (per_step, "per_step")):
            if sched is not None:
                sched.load_state_dict(ckpt[key])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if dev.type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], dev)
        history = [json.loads(line) for line in ckpt["history"]]
        log(f"resuming {out} after epoch {len(history)}")
    # metrics.jsonl always equals the checkpoint's history (a kill between the two is safe)
    write_text(out / METRICS, "".join(json.dumps(r) + "\n" for r in history))

    status, message, final = "ok", "", None
    for epoch in range(len(history) + 1, p.epochs + 1):
        lr = opt.param_groups[0]["lr"]
        bar = _progress(len(train_data), f"epoch {epoch}/{p.epochs}", quiet)
        tr = train_one_epoch(
            model, train_data, opt, seed=config.seed, epoch=epoch, batch_size=p.batch_size,
            rotation=p.rotation, l1=config.l1, l1_params=covered, step_scheduler=per_step,
            progress=bar,
        )
        if bar is not None:
            bar.close()
        if per_epoch is not None:
            per_epoch.step()
        te = evaluate(model, test_data, p.eval_batch_size, predictions=True)
        final = te.pop("predictions")  # kept from the last epoch trained
        record = {"epoch": epoch, "lr": lr, **tr, **te}
        record["seconds"] = tr["train_seconds"] + te["test_seconds"]
        record["images_per_second"] = len(train_data) / tr["train_seconds"]
        message = _divergence(record, epoch * steps_per_epoch)
        status = "diverged" if message else "ok"
        record["status"] = status
        if message:
            record["message"] = message
        history.append(record)
        _save_checkpoint(ckpt_path, model, opt, per_epoch, per_step, history, dev)
        with open(out / METRICS, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        log(
            f"epoch {epoch:>2}/{p.epochs}  train loss {tr['train_loss']:.4f} "
            f"acc {tr['train_acc']:.2f}%  test loss {te['test_loss']:.4f} "
            f"acc {te['test_acc']:.2f}%  lr {lr:.3g}  {record['seconds']:.1f}s "
            f"({record['images_per_second']:.0f} img/s)"
        )
        if writer is not None:
            _log_scalars(writer, record)
        if message:
            print(f"{out}: {message}", file=sys.stderr, flush=True)
            break

    if final is None:  # every epoch was done before a kill that came before predictions.pt
        final = evaluate(model, test_data, p.eval_batch_size, predictions=True)["predictions"]
    atomic_write(out / PREDICTIONS, lambda tmp: torch.save(final, tmp))
    if writer is not None:
        _log_mistakes(writer, test_data, final, len(history))
        writer.close()
    return RunResult(out, history, status, message)


def _save_checkpoint(path, model, opt, per_epoch, per_step, history, dev) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "epoch": len(history),
        "history": [json.dumps(r) for r in history],  # strings: weights_only-safe
        "rng": {"torch": torch.get_rng_state()},
    }
    if dev.type == "cuda":
        state["rng"]["cuda"] = torch.cuda.get_rng_state(dev)
    for sched, key in ((per_epoch, "per_epoch"), (per_step, "per_step")):
        if sched is not None:
            state[key] = sched.state_dict()
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _progress(total: int, desc: str, quiet: bool):
    if quiet or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", leave=False, dynamic_ncols=True)


def _summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ValueError(
            "--tensorboard needs the tensorboard package: pip install 'normlab[tensorboard]'"
        ) from err
    return SummaryWriter


def _log_scalars(writer, record: dict) -> None:
    for split in ("train", "test"):
        writer.add_scalar(f"loss/{split}", record[f"{split}_loss"], record["epoch"])
        writer.add_scalar(f"accuracy/{split}", record[f"{split}_acc"], record["epoch"])
    writer.add_scalar("lr", record["lr"], record["epoch"])


def _log_mistakes(writer, test: TensorData, predictions: dict, step: int) -> None:
    wrong = (predictions["pred"] != predictions["target"]).nonzero().flatten()[:64]
    if len(wrong):
        images = test.images[wrong.to(test.images.device)].unsqueeze(1).cpu()
        writer.add_images("misclassified", images, step, dataformats="NCHW")
