"""The seed's 5,760-parameter MNIST CNN, with its constructor flags and a ``norm=`` choice."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from normlab.fields import ConfigError, check_keys, coerce
from normlab.models.dropout import SparseDropout
from normlab.models.norms import (
    NormOptions,
    built_in,
    check_norm,
    check_norm_options,
    make_norm,
    norm_spec,
)

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


def default_kernels() -> str:
    """``"normlab"`` where normlab's C kernels can be compiled (a C compiler is on the
    PATH), else ``"aten"`` (the acceleration's choice: :mod:`normlab.accel`)."""
    from normlab.accel.kernels import compiler

    return "normlab" if compiler() else "aten"


@dataclass(frozen=True)
class ModelConfig:
    """The model as one value: which norm(s), GroupNorm's group count, and dropout.

    ``norms`` is a tuple because the seed's flags may stack several norms in one block;
    config.json writes it as one string (``"bn"``, or ``"bn+ln"`` when stacked). A norm is a
    registered name (:mod:`normlab.models.norms`) or an import path ``"package.module:Attr"``,
    which config.json records as it is. Built with bad values it raises
    :class:`~normlab.fields.ConfigError` naming the field.

    ``norm_options`` are keyword options passed to every norm layer's factory unchanged
    (``{"momentum": 0.01, "eps": 1e-3}``; JSON values), checked by building one layer when
    the config is made. ``weight_std`` makes every convolution a
    :class:`~normlab.models.zoo.StdConv2d` (weight standardization, Qiao et al. 2019). Each
    is written to config.json only when set, so folders written before they existed
    (normlab 0.9) read back equal.

    ``dropout_draw`` says how dropout masks are drawn, both in the same distribution (each
    unit dropped independently with probability p, survivors scaled by 1/(1-p)):
    ``"positions"`` draws only the dropped positions (:class:`SparseDropout`; the
    acceleration fuses it into the norm before it, :mod:`normlab.accel.normdrop`: about
    20% of a CPU training step saved at p = 0.01); ``"bernoulli"`` is ``nn.Dropout``, one
    random number per unit, as the seed and normlab 0.1 drew them (a stored config without
    the field reads as that: ``normlab.training.config.from_stored``).

    ``kernels`` says what computes a block's ReLU -> norm (-> dropout), for BatchNorm and
    GroupNorm (so LN and IN): ``"normlab"`` folds the ReLU into the norm and, for
    channels-last CPU training, runs normlab's C kernels (:mod:`normlab.accel.kernels`;
    built on first use with the system's C compiler), ``"aten"`` is torch's ``nn.ReLU``
    and norm layers. They agree to rounding, not bitwise. (With ``"normlab"`` the max
    pooling is the kernels' too, bitwise torch's.) The default is ``"normlab"`` where a C
    compiler is on the PATH, else ``"aten"``; a stored config without the field (normlab
    0.3 and before) reads as ``"aten"``.

    ``eval_kernels`` says what computes those blocks in evaluation (the test pass): with
    ``"normlab"`` the kernels too (BatchNorm from its running statistics in one pass,
    GroupNorm as in training), with ``"aten"`` torch's ReLU and norm, as normlab 0.5 and
    before evaluated (a stored config without the field reads as that). The test metrics
    differ at rounding level. It applies only with ``kernels="normlab"``; with ``"aten"``
    it is ``"aten"`` too.
    """

    norms: tuple[str, ...] = ("bn",)
    groups: int = 2
    dropout: float = 0.01
    dropout_draw: str = "positions"
    kernels: str = field(default_factory=default_kernels)
    eval_kernels: str = field(default_factory=default_kernels)
    norm_options: NormOptions = field(default_factory=NormOptions)
    weight_std: bool = False

    def __post_init__(self) -> None:
        norms = self.norms.split("+") if isinstance(self.norms, str) else tuple(self.norms)
        object.__setattr__(self, "norms", tuple(check_norm(n) for n in norms))
        groups = coerce("groups", self.groups, int)
        if groups < 1:
            raise ConfigError("groups", f"groups must be a positive integer, got {groups!r}")
        if not isinstance(self.weight_std, bool):
            raise ConfigError("weight_std", f"weight_std must be true or false, "
                                            f"got {self.weight_std!r}")
        options = NormOptions(self.norm_options)
        object.__setattr__(self, "norm_options", options)
        dropout = coerce("dropout", self.dropout, float)
        if not 0 <= dropout < 1:
            raise ConfigError(
                "dropout", f"dropout_value must be in [0, 1) (0 turns dropout off), got {dropout}"
            )
        object.__setattr__(self, "dropout", dropout)
        if self.dropout_draw not in DROPOUT_DRAWS:
            raise ConfigError("dropout_draw", f"dropout_draw must be one of "
                                              f"{', '.join(DROPOUT_DRAWS)}, "
                                              f"got {self.dropout_draw!r}")
        for key in ("kernels", "eval_kernels"):
            if getattr(self, key) not in KERNELS:
                raise ConfigError(key, f"{key} must be one of {', '.join(KERNELS)}, "
                                       f"got {getattr(self, key)!r}")
        if self.kernels == "aten":
            object.__setattr__(self, "eval_kernels", "aten")
        for norm in self.norms:
            spec = norm_spec(norm)
            if spec.grouped:
                for name, _, out, _, _, is_block in LAYOUT:
                    if is_block and out % groups:
                        widths = ", ".join(str(o) for _, _, o, _, _, b in LAYOUT if b)
                        raise ConfigError(
                            "groups",
                            f"{spec.title} with {groups} groups does not divide {name}'s "
                            f"{out} channels; choose a group count that divides every block "
                            f"width ({widths}), e.g. 1 or 2",
                        )
            if options or not built_in(norm):
                # one layer built once: an option the factory does not take fails here
                check_norm_options(norm, options, LAYOUT[0][2], groups)

    @property
    def norm(self) -> str:
        return "+".join(self.norms)

    def to_dict(self) -> dict[str, Any]:
        data = {"norm": self.norm, "groups": self.groups, "dropout": self.dropout,
                "dropout_draw": self.dropout_draw, "kernels": self.kernels,
                "eval_kernels": self.eval_kernels}
        if self.norm_options:  # written only when set: the format 0.9 wrote otherwise
            data["norm_options"] = self.norm_options.to_json()
        if self.weight_std:
            data["weight_std"] = True
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        check_keys(data, MODEL_KEYS, "model key")
        return cls(norms=data.get("norm", "bn"), groups=data.get("groups", 2),
                   dropout=data.get("dropout", 0.01),
                   dropout_draw=data.get("dropout_draw", "positions"),
                   kernels=data.get("kernels") or default_kernels(),
                   eval_kernels=data.get("eval_kernels") or default_kernels(),
                   norm_options=data.get("norm_options") or {},
                   weight_std=data.get("weight_std", False))


MODEL_KEYS = ("norm", "groups", "dropout", "dropout_draw", "kernels", "eval_kernels",
              "norm_options", "weight_std")
DROPOUT_DRAWS = ("positions", "bernoulli")
KERNELS = ("normlab", "aten")


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
        """The network of a (validated) ModelConfig."""
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
