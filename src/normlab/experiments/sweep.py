"""Sweep a grid given on the command line: every option takes a comma-separated list, and
each option with two or more values is an axis; the runs are their product x seeds.

The grid is written to OUT/sweep.toml (a suite file with one grid [[variant]]) before
anything trains, so `normlab suite OUT/sweep.toml --out OUT` continues it, as does the same
sweep command; then it runs exactly as `normlab suite` does (finished runs skipped,
interrupted ones resumed, the report at the end). --dry-run prints the plan and writes
nothing.

The axes are ordered net, net options, norm, norm options, groups, weight_std, dropout, l1,
l1_scope, weight_decay, then the protocol fields (the first is the outermost loop), whatever
the order on the command line. A variant is named by one part per axis (bn-lr0.1, or the
norm alone when nothing varies) and labelled by its norm and the values of the other axes.

Examples:
  normlab sweep --norm bn,gn,ln --lr 0.01,0.1 --seeds 3 --out runs/norm-lr
  normlab sweep --net plain --net-option depth=10,20,40 --norm none,bn,gn --lr 0.01,0.1 \\
      --seeds 3 --out runs/depth
  normlab sweep --norm bn --norm-option momentum=0.01,0.1 --precise-bn --epochs 10 \\
      --out runs/bn-momentum
  normlab sweep --norm bn,gn --batch-size 8,64 --subset 2000 --epochs 2 --out /tmp/b --dry-run
  normlab suite runs/depth/sweep.toml --out runs/depth     # the same sweep, continued
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Any

from normlab.accel.compiled import COMPILE
from normlab.experiments.cli import _amount, _amount_or_zero, _count, _seed_list, execute
from normlab.models.config import DROPOUT_DRAWS, KERNELS, MODEL_KEYS
from normlab.probes import add_arguments as add_probe_arguments
from normlab.training.cli import add_run_arguments
from normlab.training.config import L1_SCOPES, PRECISIONS
from normlab.training.protocols import PROTOCOLS, SCHEDULERS, protocol_fields

SWEEP_FILE = "sweep.toml"
# (field, kind) of the model and regularizer options, in axis order; the options tables
# (net_options after net, norm_options after norm) are placed by _axis_order. A kind is a
# type, a tuple of choices, or "norm"/"net" (a name the registry resolves).
FIELDS: tuple[tuple[str, Any], ...] = (
    ("net", "net"), ("norm", "norm"), ("groups", int), ("weight_std", bool),
    ("dropout", float), ("dropout_draw", DROPOUT_DRAWS), ("l1", float), ("l1_scope", L1_SCOPES),
    ("weight_decay", float), ("kernels", KERNELS), ("eval_kernels", KERNELS),
    ("precise_bn", bool),
)
BOOL_WORDS = {"true": True, "false": False}


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _model_fields() -> list[tuple[str, Any]]:
    """FIELDS less those this normlab's models do not have (``net`` before networks)."""
    return [(f, kind) for f, kind in FIELDS if f != "net" or "net" in MODEL_KEYS]


def _protocol_kinds() -> list[tuple[str, Any]]:
    seed = PROTOCOLS["seed"]
    return [(f.name, SCHEDULERS if f.name == "scheduler" else type(getattr(seed, f.name)))
            for f in protocol_fields()]


