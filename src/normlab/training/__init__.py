"""Training: protocols, the in-memory epoch loop, and resumable run directories."""

from normlab.training.config import RunConfig
from normlab.training.engine import TensorData, evaluate, l1_penalty, train_one_epoch
from normlab.training.protocols import PROTOCOLS, Protocol, resolve_protocol
from normlab.training.run import RunResult, is_finished, read_metrics, train

__all__ = [
    "PROTOCOLS",
    "Protocol",
    "RunConfig",
    "RunResult",
    "TensorData",
    "evaluate",
    "is_finished",
    "l1_penalty",
    "read_metrics",
    "resolve_protocol",
    "train",
    "train_one_epoch",
]
