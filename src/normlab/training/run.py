"""``train(config, out)``: train one run into its run directory, idempotently.

An unfinished run resumes from its last complete epoch (with every RNG state restored, so
the metrics equal those of an uninterrupted run), a finished one is not retrained, and a
directory holding a different config is refused. Progress goes out as events
(:mod:`normlab.training.events`) to one ``listener``; nothing here prints.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from normlab import __version__, accel, probes
from normlab.accel import kernels
from normlab.memory import allocator, keep_freed_memory
from normlab.probes import Prober
from normlab.studies.precise import precise_evaluate
from normlab.training.config import RunConfig, continue_hint
from normlab.training.engine import (
    TensorData,
    evaluate,
    l1_parameters,
    memory_format,
    train_one_epoch,
)
from normlab.training.events import (
    EpochFinished,
    Listener,
    Notice,
    RunFinished,
    RunStarted,
    StepsDone,
    ignore,
)
from normlab.training.rundir import CHANCE_ACC, RunDir

CHANCE_MIN_STEPS = 100  # the chance-level check needs a real first epoch, not a tiny subset
STEP_EVENTS = 20  # a StepsDone event every this many steps


@dataclass
class RunResult:
    out: Path
    history: list[dict] = field(default_factory=list)
    status: str = "ok"  # "ok" | "diverged"
    message: str = ""
    skipped: bool = False  # already finished before this call
    paused: bool = False  # stopped at ``until`` with epochs left (it resumes later)


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
    """A run's metrics.jsonl, one dict per epoch (see :meth:`RunDir.metrics`)."""
    return RunDir(out).metrics()


def divergence(record: dict, steps_done: int, at_chance: bool = True) -> str:
    """Why a run must stop after ``record`` (a nan/inf loss; with ``at_chance``, test
    accuracy at chance), or ""."""
    if record["first_bad_step"] >= 0 or not (
        math.isfinite(record["train_loss"]) and math.isfinite(record["test_loss"])
    ):
        step = record["first_bad_step"]
        where = f", step {step}" if step >= 0 else ""
        return (
            f"diverged: loss became nan/inf at epoch {record['epoch']}{where}; "
            "try a smaller learning rate or L1 lambda"
        )
    if at_chance and steps_done >= CHANCE_MIN_STEPS and record["test_acc"] < CHANCE_ACC:
        return (
            f"diverged: test accuracy {record['test_acc']:.2f}% is at chance level after "
            f"epoch {record['epoch']}; try a smaller learning rate or L1 lambda"
        )
    return ""


def make_optimizer(model, config: RunConfig, steps_per_epoch: int):
    p = config.protocol
    # foreach: a few calls for all parameters instead of three per parameter. On a CPU
    # torch defaults to the loop (its foreach kernels loop over the same per-tensor ops
    # there, so the numbers are the same bit for bit; the tests compare the two).
    opt = torch.optim.SGD(
        model.parameters(), lr=p.lr, momentum=p.momentum, nesterov=p.nesterov,
        weight_decay=config.weight_decay, foreach=True,
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
    data: tuple[TensorData, TensorData] | None = None,
    listener: Listener = ignore,
    name: str | None = None,
    until: int | None = None,
) -> RunResult:
    """Train ``config`` into the run directory ``out`` (resuming or skipping as needed).

    Progress goes to ``listener`` as events naming the run ``name`` (default: ``out``).
    With ``until`` it stops after that epoch, checkpointed as after an interruption, and
    returns ``paused`` (no RunFinished event): a later call continues it, to the same
    numbers as an uninterrupted run (an executor's way of splitting a run between workers).
    """
    if until is not None and until < 1:
        raise ValueError(f"until must be an epoch number >= 1, got {until}")
    run = RunDir(out)
    name = name or str(run.path)
    if threads:
        torch.set_num_threads(threads)
    keep_freed_memory()
    dev = resolve_device(device)
    if "normlab" in (config.model.kernels, config.augment) and dev.type == "cpu":
        kernels.library()  # built now: a run that cannot have it fails before it starts
    with run.lock():
        result = _train_locked(config, run, dev, data, listener, name, until)
    if result.paused:
        return result
    listener(RunFinished(name, result.status, tuple(result.history), result.message,
                         result.skipped))
    return result


def _check_config(run: RunDir, config: RunConfig, meta: dict, listener: Listener,
                  name: str) -> None:
    stored = run.stored()
    if stored is None:
        run.write_config(config, meta)
        return
    diffs = run.conflicts(config)
    if diffs:
        raise ValueError(
            f"{run.path} holds a run with a different config ({'; '.join(diffs)})"
            f"{continue_hint(diffs)}; use another --out or delete that directory"
        )
    if run.state() == "partial":
        for key in ("device", "threads"):  # both change the floating-point sums
            if key in stored and stored[key] != meta[key]:
                listener(Notice(name, f"started with {key} {stored[key]}, resumed with "
                                      f"{meta[key]}; the metrics will not equal an "
                                      f"uninterrupted run's (pass --{key} {stored[key]} for that)"))


