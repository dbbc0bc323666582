"""Run a suite (variants x seeds, from a TOML file) into OUT/<variant>/seed<k>, then its report.

SUITE is a bundled suite's name (s6: the seed study under the seed protocol; s6-quick: the
same variants on 2,000 images for 2 epochs) or the path of your own .toml file. The file is
checked completely before anything trains. Runs go all variants for seed 1, then seed 2, ...
Finished runs are skipped and interrupted ones resume, so after Ctrl-C or a kill, rerun the
same command to continue. OUT/suite.json lists the runs for the report.

Examples:
  normlab suite s6                          # 5 runs into runs/s6, then runs/s6/report.html
  normlab suite s6 --seeds 3                # seeds 1, 2, 3: the report shows mean ± std
  normlab suite s6-quick --out /tmp/s6q     # a couple of minutes on a CPU
  normlab suite my-study.toml --seed-list 1,7 --dry-run
"""

from __future__ import annotations

import argparse

from normlab.training.cli import add_run_arguments


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
    parser.add_argument("suite", metavar="SUITE",
                        help="a bundled suite's name (s6, s6-quick) or a .toml file's path")
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=_count, metavar="K",
                       help="run seeds 1..K instead of the file's seeds")
    seeds.add_argument("--seed-list", type=_seed_list, metavar="1,2,3",
                       help="run these seeds instead of the file's seeds")
    parser.add_argument("--out", help="output folder (default: runs/<suite name>)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved plan (runs, configs, what is finished); "
                             "train nothing")
    parser.add_argument("--jobs", type=_count, default=1, metavar="N",
                        help="train N runs at once in worker processes (default: 1); with "
                             "--threads unset each gets cores/N threads. On a 2-core CPU, "
                             "--jobs 2 --threads 1 nearly halves a suite's wall time")
    add_run_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from normlab.experiments.plan import check_out, default_out, format_plan
    from normlab.experiments.runner import run_suite
    from normlab.experiments.suite import load_suite

    suite = load_suite(args.suite)
    seeds = list(range(1, args.seeds + 1)) if args.seeds else args.seed_list
    out = args.out or default_out(suite)
    if args.dry_run:
        print(format_plan(suite, out, seeds))
        check_out(suite, out, seeds)
        return 0
    run_suite(suite, out, seeds, device=args.device, threads=args.threads, quiet=args.quiet,
              jobs=args.jobs)
    return 0
