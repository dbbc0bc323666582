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

A user's own norm: :func:`register_norm` in a session (this process only), or an import
path ``"package.module:Attr"`` wherever a norm is named (``Net(norm=...)``, a suite's
TOML, ``--norm``). A path is imported on first use in each process, so worker processes
and Ray workers build it too, and config.json records it as the norm's name.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from normlab.fields import ConfigError

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
    path it was resolved from (None for a built-in or a registered norm).
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

    def build(self, channels: int, groups: int = 2, **options: Any) -> nn.Module:
        """The layer for ``channels`` channels with ``options`` (passed unchanged)."""
        if self.grouped:
            return self.factory(channels, groups=groups, **options)
        return self.factory(channels, **options)


# ----------------------------------------------------------------------------- built-ins


def _batch(channels: int, **options: Any) -> nn.Module:
    return nn.BatchNorm2d(channels, **options)


def _group(channels: int, groups: int = 2, **options: Any) -> nn.Module:
    # nn.GroupNorm takes (num_groups, num_channels): wrapped here so callers pass C first.
    return nn.GroupNorm(groups, channels, **options)


def _layer(channels: int, **options: Any) -> nn.Module:
    # One group = statistics over (C, H, W) per image, with per-channel affine (the seed's LN).
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
_BUILT_IN: tuple[NormSpec, ...] = (
    NormSpec("bn", _batch, "BatchNorm", "BN", batch_stats=True, accel=True, formula="N,H,W"),
    NormSpec("ln", _layer, "LayerNorm", "LN", accel=True, formula="C,H,W"),
    NormSpec("gn", _group, "GroupNorm", "GN", accel=True, grouped=True, formula="C/G,H,W"),
    NormSpec("in", _instance, "InstanceNorm", "IN", accel=True, formula="H,W"),
    NormSpec("none", _identity, "no normalization", "no norm"),
    NormSpec("brn", _zoo("BatchRenorm2d"), "Batch Renormalization", "BRN", batch_stats=True),
    NormSpec("gbn", _zoo("GhostBatchNorm2d"), "Ghost BatchNorm", "GBN", batch_stats=True),
    NormSpec("frn", _zoo("FilterResponseNorm2d"), "Filter Response Normalization", "FRN"),
    NormSpec("evo-s0", _zoo("EvoNormS0"), "EvoNorm-S0", "EvoNorm-S0", grouped=True),
    NormSpec("evo-b0", _zoo("EvoNormB0"), "EvoNorm-B0", "EvoNorm-B0", batch_stats=True),
    NormSpec("rms", _zoo("RMSNorm2d"), "RMSNorm", "RMSNorm"),
)
_REGISTRY: dict[str, NormSpec] = {spec.name: spec for spec in _BUILT_IN}  # + register_norm's
_BY_PATH: dict[str, NormSpec] = {}  # import paths resolved in this process
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def norm_specs() -> tuple[NormSpec, ...]:
    """Every registered norm (the built-ins, then this session's), in teaching order."""
    return tuple(_REGISTRY.values())


def norm_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def built_in(name: str) -> bool:
    return any(spec.name == name for spec in _BUILT_IN)


def is_path(name: str) -> bool:
    """Whether ``name`` is an import path (``"package.module:Attr"``) rather than a name."""
    return ":" in name


