"""Training: protocols, the in-memory epoch loop, run directories and their events."""

from normlab.training.config import RunConfig
from normlab.training.engine import TensorData, evaluate, l1_penalty, train_one_epoch
from normlab.training.protocols import PROTOCOLS, Protocol, resolve_protocol
from normlab.training.run import RunResult, read_metrics, train
from normlab.training.rundir import RunDir

__all__ = [
    "PROTOCOLS",
    "Protocol",
    "RunConfig",
    "RunDir",
    "RunResult",
    "TensorData",
    "evaluate",
    "l1_penalty",
    "read_metrics",
    "resolve_protocol",
    "train",
    "train_one_epoch",
]
