"""What one workbook is made from: :class:`SheetConfig` (validated sizes, eps, seed, gamma and
beta) and :func:`input_tensor`, the seeded x every sheet shows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

Index = tuple[int, int, int, int]  # (n, c, h, w)

# A workbook is for reading by eye: refuse tensors nobody would read (and formulas that would
# grow past spreadsheet argument limits).
MAX_SIZE = 32
MAX_VALUES = 4096
INPUT_LOW, INPUT_HIGH = -4, 4  # the seed's spreadsheet used random integers in [-4, 4]


def _check_int(name: str, value: object, low: int = 1, high: int | None = MAX_SIZE) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(
            f"{name}={value} is too large for a workbook meant to be read by eye (at most {high})"
        )
    return value


def _check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SheetConfig:
    """Everything one workbook is made from; validated on construction (ValueError if bad).

    ``gamma``/``beta`` are the per-channel scale and shift written into the editable cells of
    ``Inputs`` (default 1 and 0; ``None`` means the default).
    """

    batch: int = 3
    channels: int = 4
    height: int = 2
    width: int = 2
    groups: int = 2
    eps: float = 1e-5
    seed: int = 0
    gamma: tuple[float, ...] | None = field(default=None)
    beta: tuple[float, ...] | None = field(default=None)

    def __post_init__(self) -> None:
        for name in ("batch", "channels", "height", "width", "groups"):
            _check_int(name, getattr(self, name))
        values = self.batch * self.channels * self.height * self.width
        if values > MAX_VALUES:
            raise ValueError(
                f"batch*channels*height*width = {values} values is too many for a workbook "
                f"meant to be read by eye (at most {MAX_VALUES})"
            )
        if self.channels % self.groups:
            divisors = [g for g in range(1, self.channels + 1) if self.channels % g == 0]
            raise ValueError(
                f"groups={self.groups} does not divide channels={self.channels}: GroupNorm needs "
                f"equal groups of channels; choose one of {', '.join(map(str, divisors))}"
            )
        eps = _check_real("eps", self.eps)
        if eps <= 0:
            raise ValueError(f"eps must be > 0 (it keeps sqrt(var + eps) away from 0), got {eps}")
        object.__setattr__(self, "eps", eps)
        _check_int("seed", self.seed, low=0, high=None)
        for name, default in (("gamma", 1.0), ("beta", 0.0)):
            given = getattr(self, name)
            if given is None:
                resolved = (default,) * self.channels
            else:
                resolved = tuple(_check_real(f"{name}[{i}]", v) for i, v in enumerate(given))
                if len(resolved) != self.channels:
                    raise ValueError(
                        f"{name} needs one value per channel ({self.channels}), got {len(resolved)}"
                    )
            object.__setattr__(self, name, resolved)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.channels, self.height, self.width)


def input_tensor(config: SheetConfig) -> torch.Tensor:
    """The workbook's x: integers in [-4, 4] from ``torch.Generator().manual_seed(seed)``.

    Returned as float64 (N, C, H, W); the same seed always gives the same values.
    """
    gen = torch.Generator().manual_seed(config.seed)
    x = torch.randint(INPUT_LOW, INPUT_HIGH + 1, config.shape, generator=gen)
    return x.to(torch.float64)
