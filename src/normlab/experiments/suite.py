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
PYTHONPATH). Everything is checked when the file is loaded, before anything trains: an
unknown key or a bad value (an option the norm does not take) is reported with the file,
the line and the valid choices.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from normlab.fields import ConfigError, check_keys
from normlab.files import TomlLines, parse_toml
from normlab.models import ModelConfig, norm_spec
from normlab.models.config import MODEL_KEYS
from normlab.training.config import REGULARIZER_KEYS, RunConfig, default_precision
from normlab.training.protocols import Protocol, protocol_fields, resolve_protocol

TOP_KEYS = ("name", "description", "dataset", "seeds", "subset", "precision", "augment",
            "precise_bn", "protocol", "variant")
PROTOCOL_KEYS = ("name", "overrides")
VARIANT_KEYS = ("name", "label", *MODEL_KEYS, *REGULARIZER_KEYS, "precise_bn", "protocol")
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
    protocol = _parse_protocol(data.get("protocol", "seed"), fail)
    shared = {"dataset": data.get("dataset", "mnist"), "subset": data.get("subset"),
              "precision": data.get("precision") or default_precision(), "protocol": protocol}
    for key in ("augment", "precise_bn"):
        if key in data:
            shared[key] = data[key]
    try:  # the suite-wide options, checked once before the variants
        RunConfig.from_dict(shared)
    except ConfigError as err:
        fail(err.message, err.field)

    variants_data = data.get("variant")
    if variants_data is None:
        fail("no variants: add at least one [[variant]] table with a name")
    if not isinstance(variants_data, list) or not all(isinstance(v, dict) for v in variants_data):
        fail("variant must be an array of tables: write each one as [[variant]]", "variant")
    variants: list[Variant] = []
    seen: dict[str, int] = {}
    for index, raw in enumerate(variants_data):
        v = _parse_variant(raw, index, shared, fail)
        if v.name in seen:
            fail(
                f"duplicate variant name {v.name!r} (variant #{seen[v.name] + 1} has it too); "
                "variant names must be unique",
                "name", "variant", index,
            )
        seen[v.name] = index
        variants.append(v)

    return Suite(
        name=name, description=description.strip(), source=path.resolve(),
        dataset=shared["dataset"], protocol=protocol, seeds=tuple(seeds),
        subset=shared["subset"], variants=tuple(variants),
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


def _parse_variant(raw: dict[str, Any], index: int, shared: dict[str, Any], fail) -> Variant:
    def vfail(message: str, key: str | None = None):
        who = raw.get("name")
        who = f"variant {who!r}" if isinstance(who, str) else f"variant #{index + 1}"
        fail(f"{who}: {message}", key, "variant", index)

    try:
        check_keys(raw, VARIANT_KEYS, "key")
    except ConfigError as err:
        vfail(err.message, err.field)
    name = raw.get("name")
    if name is None:
        vfail("has no name; every [[variant]] needs name = \"a-slug\"")
    if not isinstance(name, str) or not SLUG.match(name):
        vfail(
            f"name must be a slug (letters, digits, '-', '_', '.', starting with a letter or "
            f"digit; it names the run directory), got {name!r}", "name",
        )
    options = {k: v for k, v in raw.items() if k not in ("name", "label", "protocol")}
    overrides = raw.get("protocol", {})
    if not isinstance(overrides, dict):
        vfail("protocol must be a table of protocol fields, e.g. protocol = { batch_size = 8 }",
              "protocol")
    try:
        check_keys(overrides, [f.name for f in protocol_fields()], "protocol field")
        protocol = dataclasses.replace(shared["protocol"], **overrides)
    except ConfigError as err:
        vfail(f"protocol: {err.message}", "protocol")
    try:
        config = RunConfig.from_dict({**shared, **options, "protocol": protocol})
    except ConfigError as err:
        vfail(err.message, err.field if err.field in raw else None)

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
        "norm": config.norm, "groups": str(config.model.groups),
        "dropout": f"{config.model.dropout:g}",
        "l1": f"{config.l1:g}", "l1_scope": config.l1_scope,
        "weight_decay": f"{config.weight_decay:g}",
        "norm_options": config.model.norm_options.text(),
        **{k: f"{v:g}" if isinstance(v, float) else str(v)
           for k, v in config.model.norm_options.items() if k not in _LABEL_KEYS},
    }


_LABEL_KEYS = ("norm", "groups", "dropout", "l1", "l1_scope", "weight_decay", "norm_options")


def _fill_label(label: str, config: RunConfig, fail) -> str:
    """Fill ``{l1}``, ``{groups}``, ... in a label from the variant's options."""
    values = _label_values(config)
    try:
        return label.format_map(values)
    except (KeyError, IndexError, ValueError) as err:
        fail(f"label {label!r} has a bad placeholder ({err}); placeholders: "
             f"{', '.join('{' + k + '}' for k in values)}; write {{{{ and }}}} for braces")
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
