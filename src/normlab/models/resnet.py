"""Deep CNNs for 28x28 images in He et al. 2016's CIFAR layout ("Deep Residual Learning for
Image Recognition", section 4.2): a plain stack and a ResNet, for the depth studies.

Both are three stages of 3x3 convolutions at widths w, 2w and 4w on maps of 28x28, 14x14
and 7x7 (the first convolution of stages 2 and 3 has stride 2), after a first convolution
from the image to w channels, and end in global average pooling and a linear layer. A
ResNet of depth 6n+2 is that first convolution, n two-convolution blocks per stage, and
the linear layer; the plain net of the same depth is the same stack without the
shortcuts. Convolutions start from Kaiming's normal init (fan-out, for ReLU), as He et al.

The ResNet's ``residual_init`` says how a network without normalization is made to train:

- ``standard``: as He et al., with the norm after every convolution;
- ``skipinit`` (De & Smith 2020, "Batch Normalization Biases Residual Blocks Towards the
  Identity Function in Deep Networks"): each residual branch times a scalar gain that
  starts at 0, so every block starts as the identity;
- ``fixup`` (Zhang, Dauphin & Ma 2019, "Fixup Initialization"): each branch's first
  convolution rescaled by L^(-1/(2m-2)) = L^(-1/2) (L blocks of m = 2 layers), its last
  convolution and the final linear layer zero, a scalar bias before each convolution,
  activation and the linear layer, and a scalar multiplier on each branch.

SkipInit and Fixup are meant with ``norm = "none"``; they also build with a norm.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from normlab.fields import ConfigError

RESIDUAL_INITS = ("standard", "skipinit", "fixup")
NormLayer = Callable[[int], nn.Module]


def _check(name: str, depth: int, width: int, low: int) -> None:
    for key, value, least in (("depth", depth, low), ("width", width, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ConfigError("net_options", f"{name}'s {key} must be an integer >= {least}, "
                                             f"got {value!r}")


def _no_norm(channels: int) -> nn.Module:
    return nn.Identity()


def _kaiming(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


class PlainNet(nn.Module):
    """``PlainNet(norm_layer, depth=20, width=16)``: depth - 1 convolutions, each 3x3 conv ->
    norm -> ReLU (-> dropout), in three stages of width w, 2w, 4w (the depth - 2 after the
    first split as evenly as can be, earlier stages taking the extra), then global average
    pooling and a linear layer: ``depth`` weighted layers, no shortcuts. Returns
    log-probabilities (N, 10)."""

    def __init__(self, norm_layer: NormLayer | None = None, depth: int = 20, width: int = 16,
                 dropout_layer: Callable[[], nn.Module] | None = None,
                 conv_layer: type[nn.Conv2d] = nn.Conv2d, classes: int = 10) -> None:
        super().__init__()
        _check("plain", depth, width, 5)
        norm_layer = norm_layer or _no_norm
        per_stage = [(depth - 2) // 3 + (i < (depth - 2) % 3) for i in range(3)]
        layers: list[nn.Module] = []
        c_in = 1
        for stage, convs in enumerate(per_stage):
            c_out = width * 2 ** stage
            for i in range(convs + (stage == 0)):  # stage 1 also holds the first conv
                stride = 2 if stage and i == 0 else 1
                layers += [conv_layer(c_in, c_out, 3, stride=stride, padding=1, bias=False),
                           norm_layer(c_out), nn.ReLU()]
                if dropout_layer is not None:
                    layers.append(dropout_layer())
                c_in = c_out
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, classes)
        _kaiming(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).mean(dim=(2, 3))  # global average pooling
        return F.log_softmax(self.fc(x), dim=-1)


class BasicBlock(nn.Module):
    """conv3x3 -> norm -> ReLU -> conv3x3 -> norm, plus the shortcut, then ReLU (He et al.,
    Figure 2). The shortcut is the identity, or where the block halves the map and doubles
    the channels, the map subsampled and zero-padded with new channels (their option A, no
    parameters). ``residual_init``: see the module."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm_layer: NormLayer,
                 conv_layer: type[nn.Conv2d], residual_init: str) -> None:
        super().__init__()
        self.conv1 = conv_layer(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = norm_layer(c_out)
        self.conv2 = conv_layer(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = norm_layer(c_out)
        self.stride, self.pad = stride, c_out - c_in
        self.residual_init = residual_init
        if residual_init == "skipinit":
            self.gain = nn.Parameter(torch.zeros(1))
        elif residual_init == "fixup":
            self.bias1a, self.bias1b, self.bias2a, self.bias2b = (
                nn.Parameter(torch.zeros(1)) for _ in range(4))
            self.scale = nn.Parameter(torch.ones(1))

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1 and not self.pad:
            return x
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.pad))  # zeros for the new channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fixup = self.residual_init == "fixup"
        if fixup:
            x = x + self.bias1a  # the shortcut sees the biased input too, as in Fixup's code
        out = self.norm1(self.conv1(x))
        out = F.relu(out + self.bias1b if fixup else out)
        out = self.norm2(self.conv2(out + self.bias2a if fixup else out))
        if fixup:
            out = out * self.scale + self.bias2b
        elif self.residual_init == "skipinit":
            out = out * self.gain
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """``ResNet(norm_layer, depth=20, width=16, residual_init="standard")``: depth = 6n+2
    (8, 14, 20, 32, 44, 56, 110), n basic blocks per stage. Returns log-probabilities
    (N, 10). At width 16 with BatchNorm, ResNet-20 has 269,434 parameters (He et al.'s
    0.27M, less the 288 weights of two more input channels)."""

    def __init__(self, norm_layer: NormLayer | None = None, depth: int = 20, width: int = 16,
                 residual_init: str = "standard",
                 dropout_layer: Callable[[], nn.Module] | None = None,
                 conv_layer: type[nn.Conv2d] = nn.Conv2d, classes: int = 10) -> None:
        super().__init__()
        _check("resnet", depth, width, 8)
        if (depth - 2) % 6:
            raise ConfigError("net_options", f"resnet's depth must be 6n+2 (8, 14, 20, 32, 44, "
                                             f"56, 110), got {depth}")
        if residual_init not in RESIDUAL_INITS:
            raise ConfigError("net_options", f"resnet's residual_init must be one of "
                                             f"{', '.join(RESIDUAL_INITS)}, "
                                             f"got {residual_init!r}")
        norm_layer = norm_layer or _no_norm
        n = (depth - 2) // 6
        self.residual_init = residual_init
        self.conv1 = conv_layer(1, width, 3, padding=1, bias=False)
        self.norm1 = norm_layer(width)
        blocks: list[nn.Module] = []
        c_in = width
        for stage in range(3):
            c_out = width * 2 ** stage
            for i in range(n):
                blocks.append(BasicBlock(c_in, c_out, 2 if stage and i == 0 else 1,
                                         norm_layer, conv_layer, residual_init))
                if dropout_layer is not None:
                    blocks.append(dropout_layer())
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c_in, classes)
        _kaiming(self)
        if residual_init == "fixup":
            self.bias1, self.bias2 = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
            branches = [b for b in self.blocks if isinstance(b, BasicBlock)]
            for block in branches:  # He init times L^(-1/2); the branch's last conv zero
                with torch.no_grad():
                    block.conv1.weight.mul_(len(branches) ** -0.5)
                nn.init.zeros_(block.conv2.weight)
            nn.init.zeros_(self.fc.weight)
            nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(self.conv1(x))
        x = F.relu(x + self.bias1 if self.residual_init == "fixup" else x)
        x = self.blocks(x).mean(dim=(2, 3))  # global average pooling
        if self.residual_init == "fixup":
            x = x + self.bias2
        return F.log_softmax(self.fc(x), dim=-1)
