"""Batch augmentation with tensor ops: works the same on CPU and CUDA tensors."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rotate(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each image of a (N, 1, H, W) float batch by its own angle (degrees, (N,)).

    Nearest-neighbour sampling, the border filled with 0 (black), rotation about the centre,
    like torchvision's RandomRotation on the seed's PIL images.
    """
    theta = degrees.to(images.dtype) * (math.pi / 180.0)
    cos, sin = torch.cos(theta), torch.sin(theta)
    zeros = torch.zeros_like(cos)
    # affine_grid maps output -> input coordinates; (cos, -sin; sin, cos) turns the content
    # counter-clockwise for positive angles, as torchvision does.
    matrix = torch.stack(
        (torch.stack((cos, -sin, zeros), -1), torch.stack((sin, cos, zeros), -1)), 1
    )
    grid = F.affine_grid(matrix, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def to_input(
    images: torch.Tensor,
    mean: float,
    std: float,
    degrees: torch.Tensor | None = None,
    memory_format: torch.memory_format = torch.channels_last,
) -> torch.Tensor:
    """uint8 (N, H, W) -> normalised float (N, 1, H, W), rotated first when ``degrees`` given."""
    x = images.unsqueeze(1).float().div_(255.0)
    if degrees is not None:
        x = rotate(x, degrees)
    return x.sub_(mean).div_(std).contiguous(memory_format=memory_format)
