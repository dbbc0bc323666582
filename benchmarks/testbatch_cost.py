"""What the report's test-batch section costs per run (``normlab.studies.testbatch``: five
passes over the test set from a run's checkpoint), under the allocator a worker process of
the section gets against glibc's malloc with its defaults.

It trains one small run per ``--norms`` entry (the seed protocol's model, one epoch of 1,000
images; the section's cost does not depend on the training), then computes each run's
accuracies in fresh one-thread processes, as the section's workers do: ``glibc``
(``NORMLAB_MALLOC=system``, nothing preloaded: what the workers had before 0.15) and
``normlab`` (tcmalloc preloaded where installed, glibc tuned: what they get now),
alternating, ``--rounds`` rounds; the table gives the median seconds per run and the ratio.
The accuracies must be equal under both (the allocator changes where memory lives, not what
is computed); the script stops if they are not.

    python benchmarks/testbatch_cost.py                  # BN and GN on the seed's net
    python benchmarks/testbatch_cost.py --norms bn --net resnet --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import json, sys, torch
torch.set_num_threads(1)
from normlab.studies import testbatch
path = sys.argv[1]
stored = json.loads(open(path + "/config.json").read())
got = testbatch._computed(path, stored["run"], 1, "mnist")
print(json.dumps(got))
"""


def train(out: Path, norm: str, net: str) -> None:
    options = ["--net", net, "--net-option", "depth=8"] if net == "resnet" else ["--net", net]
    subprocess.run([sys.executable, "-m", "normlab", "train", "--norm", norm, *options,
                    "--subset", "1000", "--epochs", "1", "--threads", "1", "--quiet",
                    "--out", str(out)], check=True)


def compute(run: Path, allocator: str) -> dict:
    from normlab.memory import tcmalloc

    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "NORMLAB_MALLOC")}
    if allocator == "glibc":
        env["NORMLAB_MALLOC"] = "system"
    elif (lib := tcmalloc()) is not None:
        env["LD_PRELOAD"] = str(lib)
    (run / "testbatch.json").unlink(missing_ok=True)
    done = subprocess.run([sys.executable, "-c", CHILD, str(run)], env=env, check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--norms", default="bn,gn")
    parser.add_argument("--net", default="seed", choices=("seed", "plain", "resnet"))
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for norm in args.norms.split(","):
            runs[norm] = Path(tmp) / norm
            train(runs[norm], norm, args.net)
        print(f"| {args.net} net, norm | glibc s/run | normlab s/run | glibc / normlab |")
        print("|---|---:|---:|---:|")
        for norm, run in runs.items():
            seconds: dict[str, list[float]] = {"glibc": [], "normlab": []}
            accuracy: dict[str, dict] = {}
            for _ in range(args.rounds):
                for allocator in seconds:
                    got = compute(run, allocator)
                    seconds[allocator].append(got["seconds"])
                    accuracy.setdefault(allocator, got["accuracy"])
                    if got["accuracy"] != accuracy["glibc"]:
                        sys.exit(f"{norm}: the accuracies differ between allocators: "
                                 f"{got['accuracy']} against {accuracy['glibc']}")
            a, b = (statistics.median(seconds[k]) for k in ("glibc", "normlab"))
            print(f"| {norm} | {a:.2f} | {b:.2f} | {a / b:.2f} |", flush=True)


if __name__ == "__main__":
    main()
