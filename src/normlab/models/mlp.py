"""The BN paper's MNIST network (Ioffe & Szegedy 2015, section 4.1): a multilayer perceptron.

    28x28 image -> flatten (784) -> [Linear -> norm -> sigmoid] x 3 (100 units each)
                -> Linear (10) -> log-softmax

The norm sits between each hidden layer's affine map and its nonlinearity, where the paper
puts BN ("we add the BN transform immediately before the nonlinearity"). It normalises
feature vectors (N, C), so only norms that take them fit (BN, BRN, GBN, LN, GN, RMSNorm:
``NormSpec.inputs``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from normlab.fields import ConfigError

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU}


class MLP(nn.Module):
    """``MLP(norm_layer, hidden=(100, 100, 100), activation="sigmoid")``: hidden layers of
    the given widths, each Linear -> ``norm_layer(width)`` -> activation (-> dropout, with a
    ``dropout_layer``), then a Linear to the 10 classes. Returns log-probabilities (N, 10).
    The Linear layers keep their biases (with a norm the bias is redundant, as the paper
    notes; keeping it makes every norm's network the same but for the norm)."""

    inputs = "features"  # what its norms normalise

    def __init__(self, norm_layer: Callable[[int], nn.Module] | None = None,
                 hidden: Sequence[int] = (100, 100, 100), activation: str = "sigmoid",
                 dropout_layer: Callable[[], nn.Module] | None = None,
                 in_features: int = 28 * 28, classes: int = 10) -> None:
        super().__init__()
        if isinstance(hidden, int) and not isinstance(hidden, bool):
            hidden = (hidden,)
        if (not isinstance(hidden, Sequence) or not hidden
                or not all(isinstance(h, int) and not isinstance(h, bool) and h > 0
                           for h in hidden)):
            raise ConfigError("net_options", f"mlp's hidden must be a list of positive "
                                             f"widths, e.g. [100, 100, 100], got {hidden!r}")
        if activation not in ACTIVATIONS:
            raise ConfigError("net_options", f"mlp's activation must be one of "
                                             f"{', '.join(ACTIVATIONS)}, got {activation!r}")
        norm_layer = norm_layer or (lambda width: nn.Identity())
        layers: list[nn.Module] = []
        width = in_features
        for out in hidden:
            layers += [nn.Linear(width, out), norm_layer(out), ACTIVATIONS[activation]()]
            if dropout_layer is not None:
                layers.append(dropout_layer())
            width = out
        self.hidden = nn.Sequential(*layers)
        self.out = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.out(self.hidden(x.flatten(1))), dim=-1)
