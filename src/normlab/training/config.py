"""The one config object of a run, saved beside every result it produced."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from normlab.models import Net
from normlab.training.protocols import PROTOCOLS, Protocol, resolve_protocol

L1_SCOPES = ("all", "conv")


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides a run's numbers (the device and thread count are recorded
    beside it in config.json, but are not part of the identity that resume compares)."""

    dataset: str = "mnist"
    norm: str = "bn"
    groups: int = 2
    dropout: float = 0.01
    protocol: Protocol = field(default_factory=lambda: PROTOCOLS["seed"])
    l1: float = 0.0  # lambda of lambda * sum |w|, added to the loss once per step
    l1_scope: str = "all"  # "all" parameters, like the seed, or "conv" weights only
    weight_decay: float = 0.0  # L2, through the optimiser
    seed: int = 1
    subset: int | None = None  # first N training images, for quick checks

    def __post_init__(self) -> None:
        from normlab.data import DATASETS

        if self.dataset not in DATASETS:
            raise ValueError(
                f"unknown dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}"
            )
        Net(norm=self.norm, groups=self.groups, dropout_value=self.dropout)  # validates
        if self.l1 < 0 or self.weight_decay < 0:
            raise ValueError("l1 and weight_decay must be >= 0")
        if self.l1_scope not in L1_SCOPES:
            raise ValueError(
                f"l1_scope must be one of {', '.join(L1_SCOPES)}, got {self.l1_scope!r}"
            )
        if self.subset is not None and self.subset < 1:
            raise ValueError(f"subset must be a positive number of images, got {self.subset}")

    def make_model(self) -> Net:
        return Net(norm=self.norm, groups=self.groups, dropout_value=self.dropout)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        data = dict(data)
        proto = dict(data.pop("protocol", {}))
        name = proto.pop("name", "seed")
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown run config keys: {', '.join(sorted(unknown))}")
        return cls(protocol=resolve_protocol(name, proto), **data)


def config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the fields that differ between two config dicts."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += config_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return diffs