def _train_locked(config, run: RunDir, dev, data, listener, name, until) -> RunResult:
    meta = {"normlab": __version__, "torch": torch.__version__, "device": str(dev),
            "threads": torch.get_num_threads(), "malloc": allocator()}
    _check_config(run, config, meta, listener, name)
    if run.finished():
        history = run.metrics()
        status = history[-1].get("status", "ok") if history else "ok"
        return RunResult(run.path, history, status, history[-1].get("message", ""), skipped=True)

    train_data, test_data = data or load_split_tensors(config, dev)
    p = config.protocol
    steps_per_epoch = -(-len(train_data) // p.batch_size)
    torch.manual_seed(config.seed)
    layout = memory_format(dev, torch.get_num_threads(), config.model)
    model = config.make_model().to(dev, memory_format=layout)
    # the acceleration: its modules swapped in (sharing the parameters), its step
    step = accel.prepare(model, config.model, config.precision, enabled=config.accel == "on",
                         compile=config.compile)
    prober = Prober.for_run(model, config)
    opt, per_epoch, per_step = make_optimizer(model, config, steps_per_epoch)
    covered = l1_parameters(model, config.l1_scope)
    history: list[dict] = []
    ckpt = run.load_checkpoint(dev)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        for group in opt.param_groups:  # a checkpoint of normlab 0.6 or before says None
            group["foreach"] = opt.defaults["foreach"]
        for sched, key in ((per_epoch, "per_epoch"), (per_step, "per_step")):
            if sched is not None:
                sched.load_state_dict(ckpt[key])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if dev.type == "cuda" and "cuda" in ckpt["rng"]:
            torch.cuda.set_rng_state(ckpt["rng"]["cuda"], dev)
        history = [json.loads(line) for line in ckpt["history"]]
    # metrics.jsonl always equals the checkpoint's history (a kill between the two is safe),
    # and probes.jsonl holds the checkpoint's epochs (written before it: a kill in between
    # leaves an epoch's records that the epoch, trained again, writes again)
    run.write_metrics(history)
    probes.keep_epochs(run.path, len(history))
    listener(RunStarted(name, len(history), p.epochs))

    status, message, final = "ok", "", None
    last = p.epochs if until is None else min(until, p.epochs)
    for epoch in range(len(history) + 1, last + 1):
        lr = opt.param_groups[0]["lr"]
        tr = train_one_epoch(
            model, train_data, opt, seed=config.seed, epoch=epoch, batch_size=p.batch_size,
            rotation=p.rotation, l1=config.l1, l1_params=covered, step_scheduler=per_step,
            on_step=_step_events(listener, name, epoch, len(train_data), p.batch_size),
            precision=config.precision, augment=config.augment, step=step, prober=prober,
        )
        if per_epoch is not None:
            per_epoch.step()
        te = evaluate(model, test_data, p.eval_batch_size, predictions=True,
                      precision=config.precision, forward=step.infer)
        run.record_paths(step.paths())  # config.json says which paths the steps took
        final = te.pop("predictions")  # kept from the last epoch trained
        record = {"epoch": epoch, "lr": lr, **tr, **te}
        record["seconds"] = tr["train_seconds"] + te["test_seconds"]
        record["images_per_second"] = len(train_data) / tr["train_seconds"]
        if config.precise_bn:  # a second test pass, recalibrated, on a copy of the model
            record.update(precise_evaluate(
                model, train_data, test_data, batch_size=p.batch_size, seed=config.seed,
                eval_batch_size=p.eval_batch_size, precision=config.precision))
        message = divergence(record, epoch * steps_per_epoch, config.stop_at_chance)
        status = "diverged" if message else "ok"
        record["status"] = status
        if message:
            record["message"] = message
        history.append(record)
        if prober is not None:
            probes.append(run.path, prober.take())
        _save_checkpoint(run, model, opt, per_epoch, per_step, history, dev)
        run.append_metrics(record)
        listener(EpochFinished(name, record, p.epochs))
        if message:
            break

    if not message and len(history) < p.epochs:  # stopped at ``until``
        return RunResult(run.path, history, status, message, paused=True)
    if final is None:  # every epoch was done before a kill that came before predictions.pt
        final = evaluate(model, test_data, p.eval_batch_size, predictions=True,
                         precision=config.precision, forward=step.infer)["predictions"]
    run.save_predictions(final)
    return RunResult(run.path, history, status, message)


def _step_events(listener: Listener, name: str, epoch: int, total: int, batch: int):
    if listener is ignore:
        return None
    every = STEP_EVENTS * batch

    def on_step(seen: int) -> None:
        if seen % every == 0 or seen == total:
            listener(StepsDone(name, epoch, seen, total))

    return on_step


def _save_checkpoint(run: RunDir, model, opt, per_epoch, per_step, history, dev) -> None:
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
    run.save_checkpoint(state)
