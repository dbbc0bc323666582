"""Models: the seed's CNN and the registry of normalization layers (one NormSpec per norm)."""

from normlab.models.net import LAYOUT, ModelConfig, Net, build_config, count_parameters
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
    "NormSpec",
    "build_config",
    "check_norm",
    "count_parameters",
    "make_norm",
    "norm_names",
    "norm_spec",
    "norm_specs",
    "register_norm",
]
