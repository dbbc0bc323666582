"""Sources on this machine: a directory the user names (flat, torchvision's layout, or ours),
the cache (``$NORMLAB_DATA``, else ``~/.cache/normlab``), and Debian's Fashion-MNIST package.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

from normlab.data.pins import FILES, SourceError

TORCHVISION_DIRS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}  # <root>/<dir>/raw

# Fashion-MNIST's offline copy: Debian's dataset-fashion-mnist installs the four .gz here.
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

SOURCE_NOTE = "SOURCE"  # a text file in each cache folder: where its files came from


def data_dir() -> Path:
    """The cache root: ``$NORMLAB_DATA``, else ``~/.cache/normlab``."""
    return Path(os.environ.get("NORMLAB_DATA") or "~/.cache/normlab").expanduser()


def cache_dir(name: str) -> Path:
    return data_dir() / name


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
