"""The in-memory dataset: ``load_dataset(name)`` -> :class:`Dataset`.

Images stay uint8 (N, 28, 28) exactly as the files hold them (47 MB for MNIST's training
set), so the caller can keep the whole set on its device and normalise per batch with
``mean`` and ``std``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch

from normlab.data import sources

# name -> (mean, std) of the training pixels in [0, 1], and the class names by label
STATS = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530)}
CLASSES = {
    "mnist": tuple(str(digit) for digit in range(10)),
    "fashion-mnist": (
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ),
}


@dataclass(frozen=True, eq=False)  # eq=False: tensors have no single truth value
class Dataset:
    name: str
    train_images: torch.Tensor = field(repr=False)  # uint8 (N, 28, 28)
    train_labels: torch.Tensor = field(repr=False)  # int64 (N,)
    test_images: torch.Tensor = field(repr=False)
    test_labels: torch.Tensor = field(repr=False)
    mean: float
    std: float
    classes: tuple[str, ...]


def _tensor(array: np.ndarray) -> torch.Tensor:
    # Arrays over a bytes object are read-only; torch wants a writable buffer.
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def load_dataset(name: str, root: str | os.PathLike | None = None) -> Dataset:
    """Load ``"mnist"`` or ``"fashion-mnist"``, verified by SHA-256, from the first source
    that has it: ``root`` (the four IDX files, raw or .gz, also in torchvision's layout),
    the cache, the official mirrors, then an offline copy. See :mod:`normlab.data.sources`.

    Raises ``ValueError`` for an unknown name and ``DataUnavailableError`` (a
    ``ValueError``) listing every source and why it failed when none has the data.
    """
    arrays = sources.fetch(name, root).arrays
    mean, std = STATS[name]
    return Dataset(
        name=name,
        train_images=_tensor(arrays["train-images-idx3-ubyte"]),
        train_labels=torch.from_numpy(arrays["train-labels-idx1-ubyte"].astype(np.int64)),
        test_images=_tensor(arrays["t10k-images-idx3-ubyte"]),
        test_labels=torch.from_numpy(arrays["t10k-labels-idx1-ubyte"].astype(np.int64)),
        mean=mean,
        std=std,
        classes=CLASSES[name],
    )
