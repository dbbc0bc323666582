"""A suite: one dataset, one protocol, a list of seeds and a list of model variants.

A suite is a TOML file::

    name = "s6"                      # optional; default: the file's stem
    description = "..."              # optional
    dataset = "mnist"
    seeds = [1, 2, 3]                # or a count: seeds = 3 means 1, 2, 3
    subset = 2000                    # optional: the first N training images

    [protocol]
    name = "seed"                    # a named protocol (normlab.training.PROTOCOLS)
    [protocol.overrides]             # optional: any protocol field
    epochs = 2

    [[variant]]
    name = "bn"                      # a slug: the run directory is OUT/<name>/seed<k>
    label = "BN"                     # optional; "{l1}" etc. are filled from the options
    norm = "bn"                      # model options: norm, groups, dropout
    l1 = 1e-4                        # regularizers: l1, l1_scope, weight_decay

Everything is checked when the file is loaded, before anything trains: an unknown key or a
bad value is reported with the file, the line and the valid choices.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from normlab.training.config import L1_SCOPES, RunConfig
from normlab.training.protocols import PROTOCOLS, Protocol, protocol_fields, resolve_protocol

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

TOP_KEYS = ("name", "description", "dataset", "seeds", "subset", "protocol", "variant")
PROTOCOL_KEYS = ("name", "overrides")
MODEL_KEYS = ("norm", "groups", "dropout")
REGULARIZER_KEYS = ("l1", "l1_scope", "weight_decay")
VARIANT_KEYS = ("name", "label", *MODEL_KEYS, *REGULARIZER_KEYS)
SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
NORM_LABELS = {"bn": "BN", "ln": "LN", "in": "IN", "none": "no norm"}


@dataclass(frozen=True)
class Variant:
    """One model of a suite: a slug, a human label, and its RunConfig (for seed 1)."""

    name: str
    label: str
    config: RunConfig

    def config_for(self, seed: int) -> RunConfig:
        return dataclasses.replace(self.config, seed=seed)


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    source: Path
    dataset: str
    protocol: Protocol
    seeds: tuple[int, ...]
    subset: int | None
    variants: tuple[Variant, ...]

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(name)

    def runs(self, seeds: list[int] | tuple[int, ...] | None = None) -> list[tuple[Variant, int]]:
        """Every (variant, seed), variant-major within each seed: all variants for the first
        seed, then the next, so a partial suite already compares all variants."""
        return [(v, s) for s in (seeds or self.seeds) for v in self.variants]


def run_dir(variant: str, seed: int) -> str:
    """A run's directory, relative to the suite's output folder."""
    return f"{variant}/seed{seed}"


def bundled_suites() -> list[str]:
    folder = resources.files("normlab.experiments").joinpath("suites")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def find_suite(name_or_path: str | Path) -> Path:
    """A bare name (no '/' and no '.toml') is a bundled suite; anything else is a path."""
    text = str(name_or_path)
    bare = "/" not in text and "\\" not in text and not text.endswith(".toml")
    if bare:
        if text in bundled_suites():
            return Path(str(resources.files("normlab.experiments").joinpath(f"suites/{text}.toml")))
        if Path(text).is_file():
            return Path(text)
        raise ValueError(
            f"no bundled suite named {text!r}; bundled: {', '.join(bundled_suites())} "
            "(or give the path of a .toml file)"
        )
    path = Path(text)
    if not path.is_file():
        raise ValueError(f"suite file {text} does not exist")
    return path


def load_suite(name_or_path: str | Path) -> Suite:
    """Load and fully resolve a suite (bundled name or path); raises ValueError on any error."""
    path = find_suite(name_or_path)
    text = path.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML: {err}") from err
    return parse_suite(data, text, path)


# ----------------------------------------------------------------------------- locating keys


class _Locator:
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


def _unknown(key: str, valid: tuple[str, ...] | list[str], what: str) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown {what} {key!r}{hint}; valid keys: {', '.join(valid)}"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ----------------------------------------------------------------------------- parsing


def parse_suite(data: dict[str, Any], text: str, path: Path) -> Suite:
    loc = _Locator(text, path)

    def fail(message: str, key: str | None = None, table: str = "", index: int = 0):
        raise ValueError(f"{loc.where(key, table, index)}: {message}")

    for key in data:
        if key not in TOP_KEYS:
            fail(_unknown(key, TOP_KEYS, "key"), key)

    name = data.get("name", path.stem)
    if not isinstance(name, str) or not SLUG.match(name):
        fail(f"name must be a slug (letters, digits, '-', '_', '.'), got {name!r}", "name")
    description = data.get("description", "")
    if not isinstance(description, str):
        fail(f"description must be a string, got {description!r}", "description")

    from normlab.data import DATASETS

    dataset = data.get("dataset", "mnist")
    if dataset not in DATASETS:
        fail(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}", "dataset")

    seeds = parse_seeds(data.get("seeds", [1]), lambda msg: fail(msg, "seeds"))

    subset = data.get("subset")
    if subset is not None and (not _is_int(subset) or subset < 1):
        fail(f"subset must be a positive number of training images, got {subset!r}", "subset")

    protocol = _parse_protocol(data.get("protocol", "seed"), loc, fail)

    variants_data = data.get("variant")
    if variants_data is None:
        fail("no variants: add at least one [[variant]] table with a name")
    if not isinstance(variants_data, list) or not all(isinstance(v, dict) for v in variants_data):
        fail("variant must be an array of tables: write each one as [[variant]]", "variant")
    variants: list[Variant] = []
    seen: dict[str, int] = {}
    for index, raw in enumerate(variants_data):
        v = _parse_variant(raw, index, dataset, protocol, subset, loc, fail)
        if v.name in seen:
            fail(
                f"duplicate variant name {v.name!r} (variant #{seen[v.name] + 1} has it too); "
                "variant names must be unique",
                "name", "variant", index,
            )
        seen[v.name] = index
        variants.append(v)

    return Suite(
        name=name, description=description.strip(), source=path.resolve(), dataset=dataset,
        protocol=protocol, seeds=tuple(seeds), subset=subset, variants=tuple(variants),
    )


def parse_seeds(value: Any, fail) -> list[int]:
    """A list of distinct non-negative ints, or a count K meaning 1..K."""
    if _is_int(value):
        if value < 1:
            fail(f"seeds as a count must be >= 1, got {value}")
        return list(range(1, value + 1))
    if not isinstance(value, list) or not value:
        fail(f"seeds must be a non-empty list of integers or a count, got {value!r}")
    bad = [s for s in value if not _is_int(s) or s < 0]
    if bad:
        fail(f"seeds must be non-negative integers, got {bad[0]!r}")
    dupes = sorted({s for s in value if value.count(s) > 1})
    if dupes:
        fail(f"seeds are repeated: {', '.join(map(str, dupes))}")
    return list(value)


def _parse_protocol(raw: Any, loc: _Locator, fail) -> Protocol:
    if isinstance(raw, str):  # protocol = "fast": the shorthand for a name without overrides
        raw = {"name": raw}
    if not isinstance(raw, dict):
        fail(f"protocol must be a table ([protocol] with name = ...), got {raw!r}", "protocol")
    for key in raw:
        if key not in PROTOCOL_KEYS:
            fields = [f.name for f in protocol_fields()]
            hint = (f"; protocol fields such as {key!r} go in [protocol.overrides]"
                    if key in fields else f" (protocol fields go in [protocol.overrides]: "
                    f"{', '.join(fields)})")
            fail(f"unknown key {key!r} in [protocol]; valid keys: {', '.join(PROTOCOL_KEYS)}"
                 f"{hint}", key, "protocol")
    name = raw.get("name", "seed")
    if name not in PROTOCOLS:
        fail(f"unknown protocol {name!r}; choose one of {', '.join(PROTOCOLS)}", "name", "protocol")
    overrides = raw.get("overrides", {})
    if not isinstance(overrides, dict):
        fail("protocol overrides must be a table ([protocol.overrides])", "overrides", "protocol")
    table = "protocol.overrides"
    for key, value in overrides.items():  # one at a time, so an error points at its line
        valid = [f.name for f in protocol_fields()]
        if key not in valid:
            fail(_unknown(key, valid, "protocol field"), key, table)
        try:
            resolve_protocol(name, {key: value})
        except ValueError as err:
            fail(str(err), key, table)
    try:
        return resolve_protocol(name, overrides)
    except ValueError as err:
        fail(str(err), None, table if overrides else "protocol")
        raise  # unreachable: fail raises


def _parse_variant(
    raw: dict[str, Any], index: int, dataset: str, protocol: Protocol, subset: int | None,
    loc: _Locator, fail,
) -> Variant:
    def vfail(message: str, key: str | None = None):
        who = raw.get("name")
        who = f"variant {who!r}" if isinstance(who, str) else f"variant #{index + 1}"
        fail(f"{who}: {message}", key, "variant", index)

    for key in raw:
        if key not in VARIANT_KEYS:
            vfail(_unknown(key, VARIANT_KEYS, "key"), key)
    name = raw.get("name")
    if name is None:
        vfail("has no name; every [[variant]] needs name = \"a-slug\"")
    if not isinstance(name, str) or not SLUG.match(name):
        vfail(
            f"name must be a slug (letters, digits, '-', '_', '.', starting with a letter or "
            f"digit; it names the run directory), got {name!r}", "name",
        )
    defaults = RunConfig.__dataclass_fields__
    opts: dict[str, Any] = {
        k: raw.get(k, defaults[k].default) for k in (*MODEL_KEYS, *REGULARIZER_KEYS)
    }

    from normlab.models import NORMS

    if opts["norm"] not in NORMS:
        vfail(f"unknown norm {opts['norm']!r}; choose one of {', '.join(NORMS)}", "norm")
    if not _is_int(opts["groups"]) or opts["groups"] < 1:
        vfail(f"groups must be a positive integer, got {opts['groups']!r}", "groups")
    if not _is_number(opts["dropout"]) or not 0 <= opts["dropout"] < 1:
        vfail(f"dropout must be a number in [0, 1) (0 turns it off), got {opts['dropout']!r}",
              "dropout")
    for key in ("l1", "weight_decay"):
        if not _is_number(opts[key]) or opts[key] < 0:
            vfail(f"{key} must be a number >= 0, got {opts[key]!r}", key)
        opts[key] = float(opts[key])
    opts["dropout"] = float(opts["dropout"])
    if opts["l1_scope"] not in L1_SCOPES:
        vfail(f"l1_scope must be one of {', '.join(L1_SCOPES)}, got {opts['l1_scope']!r}",
              "l1_scope")
    try:
        config = RunConfig(dataset=dataset, protocol=protocol, subset=subset, **opts)
    except ValueError as err:
        key = "groups" if "group" in str(err).lower() and "groups" in raw else "norm"
        vfail(str(err), key if key in raw else None)

    label = raw.get("label")
    if label is None:
        label = default_label(config)
    elif not isinstance(label, str) or not label.strip():
        vfail(f"label must be a non-empty string, got {label!r}", "label")
    else:
        label = _fill_label(label, config, lambda msg: vfail(msg, "label"))
    return Variant(name=name, label=label, config=config)


def _label_values(config: RunConfig) -> dict[str, str]:
    return {
        "norm": config.norm, "groups": str(config.groups), "dropout": f"{config.dropout:g}",
        "l1": f"{config.l1:g}", "l1_scope": config.l1_scope,
        "weight_decay": f"{config.weight_decay:g}",
    }


def _fill_label(label: str, config: RunConfig, fail) -> str:
    """Fill ``{l1}``, ``{groups}``, ... in a label from the variant's options."""
    values = _label_values(config)
    try:
        return label.format_map(values)
    except (KeyError, IndexError, ValueError) as err:
        fail(f"label {label!r} has a bad placeholder ({err}); placeholders: "
             f"{', '.join('{' + k + '}' for k in values)}; write {{{{ and }}}} for braces")
        raise  # unreachable: fail raises


def default_label(config: RunConfig) -> str:
    """A human name from the options, e.g. ``GN (2 groups) + L1 (λ=0.0001)``."""
    default = RunConfig.__dataclass_fields__
    if config.norm == "gn":
        label = f"GN ({config.groups} group{'s' if config.groups != 1 else ''})"
    else:
        label = NORM_LABELS.get(config.norm, config.norm.upper())
    if config.l1:
        scope = ", conv weights" if config.l1_scope == "conv" else ""
        label += f" + L1 (λ={config.l1:g}{scope})"
    if config.weight_decay:
        label += f" + L2 (wd={config.weight_decay:g})"
    if config.dropout != default["dropout"].default:
        label += f", dropout {config.dropout:g}"
    return label
