"""Models: the seed's CNN and the registry of normalization layers."""

from normlab.models.net import LAYOUT, ModelConfig, Net, build_config, count_parameters
from normlab.models.norms import (
    NORM_LABELS,
    NORM_TITLES,
    NORMALIZING,
    NORMS,
    check_norm,
    make_norm,
)

__all__ = [
    "LAYOUT",
    "NORMALIZING",
    "NORMS",
    "NORM_LABELS",
    "NORM_TITLES",
    "ModelConfig",
    "Net",
    "build_config",
    "check_norm",
    "count_parameters",
    "make_norm",
]
