"""Train one model into a run directory (resumable; a finished run is not retrained).

The run directory gets config.json, metrics.jsonl (one line per epoch), checkpoint.pt
(after every epoch) and predictions.pt (at the end). Rerunning the same command on an
interrupted run continues from its last complete epoch with identical results.

Examples:
  normlab train --out runs/bn                          # the seed's BN model and protocol
  normlab train --norm gn --groups 2 --l1 1e-4 --epochs 20 --seed 1 --out runs/gn2
  normlab train --subset 2000 --epochs 1 --out /tmp/quick
  normlab train --protocol fast --lr 0.1 --out runs/fast
  normlab train --norm brn --norm-option r_max=2 --subset 2000 --epochs 1 --out /tmp/brn
  normlab train --norm gn --weight-std --out runs/gn-ws
  normlab train --norm mypkg.norms:MyNorm --norm-option eps=1e-3 --out runs/mine
  normlab train --norm bn --norm-option momentum=0.01 --precise-bn --out runs/bn-m001
  normlab train --net resnet --net-option depth=20 --norm none \
      --net-option residual_init=skipinit --lr 0.01 --out runs/skipinit
  normlab train --net mlp --norm bn --batch-size 60 --lr 1 --momentum 0 --out runs/mlp-bn
  normlab train --net mypkg.nets:MyNet --net-option width=32 --out runs/mine
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from normlab.accel import ACCEL
from normlab.accel.compiled import COMPILE
from normlab.fields import check_keys
from normlab.files import parse_toml
from normlab.models.cli import add_model_arguments, norm_options_from_args
from normlab.models.config import KERNELS, MODEL_KEYS
from normlab.probes import add_arguments as add_probe_arguments
from normlab.training.config import L1_SCOPES, PRECISIONS, RunConfig
from normlab.training.protocols import PROTOCOLS, protocol_fields


def _read_overrides(path: str) -> dict:
    p = Path(path)
    if not p.exists():
        raise ValueError(f"protocol file {path} does not exist")
    if p.suffix == ".json":
        return json.loads(p.read_text())
    return parse_toml(p.read_text(), p)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by everything that launches runs (train; suites reuse the device ones)."""
    group = parser.add_argument_group("execution")
    group.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    group.add_argument("--threads", type=int, default=None,
                       help="CPU threads for torch (default: torch's choice)")
    group.add_argument("--quiet", action="store_true", help="no progress bars or epoch lines")
    add_track_arguments(parser)


