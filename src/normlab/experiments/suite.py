"""A suite: one dataset, one protocol, a list of seeds and a list of model variants.

A suite is a TOML file::

    name = "s6"                      # optional; default: the file's stem
    description = "..."              # optional
    dataset = "mnist"
    seeds = [1, 2, 3]                # or a count: seeds = 3 means 1, 2, 3
    subset = 2000                    # optional: the first N training images
    precision = "bf16"               # optional: fp32 or bf16 autocast (default: bf16 on CPUs
                                     # with AMX or AVX512-BF16, else fp32)
    augment = "aten"                 # optional: what rotates the training images (normlab's
                                     # C kernel where a compiler is found, else torch's ops)
    precise_bn = true                # optional: also evaluate with PreciseBN statistics
    compile = "off"                  # optional: autograd for the steps normlab would compile
                                     # (the zoo, other nets: inductor where g++ is found)
    stop_at_chance = false           # optional: a run at chance after an epoch trains on
                                     # (default: it stops as diverged); nan always stops
    test_batch = false               # optional: leave the report's test-batch section out
                                     # (it evaluates every checkpoint in five modes)

    [protocol]
    name = "seed"                    # a named protocol (normlab.training.PROTOCOLS)
    [protocol.overrides]             # optional: any protocol field
    epochs = 2

    [[variant]]
    name = "bn"                      # a slug: the run directory is OUT/<name>/seed<k>
    label = "BN"                     # optional; "{l1}" etc. are filled from the options
    norm = "bn"                      # model options: norm, groups, dropout, dropout_draw,
                                     # norm_options, weight_std (and kernels, eval_kernels)
    norm_options = { momentum = 0.01 }   # optional: keyword options of every norm layer
    weight_std = false               # optional: weight standardization (StdConv2d)
    l1 = 1e-4                        # regularizers: l1, l1_scope, weight_decay
    protocol = { batch_size = 8, lr = 0.0125 }   # optional: this variant's protocol fields

A norm is a registered name (``normlab.models.norm_names()``) or your own by import path,
``norm = "mypkg.norms:MyNorm"`` (imported in every process that trains it: put it on
PYTHONPATH).

A [[variant]] with ``axes`` is a grid: one variant per combination of the axes' values::

    [[variant]]
    name = "{norm}-b{batch_size}"            # templates, filled per combination
    label = "{norm_label}, batch {batch_size}"
    dropout = 0.0                            # fixed fields, as in any variant
    axes.batch_size = [2, 4, 8, 16, 32, 64]  # the product; the first axis is the outermost loop
    axes.norm = ["bn", "gn", { name = "gn-ws", norm = "gn", weight_std = true }]
    axes.norm_options.momentum = [0.01, 0.1] # an option: the axis norm_options.momentum
    derive.lr = "0.1 * batch_size / 64"      # computed from the other fields
    exclude = [{ norm = "gn-ws", batch_size = 2 }]   # combinations dropped

- An axis is a field: a variant field (norm, groups, weight_std, l1, ...), a protocol field
  given flat (lr, batch_size, epochs, ...) or an option of an ``*_options`` table by its
  dotted name. A scalar value sets that field; a table value sets each field it holds, so
  an axis of tables zips fields (``axes.batch = [{ batch_size = 2, lr = 0.003125 }, ...]``,
  and such an axis need not be a field); its ``name`` and ``label`` are what ``{axis}``
  gives in the name and label templates.
- ``derive.FIELD``: arithmetic (numbers, field names, + - * / // % **, parentheses) over the
  combination's fields, the suite's where the variant sets none.
- ``exclude``: a combination is dropped if it matches every key of one table (an axis
  compared by its value's name, a field by its value after derive; numbers by value). A
  rule that matches nothing is an error.
- A field set twice (fixed and an axis, two axes, an axis and a derive) is an error.
- Templates: ``{key}`` or ``{key:format_spec}``, ``{{`` and ``}}`` for braces. Keys: each
  axis and every field of the resolved config, flat (an option also by its own name where
  no other field has it: ``{virtual_batch}``, but ``{norm_options.momentum}``); numbers
  are written with ``:g``, bools true/false. In a label ``{norm}`` is the norm's label
  (``GN``, ``no norm``) and ``{norm_label}`` the one with groups, options and "+ WS". A
  name must come out a slug, and every name once. A variant without ``label`` gets one
  from its options (in a grid, with ``, lr 0.1`` for each protocol field or table axis);
  a plain variant's name and label may use placeholders too.

The grid is expanded when the file is loaded: the plan, suite.json and the report see the
plain variants. Everything is checked then, before anything trains: an unknown key or a
bad value (an option the norm does not take) is reported with the file, the line, the
variant (its name template) and the valid choices.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from normlab.experiments.grid import (
    GRID_KEYS,
    Combination,
    Fields,
    GridError,
    expand,
    fill,
    flatten,
    text,
)
from normlab.fields import ConfigError, check_keys
from normlab.files import TomlLines, parse_toml
from normlab.models import ModelConfig, norm_spec
from normlab.models.config import MODEL_KEYS
from normlab.training.config import REGULARIZER_KEYS, RunConfig, default_precision
from normlab.training.protocols import Protocol, protocol_fields, resolve_protocol

TOP_KEYS = ("name", "description", "dataset", "seeds", "subset", "precision", "augment",
            "compile", "precise_bn", "probe", "probe_every", "protocol", "stop_at_chance",
            "test_batch", "variant")
PROTOCOL_KEYS = ("name", "overrides")
VARIANT_KEYS = ("name", "label", *MODEL_KEYS, *REGULARIZER_KEYS, "precise_bn", "probe",
                "probe_every", "stop_at_chance", "protocol", *GRID_KEYS)
PROTOCOL_FIELDS = tuple(f.name for f in protocol_fields())
# what an axis, a derive or an exclude rule may name: every variant field and protocol
# field, flat, and each option of an option table (norm_options.momentum)
_OPTION_TABLES = tuple(k for k in MODEL_KEYS if k.endswith("_options"))
FIELDS = Fields(plain=(*(k for k in MODEL_KEYS if k not in _OPTION_TABLES), *REGULARIZER_KEYS,
                       "precise_bn", "stop_at_chance", *PROTOCOL_FIELDS),
                protocol=PROTOCOL_FIELDS, tables=_OPTION_TABLES)
SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


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
    test_batch: bool = True  # the report's test-batch section (suite.json says when False)

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(name)

    def with_config(self, **changes) -> Suite:
        """The suite with ``changes`` (RunConfig fields, e.g. ``precision="bf16"``) applied
        to every variant."""
        return self.map_configs(lambda c: dataclasses.replace(c, **changes))

    def with_model(self, **changes) -> Suite:
        """The suite with ``changes`` (ModelConfig fields) applied to every variant."""
        return self.map_configs(
            lambda c: dataclasses.replace(c, model=dataclasses.replace(c.model, **changes)))

    def map_configs(self, change) -> Suite:
        """The suite with every variant's config replaced by ``change(config)``."""
        return dataclasses.replace(self, variants=tuple(
            dataclasses.replace(v, config=change(v.config)) for v in self.variants))

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
    return parse_suite(parse_toml(text, path), text, path)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ----------------------------------------------------------------------------- parsing


