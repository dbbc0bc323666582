"""Networks chosen by name through one registry: one :class:`NetSpec` per network, as
:mod:`normlab.models.norms` has one NormSpec per norm.

- ``seed``: the seed's 5,760-parameter CNN (:class:`~normlab.models.net.Net`), the default;
- ``mlp``: the BN paper's MNIST network (:mod:`normlab.models.mlp`), options ``hidden``
  and ``activation``;
- ``plain``: a plain deep CNN, options ``depth`` and ``width``;
- ``resnet``: He et al.'s CIFAR ResNet for 28x28 images, options ``depth`` (6n+2),
  ``width`` and ``residual_init`` (standard, skipinit, fixup) (:mod:`normlab.models.resnet`);
- your own by import path, ``"package.module:Attr"``: an ``nn.Module`` subclass (or a
  NetSpec) called as ``Attr(norm_layer, **net_options)``.

A network takes the norm factory its config gives it (``norm_layer(C)``, timm's and
torchvision's convention), so any norm goes in any network where it has a meaning; and,
only when it is asked for, ``dropout_layer`` (a zero-argument factory of the run's dropout
module, where dropout > 0) and ``conv_layer`` (:class:`~normlab.models.zoo.StdConv2d`, with
weight standardization). Its forward takes (N, 1, 28, 28) images and returns
log-probabilities (N, 10). :func:`check_net` builds it once when its config is made and
runs it on two blank images, so that a bad option or a network that does not fit fails
there, naming the field.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from normlab.fields import ConfigError
from normlab.models.config import ModelConfig
from normlab.models.imports import is_path, module_class, resolve
from normlab.models.mlp import MLP
from normlab.models.resnet import PlainNet, ResNet


@dataclass(frozen=True)
class NetSpec:
    """One network, as everything in normlab reads it.

    ``factory(norm_layer, **options)`` builds it (see the module). ``title`` names it in
    prose, ``label`` in tables and figures; ``describe(options)`` gives its label with its
    options (``ResNet-20 + SkipInit``; None: the label and the options given).
    ``inputs``: what its norms normalise, ``"maps"`` (N, C, H, W) or ``"features"``
    (N, C). ``dropout``: its default dropout. ``whole_config``: the factory takes the
    ModelConfig itself (only the seed's network: its seed flags stack norms in its own
    blocks). ``path``: the import path it was resolved from (None for a built-in).
    """

    name: str
    factory: Callable[..., nn.Module]
    title: str
    label: str
    inputs: str = "maps"
    dropout: float = 0.0
    describe: Callable[[Mapping[str, Any]], str] | None = None
    whole_config: bool = False
    path: str | None = None

    def options(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """``given`` over the factory's own defaults (for labels)."""
        try:
            params = inspect.signature(self.factory).parameters.values()
        except (TypeError, ValueError):
            params = []
        defaults = {p.name: p.default for p in params if p.default is not p.empty
                    and p.name not in ("norm_layer", "dropout_layer", "conv_layer")}
        return {**defaults, **given}


# ----------------------------------------------------------------------------- built-ins


def _seed(config: ModelConfig) -> nn.Module:
    from normlab.models.net import Net

    return Net.from_config(config)


def _width(options: Mapping[str, Any]) -> str:
    return f", width {options['width']}" if options.get("width", 16) != 16 else ""


def _describe_mlp(options: Mapping[str, Any]) -> str:
    hidden = options.get("hidden", (100, 100, 100))
    hidden = hidden if isinstance(hidden, list | tuple) else (hidden,)
    return f"MLP {'-'.join(map(str, hidden))} ({options.get('activation', 'sigmoid')})"


def _describe_resnet(options: Mapping[str, Any]) -> str:
    init = {"skipinit": " + SkipInit", "fixup": " + Fixup"}.get(
        options.get("residual_init", "standard"), "")
    return f"ResNet-{options.get('depth', 20)}{init}{_width(options)}"


_BUILT_IN: tuple[NetSpec, ...] = (
    NetSpec("seed", _seed, "the seed's 5,760-parameter CNN", "seed CNN", dropout=0.01,
            whole_config=True),
    NetSpec("mlp", MLP, "the BN paper's MLP", "MLP", inputs="features",
            describe=_describe_mlp),
    NetSpec("plain", PlainNet, "a plain deep CNN", "plain",
            describe=lambda o: f"plain-{o.get('depth', 20)}{_width(o)}"),
    NetSpec("resnet", ResNet, "He et al.'s CIFAR ResNet", "ResNet",
            describe=_describe_resnet),
)
_REGISTRY: dict[str, NetSpec] = {spec.name: spec for spec in _BUILT_IN}
_BY_PATH: dict[str, NetSpec] = {}  # import paths resolved in this process


def net_specs() -> tuple[NetSpec, ...]:
    return tuple(_REGISTRY.values())


