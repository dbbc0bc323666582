"""Typed config fields: the one error type a bad option raises, and the one check of a raw
value (from TOML, JSON or the command line) against a field's declared type.

Every config dataclass (``ModelConfig``, ``Protocol``, ``RunConfig``) validates itself in
``__post_init__`` through :func:`coerce` and raises :class:`ConfigError` naming the field, so
a caller that knows where a field came from (a TOML line, a command-line flag) can say so
without re-checking anything itself.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any


class ConfigError(ValueError):
    """A bad config value. ``field`` names the option (``"groups"``, ``"lr"``, ...)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def coerce(field: str, value: Any, kind: type, *, optional: bool = False) -> Any:
    """``value`` checked against ``kind`` (bool, int, float or str); an int is accepted for a
    float and returned as one. ``optional`` also admits None."""
    if value is None and optional:
        return None
    is_bool = isinstance(value, bool)
    if kind is bool:
        ok = is_bool
    elif kind is float:
        ok = isinstance(value, (int, float)) and not is_bool
    else:
        ok = isinstance(value, kind) and not is_bool
    if not ok:
        words = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
        raise ConfigError(field, f"{field} must be {words.get(kind, kind.__name__)}, "
                                 f"got {value!r}")
    return float(value) if kind is float else value


def check_keys(data: dict[str, Any], valid: list[str] | tuple[str, ...], what: str) -> None:
    """Raise ConfigError on the first key of ``data`` that is not in ``valid``."""
    import difflib

    for key in data:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(key, f"unknown {what} {key!r}{hint}; valid keys: "
                                   f"{', '.join(valid)}")


_SCALARS = (bool, int, float, str, type(None))


class Options(Mapping[str, Any]):
    """Keyword options (a norm's ``norm_options``, a network's ``net_options``) as a
    read-only, hashable mapping, so a ModelConfig stays hashable; equal to a dict with the
    same items. Values are JSON's: numbers, bools, strings, null, and lists of them (held
    as tuples). ``field`` names the option in errors."""

    def __init__(self, data: Mapping[str, Any] | None = None, field: str = "norm_options"
                 ) -> None:
        self.field = field
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(field, f"{field} must be a table of keyword options, e.g. "
                                     f"{{momentum = 0.01}}, got {data!r}")
        items = {}
        for key, value in data.items():
            if not isinstance(key, str) or not key.isidentifier():
                raise ConfigError(field, f"{field} keys are keyword names, got {key!r}")
            if isinstance(value, list | tuple) and all(isinstance(v, _SCALARS) for v in value):
                value = tuple(value)
            elif not isinstance(value, _SCALARS):
                raise ConfigError(field, f"{field}[{key!r}] must be a number, bool, string "
                                         f"or list, got {value!r}")
            items[key] = value
        self._items = dict(sorted(items.items()))

    def __getitem__(self, key: str) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(self._items.items()))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self.items()) == dict(other.items())

    def __repr__(self) -> str:
        return repr(self._items)

    def __reduce__(self):
        return Options, (self._items, self.field)

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self._items.items()}

    def text(self) -> str:
        """``momentum=0.01, eps=0.001``, for labels."""
        return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in self._items.items())
