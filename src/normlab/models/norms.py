"""Normalization layers chosen by name through one registry: one :class:`NormSpec` per norm.

A norm is one entry: its factory, its names (a title for prose and figures, a short label
for tables), whether it uses batch statistics, whether the accelerated step takes it
(:mod:`normlab.accel`), whether it receives GroupNorm's group count, and the workbook's
formula (or none). The model, suites, reports, the workbook and the accelerator all read
it; adding a norm is adding one entry to :data:`_BUILT_IN`.

Every factory takes the channel count first (``factory(C, **options)``; a grouped norm's
also gets ``groups=``), so the network only ever says ``make_norm(name, C, groups,
**options)``. LayerNorm and InstanceNorm over conv maps are GroupNorm with 1 and C groups:
that normalises over (C, H, W) and (H, W) per image and keeps a per-channel scale and
shift, exactly as the seed did (and so the parameter counts match).

A norm normalises conv maps (N, C, H, W), and some also feature vectors (N, C), as in the
BN paper's MLP (``NormSpec.inputs``): BN, BRN, GBN, LN, GN and RMSNorm do; IN (one value
per group of a vector), FRN and the EvoNorms (statistics over H, W) do not, and a network
of feature vectors refuses them when its config is made.

A user's own norm: :func:`register_norm` in a session (this process only), or an import
path ``"package.module:Attr"`` wherever a norm is named (``Net(norm=...)``, a suite's
TOML, ``--norm``), naming an ``nn.Module`` subclass or a :class:`NormSpec` (anything else
is refused before it is called). A path is imported on first use in each process, so
worker processes and Ray workers build it too, and config.json records it as the norm's
name.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from normlab.fields import ConfigError
from normlab.models.imports import is_path, module_class, resolve

NormFactory = Callable[..., nn.Module]


@dataclass(frozen=True)
class NormSpec:
    """One norm, as everything in normlab reads it.

    ``factory(channels, **options)`` builds the layer (``grouped``: also ``groups=``, the
    model's group count). ``batch_stats``: its training output depends on the other images
    of the batch (BN and its kin). ``accel``: :mod:`normlab.accel` may swap it for its fused
    modules and train it by hand (else the step goes through autograd, and the run's paths
    say so). ``formula``: the axes one mean and variance are taken over, for the workbook's
    sheets (``"N,H,W"`` is per channel over the batch; ``"C/G,H,W"`` per image and group of
    channels); None leaves the norm out of the workbook, which says so. ``path``: the import
    path it was resolved from (None for a built-in or a registered norm). ``inputs``: what
    it normalises, ``"maps"`` (N, C, H, W) and/or ``"features"`` (N, C); ``features``: the
    factory for feature vectors where it differs (BatchNorm1d for BN; None: ``factory``).
    """

    name: str
    factory: NormFactory
    title: str
    label: str
    batch_stats: bool = False
    accel: bool = False
    grouped: bool = False
    formula: str | None = None
    path: str | None = None
    inputs: tuple[str, ...] = ("maps",)
    features: NormFactory | None = None

    def build(self, channels: int, groups: int = 2, inputs: str = "maps",
              **options: Any) -> nn.Module:
        """The layer for ``channels`` channels of ``inputs`` (maps or features) with
        ``options`` (passed unchanged)."""
        if inputs not in self.inputs:
            raise ConfigError("norm", f"{self.title} does not normalise {INPUTS[inputs]}")
        factory = self.features if inputs == "features" and self.features else self.factory
        if self.grouped:
            return factory(channels, groups=groups, **options)
        return factory(channels, **options)


# what a layer's input is, in words
INPUTS = {"maps": "conv maps (N, C, H, W)", "features": "feature vectors (N, C)"}


# ----------------------------------------------------------------------------- built-ins


def _batch(channels: int, **options: Any) -> nn.Module:
    return nn.BatchNorm2d(channels, **options)


def _batch1d(channels: int, **options: Any) -> nn.Module:
    return nn.BatchNorm1d(channels, **options)


def _group(channels: int, groups: int = 2, **options: Any) -> nn.Module:
    # nn.GroupNorm takes (num_groups, num_channels): wrapped here so callers pass C first.
    return nn.GroupNorm(groups, channels, **options)


def _layer(channels: int, **options: Any) -> nn.Module:
    # One group = statistics over (C, H, W) per image, with per-channel affine (the seed's
    # LN); on feature vectors (N, C) that is nn.LayerNorm(C) exactly.
    return nn.GroupNorm(1, channels, **options)


def _instance(channels: int, **options: Any) -> nn.Module:
    # C groups = statistics over (H, W) per image and channel; per-channel affine like the rest.
    return nn.GroupNorm(channels, channels, **options)


def _identity(channels: int) -> nn.Module:  # takes no options: any given is an error
    return nn.Identity()


def _zoo(attr: str) -> NormFactory:
    """A factory for :mod:`normlab.models.zoo`'s class ``attr``, imported when first built."""

    def build(channels: int, **options: Any) -> nn.Module:
        from normlab.models import zoo

        return getattr(zoo, attr)(channels, **options)

    build.__name__ = build.__qualname__ = attr
    return build


# In teaching order (the workbook's sheets and the report's figures follow it).
BOTH = ("maps", "features")
_BUILT_IN: tuple[NormSpec, ...] = (
    NormSpec("bn", _batch, "BatchNorm", "BN", batch_stats=True, accel=True, formula="N,H,W",
             inputs=BOTH, features=_batch1d),
    NormSpec("ln", _layer, "LayerNorm", "LN", accel=True, formula="C,H,W", inputs=BOTH),
    NormSpec("gn", _group, "GroupNorm", "GN", accel=True, grouped=True, formula="C/G,H,W",
             inputs=BOTH),
    NormSpec("in", _instance, "InstanceNorm", "IN", accel=True, formula="H,W"),
    NormSpec("none", _identity, "no normalization", "no norm", inputs=BOTH),
    NormSpec("brn", _zoo("BatchRenorm2d"), "Batch Renormalization", "BRN", batch_stats=True,
             inputs=BOTH, features=_zoo("BatchRenorm1d")),
    NormSpec("gbn", _zoo("GhostBatchNorm2d"), "Ghost BatchNorm", "GBN", batch_stats=True,
             inputs=BOTH, features=_zoo("GhostBatchNorm1d")),
    NormSpec("frn", _zoo("FilterResponseNorm2d"), "Filter Response Normalization", "FRN"),
    NormSpec("evo-s0", _zoo("EvoNormS0"), "EvoNorm-S0", "EvoNorm-S0", grouped=True),
    NormSpec("evo-b0", _zoo("EvoNormB0"), "EvoNorm-B0", "EvoNorm-B0", batch_stats=True),
    NormSpec("rms", _zoo("RMSNorm2d"), "RMSNorm", "RMSNorm", inputs=BOTH),
    NormSpec("noisy-bn", _zoo("NoisyBatchNorm2d"), "noisy BatchNorm", "noisy BN",
             batch_stats=True, inputs=BOTH, features=_zoo("NoisyBatchNorm1d")),
)
_REGISTRY: dict[str, NormSpec] = {spec.name: spec for spec in _BUILT_IN}  # + register_norm's
_BY_PATH: dict[str, NormSpec] = {}  # import paths resolved in this process
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def norm_specs() -> tuple[NormSpec, ...]:
    """Every registered norm (the built-ins, then this session's), in teaching order."""
    return tuple(_REGISTRY.values())


def norm_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def built_in(name: str) -> bool:
    return any(spec.name == name for spec in _BUILT_IN)


def register_norm(name: str, factory: NormFactory, *, title: str | None = None,
                  label: str | None = None, batch_stats: bool = False,
                  grouped: bool = False, inputs: tuple[str, ...] = ("maps",)) -> NormSpec:
    """Register ``factory`` (called as ``factory(channels, **options)``, with ``groups=``
    too when ``grouped``) as the norm ``name`` in this process; returns its spec.
    ``inputs``: what it normalises, ``("maps",)``, ``("features",)`` or both.
    Registering the same name again replaces it (rerunning a notebook cell). The
    accelerated step leaves it to autograd, and the workbook leaves it out.

    It lives in this session only: worker processes (``jobs=2``) and Ray workers do not
    see it. To train it there, name it by import path, ``"package.module:Attr"``."""
    if not isinstance(name, str) or not _NAME.match(name) or "+" in name:
        raise ConfigError("norm", f"a norm's name must be a slug (letters, digits, '.', '_', "
                                  f"'-'; no '+' or ':'), got {name!r}")
    if built_in(name):
        raise ConfigError("norm", f"{name!r} is a built-in norm; register yours under "
                                  "another name")
    if not callable(factory):
        raise ConfigError("norm", f"register_norm({name!r}, ...): the factory must be "
                                  f"callable, got {factory!r}")
    spec = NormSpec(name, factory, title or name, label or title or name,
                    batch_stats=bool(batch_stats), grouped=bool(grouped),
                    inputs=_inputs(inputs, name))
    _REGISTRY[name] = spec
    return spec


def _choices() -> str:
    return (", ".join(repr(k) for k in _REGISTRY)
            + ", or your own by import path 'package.module:Attr'")


def norm_spec(name: str) -> NormSpec:
    """The spec of ``name``: a registered norm, or an import path ``"package.module:Attr"``
    (imported on first use in this process; ``Attr`` is an ``nn.Module`` subclass called
    as ``Attr(channels, **options)``, or a :class:`NormSpec`). Raises a ConfigError listing
    the choices, or saying why a path does not resolve (a path naming anything else, such
    as ``builtins:print``, is refused and nothing is called)."""
    if not isinstance(name, str):
        raise ConfigError("norm", f"a norm is named by a string, got {name!r}")
    spec = _REGISTRY.get(name) or _BY_PATH.get(name)
    if spec is not None:
        return spec
    if not is_path(name):
        raise ConfigError("norm", f"unknown norm {name!r}; choose one of {_choices()}")
    spec = _BY_PATH[name] = _resolve(name)
    return spec


def _inputs(value: Any, name: str) -> tuple[str, ...]:
    inputs = (value,) if isinstance(value, str) else tuple(value)
    if not inputs or any(kind not in INPUTS for kind in inputs):
        raise ConfigError("norm", f"norm {name!r}: inputs must be 'maps' and/or 'features', "
                                  f"got {value!r}")
    return inputs


def _resolve(path: str) -> NormSpec:
    """The spec of the import path ``path``: a :class:`NormSpec` it names, or one made for
    the ``nn.Module`` subclass it names (its class attributes ``title``, ``label``,
    ``batch_stats``, ``grouped`` and ``inputs`` read where given). Nothing it names is
    called here; anything else is refused."""
    obj = resolve(path, "norm")
    if isinstance(obj, NormSpec):  # a module may publish a whole spec
        return dataclasses.replace(obj, name=path, path=path)
    cls = module_class(path, obj, "norm", "NormSpec")
    short = path.rsplit(":", 1)[-1].rsplit(".", 1)[-1]
    title = getattr(cls, "title", None)
    label = getattr(cls, "label", None)
    batch_stats = getattr(cls, "batch_stats", None)
    if not isinstance(batch_stats, bool):  # a BatchNorm subclass uses the batch's statistics
        batch_stats = issubclass(cls, nn.modules.batchnorm._BatchNorm)
    inputs = getattr(cls, "inputs", None)
    if inputs is None:  # a BatchNorm1d subclass normalises feature vectors
        inputs = ("features",) if issubclass(cls, nn.BatchNorm1d) else ("maps",)
    return NormSpec(path, cls, title if isinstance(title, str) else short,
                    label if isinstance(label, str) else short, batch_stats=batch_stats,
                    grouped=getattr(cls, "grouped", False) is True, path=path,
                    inputs=_inputs(inputs, path))


def check_norm(name: str) -> str:
    """Return ``name`` if it names a norm (registered, or an import path that resolves),
    else raise a ConfigError listing the choices."""
    return norm_spec(name).name


def make_norm(name: str, channels: int, groups: int = 2, inputs: str = "maps",
              **options: Any) -> nn.Module:
    """Build the norm layer ``name`` for ``channels`` channels of ``inputs`` (maps or
    features), ``options`` passed to its factory (``groups`` too, for a grouped norm)."""
    return norm_spec(name).build(channels, groups, inputs, **options)


def check_norm_options(name: str, options: Mapping[str, Any], channels: int,
                       groups: int) -> None:
    """Build ``name`` once with ``options``: an option its factory does not take (a
    TypeError) or a value it refuses becomes a ConfigError naming ``norm_options``."""
    spec = norm_spec(name)
    inputs = spec.inputs[0]
    if "groups" in options:  # one group count per model: a grouped norm gets it as groups=
        raise ConfigError("norm_options", "groups is not a norm option: a grouped norm takes "
                                          "the model's groups (groups=, --groups)")
    field_name = "norm_options" if options else "norm"
    try:
        layer = spec.build(channels, groups, inputs, **options)
    except ConfigError:
        raise
    except TypeError as err:
        raise ConfigError(field_name, f"norm {name!r} does not take norm_options "
                                      f"{dict(options)}: {err}") from err
    except Exception as err:
        raise ConfigError(field_name, f"norm {name!r} with norm_options {dict(options)} "
                                      f"cannot be built: {type(err).__name__}: {err}") from err
    if not isinstance(layer, nn.Module):
        raise ConfigError("norm", f"norm {name!r}: its factory returned "
                                  f"{type(layer).__name__}, not an nn.Module")