def configure(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group(
        "model and regularizers (each: one value, or a comma-separated list: an axis)")
    for field, kind in _model_fields():
        _add_list(model, field, kind)
        if field in ("net", "norm"):
            model.add_argument(
                f"--{field}-option", dest=f"{field}_option_values", action="append",
                default=[], metavar="KEY=V1,V2",
                help=f"a keyword option of the {field} (repeatable); two or more values make "
                     f"an axis; values are JSON-ish (numbers, true/false, null, [lists], else "
                     f"strings)")
    proto = parser.add_argument_group(
        "protocol (each field: one value overrides the protocol's, a list is an axis)")
    proto.add_argument("--protocol", default="seed", choices=list(PROTOCOLS),
                       help="the named protocol the fields override (default: seed)")
    for field, kind in _protocol_kinds():
        _add_list(proto, field, kind)

    suite = parser.add_argument_group("suite")
    suite.add_argument("--out", required=True,
                       help=f"output folder: the runs, suite.json, {SWEEP_FILE}, the report")
    suite.add_argument("--name", help="the suite's name (default: the output folder's name)")
    suite.add_argument("--dataset", default="mnist", help="mnist or fashion-mnist")
    suite.add_argument("--subset", type=int, default=None,
                       help="train on the first N training images only")
    suite.add_argument("--precision", choices=PRECISIONS, default=None,
                       help="fp32 or bf16 autocast (default: bf16 where the CPU has AMX or "
                            "AVX512-BF16, else fp32)")
    suite.add_argument("--compile", choices=COMPILE, default=None,
                       help="inductor or off: whether the steps the hand step does not "
                            "take (the zoo, other nets) run under torch.compile "
                            "(default: inductor where a C++ compiler is found)")
    add_probe_arguments(suite)
    seeds = suite.add_mutually_exclusive_group()
    seeds.add_argument("--seeds", type=_count, metavar="K", help="seeds 1..K (default: 1)")
    seeds.add_argument("--seed-list", type=_seed_list, metavar="1,2,3", help="these seeds")
    suite.add_argument("--dry-run", action="store_true",
                       help="print the resolved plan; train and write nothing")
    suite.add_argument("--jobs", type=_count, default=None, metavar="N",
                       help="train N runs at once in worker processes (default: as "
                            "`normlab suite`)")
    ex = parser.add_argument_group("executor (as `normlab suite`'s)")
    ex.add_argument("--executor", choices=("local", "ray"), default=None)
    ex.add_argument("--ray-address", metavar="ADDR")
    ex.add_argument("--cpus-per-run", type=_amount, default=1.0, metavar="N")
    ex.add_argument("--gpus-per-run", type=_amount_or_zero, default=0.0, metavar="N")
    add_run_arguments(parser)


def _add_list(group, field: str, kind: Any) -> None:
    if kind is bool:
        group.add_argument(_flag(field), dest=f"v_{field}", nargs="?", const="true",
                           default=None, metavar="true,false",
                           help=f"{field} (alone: true; true,false: an axis)")
        return
    words = {int: "integers", float: "numbers", str: "strings",
             "norm": "norms by name (bn, gn, ln, ...: `normlab summary --help`) or import path",
             "net": "networks by name (seed, mlp, plain, resnet) or import path"}
    what = f"{', '.join(kind)}" if isinstance(kind, tuple) else words[kind]
    group.add_argument(_flag(field), dest=f"v_{field}", default=None, metavar="LIST",
                       help=f"{field}: {what}")


# ----------------------------------------------------------------------------- values


def split_values(text: str) -> list[str]:
    """``text`` split at its top-level commas: ``[1, 2],[3]`` is two values."""
    parts, depth, quote, current = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
            continue
        current += ch
    parts.append(current.strip())
    return parts


def parse_values(flag: str, text: str, kind: Any) -> list[Any]:
    """The values of one option (a comma-separated list), each checked against ``kind``;
    ValueError naming the flag."""
    from normlab.fields import ConfigError
    from normlab.models.cli import option_value

    values = []
    for item in split_values(text):
        if not item:
            raise ValueError(f"{flag}: an empty value in {text!r}")
        if kind is bool:
            if item.lower() not in BOOL_WORDS:
                raise ValueError(f"{flag}: expected true or false, got {item!r}")
            value = BOOL_WORDS[item.lower()]
        elif kind in (int, float):
            try:
                value = kind(item)
            except ValueError:
                words = "an integer" if kind is int else "a number"
                raise ValueError(f"{flag}: expected {words}, got {item!r}") from None
        elif isinstance(kind, tuple):
            if item not in kind:
                raise ValueError(f"{flag}: expected one of {', '.join(kind)}, got {item!r}")
            value = item
        elif kind in ("norm", "net"):
            try:
                _check_name(kind, item)
            except ConfigError as err:
                raise ValueError(f"{flag}: {err.message}") from None
            value = item
        elif kind == "option":
            value = option_value(item)
        else:
            value = item
        if any(_same(value, v) for v in values):
            raise ValueError(f"{flag}: {item!r} is given twice")
        values.append(value)
    return values


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b


def _check_name(kind: str, name: str) -> None:
    if kind == "norm":
        from normlab.models.norms import norm_spec

        for part in name.split("+"):
            norm_spec(part)
    else:
        from normlab.models.nets import net_spec

        net_spec(name)


def _options(flag: str, pairs: list[str]) -> dict[str, list[Any]]:
    """``--norm-option KEY=V1,V2`` pairs: {key: values}."""
    options: dict[str, list[Any]] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise ValueError(f"{flag}: expected KEY=VALUE or KEY=V1,V2 (e.g. momentum=0.01), "
                             f"got {pair!r}")
        if key in options:
            raise ValueError(f"{flag}: {key} is given twice; list its values in one "
                             f"{flag} {key}=V1,V2")
        options[key] = parse_values(f"{flag} {key}", text, "option")
    return options


# ----------------------------------------------------------------------------- the grid


def _given(args: argparse.Namespace) -> list[tuple[str, str, list[Any]]]:
    """(field, flag, values) of every grid option given, in axis order (net, net options,
    norm, norm options, the other model fields, the protocol fields); an option's field is
    its dotted name, norm_options.momentum."""
    given = []
    for field, kind in [*_model_fields(), *_protocol_kinds()]:
        text = getattr(args, f"v_{field}")
        if text is not None:
            given.append((field, _flag(field), parse_values(_flag(field), text, kind)))
        if field in ("net", "norm"):
            flag = f"--{field}-option"
            for key, values in _options(flag, getattr(args, f"{field}_option_values")).items():
                given.append((f"{field}_options.{key}", f"{flag} {key}", values))
    return given


def _nest(table: dict[str, Any], field: str, value: Any) -> None:
    head, dot, key = field.partition(".")
    if dot:
        table.setdefault(head, {})[key] = value
    else:
        table[field] = value


def sweep_data(args: argparse.Namespace) -> dict[str, Any]:
    """The suite the options describe, as the dict of its TOML file."""
    from normlab.experiments.suite import SLUG

    proto_fields = [f.name for f in protocol_fields()]
    given = _given(args)
    _check_values(args, given)
    axes = [(field, values) for field, _, values in given if len(values) > 1]
    name_parts, label_tail = [], []
    for field, _ in axes:
        short = field.rpartition(".")[2]
        name_parts.append(f"{{{field}}}" if field in ("net", "norm") else f"{short}{{{field}}}")
        # the net's and the norm's labels name their options
        if field.partition(".")[0] not in ("net", "norm", "net_options", "norm_options"):
            label_tail.append(f", {short} {{{field}}}")
    has_net = any(field == "net" for field, _, _ in given)
    variant: dict[str, Any] = {
        "name": "-".join(name_parts) or "{norm}",
        "label": ("{net}, " if has_net else "") + "{norm_label}" + "".join(label_tail),
    }
    overrides: dict[str, Any] = {}
    for field, _, values in given:
        if len(values) == 1:
            _nest(overrides if field in proto_fields else variant, field, values[0])
    if axes:
        variant["axes"] = {}
        for field, values in axes:
            _nest(variant["axes"], field, values)

    name = args.name or Path(args.out).resolve().name
    if not SLUG.match(name):
        raise ValueError(f"--name: a suite's name must be a slug (letters, digits, '-', '_', "
                         f"'.'), got {name!r}" + ("" if args.name else
                                                  " (from --out's folder name); give --name"))
    data: dict[str, Any] = {"name": name, "description": _command(args, given),
                            "dataset": args.dataset}
    data["seeds"] = args.seed_list if args.seed_list else (args.seeds or 1)
    if args.subset is not None:
        data["subset"] = args.subset
    if args.precision:
        data["precision"] = args.precision
    if args.compile:
        data["compile"] = args.compile
    if args.probe:
        data["probe"] = args.probe
    if args.probe_every:
        data["probe_every"] = args.probe_every
    data["protocol"] = {"name": args.protocol, **({"overrides": overrides} if overrides else {})}
    data["variant"] = [variant]
    return data


def _check_values(args: argparse.Namespace, given: list[tuple[str, str, list[Any]]]) -> None:
    """Each value of each option in a combination of the grid (the first value of every
    other option), so that a value no combination takes (--lr -1, --groups 3 with GN) is
    reported by its flag; ValueError."""
    from normlab.fields import ConfigError
    from normlab.training.config import RunConfig

    first = {field: values[0] for field, _, values in given}
    for field, flag, values in given:
        for value in values:
            options: dict[str, Any] = {}
            for f, v in {**first, field: value}.items():
                _nest(options, f, v)
            try:
                RunConfig.from_options(args.protocol, dataset=args.dataset, **options)
            except ConfigError as err:
                culprit = next((g for f, g, _ in given
                                if f == err.field or f.startswith(f"{err.field}.")), flag)
                raise ValueError(f"{culprit}: {err.message}") from None


def _command(args: argparse.Namespace, given: list[tuple[str, str, list[Any]]]) -> str:
    """The sweep as one command line (the options that define it, in axis order)."""
    from normlab.experiments.grid import text

    words = ["normlab", "sweep"]
    for field, flag, values in given:
        if "." in field:
            words += [flag.split()[0], f"{field.partition('.')[2]}={','.join(map(text, values))}"]
        else:
            words += [flag, ",".join(map(text, values))]
    if args.protocol != "seed":
        words += ["--protocol", args.protocol]
    words += ["--dataset", args.dataset]
    if args.subset is not None:
        words += ["--subset", str(args.subset)]
    if args.precision:
        words += ["--precision", args.precision]
    if args.compile:
        words += ["--compile", args.compile]
    if args.probe:
        words += ["--probe", args.probe]
    if args.probe_every:
        words += ["--probe-every", str(args.probe_every)]
    return shlex.join(words)


def sweep_suite(args: argparse.Namespace):
    """(the Suite, its TOML text, the path it is written to) for the options."""
    from normlab.experiments.suite import parse_suite
    from normlab.files import parse_toml, toml_text

    data = sweep_data(args)
    path = Path(args.out) / SWEEP_FILE
    text = (f"# written by `normlab sweep` (the command: description); continue it with\n"
            f"#   {shlex.join(['normlab', 'suite', str(path), '--out', str(args.out)])}\n"
            + toml_text(data))
    try:
        suite = parse_suite(parse_toml(text, path), text, path)
    except ValueError as err:  # a combination the values do not make: no file to point at
        message = str(err)
        if message.startswith(f"{path}:"):
            message = message.split(": ", 1)[1]
        raise ValueError(f"the sweep's grid: {message}") from None
    return suite, text, path


def run(args: argparse.Namespace) -> int:
    from normlab.files import write_text

    suite, text, path = sweep_suite(args)
    return execute(suite, args, before_training=lambda out: write_text(path, text))
