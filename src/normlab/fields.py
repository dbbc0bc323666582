"""Typed config fields: the one error type a bad option raises, and the one check of a raw
value (from TOML, JSON or the command line) against a field's declared type.

Every config dataclass (``ModelConfig``, ``Protocol``, ``RunConfig``) validates itself in
``__post_init__`` through :func:`coerce` and raises :class:`ConfigError` naming the field, so
a caller that knows where a field came from (a TOML line, a command-line flag) can say so
without re-checking anything itself.
"""

from __future__ import annotations

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