def register_norm(name: str, factory: NormFactory, *, title: str | None = None,
                  label: str | None = None, batch_stats: bool = False,
                  grouped: bool = False) -> NormSpec:
    """Register ``factory`` (called as ``factory(channels, **options)``, with ``groups=``
    too when ``grouped``) as the norm ``name`` in this process; returns its spec.
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
                    batch_stats=bool(batch_stats), grouped=bool(grouped))
    _REGISTRY[name] = spec
    return spec


def _choices() -> str:
    return (", ".join(repr(k) for k in _REGISTRY)
            + ", or your own by import path 'package.module:Attr'")


def norm_spec(name: str) -> NormSpec:
    """The spec of ``name``: a registered norm, or an import path ``"package.module:Attr"``
    (imported on first use in this process; ``Attr`` is a factory such as an ``nn.Module``
    class, or a :class:`NormSpec`). Raises a ConfigError listing the choices, or saying why
    a path does not resolve."""
    if not isinstance(name, str):
        raise ConfigError("norm", f"a norm is named by a string, got {name!r}")
    spec = _REGISTRY.get(name) or _BY_PATH.get(name)
    if spec is not None:
        return spec
    if not is_path(name):
        raise ConfigError("norm", f"unknown norm {name!r}; choose one of {_choices()}")
    spec = _BY_PATH[name] = _resolve(name)
    return spec


def _resolve(path: str) -> NormSpec:
    if not _PATH.match(path):
        raise ConfigError("norm", f"norm {path!r} is not an import path of the form "
                                  "'package.module:Attr'")
    module_name, attr = path.split(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as err:
        raise ConfigError("norm", f"norm {path!r}: module {module_name!r} does not import "
                                  f"({type(err).__name__}: {err}); it must be importable in "
                                  "every process that trains it (PYTHONPATH, or an installed "
                                  "package)") from err
    where = module_name
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError("norm", f"norm {path!r}: {where} has no attribute {part!r}")
        obj, where = getattr(obj, part), f"{where}.{part}"
    if isinstance(obj, NormSpec):  # a module may publish a whole spec
        return dataclasses.replace(obj, name=path, path=path)
    if not callable(obj):
        raise ConfigError("norm", f"norm {path!r} is not callable ({type(obj).__name__}); it "
                                  "must be a factory called as factory(channels, **options), "
                                  "e.g. an nn.Module class")
    short = attr.rsplit(".", 1)[-1]
    title = getattr(obj, "title", None)
    label = getattr(obj, "label", None)
    batch_stats = getattr(obj, "batch_stats", None)
    if not isinstance(batch_stats, bool):  # a BatchNorm subclass uses the batch's statistics
        batch_stats = isinstance(obj, type) and issubclass(obj, nn.modules.batchnorm._BatchNorm)
    return NormSpec(path, obj, title if isinstance(title, str) else short,
                    label if isinstance(label, str) else short, batch_stats=batch_stats,
                    grouped=getattr(obj, "grouped", False) is True, path=path)


def check_norm(name: str) -> str:
    """Return ``name`` if it names a norm (registered, or an import path that resolves),
    else raise a ConfigError listing the choices."""
    return norm_spec(name).name


def make_norm(name: str, channels: int, groups: int = 2, **options: Any) -> nn.Module:
    """Build the norm layer ``name`` for ``channels`` channels, ``options`` passed to its
    factory (``groups`` too, for a grouped norm)."""
    return norm_spec(name).build(channels, groups, **options)


def check_norm_options(name: str, options: Mapping[str, Any], channels: int,
                       groups: int) -> None:
    """Build ``name`` once with ``options``: an option its factory does not take (a
    TypeError) or a value it refuses becomes a ConfigError naming ``norm_options``."""
    spec = norm_spec(name)
    if "groups" in options:  # one group count per model: a grouped norm gets it as groups=
        raise ConfigError("norm_options", "groups is not a norm option: a grouped norm takes "
                                          "the model's groups (groups=, --groups)")
    field_name = "norm_options" if options else "norm"
    try:
        layer = spec.build(channels, groups, **options)
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


# ----------------------------------------------------------------------------- options

_SCALARS = (bool, int, float, str, type(None))


class NormOptions(Mapping[str, Any]):
    """A norm's keyword options as a read-only, hashable mapping (so a ModelConfig stays
    hashable); equal to a dict with the same items. Values are JSON's: numbers, bools,
    strings, null, and lists of them (held as tuples)."""

    def __init__(self, data: Mapping[str, Any] | None = None) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError("norm_options", f"norm_options must be a table of keyword "
                                              f"options, e.g. {{momentum = 0.01}}, got {data!r}")
        items = {}
        for key, value in data.items():
            if not isinstance(key, str) or not key.isidentifier():
                raise ConfigError("norm_options", f"norm_options keys are keyword names, "
                                                  f"got {key!r}")
            if isinstance(value, list | tuple) and all(isinstance(v, _SCALARS) for v in value):
                value = tuple(value)
            elif not isinstance(value, _SCALARS):
                raise ConfigError("norm_options", f"norm_options[{key!r}] must be a number, "
                                                  f"bool, string or list, got {value!r}")
            items[key] = value
        self._items = dict(sorted(items.items()))

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(self._items.items()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self.items()) == dict(other.items())

    def __repr__(self) -> str:
        return repr(self._items)

    def __reduce__(self):
        return NormOptions, (self._items,)

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self._items.items()}

    def text(self) -> str:
        """``momentum=0.01, eps=0.001``, for labels."""
        return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in self._items.items())
