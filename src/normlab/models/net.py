"""The seed's 5,760-parameter MNIST CNN, with its constructor flags and a ``norm=`` choice."""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from normlab.fields import ConfigError
from normlab.models.config import ModelConfig
from normlab.models.dropout import SparseDropout
from normlab.models.norms import check_norm, make_norm

# (name, in, out, kernel, padding, is_conv_block). A conv block is Conv -> ReLU -> norm ->
# Dropout; a transition (1x1) is a bare convolution. The max-pool sits after convblock3.
LAYOUT = (
    ("convblock1", 1, 8, 3, 0, True),
    ("convblock2", 8, 16, 3, 0, True),
    ("convblock3", 16, 8, 1, 0, False),
    ("convblock4", 8, 12, 3, 0, True),
    ("convblock6", 12, 14, 3, 0, True),
    ("convblock7", 14, 14, 3, 1, True),
    ("convblock8", 14, 10, 1, 0, False),
)
GAP_KERNEL = 6  # the seed's AvgPool2d(6) on an 8x8 map: it averages the top-left 6x6 window
# The forward, stage by stage: the submodules it calls in order, then log-softmax. Defined
# once here: Net.forward walks it, and so does the accelerated step (normlab.accel).
STAGES = ("convblock1", "convblock2", "convblock3", "pool1",
          "convblock4", "convblock6", "convblock7", "gap", "convblock8")


def resolve_seed_flags(
    batch_norm: bool, layer_norm: bool, group_norm: bool
) -> tuple[str, ...]:
    """Map the seed's three booleans onto registry names (the one place this happens)."""
    norms = tuple(
        name
        for name, on in (("bn", batch_norm), ("ln", layer_norm), ("gn", group_norm))
        if on
    )
    if len(norms) > 1:
        only = {"ln": "layer_norm=True", "gn": "group_norm=True"}
        hint = "; ".join(
            f"for {n.upper()} only pass batch_norm=False, {only[n]} (or norm={n!r})"
            for n in norms
            if n != "bn"
        )
        warnings.warn(
            f"Net: several norms are on ({' + '.join(n.upper() for n in norms)}); they are "
            f"stacked in every block as in the seed. batch_norm defaults to True: {hint}.",
            UserWarning,
            stacklevel=3,
        )
    return norms or ("none",)


def build_config(
    norm: str | None = None,
    groups: int | None = None,
    dropout_value: float = 0.01,
    batch_norm: bool | None = None,
    layer_norm: bool | None = None,
    group_norm: bool | None = None,
    group_norm_groups: int | None = None,
    norm_options: dict[str, Any] | None = None,
    weight_std: bool = False,
) -> ModelConfig:
    """Resolve either face of the API (``norm=`` or the seed flags) into a ModelConfig."""
    if norm is not None:
        check_norm(norm)
        implied = {"bn": "batch_norm", "ln": "layer_norm", "gn": "group_norm"}.get(norm)
        flags = {"batch_norm": batch_norm, "layer_norm": layer_norm, "group_norm": group_norm}
        conflicts = [
            f"{flag}={value}"
            for flag, value in flags.items()
            if value is not None and value != (flag == implied)
        ]
        if conflicts:
            raise ConfigError("norm",
                f"norm={norm!r} conflicts with {', '.join(conflicts)}; "
                "pass either norm= or the seed flags, not both"
            )
        if group_norm_groups is not None and groups is not None and group_norm_groups != groups:
            raise ConfigError("groups",
                              "pass groups= or group_norm_groups=, not two different values")
        norms: tuple[str, ...] = (norm,)
    else:
        norms = resolve_seed_flags(
            True if batch_norm is None else batch_norm,
            bool(layer_norm),
            bool(group_norm),
        )
    n_groups = groups if groups is not None else group_norm_groups
    return ModelConfig(norms=norms, groups=2 if n_groups is None else n_groups,
                       dropout=dropout_value, norm_options=norm_options or {},
                       weight_std=weight_std)


class Net(nn.Module):
    """The seed's CNN.

    Seed API: ``Net(dropout_value=0.01, batch_norm=True, layer_norm=False, group_norm=False,
    group_norm_groups=2)``. Cleaner API: ``Net(norm="gn", groups=2, dropout_value=0.0)`` with
    ``norm`` a registered norm (``bn``, ``gn``, ``ln``, ``in``, ``none``, ``brn``, ``gbn``,
    ``frn``, ``evo-s0``, ``evo-b0``, ``rms``: :func:`~normlab.models.norms.norm_names`) or an
    import path ``"package.module:Attr"``; ``norm_options={"momentum": 0.01}`` passed to every
    norm layer; ``weight_std=True`` standardizes every convolution's weights
    (``Net(norm="gn", weight_std=True)``). Returns log-probabilities (N, 10).
    """

    def __init__(
        self,
        dropout_value: float = 0.01,
        batch_norm: bool | None = None,
        layer_norm: bool | None = None,
        group_norm: bool | None = None,
        group_norm_groups: int | None = None,
        *,
        norm: str | None = None,
        groups: int | None = None,
        norm_options: dict[str, Any] | None = None,
        weight_std: bool = False,
    ) -> None:
        super().__init__()
        self._build(build_config(
            norm, groups, dropout_value, batch_norm, layer_norm, group_norm, group_norm_groups,
            norm_options, weight_std,
        ))

    @classmethod
    def from_config(cls, config: ModelConfig) -> Net:
        """The network of a (validated) ModelConfig of the seed's net."""
        if config.net != "seed":
            raise ValueError(f"Net is the seed's network; this config is net {config.net!r} "
                             "(normlab.models.build_model builds any)")
        net = cls.__new__(cls)
        nn.Module.__init__(net)
        net._build(config)
        return net

    def _build(self, cfg: ModelConfig) -> None:
        self.config = cfg
        conv = nn.Conv2d
        if cfg.weight_std:
            from normlab.models.zoo import StdConv2d as conv
        for name, c_in, c_out, kernel, padding, is_block in LAYOUT:
            layers: list[nn.Module] = [conv(c_in, c_out, kernel, padding=padding, bias=False)]
            if is_block:  # Conv -> ReLU -> norm(s) -> Dropout, as the seed's blocks
                layers.append(nn.ReLU())
                layers += [make_norm(n, c_out, cfg.groups, **cfg.norm_options)
                           for n in cfg.norms if n != "none"]
                if cfg.dropout > 0:
                    layers.append(make_dropout(cfg))
            setattr(self, name, nn.Sequential(*layers))
        self.pool1 = nn.MaxPool2d(2, 2)
        self.gap = nn.AvgPool2d(GAP_KERNEL)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for name in STAGES:
            x = getattr(self, name)(x)
        return F.log_softmax(x.flatten(1), dim=-1)


def make_dropout(cfg: ModelConfig) -> nn.Module:
    """A block's dropout: :class:`SparseDropout` (``dropout_draw="positions"``: only the
    dropped positions drawn) or ``nn.Dropout`` (``"bernoulli"``, as the seed), both
    dropping each unit with probability ``cfg.dropout``."""
    if cfg.dropout_draw == "bernoulli":
        return nn.Dropout(cfg.dropout)
    return SparseDropout(cfg.dropout)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
