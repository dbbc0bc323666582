"""Push a suite folder (or one run directory) trained earlier to W&B, MLflow or TensorBoard.

Every run's epochs (metrics.jsonl), and for a finished run its final metrics, misclassified
gallery and confusion matrix, go to the tracker as if it had been tracked while training
(``--track`` on ``normlab suite`` and ``normlab train`` does that as it trains). Pushing
again adds only what the tracker does not hold yet: the tracker's run ids are kept in each
run directory's tracking.json. W&B writes offline unless WANDB_MODE says otherwise
(``wandb sync`` uploads later); MLflow writes to $MLFLOW_TRACKING_URI, else to MLflow's
default store in this folder (``mlflow ui`` shows it).

examples:
  normlab track runs/s6 --to mlflow
  normlab track runs/s6 --to wandb --to mlflow
  WANDB_MODE=online normlab track runs/s6 --to wandb
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from normlab.tracking.consumer import TRACKERS


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", type=Path, metavar="FOLDER",
                        help="a suite folder (holding suite.json) or one run directory")
    parser.add_argument("--to", action="append", choices=TRACKERS, required=True,
                        metavar="TRACKER",
                        help=f"the tracker to push to ({', '.join(TRACKERS)}); repeatable")


def run(args: argparse.Namespace) -> int:
    from normlab.tracking.push import push_folder
    from normlab.training.events import Notice

    problems = []

    def listener(event) -> None:
        if isinstance(event, Notice):
            problems.append(event.message)
            print(f"{event.run}: warning: {event.message}", file=sys.stderr, flush=True)

    for line in push_folder(args.folder, args.to, listener):
        print(line)
    return 1 if problems else 0
