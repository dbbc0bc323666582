"""Models, plain PyTorch: the networks (the seed's CNN, the BN paper's MLP, plain and
residual deep CNNs: one NetSpec per network) and the normalization layers (one NormSpec
per norm), each chosen by name through its registry."""

from normlab.models.config import ModelConfig
from normlab.models.net import LAYOUT, Net, build_config, count_parameters
from normlab.models.nets import NetSpec, build_model, net_label, net_names, net_spec, net_specs
from normlab.models.norms import (
    NormSpec,
    check_norm,
    make_norm,
    norm_names,
    norm_spec,
    norm_specs,
    register_norm,
)

__all__ = [
    "LAYOUT",
    "ModelConfig",
    "Net",
    "NetSpec",
    "NormSpec",
    "build_config",
    "build_model",
    "check_norm",
    "count_parameters",
    "make_norm",
    "net_label",
    "net_names",
    "net_spec",
    "net_specs",
    "norm_names",
    "norm_spec",
    "norm_specs",
    "register_norm",
]
