"""A user's own norm or network by import path, ``"package.module:Attr"``, resolved without
calling anything it names.

A config.json in a folder someone sends you is data: the import path it names must resolve
to the kind of thing meant (an ``nn.Module`` subclass, or a spec object) before anything is
called. :func:`resolve` imports the module and walks the attribute; :func:`module_class`
accepts only an ``nn.Module`` subclass, so ``builtins:print`` or ``os:getcwd`` is refused
without being called.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

from torch import nn

from normlab.fields import ConfigError

PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def is_path(name: str) -> bool:
    """Whether ``name`` is an import path (``"package.module:Attr"``) rather than a name."""
    return ":" in name


def resolve(path: str, field: str) -> Any:
    """The object ``path`` names (the module imported, the attribute looked up, nothing
    called), or a ConfigError naming ``field`` and what went wrong."""
    if not PATH.match(path):
        raise ConfigError(field, f"{field} {path!r} is not an import path of the form "
                                 "'package.module:Attr'")
    module_name, attr = path.split(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as err:
        raise ConfigError(field, f"{field} {path!r}: module {module_name!r} does not import "
                                 f"({type(err).__name__}: {err}); it must be importable in "
                                 "every process that trains it (PYTHONPATH, or an installed "
                                 "package)") from err
    where = module_name
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(field, f"{field} {path!r}: {where} has no attribute {part!r}")
        obj, where = getattr(obj, part), f"{where}.{part}"
    return obj


def module_class(path: str, obj: Any, field: str, spec: str) -> type[nn.Module]:
    """``obj`` if it is an ``nn.Module`` subclass, else a ConfigError saying what ``path``
    must name instead (``spec``: the spec class's name)."""
    if isinstance(obj, type) and issubclass(obj, nn.Module):
        return obj
    kind = f"class {obj.__name__}" if isinstance(obj, type) else type(obj).__name__
    raise ConfigError(field, f"{field} {path!r} names a {kind}, not an nn.Module subclass or "
                             f"a {spec}; nothing was called")