def parse_suite(data: dict[str, Any], text: str, path: Path) -> Suite:
    """Resolve a parsed TOML suite. Every value is checked by the config classes themselves;
    their ConfigError names the field, which is mapped here to its line in the file."""
    loc = TomlLines(text, path)

    def fail(message: str, key: str | None = None, table: str = "", index: int = 0):
        raise ValueError(f"{loc.where(key, table, index)}: {message}")

    try:
        check_keys(data, TOP_KEYS, "key")
    except ConfigError as err:
        fail(err.message, err.field)

    name = data.get("name", path.stem)
    if not isinstance(name, str) or not SLUG.match(name):
        fail(f"name must be a slug (letters, digits, '-', '_', '.'), got {name!r}", "name")
    description = data.get("description", "")
    if not isinstance(description, str):
        fail(f"description must be a string, got {description!r}", "description")
    seeds = parse_seeds(data.get("seeds", [1]), lambda msg: fail(msg, "seeds"))
    test_batch = data.get("test_batch", True)
    if not isinstance(test_batch, bool):
        fail(f"test_batch must be true or false, got {test_batch!r}", "test_batch")
    protocol = _parse_protocol(data.get("protocol", "seed"), fail)
    shared = {"dataset": data.get("dataset", "mnist"), "subset": data.get("subset"),
              "precision": data.get("precision") or default_precision(), "protocol": protocol}
    for key in ("augment", "precise_bn", "compile", "probe", "probe_every", "stop_at_chance"):
        if key in data:
            shared[key] = data[key]
    try:  # the suite-wide options, checked once before the variants
        base = template_values(RunConfig.from_dict(shared), label=False)
    except ConfigError as err:
        fail(err.message, err.field)

    variants_data = data.get("variant")
    if variants_data is None:
        fail("no variants: add at least one [[variant]] table with a name")
    if not isinstance(variants_data, list) or not all(isinstance(v, dict) for v in variants_data):
        fail("variant must be an array of tables: write each one as [[variant]]", "variant")
    variants: list[Variant] = []
    seen: dict[str, tuple[int, str]] = {}
    for index, raw in enumerate(variants_data):
        for v, where in _parse_variants(raw, index, shared, base, fail):
            if v.name in seen:
                other, other_where = seen[v.name]
                who = raw.get("name") if isinstance(raw.get("name"), str) else f"#{index + 1}"
                fail(f"variant {who!r}: duplicate variant name {v.name!r}"
                     f"{' (' + where + ')' if where else ''} (variant #{other + 1}"
                     f"{' (' + other_where + ')' if other_where else ''} has it too); "
                     "variant names must be unique", "name", "variant", index)
            seen[v.name] = (index, where)
            variants.append(v)

    return Suite(
        name=name, description=description.strip(), source=path.resolve(),
        dataset=shared["dataset"], protocol=protocol, seeds=tuple(seeds),
        subset=shared["subset"], variants=tuple(variants), test_batch=test_batch,
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


def _parse_protocol(raw: Any, fail) -> Protocol:
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
    overrides = raw.get("overrides", {})
    if not isinstance(overrides, dict):
        fail("protocol overrides must be a table ([protocol.overrides])", "overrides", "protocol")
    try:
        return resolve_protocol(raw.get("name", "seed"), overrides)
    except ConfigError as err:
        if err.field == "name":
            fail(err.message, "name", "protocol")
        fail(err.message, err.field, "protocol.overrides")
        raise  # unreachable: fail raises


def _parse_variants(raw: dict[str, Any], index: int, shared: dict[str, Any],
                    base: dict[str, Any], fail) -> list[tuple[Variant, str]]:
    """The variants of one [[variant]] table (one, or a grid's), each with its
    combination in words (``norm=bn, lr=0.1``; empty for a plain variant)."""
    template = raw.get("name")
    who = f"variant {template!r}" if isinstance(template, str) else f"variant #{index + 1}"

    def vfail(message: str, key: str | None = None):
        fail(f"{who}: {message}", key, "variant", index)

    try:
        check_keys(raw, VARIANT_KEYS, "key")
    except ConfigError as err:
        vfail(err.message, err.field)
    if template is None:
        vfail("has no name; every [[variant]] needs name = \"a-slug\"")
    if not isinstance(template, str) or not template:
        vfail(f"name must be a slug (letters, digits, '-', '_', '.'), or a template of one "
              f"such as \"{{norm}}-lr{{lr}}\", got {template!r}", "name")
    label_template = raw.get("label")
    if label_template is not None and (not isinstance(label_template, str)
                                       or not label_template.strip()):
        vfail(f"label must be a non-empty string, got {label_template!r}", "label")
    fixed = {k: v for k, v in raw.items() if k not in ("name", "label", *GRID_KEYS)}
    try:
        combos, unused = expand(raw, flatten(fixed, FIELDS, lambda k: k, "variant"), FIELDS,
                                base)
    except GridError as err:
        vfail(err.message, err.key)

    variants: list[tuple[Variant, str]] = []
    named: dict[str, str] = {}
    for combo in combos:
        where = combo.describe()

        def cfail(message: str, key: str | None = None, where: str = where):
            vfail(f"{where}: {message}" if where else message, key)

        config = _combination_config(combo, shared, cfail)
        name = _fill(template, "name", config, combo, vfail)
        if not SLUG.match(name):
            if name == template:
                vfail(f"name must be a slug (letters, digits, '-', '_', '.', starting with a "
                      f"letter or digit; it names the run directory), got {name!r}", "name")
            vfail(f"name {template!r} gives {name!r}{' for ' + where if where else ''}, not a "
                  f"slug (letters, digits, '-', '_', '.', starting with a letter or digit; it "
                  f"names the run directory)", "name")
        if name in named:
            vfail(f"name {template!r} gives {name!r} for both {named[name]} and {where}: put "
                  f"the axes that differ in the name", "name")
        named[name] = where
        label = (_default_grid_label(config, combo) if label_template is None
                 else _fill(label_template, "label", config, combo, vfail))
        variants.append((Variant(name=name, label=label, config=config), where))
    for err in unused:
        vfail(err.message, err.key)
    return variants


def _default_grid_label(config: RunConfig, combo: Combination) -> str:
    """:func:`default_label`, and for each axis it does not show (a protocol field, an axis
    of tables) ``, lr 0.1``."""
    label = default_label(config)
    for choice in combo.choices:
        if choice.axis in PROTOCOL_FIELDS or choice.axis not in FIELDS:
            label += f", {choice.axis} {choice.label or choice.name}"
    return label


def _combination_config(combo: Combination, shared: dict[str, Any], fail) -> RunConfig:
    """The RunConfig of one combination's flat fields; a ConfigError is reported at the
    key that set the field."""
    overrides: dict[str, Any] = {}
    run: dict[str, Any] = {}
    options: dict[str, dict[str, Any]] = {}
    for f, value in combo.fields.items():
        if f in PROTOCOL_FIELDS:
            overrides[f] = value
        elif "." in f:
            table, _, key = f.partition(".")
            options.setdefault(table, {})[key] = value
        else:
            run[f] = value
    for table, values in options.items():
        run[table] = {**run[table], **values} if isinstance(run.get(table), dict) else values

    def source(name: str) -> str | None:
        return combo.sources.get(name) or next(
            (key for f, key in combo.sources.items() if f.startswith(f"{name}.")), None)

    try:
        protocol = dataclasses.replace(shared["protocol"], **overrides)
    except ConfigError as err:
        key = source(err.field)
        fail(f"protocol: {err.message}" if key == "protocol" else err.message, key)
    try:
        return RunConfig.from_dict({**shared, **run, "protocol": protocol})
    except ConfigError as err:
        fail(err.message, source(err.field))
        raise  # unreachable: fail raises


def _short(path: str) -> str:
    """A norm's or net's name as names write it: ``Attr`` for an import path
    ``pkg.mod:Attr``."""
    return path.rpartition(":")[2]


def template_values(config: RunConfig, combo: Combination | None = None, *,
                    label: bool) -> dict[str, Any]:
    """What each ``{key}`` of a name (``label=False``) or label template gives: every field
    of ``config``, flat (norm, groups, dropout, l1, lr, batch_size, ...; an option by its
    dotted name ``norm_options.momentum``, and by its own name where no other field has
    it; ``norm_options`` as ``momentum=0.01``), and each axis of ``combo`` by its value's
    name (in a label: by its label where it has one). In a label ``{norm}`` is the norms'
    labels (``GN``), ``{norm_label}`` :func:`norm_label` (``GN (2 groups) + WS``) and
    ``{net}`` the net's label; in a name ``{norm}`` and ``{net}`` are their names."""
    model = config.model
    values: dict[str, Any] = {}
    for key in MODEL_KEYS:
        value = getattr(model, key, None)
        if key.endswith("_options") and isinstance(value, Mapping):
            values[key] = value.text() if hasattr(value, "text") else text(value)
            values.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            values[key] = value
    values.update({f.name: getattr(config, f.name) for f in dataclasses.fields(config)
                   if f.name not in ("model", "protocol", "seed")})
    values.update({f: getattr(config.protocol, f) for f in PROTOCOL_FIELDS})
    own = Counter(k.partition(".")[2] for k in values if "." in k)
    for key in [k for k in values if "." in k]:
        short = key.partition(".")[2]
        if own[short] == 1 and short not in values:
            values[short] = values[key]
    net = getattr(model, "net", None)
    if label:
        values["norm"] = " + ".join(norm_spec(n).label for n in model.norms)
        values["norm_label"] = norm_label(model)
        if net is not None:
            values["net"] = _net_label(model)
    else:
        values["norm"] = "+".join(_short(n) for n in model.norms)
        if net is not None:
            values["net"] = _short(str(getattr(net, "name", net)))
    for choice in combo.choices if combo else ():
        if isinstance(choice.value, dict):
            if not label:
                values[choice.axis] = choice.name
            elif choice.label is not None:
                values[choice.axis] = choice.label
            elif choice.axis not in FIELDS:
                values[choice.axis] = choice.name
        values.setdefault(choice.axis, choice.value)
    return values


def _net_label(model: ModelConfig) -> str:
    try:
        from normlab.models.nets import net_label
    except ImportError:  # a normlab without networks by name
        return str(model.net)
    return net_label(model)


def _fill(template: str, what: str, config: RunConfig, combo: Combination, fail) -> str:
    """A name or label template filled for one combination."""
    values = template_values(config, combo, label=what == "label")
    try:
        return fill(template, values)
    except ValueError as err:
        fail(f"{what} {template!r} has a bad placeholder ({err}); placeholders: "
             f"{', '.join('{' + k + '}' for k in values)}; write {{{{ and }}}} for braces",
             what)
        raise  # unreachable: fail raises


def norm_label(model: ModelConfig) -> str:
    """The model's norm(s) by their specs' labels, e.g. ``GN (2 groups)``, ``BN
    (momentum=0.01)``, ``GN (2 groups) + WS`` (weight standardization)."""
    parts = []
    for name in model.norms:
        spec = norm_spec(name)
        part = spec.label
        if spec.grouped:
            part += f" ({model.groups} group{'s' if model.groups != 1 else ''})"
        parts.append(part)
    label = " + ".join(parts)
    if model.norm_options:
        label += f" ({model.norm_options.text()})"
    if model.weight_std:
        label += " + WS"
    return label


def default_label(config: RunConfig) -> str:
    """A human name from the options, e.g. ``GN (2 groups) + L1 (λ=0.0001)``; a network
    other than the seed's comes first: ``ResNet-20 + SkipInit, no norm``."""
    from normlab.models import net_label, net_spec

    model = config.model
    label = norm_label(model)
    if model.net != "seed":
        label = f"{net_label(model)}, {label}"
    if config.l1:
        scope = ", conv weights" if config.l1_scope == "conv" else ""
        label += f" + L1 (λ={config.l1:g}{scope})"
    if config.weight_decay:
        label += f" + L2 (wd={config.weight_decay:g})"
    if model.dropout != net_spec(model.net).dropout:
        label += f", dropout {model.dropout:g}"
    return label
