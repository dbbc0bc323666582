"""Normalization layers chosen by name through one registry.

Every factory takes the channel count first (``make_norm(name, C, groups=...)``), so the
network only ever says ``norm_layer(C)``. LayerNorm and InstanceNorm over conv maps are
GroupNorm with 1 and C groups: that normalises over (C, H, W) and (H, W) per image and keeps
a per-channel scale and shift, exactly as the seed did (and so the parameter counts match).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from normlab.fields import ConfigError

NormFactory = Callable[[int, int], nn.Module]


def _batch(channels: int, groups: int) -> nn.Module:
    return nn.BatchNorm2d(channels)


def _group(channels: int, groups: int) -> nn.Module:
    # nn.GroupNorm takes (num_groups, num_channels): wrapped here so callers pass C first.
    return nn.GroupNorm(groups, channels)


def _layer(channels: int, groups: int) -> nn.Module:
    # One group = statistics over (C, H, W) per image, with per-channel affine (the seed's LN).
    return nn.GroupNorm(1, channels)


def _instance(channels: int, groups: int) -> nn.Module:
    # C groups = statistics over (H, W) per image and channel; per-channel affine like the rest.
    return nn.GroupNorm(channels, channels)


def _identity(channels: int, groups: int) -> nn.Module:
    return nn.Identity()


# In teaching order (the workbook's sheets and the report's figure follow it).
NORMS: dict[str, NormFactory] = {
    "bn": _batch,
    "ln": _layer,
    "gn": _group,
    "in": _instance,
    "none": _identity,
}
# The one home of each norm's names: a title for prose and figures, a short label for tables.
NORM_TITLES = {
    "bn": "BatchNorm",
    "ln": "LayerNorm",
    "gn": "GroupNorm",
    "in": "InstanceNorm",
    "none": "no normalization",
}
NORM_LABELS = {"bn": "BN", "ln": "LN", "gn": "GN", "in": "IN", "none": "no norm"}
NORMALIZING = tuple(name for name in NORMS if name != "none")


def check_norm(name: str) -> str:
    """Return ``name`` if it is a registered norm, else raise a ConfigError listing the choices."""
    if name not in NORMS:
        valid = ", ".join(repr(k) for k in NORMS)
        raise ConfigError("norm", f"unknown norm {name!r}; choose one of {valid}")
    return name


def make_norm(name: str, channels: int, groups: int = 2) -> nn.Module:
    """Build the norm layer ``name`` for ``channels`` channels."""
    return NORMS[check_norm(name)](channels, groups)
