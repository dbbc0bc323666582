"""Training protocols by name: each is one dataclass value, every field overridable."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Protocol:
    """Optimiser, schedule, batching and augmentation of a run."""

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


SCHEDULERS = ("step", "onecycle", "none")

PROTOCOLS: dict[str, Protocol] = {
    # The seed notebook, exactly: SGD 0.1/0.9, StepLR(8, 0.01) per epoch, batch 64, 20 epochs.
    "seed": Protocol(),
    # A faster modern schedule: larger batches, one-cycle LR with Nesterov momentum.
    "fast": Protocol(
        name="fast", epochs=8, batch_size=128, lr=0.2, nesterov=True, scheduler="onecycle"
    ),
}


def protocol_fields() -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(Protocol) if f.name != "name"]


def resolve_protocol(name: str, overrides: dict[str, Any] | None = None) -> Protocol:
    """The protocol ``name`` with ``overrides`` applied; unknown names or keys fail loudly."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}")
    overrides = dict(overrides or {})
    fields = {f.name: f for f in protocol_fields()}
    clean: dict[str, Any] = {}
    for key, value in overrides.items():
        if key not in fields:
            raise ValueError(
                f"unknown protocol field {key!r}; valid fields: {', '.join(fields)}"
            )
        clean[key] = _coerce(key, value, type(getattr(PROTOCOLS["seed"], key)))
    proto = dataclasses.replace(PROTOCOLS[name], **clean)
    _validate(proto)
    return proto


def _coerce(key: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"protocol field {key!r} must be true or false, got {value!r}")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(
            f"protocol field {key!r} must be {kind.__name__}, got {value!r}"
        )
    return value


def _validate(p: Protocol) -> None:
    if p.scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got {p.scheduler!r}")
    for key in ("epochs", "batch_size", "step_size", "eval_batch_size"):
        if getattr(p, key) < 1:
            raise ValueError(f"protocol field {key!r} must be >= 1, got {getattr(p, key)}")
    if p.lr <= 0:
        raise ValueError(f"lr must be > 0, got {p.lr}")
    if not 0 <= p.momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {p.momentum}")
    if not 0 <= p.rotation <= 180:
        raise ValueError(f"rotation must be in [0, 180] degrees, got {p.rotation}")
