"""Run a suite (variants x seeds, from a TOML file) into OUT/<variant>/seed<k>, then its report.

SUITE is a bundled suite's name (s6: the seed study under the seed protocol; s6-quick: the
same variants on 2,000 images for 2 epochs; batch-sizes, batch-sizes-fashion: BN, BRN, GN,
GN + WS, LN, IN and FRN at batch sizes 2 to 64 on MNIST and Fashion-MNIST; lr-range: every
norm at learning rates 0.001 to 3 (lr-range-quick: a test-sized one); ghost-batch: BN's
statistics over virtual batches of 2 to 64 at an SGD batch of 64; running-stats: BN's running
statistics against PreciseBN per epoch; l1-sweep: the L1 lambdas) or the path of your own
.toml file.
The file is checked completely before anything trains. Runs go all variants for seed 1, then
seed 2, ... Finished runs are skipped and interrupted ones resume, so after Ctrl-C or a kill,
rerun the same command to continue. OUT/suite.json lists the runs for the report.

Examples:
  normlab suite s6                          # 5 runs into runs/s6, then runs/s6/report.html
  normlab suite s6 --seeds 3                # seeds 1, 2, 3: the report shows mean ± std
  normlab suite s6-quick --out /tmp/s6q     # a couple of minutes on a CPU
  normlab suite my-study.toml --seed-list 1,7 --dry-run
  normlab suite batch-sizes --executor ray  # Ray tasks on a local Ray instance (all cores)
  normlab suite batch-sizes --executor ray --ray-address HEAD:6379 --out /shared/bs
                                            # on a Ray cluster; --out on shared storage

Executors: local (the default) trains in this process, or --jobs N runs at once in worker
processes. ray (pip install 'normlab[ray]') makes each run one Ray task: without
--ray-address on a local Ray instance (127.0.0.1 only, stopped at the end), with it on a
running cluster, whose nodes must all see the output folder at the same path (shared
storage: tasks write the run directories, this process reads them). A task whose worker
dies is retried and resumes from its checkpoint; the results equal the local executors'
for the same seeds, device and threads per run.
"""

from __future__ import annotations

import argparse

from normlab.accel import ACCEL
from normlab.accel.compiled import COMPILE
from normlab.models.config import DROPOUT_DRAWS, KERNELS
from normlab.probes import add_arguments as add_probe_arguments
from normlab.training.cli import add_run_arguments
from normlab.training.config import PRECISIONS


def _seed_list(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers like 1,2,3, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(
            f"expected distinct non-negative integers like 1,2,3, got {text!r}")
    return seeds


def _count(text: str) -> int:
    try:
        k = int(text)
    except ValueError:
        k = 0
    if k < 1:
        raise argparse.ArgumentTypeError(f"expected a positive count, got {text!r}")
    return k


def configure(parser: argparse.ArgumentParser) -> None:
    from normlab.experiments.suite import bundled_suites

    parser.add_argument("suite", metavar="SUITE",
                        help=f"a bundled suite's name ({', '.join(bundled_suites())}) or a "
                             ".toml file's path")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=_count, metavar="K",
                       help="run seeds 1..K instead of the file's seeds")
    seeds.add_argument("--seed-list", type=_seed_list, metavar="1,2,3",
                       help="run these seeds instead of the file's seeds")
    parser.add_argument("--out", help="output folder (default: runs/<suite name>)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved plan (runs, configs, what is finished); "
                             "train nothing")
    parser.add_argument("--jobs", type=_count, default=None, metavar="N",
                        help="train N runs at once in worker processes; with --threads unset "
                             "each gets cores/N threads (default: on a CPU one run per core, "
                             "one thread each, the fastest for this small model; on a GPU 1)")
    parser.add_argument("--dropout-draw", choices=DROPOUT_DRAWS, default=None,
                        help="how every run draws dropout masks: positions (normlab's default) "
                             "or bernoulli (nn.Dropout; what a folder written by normlab 0.1 "
                             "holds: pass it to continue such a folder)")
    parser.add_argument("--kernels", choices=KERNELS, default=None,
                        help="what computes every run's ReLU -> norm: normlab (its C "
                             "kernels; the default where a C compiler is on the PATH) or aten "
                             "(torch's; what a folder written by normlab 0.3 or before holds: "
                             "pass it to continue such a folder)")
    parser.add_argument("--eval-kernels", choices=KERNELS, default=None,
                        help="what computes every run's ReLU -> norm in its test passes, with "
                             "--kernels normlab: normlab (the kernels; the default where a C "
                             "compiler is on the PATH) or aten (torch's; what a folder "
                             "written by normlab 0.5 or before holds: pass it to continue "
                             "such a folder)")
    parser.add_argument("--augment", choices=KERNELS, default=None,
                        help="what rotates every run's training images: normlab (its C "
                             "kernel, one pass; the default where a C compiler is on the "
                             "PATH) or aten (torch's affine_grid + grid_sample; what a folder "
                             "written by normlab 0.4 or before holds: pass it to continue "
                             "such a folder)")
    parser.add_argument("--accel", choices=ACCEL, default=None,
                        help="on: every run's step as normlab.accel prepares it (the fast "
                             "paths this host takes; `normlab info` lists them); off: the "
                             "plain model through autograd with torch's norms (default: on)")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="every run in fp32 or with bf16 autocast; default: the suite "
                             "file's, else bf16 where the CPU has AMX or AVX512-BF16 (an "
                             "epoch ~1.3x faster, the same accuracy), else fp32")
    parser.add_argument("--compile", choices=COMPILE, default=None,
                        help="inductor or off: whether the steps the hand step does not "
                             "take (the zoo, other nets) run under torch.compile "
                             "(default: inductor where a C++ compiler is found)")
    add_probe_arguments(parser)
    parser.add_argument("--precise-bn", action="store_true",
                        help="every run also evaluates each epoch with PreciseBN statistics "
                             "(test_acc_precise, test_loss_precise; the ordinary metrics "
                             "unchanged)")
    ex = parser.add_argument_group("executor")
    ex.add_argument("--executor", choices=("local", "ray"), default=None,
                    help="local: this process, or --jobs N worker processes (the default); "
                         "ray: one Ray task per run (default with --ray-address)")
    ex.add_argument("--ray-address", metavar="ADDR",
                    help="a running Ray cluster: auto, HOST:6379 or ray://HOST:10001 (Ray "
                         "Client); default: start a local Ray instance on 127.0.0.1")
    ex.add_argument("--cpus-per-run", type=_amount, default=1.0, metavar="N",
                    help="CPUs Ray reserves for each run, and its torch threads unless "
                         "--threads is given (default: 1)")
    ex.add_argument("--gpus-per-run", type=_amount_or_zero, default=0.0, metavar="N",
                    help="GPUs Ray reserves for each run; fractions share one (default: 0)")
    add_run_arguments(parser)


