"""Files: atomic writes (a temp file in the same folder, then a rename, so a reader or a
resumed run after a kill never sees half a file), and TOML reading."""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | Path, write: Callable[[str], object]) -> Path:
    """Call ``write(tmp_path)``, then rename the temp file to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def write_json(path: str | Path, data: object) -> Path:
    return write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def parse_toml(text: str, path: str | Path) -> dict[str, Any]:
    """TOML text read from ``path``; a syntax error is a ValueError naming the file."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML: {err}") from err


class TomlLines:
    """Finds the line of a key in the TOML text: tomllib keeps no positions, so scan the
    text for ``key =`` within the right table ([protocol], the n-th [[variant]], ...)."""

    HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")

    def __init__(self, text: str, path: Path):
        self.path = path
        self.lines = text.splitlines()
        # blocks: (table name, index among arrays of that name, first line no, end line no)
        self.blocks: list[tuple[str, int, int, int]] = []
        counts: dict[str, int] = {}
        start, current, index = 0, "", 0
        for i, line in enumerate(self.lines):
            m = self.HEADER.match(line)
            if m:
                self.blocks.append((current, index, start, i))
                current = m.group(2).replace(" ", "").replace('"', "")
                if m.group(1) == "[[":
                    index = counts.get(current, 0)
                    counts[current] = index + 1
                else:
                    index = 0
                start = i
        self.blocks.append((current, index, start, len(self.lines)))

    def line(self, key: str | None, table: str = "", index: int = 0) -> int | None:
        """1-based line of ``key`` in ``table`` (the index-th for arrays of tables); with
        key None the table's header line."""
        for name, idx, start, end in self.blocks:
            if name != table or idx != index:
                continue
            if key is None:
                return start + 1 if table else None
            k = re.escape(key)
            pattern = re.compile(rf"^\s*(\"{k}\"|'{k}'|{k})\s*=")
            for i in range(start, end):
                if pattern.match(self.lines[i]):
                    return i + 1
            return start + 1 if table else None
        return None

    def where(self, key: str | None, table: str = "", index: int = 0) -> str:
        line = self.line(key, table, index)
        return f"{self.path}:{line}" if line else str(self.path)