def add_track_arguments(parser: argparse.ArgumentParser) -> None:
    """--track (repeatable), and --tensorboard as the old name of --track tensorboard."""
    from normlab.tracking.consumer import TRACKERS

    group = parser.add_argument_group("tracking")
    group.add_argument("--track", action="append", choices=TRACKERS, default=None,
                       metavar="TRACKER",
                       help="also log every run to wandb (offline unless WANDB_MODE says "
                            "otherwise; `wandb sync` uploads later), mlflow "
                            "($MLFLOW_TRACKING_URI, else MLflow's default store in this "
                            "folder: `mlflow ui` shows it) or tensorboard (the run's "
                            "tensorboard/ folder); repeatable; needs pip install "
                            "'normlab[wandb]' (mlflow, tensorboard)")
    group.add_argument("--tensorboard", dest="track", action="append_const",
                       const="tensorboard", help="the same as --track tensorboard")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="run directory (created or resumed)")
    parser.add_argument("--dataset", default="mnist", help="mnist or fashion-mnist")
    parser.add_argument("--seed", type=int, default=1,
                        help="fixes init, data order, augmentation and dropout (default: 1)")
    parser.add_argument("--subset", type=int, default=None,
                        help="train on the first N training images only (quick checks)")
    parser.add_argument("--precision", default=None, choices=PRECISIONS,
                        help="fp32, or bf16 autocast (fast on CPUs with AMX or AVX512-BF16 "
                             "and on recent GPUs) (default: bf16 where the CPU has AMX or "
                             "AVX512-BF16, else fp32)")
    parser.add_argument("--augment", default=None, choices=KERNELS,
                        help="what rotates the training images: normlab (its C kernel, one "
                             "pass; the default where a C compiler is on the PATH) or aten "
                             "(torch's affine_grid + grid_sample, as normlab 0.4 and before)")
    parser.add_argument("--accel", default=None, choices=ACCEL,
                        help="on: the training step as normlab.accel prepares it (the fast "
                             "paths this host takes, recorded in config.json; `normlab info` "
                             "lists them); off: the plain model through autograd with torch's "
                             "norms and augmentation (default: on)")
    parser.add_argument("--compile", default=None, choices=COMPILE,
                        help="inductor: the steps the hand step does not take (the zoo's "
                             "norms, your own, --weight-std, every --net but the seed's) run "
                             "under torch.compile, compiled once and cached (numbers equal to "
                             "autograd's to rounding, recorded in config.json); off: autograd "
                             "(default: inductor where a C++ compiler is found; "
                             "$NORMLAB_COMPILE sets another)")
    add_probe_arguments(parser)
    add_model_arguments(parser)
    parser.add_argument("--precise-bn", action="store_true", default=None,
                        help="also evaluate every epoch with the batch-statistics norms' "
                             "running statistics recalibrated on training batches "
                             "(PreciseBN): metrics.jsonl gets test_acc_precise and "
                             "test_loss_precise; the ordinary metrics are unchanged")
    parser.add_argument("--train-at-chance", dest="stop_at_chance", action="store_false",
                        default=None,
                        help="keep training a run whose test accuracy is at chance after an "
                             "epoch (by default it stops as diverged; a nan loss stops it "
                             "either way): for trainability studies, where a slow start "
                             "must get its whole budget")
    reg = parser.add_argument_group("regularizers")
    reg.add_argument("--l1", type=float, default=0.0,
                     help="L1 lambda: loss + lambda * sum|w|, added once per step")
    reg.add_argument("--l1-scope", default="all", choices=L1_SCOPES,
                     help="parameters the L1 term covers: all (the seed's) or conv weights")
    reg.add_argument("--weight-decay", type=float, default=0.0, help="L2 via the optimiser")
    proto = parser.add_argument_group("protocol (every field overrides the named protocol)")
    proto.add_argument("--protocol", default="seed", choices=list(PROTOCOLS),
                       help="named protocol (default: seed)")
    proto.add_argument("--protocol-file", help="TOML or JSON file of protocol field overrides")
    for f in protocol_fields():
        kind = type(getattr(PROTOCOLS["seed"], f.name))
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            proto.add_argument(flag, dest=f"p_{f.name}", default=None,
                               action=argparse.BooleanOptionalAction)
        else:
            proto.add_argument(flag, dest=f"p_{f.name}", type=kind, default=None,
                               metavar=kind.__name__.upper())
    add_run_arguments(parser)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    options = _read_overrides(args.protocol_file) if args.protocol_file else {}
    check_keys(options, [f.name for f in protocol_fields()], "protocol field")
    for f in protocol_fields():
        if getattr(args, f"p_{f.name}") is not None:
            options[f.name] = getattr(args, f"p_{f.name}")
    run_options = ("dataset", *MODEL_KEYS, "l1", "l1_scope", "weight_decay", "seed", "subset",
                   "precision", "augment", "accel", "precise_bn", "compile", "probe",
                   "probe_every", "stop_at_chance")
    given = {key: getattr(args, key, None) for key in run_options}
    given["norm_options"] = norm_options_from_args(args)  # --norm-option pairs as a dict
    given["net_options"] = norm_options_from_args(args, "net_options")
    return RunConfig.from_options(args.protocol, **options, **given)


def run(args: argparse.Namespace) -> int:
    from normlab.experiments.progress import ConsoleProgress
    from normlab.tracking import Tracking
    from normlab.training.run import train

    console = ConsoleProgress(quiet=args.quiet)
    tracking = Tracking(args.track, console) if args.track else None
    try:
        result = train(
            config_from_args(args), args.out, device=args.device, threads=args.threads,
            listener=tracking or console,
        )
    finally:
        for line in tracking.close() if tracking else []:
            console.line(line)
        console.close()
    if result.skipped:
        print(f"{args.out}: already finished ({len(result.history)} epochs); nothing to do")
    if result.history:
        last = result.history[-1]
        print(f"{args.out}: {result.status}; final test accuracy {last['test_acc']:.2f}% "
              f"after {last['epoch']} epochs")
    return 0 if result.status == "ok" else 3