def net_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def net_spec(name: str) -> NetSpec:
    """The spec of ``name``: a built-in network, or an import path ``"package.module:Attr"``
    naming an ``nn.Module`` subclass or a :class:`NetSpec` (anything else is refused, and
    nothing it names is called). Raises a ConfigError naming ``net``."""
    if not isinstance(name, str):
        raise ConfigError("net", f"a net is named by a string, got {name!r}")
    spec = _REGISTRY.get(name) or _BY_PATH.get(name)
    if spec is not None:
        return spec
    if not is_path(name):
        raise ConfigError("net", f"unknown net {name!r}; choose one of "
                                 f"{', '.join(map(repr, _REGISTRY))}, or your own by import "
                                 "path 'package.module:Attr'")
    obj = resolve(name, "net")
    if isinstance(obj, NetSpec):
        spec = dataclasses.replace(obj, name=name, path=name, whole_config=False)
    else:
        cls = module_class(name, obj, "net", "NetSpec")
        short = name.rsplit(":", 1)[-1].rsplit(".", 1)[-1]
        title, label = getattr(cls, "title", None), getattr(cls, "label", None)
        inputs = getattr(cls, "inputs", "maps")
        if inputs not in ("maps", "features"):
            raise ConfigError("net", f"net {name!r}: its inputs attribute must be 'maps' or "
                                     f"'features', got {inputs!r}")
        spec = NetSpec(name, cls, title if isinstance(title, str) else short,
                       label if isinstance(label, str) else short, inputs=inputs, path=name)
    _BY_PATH[name] = spec
    return spec


def net_label(config: ModelConfig) -> str:
    """The network with its options, for labels: ``ResNet-20 + SkipInit``, ``plain-40``,
    ``MLP 100-100-100 (sigmoid)``, ``MyNet (depth=3)``."""
    spec = net_spec(config.net)
    if spec.describe is not None:
        return spec.describe(spec.options(config.net_options))
    return spec.label + (f" ({config.net_options.text()})" if config.net_options else "")


# ----------------------------------------------------------------------------- building


def _extras(config: ModelConfig) -> dict[str, Any]:
    """What the network gets besides its norm and options: the dropout module's factory
    (dropout > 0) and the convolution class (weight standardization)."""
    extras: dict[str, Any] = {}
    if config.dropout > 0:
        from normlab.models.net import make_dropout

        extras["dropout_layer"] = lambda: make_dropout(config)
    if config.weight_std:
        from normlab.models.zoo import StdConv2d

        extras["conv_layer"] = StdConv2d
    return extras


def build_model(config: ModelConfig) -> nn.Module:
    """The network of ``config`` (checked when the config was made), freshly initialised
    from torch's global generator."""
    spec = net_spec(config.net)
    if spec.whole_config:
        return spec.factory(config)
    return spec.factory(config.norm_layer(spec.inputs), **_extras(config),
                        **config.net_options)


_CHECKED: set[tuple] = set()  # configs whose network was built and run in this process


def check_net(config: ModelConfig) -> None:
    """Build ``config``'s network once and run it on two blank images, the global
    generator's state restored after: an option its factory does not take, a value it
    refuses, a dropout or weight standardization it cannot place, a forward that fails or
    does not return log-probabilities (N, 10) becomes a ConfigError naming the field."""
    key = (config.net, config.net_options, config.norms, config.norm_options, config.groups,
           config.dropout, config.dropout_draw, config.weight_std)
    if key in _CHECKED:
        return
    spec = net_spec(config.net)
    _check_signature(spec, config)
    with torch.random.fork_rng(devices=[]):
        try:
            model = build_model(config)
        except ConfigError as err:  # a value the network refused: say which field it was
            if err.message.startswith(f"{err.field}:"):
                raise
            raise ConfigError(err.field, f"{err.field}: {err.message}") from None
        except Exception as err:
            field = "net_options" if config.net_options else "net"
            raise ConfigError(field, f"net {config.net!r} with net_options "
                                     f"{dict(config.net_options)} cannot be built: "
                                     f"{type(err).__name__}: {err}") from err
        if not isinstance(model, nn.Module):
            raise ConfigError("net", f"net {config.net!r} built a {type(model).__name__}, "
                                     "not an nn.Module")
        model.eval()
        try:
            with torch.no_grad():
                out = model(torch.zeros(2, 1, 28, 28))
        except Exception as err:
            raise ConfigError("net", f"net {config.net!r}: its forward on a batch of "
                                     f"(2, 1, 28, 28) images fails: {type(err).__name__}: "
                                     f"{err}") from err
    if (not isinstance(out, torch.Tensor) or out.shape != (2, 10)
            or not torch.allclose(out.float().exp().sum(1), torch.ones(2), atol=1e-3)):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError("net", f"net {config.net!r} must return log-probabilities (N, 10) "
                                 f"(end its forward with F.log_softmax); on 2 images it "
                                 f"returned {got}")
    _CHECKED.add(key)


def _check_signature(spec: NetSpec, config: ModelConfig) -> None:
    """Each option and extra ``config`` would pass, named by the field it comes from when
    the factory does not take it."""
    try:
        params = inspect.signature(spec.factory).parameters
    except (TypeError, ValueError):
        return  # a factory without a signature: building it will tell
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    needs = {"dropout_layer": ("dropout", f"a dropout of {config.dropout:g}; set dropout = 0"),
             "conv_layer": ("weight_std", "weight standardization; set weight_std = false")}
    for key in _extras(config):
        if key not in params:
            field, what = needs[key]
            raise ConfigError(field, f"net {config.net!r} takes no {key}, so it cannot place "
                                     f"{what}")
    takes = [name for name in params if name not in ("norm_layer", *needs)]
    for key in config.net_options:
        if key not in takes:
            raise ConfigError("net_options", f"net {config.net!r} has no option {key!r}; its "
                                             f"options: {', '.join(takes) or 'none'}")
