"""Experiment tracking: W&B (offline by default), MLflow and TensorBoard, fed from the event
stream (:mod:`normlab.training.events`) by one consumer, :class:`Tracking`.

    normlab suite s6 --track wandb --track mlflow    # while it trains
    normlab track runs/s6 --to mlflow                 # a folder trained earlier

Each tracker is one module (``wandb_tracker``, ``mlflow_tracker``, ``tensorboard_tracker``)
behind :class:`~normlab.tracking.consumer.Tracker`; its package is an extra
(``pip install 'normlab[wandb]'``, ``'normlab[mlflow]'``, ``'normlab[tensorboard]'``).
"""

from normlab.tracking.consumer import (
    TRACKERS,
    RunInfo,
    SuiteInfo,
    SuiteRun,
    Tracker,
    Tracking,
    check_trackers,
    suite_info,
)
from normlab.tracking.push import push_folder, suite_tracking

__all__ = [
    "TRACKERS",
    "RunInfo",
    "SuiteInfo",
    "SuiteRun",
    "Tracker",
    "Tracking",
    "check_trackers",
    "push_folder",
    "suite_info",
    "suite_tracking",
]
