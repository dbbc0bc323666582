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
    text for ``key =`` within the right table ([protocol], the n-th [[variant]], ...).

    A key may be dotted (``axes.lr``): it is found as written in the table (``axes.lr =``)
    or in a sub-table of it (``[variant.axes]`` after the n-th ``[[variant]]`` holds its
    ``lr =``); where the whole key is not written, the line of its longest written prefix
    (``axes = { lr = [...] }``), else the table's header."""

    HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")

    def __init__(self, text: str, path: Path):
        self.path = path
        self.lines = text.splitlines()
        # blocks: (table name, index among arrays of that name, first line no, end line no);
        # a sub-table of an array's element ([variant.axes]) takes that element's index
        self.blocks: list[tuple[str, int, int, int]] = []
        counts: dict[str, int] = {}
        start, current, index = 0, "", 0
        for i, line in enumerate(self.lines):
            m = self.HEADER.match(line)
            if m:
                self.blocks.append((current, index, start, i))
                current = m.group(2).replace(" ", "").replace('"', "").replace("'", "")
                if m.group(1) == "[[":
                    index = counts.get(current, 0)
                    counts[current] = index + 1
                else:
                    parts = current.split(".")
                    index = next((counts[p] - 1 for p in (".".join(parts[:n]) for n in
                                  range(len(parts) - 1, 0, -1)) if p in counts), 0)
                start = i
        self.blocks.append((current, index, start, len(self.lines)))

    def _find(self, table: str, index: int, key: list[str]) -> int | None:
        segments = [rf"(\"{re.escape(k)}\"|'{re.escape(k)}'|{re.escape(k)})" for k in key]
        pattern = re.compile(r"^\s*" + r"\s*\.\s*".join(segments) + r"\s*=")
        for name, idx, start, end in self.blocks:
            if name == table and idx == index:
                for i in range(start, end):
                    if pattern.match(self.lines[i]):
                        return i + 1
        return None

    def line(self, key: str | None, table: str = "", index: int = 0) -> int | None:
        """1-based line of ``key`` (dotted: ``axes.lr``) in ``table`` (the index-th for
        arrays of tables); with key None the table's header line."""
        header = next((start + 1 for name, idx, start, _ in self.blocks
                       if name == table and idx == index), None) if table else None
        if key is None:
            return header
        parts = key.split(".")
        for n in range(len(parts), 0, -1):  # the whole key, then shorter prefixes
            for split in range(n):  # parts[:split] in a sub-table's header, the rest as key
                sub = ".".join(p for p in (table, *parts[:split]) if p)
                found = self._find(sub, index, parts[split:n])
                if found:
                    return found
            sub = ".".join(p for p in (table, *parts[:n]) if p)  # the prefix as a [table]
            found = next((start + 1 for name, idx, start, _ in self.blocks
                          if name == sub and idx == index), None)
            if found:
                return found
        return header

    def where(self, key: str | None, table: str = "", index: int = 0) -> str:
        line = self.line(key, table, index)
        return f"{self.path}:{line}" if line else str(self.path)


# ----------------------------------------------------------------------------- writing


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def toml_text(data: dict[str, Any]) -> str:
    """``data`` as TOML text that :func:`parse_toml` reads back equal. A table of the root
    is a ``[table]`` (its own tables ``[table.sub]``), a list of tables ``[[table]]``; a
    table inside one of those is written as dotted keys where it stands (``axes.lr = [...]``),
    so its keys keep their order. Strings are escaped as JSON escapes them, floats written
    by ``repr``. Anything but str, int, float, bool, list and dict (None: TOML has no null)
    is a TypeError."""
    lines: list[str] = []
    _write_table(data, [], lines)
    return "\n".join(lines).lstrip("\n") + "\n"


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _write_table(data: dict[str, Any], path: list[str], lines: list[str]) -> None:
    # TOML wants a table's own keys before the headers of its sub-tables
    for key, value in data.items():
        if not isinstance(value, dict) and not _is_table_array(value):
            lines.append(f"{toml_key(key)} = {toml_value(value)}")
    for key, value in data.items():
        header = ".".join(toml_key(k) for k in (*path, key))
        if isinstance(value, dict):
            lines += ["", f"[{header}]"]
            _write_table(value, [*path, key], lines)
        elif _is_table_array(value):
            for item in value:
                lines += ["", f"[[{header}]]"]
                _write_dotted(item, [], lines)


def _write_dotted(data: dict[str, Any], prefix: list[str], lines: list[str]) -> None:
    for key, value in data.items():
        if isinstance(value, dict) and value:
            _write_dotted(value, [*prefix, key], lines)
        else:
            dotted = ".".join(toml_key(k) for k in (*prefix, key))
            lines.append(f"{dotted} = {toml_value(value)}")


def toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _toml_string(key)


def _toml_string(text: str) -> str:
    # JSON's escapes are TOML's; DEL, which JSON leaves alone, TOML wants escaped
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def toml_value(value: Any) -> str:
    """One value in TOML: a string, bool, int, float, list or (inline) table."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{toml_key(k)} = {toml_value(v)}"
                                for k, v in value.items()) + " }"
    raise TypeError(f"{value!r} ({type(value).__name__}) has no TOML form")
