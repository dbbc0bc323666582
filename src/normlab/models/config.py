"""The model as one value: :class:`ModelConfig`, which network, which norm(s), dropout and
the acceleration's kernel choices. Checked when made (a bad value is a ConfigError naming
the field), hashable, and written to config.json by :meth:`ModelConfig.to_dict`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from normlab.fields import ConfigError, Options, check_keys, coerce
from normlab.models.norms import (
    INPUTS,
    built_in,
    check_norm,
    check_norm_options,
    make_norm,
    norm_spec,
)


def default_kernels() -> str:
    """``"normlab"`` where normlab's C kernels can be compiled (a C compiler is on the
    PATH), else ``"aten"`` (the acceleration's choice: :mod:`normlab.accel`)."""
    from normlab.accel.kernels import compiler

    return "normlab" if compiler() else "aten"


@dataclass(frozen=True)
class ModelConfig:
    """The model as one value: which network, which norm(s), GroupNorm's group count, and
    dropout.

    ``net`` names the network (:mod:`normlab.models.nets`: ``seed``, the default, ``mlp``,
    ``plain``, ``resnet``, or an import path ``"package.module:Attr"``) and ``net_options``
    its keyword options (``{"depth": 20}``), both written to config.json only when set, so
    folders of normlab 0.10 and before read back equal. A network takes the norm factory
    :meth:`norm_layer` gives it; a norm with no meaning in it (FRN on the MLP's feature
    vectors) is refused here, naming both, and every other network is built once here (and
    run on two blank images) so that a bad option fails now, not in a worker.
    ``dropout`` None is the network's own default (0.01 for the seed's, 0 for the others).

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
    dropout: float | None = None
    dropout_draw: str = "positions"
    kernels: str = field(default_factory=default_kernels)
    eval_kernels: str = field(default_factory=default_kernels)
    norm_options: Options = field(default_factory=Options)
    weight_std: bool = False
    net: str = "seed"
    net_options: Options = field(default_factory=lambda: Options(field="net_options"))

    def __post_init__(self) -> None:
        from normlab.models.nets import check_net, net_spec

        norms = self.norms.split("+") if isinstance(self.norms, str) else tuple(self.norms)
        object.__setattr__(self, "norms", tuple(check_norm(n) for n in norms))
        net = net_spec(self.net)
        object.__setattr__(self, "net", net.name)
        object.__setattr__(self, "net_options", Options(self.net_options, "net_options"))
        if self.dropout is None:
            object.__setattr__(self, "dropout", net.dropout)
        groups = coerce("groups", self.groups, int)
        if groups < 1:
            raise ConfigError("groups", f"groups must be a positive integer, got {groups!r}")
        if not isinstance(self.weight_std, bool):
            raise ConfigError("weight_std", f"weight_std must be true or false, "
                                            f"got {self.weight_std!r}")
        options = Options(self.norm_options)
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
            if net.inputs not in spec.inputs:
                raise ConfigError("norm", f"norm {norm!r} has no meaning in net {self.net!r}: "
                                          f"{spec.title} does not normalise "
                                          f"{INPUTS[net.inputs]}, which that net's norms see; "
                                          f"choose one of {', '.join(takers(net.inputs))}")
        if self.net != "seed":
            check_net(self)
            return
        if self.net_options:
            raise ConfigError("net_options", "the seed's network takes no net_options "
                                             f"(got {dict(self.net_options)})")
        from normlab.models.net import LAYOUT

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

    def norm_layer(self, inputs: str = "maps") -> Callable[[int], nn.Module]:
        """The norm factory a network gets: ``norm_layer(C)`` is this config's norm for C
        channels of ``inputs`` (maps or features), with its groups and options;
        ``nn.Identity()`` for no norm, an ``nn.Sequential`` of them where several are
        stacked."""
        names = [n for n in self.norms if n != "none"]

        def build(channels: int) -> nn.Module:
            layers = []
            for name in names:
                if norm_spec(name).grouped and channels % self.groups:
                    raise ConfigError("groups", f"{norm_spec(name).title} with {self.groups} "
                                                f"groups does not divide {channels} channels "
                                                f"of net {self.net!r}; choose a group count "
                                                "that divides every width")
                layers.append(make_norm(name, channels, self.groups, inputs,
                                        **self.norm_options))
            return (layers[0] if len(layers) == 1 else nn.Sequential(*layers) if layers
                    else nn.Identity())

        return build

    def to_dict(self) -> dict[str, Any]:
        data = {"norm": self.norm, "groups": self.groups, "dropout": self.dropout,
                "dropout_draw": self.dropout_draw, "kernels": self.kernels,
                "eval_kernels": self.eval_kernels}
        if self.norm_options:  # written only when set: the format 0.9 wrote otherwise
            data["norm_options"] = self.norm_options.to_json()
        if self.weight_std:
            data["weight_std"] = True
        if self.net != "seed":  # written only when set: the format 0.10 wrote otherwise
            data["net"] = self.net
        if self.net_options:
            data["net_options"] = self.net_options.to_json()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        check_keys(data, MODEL_KEYS, "model key")
        return cls(norms=data.get("norm", "bn"), groups=data.get("groups", 2),
                   dropout=data.get("dropout"),
                   dropout_draw=data.get("dropout_draw", "positions"),
                   kernels=data.get("kernels") or default_kernels(),
                   eval_kernels=data.get("eval_kernels") or default_kernels(),
                   norm_options=data.get("norm_options") or {},
                   weight_std=data.get("weight_std", False), net=data.get("net", "seed"),
                   net_options=data.get("net_options") or {})


MODEL_KEYS = ("norm", "groups", "dropout", "dropout_draw", "kernels", "eval_kernels",
              "norm_options", "weight_std", "net", "net_options")
DROPOUT_DRAWS = ("positions", "bernoulli")
KERNELS = ("normlab", "aten")


def takers(inputs: str) -> list[str]:
    """The registered norms that normalise ``inputs`` (maps or features)."""
    from normlab.models.norms import norm_specs

    return [spec.name for spec in norm_specs() if inputs in spec.inputs]
