"""Training protocols by name: each is one dataclass value, every field overridable."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from normlab.fields import ConfigError, check_keys, coerce

SCHEDULERS = ("step", "onecycle", "none")


@dataclass(frozen=True)
class Protocol:
    """Optimiser, schedule, batching and augmentation of a run. Built with a bad value it
    raises :class:`~normlab.fields.ConfigError` naming the field."""

    name: str = "seed"
    epochs: int = 20
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    scheduler: str = "step"  # "step" (StepLR, stepped per epoch) | "onecycle" (per step) | "none"
    step_size: int = 8
    gamma: float = 0.01
    rotation: float = 7.0  # degrees: each image rotated by U(-rotation, +rotation)
    eval_batch_size: int = 1000

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            kind = {"int": int, "float": float, "bool": bool, "str": str}[str(f.type)]
            object.__setattr__(self, f.name, coerce(f.name, getattr(self, f.name), kind))
        if self.scheduler not in SCHEDULERS:
            raise ConfigError("scheduler", f"scheduler must be one of {', '.join(SCHEDULERS)}, "
                                           f"got {self.scheduler!r}")
        for key in ("epochs", "batch_size", "step_size", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(key, f"protocol field {key!r} must be >= 1, "
                                       f"got {getattr(self, key)}")
        if self.lr <= 0:
            raise ConfigError("lr", f"lr must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError("momentum", f"momentum must be in [0, 1), got {self.momentum}")
        if not 0 <= self.rotation <= 180:
            raise ConfigError("rotation",
                              f"rotation must be in [0, 180] degrees, got {self.rotation}")

PROTOCOLS: dict[str, Protocol] = {
    # The seed notebook, exactly: SGD 0.1/0.9, StepLR(8, 0.01) per epoch, batch 64, 20 epochs.
    "seed": Protocol(),
    # A faster modern schedule: larger batches, one-cycle LR with Nesterov momentum. With
    # --dropout 0 on two CPU threads (bf16 and the kernels, normlab 0.5's defaults on an AMX
    # CPU) the BN model reaches 99.43% (mean of 5 seeds) in 47-51 s of training
    # (benchmarks/README.md). normlab 0.2 had 8 epochs of batch 128 at lr 0.2: run
    # directories store every field, so theirs read unchanged.
    "fast": Protocol(
        name="fast", epochs=10, batch_size=256, lr=0.4, nesterov=True, scheduler="onecycle"
    ),
}


def protocol_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(Protocol) if f.name != "name"]


def resolve_protocol(name: str, overrides: dict[str, Any] | None = None) -> Protocol:
    """The protocol ``name`` with ``overrides`` applied; unknown names or keys fail loudly."""
    if name not in PROTOCOLS:
        raise ConfigError("name", f"unknown protocol {name!r}; "
                                  f"choose one of {', '.join(PROTOCOLS)}")
    overrides = dict(overrides or {})
    check_keys(overrides, [f.name for f in protocol_fields()], "protocol field")
    return dataclasses.replace(PROTOCOLS[name], **overrides)
