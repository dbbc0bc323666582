"""Grids: a [[variant]] table with ``axes`` stands for one variant per combination of their
values (the rules: :mod:`normlab.experiments.suite`'s docstring).

This module is the grid language alone, over flat field names (``norm``, ``lr``,
``norm_options.momentum``): its axes, their product, ``derive`` expressions, ``exclude``
rules and name/label templates. What a field means, and the RunConfig each combination
becomes, is :mod:`normlab.experiments.suite`'s. Every error is a :class:`GridError` naming
the key of the variant table it is about (``axes.lr``, ``derive.lr``), so the suite loader
can say on which line of the file it is.
"""

from __future__ import annotations

import ast
import difflib
import itertools
import math
import operator
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

GRID_KEYS = ("axes", "derive", "exclude")
_TEXT_KEYS = ("name", "label")  # in a table axis value: what {axis} gives in templates


class GridError(ValueError):
    """A bad grid. ``key`` is the key of the variant table it is about (dotted: ``axes.lr``,
    ``derive.lr``; None: the variant as a whole)."""

    def __init__(self, key: str | None, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


@dataclass(frozen=True)
class Fields:
    """The field names a grid may set: ``plain`` ones (variant and protocol fields, flat),
    ``protocol`` (those of them that a ``protocol = { ... }`` table holds) and ``tables``
    (option tables such as ``norm_options``, whose keys are fields by their dotted names,
    ``norm_options.momentum``)."""

    plain: tuple[str, ...]
    protocol: tuple[str, ...]
    tables: tuple[str, ...]

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        table, dot, key = name.partition(".")
        return (table in self.tables and key.isidentifier()) if dot else name in self.plain

    def describe(self) -> str:
        protocol = set(self.protocol)
        variant = [f for f in self.plain if f not in protocol]
        tables = ", ".join(f"{t}.KEY" for t in self.tables)
        return (f"variant fields ({', '.join(variant)}), protocol fields "
                f"({', '.join(self.protocol)}) or options ({tables})")


@dataclass(frozen=True)
class Choice:
    """One value of one axis: the fields it sets, and what ``{axis}`` gives in a name
    (``name``) and in a label (``label``; None: the field's own label)."""

    axis: str
    name: str
    label: str | None
    fields: dict[str, Any]
    value: Any  # as written: a scalar, or the table


@dataclass
class Combination:
    """One point of a grid: its choices (one per axis, in axis order) and every field it
    sets, flat, each with the key of the variant table that set it."""

    choices: tuple[Choice, ...]
    fields: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def choice(self, axis: str) -> Choice | None:
        return next((c for c in self.choices if c.axis == axis), None)

    def describe(self) -> str:
        """``norm=bn, lr=0.1``: the combination by its axes' value names."""
        return ", ".join(f"{c.axis}={c.name}" for c in self.choices)


def text(value: Any) -> str:
    """A value as templates write it: numbers with ``:g`` (0.001, 3, 1e-05), bools as
    true/false, lists as [a, b], tables as k=v, k=v."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(text(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={text(v)}" for k, v in value.items())
    if value is None:
        return "none"
    return str(value)


def same(a: Any, b: Any) -> bool:
    """Equality as exclude rules compare: numbers by value, a bool only to a bool."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    return a == b


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# ----------------------------------------------------------------------------- fields


def flatten(table: Mapping[str, Any], fields: Fields, key: Callable[[str], str],
            what: str) -> dict[str, tuple[Any, str]]:
    """The flat fields a table sets (a variant's fixed fields, or a table axis value):
    ``{field: (value, key)}``; a ``protocol = { ... }`` table and option tables are
    flattened (``lr``, ``norm_options.momentum``). ``key(k)`` is the variant-table key to
    name in errors for the table's key ``k``; ``what`` says whose field it is."""
    flat: dict[str, tuple[Any, str]] = {}
    for k, value in table.items():
        if k == "protocol" and "protocol" not in fields.plain:
            if not isinstance(value, dict):
                raise GridError(key(k), "protocol must be a table of protocol fields, e.g. "
                                        "protocol = { batch_size = 8 }")
            for p, v in value.items():
                if p not in fields.protocol:
                    raise GridError(key(k), f"protocol: unknown protocol field {p!r}"
                                            f"{_suggest(p, list(fields.protocol))}; valid "
                                            f"keys: {', '.join(fields.protocol)}")
                flat[p] = (v, key(k))
        elif k in fields.tables and isinstance(value, dict):
            for o, v in value.items():
                flat[f"{k}.{o}"] = (v, key(f"{k}.{o}"))
        elif k in fields or k in fields.tables:
            flat[k] = (value, key(k))
        else:
            valid = [*fields.plain, *fields.tables]
            raise GridError(key(k), f"{what}: unknown field {k!r}{_suggest(k, valid)}; fields "
                                    f"are {fields.describe()}")
    return flat


# ----------------------------------------------------------------------------- axes


def _axis_items(axes: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted name, values) of each axis: ``axes.norm_options.momentum = [...]`` is a
    nested table in TOML, the axis ``norm_options.momentum`` here."""
    items = []
    for name, values in axes.items():
        if isinstance(values, dict):
            items += _axis_items(values, f"{prefix}{name}.")
        else:
            items.append((f"{prefix}{name}", values))
    return items


def parse_axes(axes: Any, fields: Fields) -> list[tuple[str, list[Choice]]]:
    """Each axis, in the order written (the first is the outermost loop), with its
    choices."""
    if not isinstance(axes, dict):
        raise GridError("axes", f"axes must be a table of axis = [values], e.g. "
                                f"axes.lr = [0.01, 0.1], got {axes!r}")
    items = _axis_items(axes)
    if not items:
        raise GridError("axes", "axes is empty: give at least one axis, e.g. "
                                "axes.lr = [0.01, 0.1]")
    parsed = []
    for name, values in items:
        key = f"axes.{name}"
        if not isinstance(values, list):
            raise GridError(key, f"axis {name!r} must be a list of values, got {values!r}")
        if not values:
            raise GridError(key, f"axis {name!r} is empty: give it at least one value")
        parsed.append((name, [_choice(name, v, i, fields, key) for i, v in enumerate(values)]))
    return parsed


def _choice(axis: str, value: Any, i: int, fields: Fields, key: str) -> Choice:
    if not isinstance(value, dict):
        if axis not in fields or axis in fields.tables:
            raise GridError(key, f"unknown axis field {axis!r}{_suggest(axis, list(fields.plain))}"
                                 f": an axis is one of the {fields.describe()}, or any name "
                                 f"whose values are all tables of fields")
        return Choice(axis, text(value), None, {axis: value}, value)
    where = f"axis {axis!r} value #{i + 1}"
    for k in _TEXT_KEYS:
        if k in value and (not isinstance(value[k], str) or not value[k]):
            raise GridError(key, f"{where}: {k} must be a non-empty string, got {value[k]!r}")
    rest = {k: v for k, v in value.items() if k not in _TEXT_KEYS}
    if axis in fields.tables:  # axes.norm_options = [{ momentum = 0.01 }, ...]: options
        rest = {axis: rest}
    sets = {f: v for f, (v, _) in flatten(rest, fields, lambda k: key, where).items()}
    if not sets:
        raise GridError(key, f"{where} sets no field: a table value sets fields, e.g. "
                             f"{{ batch_size = 8, lr = 0.0125 }}")
    default = text(sets[axis]) if axis in sets else "-".join(text(v) for v in sets.values())
    if axis in fields.tables:
        default = text({k.partition(".")[2]: v for k, v in sets.items()})
    return Choice(axis, value.get("name", default), value.get("label"), sets, value)


# ----------------------------------------------------------------------------- expand


def expand(raw: Mapping[str, Any], fixed: dict[str, tuple[Any, str]], fields: Fields,
           base: Mapping[str, Any]) -> tuple[list[Combination], list[GridError]]:
    """Every combination of a variant table (``raw``) in order: the product of its axes
    (none: one combination), each with the ``fixed`` fields, its axes' fields and the
    derived ones, less the excluded; and an error for each exclude rule that matched
    nothing (for the caller to raise once the combinations are known to be good: a typo
    in an axis value is the better message). ``base``: the flat values of fields the
    variant does not set (the suite's), for derive expressions and exclude rules."""
    axes = parse_axes(raw["axes"], fields) if "axes" in raw else []
    derive = _parse_derive(raw.get("derive", {}), fields)
    _check_sources(axes, fixed, derive)
    axis_names = [name for name, _ in axes]
    rules = _parse_exclude(raw.get("exclude", []), axis_names, fields)

    combos = []
    for choices in itertools.product(*(c for _, c in axes)):
        combo = Combination(tuple(choices))
        for f, (value, key) in fixed.items():
            combo.fields[f], combo.sources[f] = value, key
        for choice in choices:
            for f, value in choice.fields.items():
                combo.fields[f], combo.sources[f] = value, f"axes.{choice.axis}"
        for f, (tree, expression) in derive.items():
            combo.fields[f] = evaluate(tree, expression, f"derive.{f}",
                                       lambda n, c=combo: _lookup(n, c, base))
            combo.sources[f] = f"derive.{f}"
        combos.append(combo)

    kept = []
    used = [False] * len(rules)
    for combo in combos:
        hits = [i for i, rule in enumerate(rules) if _matches(rule, combo, base)]
        for i in hits:
            used[i] = True
        if not hits:
            kept.append(combo)
    if not kept:
        raise GridError("exclude", "exclude drops every combination")
    return kept, [GridError("exclude", f"exclude #{i + 1} ({text(rule)}) matches no "
                                       "combination: check its keys and values")
                  for i, rule in enumerate(rules) if not used[i]]


def _check_sources(axes: list[tuple[str, list[Choice]]], fixed: dict[str, tuple[Any, str]],
                   derive: dict[str, Any]) -> None:
    """A field may be set by one source only: a fixed field, one axis, or a derive."""
    owner = {f: (key, f"the fixed field {key!r}") for f, (_, key) in fixed.items()}
    for name, choices in axes:
        key = f"axes.{name}"
        for f in dict.fromkeys(f for c in choices for f in c.fields):
            if f in owner:
                raise GridError(key, f"field {f!r} is set twice: by {owner[f][1]} and by "
                                     f"axis {name!r}")
        for f in dict.fromkeys(f for c in choices for f in c.fields):
            owner[f] = (key, f"axis {name!r}")
    for f in derive:
        if f in owner:
            raise GridError(f"derive.{f}", f"field {f!r} is set twice: by {owner[f][1]} and "
                                           f"by derive.{f}")


def _lookup(name: str, combo: Combination, base: Mapping[str, Any]) -> Any:
    if name in combo.fields:
        return combo.fields[name]
    choice = combo.choice(name)
    if choice is not None and not isinstance(choice.value, dict):
        return choice.value
    if name in base:
        return base[name]
    raise KeyError(name)


def _matches(rule: dict[str, Any], combo: Combination, base: Mapping[str, Any]) -> bool:
    for key, want in rule.items():
        choice = combo.choice(key)
        if choice is not None:
            got = choice.value if not isinstance(choice.value, dict) else choice.name
        else:
            got = _lookup(key, combo, base) if key in combo.fields or key in base else None
        if not same(got, want):
            return False
    return True


def _parse_exclude(rules: Any, axes: list[str], fields: Fields) -> list[dict[str, Any]]:
    if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
        raise GridError("exclude", f"exclude must be a list of tables, e.g. exclude = "
                                   f"[{{ norm = \"in\", batch_size = 2 }}], got {rules!r}")
    for i, rule in enumerate(rules):
        if not rule:
            raise GridError("exclude", f"exclude #{i + 1} is empty: it would drop everything")
        for key in rule:
            if key not in axes and key not in fields:
                raise GridError("exclude", f"exclude #{i + 1}: {key!r} is neither an axis "
                                           f"({', '.join(axes) or 'none'}) nor a field"
                                           f"{_suggest(key, [*axes, *fields.plain])}")
    return rules


# ----------------------------------------------------------------------------- derive

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_SYNTAX = ("numbers, names of fields, + - * / // % **, unary minus and parentheses, e.g. "
           "\"0.1 * batch_size / 64\"")


def _parse_derive(derive: Any, fields: Fields) -> dict[str, tuple[ast.AST, str]]:
    if not isinstance(derive, dict):
        raise GridError("derive", f"derive must be a table of FIELD = \"expression\", e.g. "
                                  f"derive.lr = \"0.1 * batch_size / 64\", got {derive!r}")
    parsed = {}
    for f, expression in _axis_items(derive):
        key = f"derive.{f}"
        if f not in fields or f in fields.tables:
            raise GridError(key, f"derive: unknown field {f!r}"
                                 f"{_suggest(f, list(fields.plain))}; fields are "
                                 f"{fields.describe()}")
        if not isinstance(expression, str):
            raise GridError(key, f"derive.{f} must be an expression in a string, e.g. "
                                 f"\"0.1 * batch_size / 64\", got {expression!r}")
        parsed[f] = (parse_expression(expression, key), expression)
    return parsed


def parse_expression(expression: str, key: str) -> ast.AST:
    """The syntax tree of an arithmetic expression, checked to hold only what
    :func:`evaluate` computes; GridError(key) otherwise."""
    try:
        tree = ast.parse(expression.strip(), mode="eval").body
    except SyntaxError as err:
        raise GridError(key, f"{key} = {expression!r} is not an expression ({err.msg}); "
                             f"write {_SYNTAX}") from None
    for node in ast.walk(tree):
        ok = (isinstance(node, ast.BinOp | ast.UnaryOp | ast.Name | ast.Load | ast.Attribute)
              or type(node) in _BINARY or type(node) in _UNARY
              or (isinstance(node, ast.Constant) and _is_number(node.value)))
        if isinstance(node, ast.Attribute) and _dotted(node) is None:
            ok = False
        if not ok:
            raise GridError(key, f"{key} = {expression!r}: {ast.unparse(node)!r} is not "
                                 f"allowed; write {_SYNTAX}")
    return tree


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _dotted(node: ast.AST) -> str | None:
    """``norm_options.momentum`` for the attribute chain that spells it, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return f"{head}.{node.attr}" if head else None
    return None


def evaluate(tree: ast.AST, expression: str, key: str, lookup: Callable[[str], Any]) -> Any:
    """The value of a parsed arithmetic expression, names read through ``lookup`` (KeyError:
    unknown). Never ``eval``: only numbers, names and the arithmetic operators."""

    def value(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name | ast.Attribute):
            name = _dotted(node)
            try:
                got = lookup(name)
            except KeyError:
                raise GridError(key, f"{key} = {expression!r}: unknown name {name!r}; names "
                                     f"are the fields of the variant (batch_size, lr, "
                                     f"groups, norm_options.KEY, ...)") from None
            if not _is_number(got):
                raise GridError(key, f"{key} = {expression!r}: {name} is {got!r}, not a "
                                     f"number")
            return got
        if isinstance(node, ast.UnaryOp):
            return _UNARY[type(node.op)](value(node.operand))
        left, right = value(node.left), value(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 1024:
            raise GridError(key, f"{key} = {expression!r}: exponent {right} is too large")
        try:
            result = _BINARY[type(node.op)](left, right)
        except (ZeroDivisionError, OverflowError) as err:
            raise GridError(key, f"{key} = {expression!r}: {err}") from None
        if isinstance(result, complex) or (isinstance(result, float) and not
                                           math.isfinite(result)):
            raise GridError(key, f"{key} = {expression!r} gives {result}, not a finite number")
        return result

    return value(tree)


# ----------------------------------------------------------------------------- templates


def placeholders(template: str) -> list[tuple[str, str]]:
    """The ``(key, format_spec)`` of each ``{key}`` / ``{key:spec}`` in a template
    (``{{`` and ``}}`` are braces); ValueError on a malformed one."""
    found = []
    for _, key, spec, conversion in string.Formatter().parse(template):
        if key is None:
            continue
        if not key or conversion or "{" in (spec or ""):
            raise ValueError(f"{{{key}{'!' + conversion if conversion else ''}"
                             f"{':' + spec if spec else ''}}} is not a placeholder")
        found.append((key, spec or ""))
    return found


def fill(template: str, values: Mapping[str, Any]) -> str:
    """``template`` with each ``{key}`` replaced by :func:`text` of ``values[key]`` and each
    ``{key:spec}`` by ``format(values[key], spec)``. ValueError (its message says why) on
    an unknown key, a malformed placeholder or a spec that does not fit the value."""
    placeholders(template)
    out = []
    for literal, key, spec, _ in string.Formatter().parse(template):
        out.append(literal)
        if key is None:
            continue
        if key not in values:
            raise ValueError(f"unknown placeholder {{{key}}}")
        value = values[key]
        if spec:
            try:
                out.append(format(value, spec))
            except (ValueError, TypeError) as err:
                raise ValueError(f"{{{key}:{spec}}} does not fit {value!r} ({err})") from None
        else:
            out.append(text(value))
    return "".join(out)