def _amount(text: str, zero: bool = False) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value < 0 or (value == 0 and not zero):
        raise argparse.ArgumentTypeError(
            f"expected a {'non-negative' if zero else 'positive'} number, got {text!r}")
    return int(value) if value.is_integer() else value


def _amount_or_zero(text: str) -> float:
    return _amount(text, zero=True)


def make_executor(args: argparse.Namespace):
    """The executor the options ask for (None: the runner's local default). Raises
    ValueError, before anything is planned or written, for options that do not fit."""
    kind = args.executor or ("ray" if args.ray_address else "local")
    ray_options = [flag for flag, given in (
        ("--ray-address", args.ray_address is not None),
        ("--cpus-per-run", args.cpus_per_run != 1),
        ("--gpus-per-run", args.gpus_per_run != 0)) if given]
    if kind == "local":
        if ray_options:
            raise ValueError(f"{', '.join(ray_options)}: only with --executor ray")
        return None
    if args.jobs is not None:
        raise ValueError("--jobs is for the local executor; with --executor ray, Ray runs as "
                         "many runs at once as the cluster has CPUs (see --cpus-per-run)")
    if args.device.startswith("cuda") and not args.gpus_per_run:
        raise ValueError(f"--device {args.device} with --executor ray needs --gpus-per-run "
                         "(1, or a fraction such as 0.25 for runs sharing a GPU): Ray gives a "
                         "task only the GPUs it asks for")
    from normlab.experiments.ray_executor import RayExecutor

    return RayExecutor(args.ray_address, cpus_per_run=args.cpus_per_run,
                       gpus_per_run=args.gpus_per_run, device=args.device,
                       threads=args.threads)


def run(args: argparse.Namespace) -> int:
    from normlab.experiments.suite import load_suite

    suite = load_suite(args.suite)
    if args.precision:
        suite = suite.with_config(precision=args.precision)
    if args.dropout_draw:
        suite = suite.with_model(dropout_draw=args.dropout_draw)
    if args.kernels:
        suite = suite.with_model(kernels=args.kernels)
    if args.eval_kernels:
        suite = suite.with_model(eval_kernels=args.eval_kernels)
    if args.augment:
        suite = suite.with_config(augment=args.augment)
    if args.accel:
        suite = suite.with_config(accel=args.accel)
    if args.compile:
        suite = suite.with_config(compile=args.compile)
    if args.precise_bn:
        suite = suite.with_config(precise_bn=True)
    if args.probe:
        suite = suite.with_config(probe=args.probe)
    if args.probe_every:
        suite = suite.with_config(probe_every=args.probe_every)
    return execute(suite, args)


def execute(suite, args: argparse.Namespace, before_training=None) -> int:
    """Plan ``suite`` (``--dry-run``: print the plan) or train it, as the suite options in
    ``args`` say (seeds, --out, the executor, device, threads, tracking); ``normlab suite``
    and ``normlab sweep`` both end here. ``before_training(out)`` is called once the output
    folder is known to fit the suite (``check_out``), before anything trains."""
    from normlab.experiments.plan import check_out, default_out, format_plan
    from normlab.experiments.runner import run_suite

    seeds = list(range(1, args.seeds + 1)) if args.seeds else args.seed_list
    out = args.out or default_out(suite)
    executor = make_executor(args)
    if args.dry_run:
        print(format_plan(suite, out, seeds))
        check_out(suite, out, seeds)
        return 0
    if before_training is not None:
        check_out(suite, out, seeds)
        before_training(out)
    run_suite(suite, out, seeds, executor=executor, device=args.device, threads=args.threads,
              quiet=args.quiet, jobs=args.jobs, track=args.track)
    return 0
