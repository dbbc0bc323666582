"""Grids in suite files: every bundled suite plans exactly as normlab 0.10.1 did (its
variants written out one by one), the grid rules (axis order, zipped table values, derive,
exclude, option axes, templates) and each error's file:line."""

import json
import re
import textwrap
from pathlib import Path

import pytest

import normlab.accel.kernels as kernels
from normlab.experiments import format_plan, load_suite, manifest
from normlab.experiments.grid import GridError, evaluate, fill, parse_expression
from normlab.experiments.suite import bundled_suites
from normlab.files import TomlLines

PLANS = json.loads((Path(__file__).parent / "data" / "plans-0.10.1.json").read_text())

HEAD = """\
dataset = "mnist"
seeds = [1]
subset = 300

[protocol]
name = "seed"

[protocol.overrides]
epochs = 1
"""  # 9 lines: a variant written after it starts on line 11


@pytest.fixture
def as_0_10_1(monkeypatch):
    """The host plans-0.10.1.json was written on, as any host can be: fp32 by default (no
    native bf16) and normlab's kernels (a C compiler)."""
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setattr(kernels, "compiler", lambda: "/usr/bin/cc")


def suite_file(tmp_path, body: str, name: str = "grid.toml") -> Path:
    path = tmp_path / name
    path.write_text(HEAD + "\n" + textwrap.dedent(body).lstrip("\n"))
    return path


def load(tmp_path, body: str):
    return load_suite(suite_file(tmp_path, body))


def names(suite) -> list[str]:
    return [v.name for v in suite.variants]


# ----------------------------------------------------------------------------- bundled


# Bundled suites added after 0.10.1 (no stored plan): what each is checked by instead.
ADDED = {"bn-paper": "tests/test_probes.py (its report section at a test's size)",
         "weight-decay": "tests/test_probes.py (its report section at a test's size)",
         "ics": "tests/test_probes.py (its report section at a test's size)",
         "depth": "tests/test_depth.py (its report section at a test's size)"}


def test_every_bundled_suite_has_a_stored_plan():
    assert set(bundled_suites()) == set(PLANS) | set(ADDED)


# Bundled suites changed on purpose since 0.10.1, and how: the variants kept (by norm) and
# the seeds. The batch-size studies: BN, GN, LN and IN on 6 seeds (issue 29: at 3 seeds the
# verdict flipped on a disjoint set; BRN, GN + WS and FRN moved out to afford the seeds).
NARROWED = {name: ({"bn", "gn", "ln", "in"}, list(range(1, 7)))
            for name in ("batch-sizes", "batch-sizes-fashion")}


def narrowed(name: str) -> dict:
    """0.10.1's plan of ``name`` as changed on purpose since (:data:`NARROWED`)."""
    want = json.loads(json.dumps(PLANS[name]))
    if name not in NARROWED:
        return want
    norms, seeds = NARROWED[name]
    plan = want["manifest"]
    plan["variants"] = [v for v in plan["variants"] if v["config"]["model"]["norm"] in norms
                        and not v["config"]["model"].get("weight_std")]
    plan["seeds"] = seeds
    return want


@pytest.mark.parametrize("name", sorted(PLANS))
def test_bundled_suites_plan_exactly_as_0_10_1(name, as_0_10_1):
    suite = load_suite(name)
    got = manifest(suite, suite.seeds)
    del got["source"], got["runs"]
    want = narrowed(name)
    if name in NARROWED:  # the changed description and plan: the variants and seeds above
        assert got["variants"] == want["manifest"]["variants"]
        assert got["seeds"] == want["manifest"]["seeds"]
        return
    assert [v["name"] for v in got["variants"]] == [v["name"] for v in want["manifest"]
                                                   ["variants"]]  # the order, first
    assert got == want["manifest"]
    lines = format_plan(suite, "OUT").splitlines()
    lines[0] = lines[0].split("  ")[0]  # "suite NAME  (SOURCE)": the source differs by host
    assert lines == want["dry_run"]


def test_the_study_suites_are_short_grids():
    folder = Path(load_suite("lr-range").source).parent
    for name in ("lr-range", "lr-range-quick", "batch-sizes", "batch-sizes-fashion",
                 "ghost-batch", "running-stats", "bn-paper", "weight-decay", "ics", "depth"):
        text = (folder / f"{name}.toml").read_text()
        assert text.count("[[variant]]") == 1 and "axes." in text, name
        assert len(text.splitlines()) < 60, name
        assert not re.search(r"\d+(\.\d+)? ?(s|min|minutes)\b", text.split('description')[0]), \
            f"{name}: measured times belong in benchmarks/README.md"


# ----------------------------------------------------------------------------- the rules


def test_the_first_axis_is_the_outermost_loop(tmp_path):
    suite = load(tmp_path, """
        [[variant]]
        name = "{norm}-b{batch_size}"
        axes.batch_size = [8, 16]
        axes.norm = ["bn", "ln", "in"]
    """)
    assert names(suite) == ["bn-b8", "ln-b8", "in-b8", "bn-b16", "ln-b16", "in-b16"]
    assert suite.variant("ln-b16").config.protocol.batch_size == 16
    assert suite.variant("ln-b16").config.protocol.epochs == 1  # the rest: the suite's


def test_a_sub_table_of_axes_and_plain_variants_beside_a_grid(tmp_path):
    suite = load(tmp_path, """
        [[variant]]
        name = "bn"
        norm = "bn"

        [[variant]]
        name = "{norm}-lr{lr}"
        dropout = 0.0

        [variant.axes]
        norm = ["gn", "ln"]
        lr = [0.01, 0.1]
    """)
    assert names(suite) == ["bn", "gn-lr0.01", "gn-lr0.1", "ln-lr0.01", "ln-lr0.1"]
    assert [v.label for v in suite.variants][:3] == [  # default labels
        "BN", "GN (2 groups), dropout 0, lr 0.01", "GN (2 groups), dropout 0, lr 0.1"]
    assert suite.variant("ln-lr0.1").config.model.dropout == 0.0


def test_table_values_zip_fields_and_name_and_label_the_axis(tmp_path):
    suite = load(tmp_path, """
        [[variant]]
        name = "{norm}-{batch}"
        label = "{norm}, {batch}"
        axes.norm = ["bn", { name = "gn-ws", label = "GN + WS", norm = "gn", weight_std = true }]
        axes.batch = [{ name = "small", label = "batch 2", batch_size = 2, lr = 0.003125 },
                      { batch_size = 64, lr = 0.1 }]
    """)
    assert names(suite) == ["bn-small", "bn-64-0.1", "gn-ws-small", "gn-ws-64-0.1"]
    assert [v.label for v in suite.variants] == [
        "BN, batch 2", "BN, 64-0.1", "GN + WS, batch 2", "GN + WS, 64-0.1"]
    small = suite.variant("gn-ws-small").config
    assert (small.protocol.batch_size, small.protocol.lr) == (2, 0.003125)
    assert small.model.norm == "gn" and small.model.weight_std


def test_derive_and_exclude(tmp_path):
    suite = load(tmp_path, """
        [[variant]]
        name = "{norm}-b{batch_size}"
        label = "{norm_label}, batch {batch_size}, lr {lr:.4f}"
        axes.batch_size = [2, 8, 64]
        axes.norm = ["bn", "in", { name = "gn-ws", norm = "gn", weight_std = true }]
        derive.lr = "0.1 * batch_size / 64"
        derive.step_size = "-(-epochs * 3 // 2) + batch_size % 3 - 2 ** 1"
        exclude = [{ norm = "in", batch_size = 2 }, { norm = "gn-ws", lr = 0.0125 }]
    """)
    assert names(suite) == ["bn-b2", "gn-ws-b2", "bn-b8", "in-b8", "bn-b64", "in-b64",
                            "gn-ws-b64"]
    p = suite.variant("bn-b8").config.protocol
    assert p.lr == 0.1 * 8 / 64 and p.step_size == 2 + 2 - 2
    assert suite.variant("gn-ws-b2").label == "GN (2 groups) + WS, batch 2, lr 0.0031"


def test_option_axes_and_their_placeholders(tmp_path):
    suite = load(tmp_path, """
        [[variant]]
        name = "gbn-v{virtual_batch}-m{norm_options.momentum}"
        label = "{norm} ({norm_options}), momentum {momentum}, v {virtual_batch:03d}"
        norm = "gbn"
        norm_options = { eps = 1e-3 }
        axes.norm_options.momentum = [0.01, 0.5]
        axes.norm_options.virtual_batch = [4, 16]
    """)
    assert names(suite) == ["gbn-v4-m0.01", "gbn-v16-m0.01", "gbn-v4-m0.5", "gbn-v16-m0.5"]
    config = suite.variant("gbn-v16-m0.5").config
    assert dict(config.model.norm_options) == {"eps": 1e-3, "momentum": 0.5, "virtual_batch": 16}
    # {momentum} alone is the protocol's (SGD) momentum: the option's is norm_options.momentum
    assert suite.variant("gbn-v16-m0.5").label == (
        "GBN (eps=0.001, momentum=0.5, virtual_batch=16), momentum 0.9, v 016")


def test_templates_format_numbers_bools_and_braces(tmp_path):
    suite = load(tmp_path, """
        [[variant]]
        name = "ws{weight_std}-l1{l1}-lr{lr:.0e}"
        label = "{{{norm}}} ws={weight_std} λ={l1} lr={lr} e={epochs} {l1_scope}"
        axes.weight_std = [false, true]
        axes.l1 = [1e-5, 3.0]
        axes.lr = [0.001]
    """)
    assert names(suite)[:2] == ["wsfalse-l11e-05-lr1e-03", "wsfalse-l13-lr1e-03"]
    assert suite.variants[-1].label == "{BN} ws=true λ=3 lr=0.001 e=1 all"
    values = {"x": 0.001, "y": 3.0, "z": 1e-05, "b": True, "s": "gn"}
    assert fill("{x}|{y}|{z}|{b}|{s}|{{}}|{y:.2f}", values) == "0.001|3|1e-05|true|gn|{}|3.00"


def test_a_plain_variant_may_use_placeholders(tmp_path):
    suite = load(tmp_path, """
        [[variant]]
        name = "{norm}-g{groups}"
        label = "IN, dropout {dropout}, λ={l1}, {norm_options}"
        norm = "gn"
        groups = 1
        norm_options = { eps = 1e-3 }
    """)
    assert [(v.name, v.label) for v in suite.variants] == [
        ("gn-g1", "IN, dropout 0.01, λ=0, eps=0.001")]


def test_the_expression_evaluator_computes_arithmetic_only():
    def value(expression, **names):
        return evaluate(parse_expression(expression, "derive.x"), expression, "derive.x",
                        names.__getitem__)

    assert value("0.1 * b / 64", b=8) == 0.0125
    assert value("-(a // 3) + a % 3 - 2 ** 3 + +1", a=7) == -2 + 1 - 8 + 1
    for bad in ("__import__('os')", "a.__class__()", "[1]", "a if a else 1", "f(1)",
                "'x'", "True", "lambda: 1", "a < 1", "a[0]", "(1).real"):
        with pytest.raises(GridError, match=r"derive\.x = .* is not (allowed|an expr)"):
            parse_expression(bad, "derive.x")
    with pytest.raises(GridError, match=r"unknown name 'a\.__class__'"):  # a name, no getattr
        value("a.__class__", a=1)
    with pytest.raises(GridError, match="exponent"):
        value("10 ** 10 ** 10")
    with pytest.raises(GridError, match="division by zero"):
        value("1 / 0")


def test_toml_lines_finds_keys_in_sub_tables_of_the_nth_variant(tmp_path):
    text = textwrap.dedent("""\
        [[variant]]
        name = "a"
        axes.lr = [1]
        [[variant]]
        name = "b"
        axes . norm_options . momentum = [0.1]
        [variant.axes]
        norm = ["bn"]
        [variant.axes.norm_options]
        eps = [1e-3]
        [variant.derive]
        lr = "1"
    """)
    lines = TomlLines(text, tmp_path / "x.toml")
    assert lines.line("axes.lr", "variant", 0) == 3
    assert lines.line("axes.norm_options.momentum", "variant", 1) == 6
    assert lines.line("axes.norm", "variant", 1) == 8
    assert lines.line("axes.norm_options.eps", "variant", 1) == 10
    assert lines.line("derive.lr", "variant", 1) == 12
    assert lines.line("axes.lr", "variant", 1) == 7  # not written: its longest prefix
    assert lines.line("exclude", "variant", 1) == 4  # nothing: the variant's header


# ----------------------------------------------------------------------------- errors

GRID = """\
[[variant]]
name = "{norm}-lr{lr}"
label = "{norm}, lr {lr}"
dropout = 0.0
axes.norm = ["bn", "gn"]
axes.lr = [0.01, 0.1]
derive.weight_decay = "lr / 100"
exclude = [{ norm = "gn", lr = 0.01 }]
"""  # after HEAD: lines 11-18

ERRORS = [
    # (what to change in GRID, the line, words the message must contain)
    (("axes.lr", "axes.lrr"), 16, ["unknown axis field 'lrr'", "did you mean 'lr'?"]),
    (("dropout = 0.0", "lr = 0.1"), 14, ["unknown key 'lr'"]),
    (("dropout = 0.0", "norm = \"ln\""), 15, ["field 'norm' is set twice", "fixed field",
                                              "axis 'norm'"]),
    (("axes.lr = [0.01, 0.1]", "axes.lr = [0.01, 0.1]\naxes.b = [{ lr = 0.1 }]"), 17,
     ["field 'lr' is set twice", "axis 'lr'", "axis 'b'"]),
    (("weight_decay", "lr"), 17, ["field 'lr' is set twice", "derive.lr"]),
    (('"lr / 100"', '"lr / / 100"'), 17, ["derive.weight_decay", "not an expression"]),
    (('"lr / 100"', '"lr.real"'), 17, ["derive.weight_decay", "unknown name 'lr.real'"]),
    (('"lr / 100"', '"lrate / 100"'), 17, ["derive.weight_decay", "unknown name 'lrate'"]),
    (('"lr / 100"', '"norm"'), 17, ["derive.weight_decay", "norm is 'bn', not a number"]),
    (('"lr / 100"', '"open(1)"'), 17, ["derive.weight_decay", "'open(1)' is not allowed"]),
    (('derive.weight_decay', 'derive.wd'), 17, ["derive: unknown field 'wd'"]),
    (('name = "{norm}-lr{lr}"', 'name = "{norm}"'), 12,
     ["variant '{norm}'", "name '{norm}' gives 'bn' for both norm=bn, lr=0.01 and norm=bn, "
      "lr=0.1"]),
    (('name = "{norm}-lr{lr}"', 'name = "{norm}/{lr}"'), 12,
     ["variant '{norm}/{lr}'", "gives 'bn/0.01' for norm=bn, lr=0.01, not a slug"]),
    (('name = "{norm}-lr{lr}"', 'name = "{norm}-{lambda}"'), 12,
     ["bad placeholder", "unknown placeholder {lambda}", "{lr}"]),
    (('label = "{norm}, lr {lr}"', 'label = "{norm}, lr {lr:d}"'), 13,
     ["bad placeholder", "{lr:d} does not fit 0.01"]),
    (("axes.lr = [0.01, 0.1]", "axes.lr = []"), 16, ["axis 'lr' is empty"]),
    (("axes.lr = [0.01, 0.1]", "axes.lr = 0.1"), 16, ["axis 'lr' must be a list"]),
    (("axes.norm = [\"bn\", \"gn\"]\naxes.lr = [0.01, 0.1]", "axes = [\"bn\"]"), 15,
     ["axes must be a table"]),
    (("axes.lr = [0.01, 0.1]", "axes.lr = [0.01, -1]"), 16,
     ["norm=bn, lr=-1: lr must be > 0"]),
    (("axes.norm = [\"bn\", \"gn\"]", "axes.norm = [\"bn\", \"gnn\"]"), 15,
     ["norm=gnn, lr=0.01: unknown norm 'gnn'"]),
    (("axes.norm = [\"bn\", \"gn\"]", "axes.norm = [\"bn\", { norm = \"gn\", grops = 1 }]"),
     15, ["axis 'norm' value #2: unknown field 'grops'", "did you mean 'groups'?"]),
    (('{ norm = "gn", lr = 0.01 }', '{ norm = "in" }'), 18,
     ["exclude #1 (norm=in) matches no combination"]),
    (('{ norm = "gn", lr = 0.01 }', '{ nrom = "gn" }'), 18,
     ["exclude #1: 'nrom' is neither an axis", "did you mean 'norm'?"]),
]


@pytest.mark.parametrize(("change", "line", "words"), ERRORS,
                         ids=[e[0][1][:24] for e in ERRORS])
def test_bad_grids_name_file_line_variant_and_field(tmp_path, change, line, words):
    old, new = change
    assert old in GRID
    path = suite_file(tmp_path, GRID.replace(old, new, 1))
    with pytest.raises(ValueError) as err:
        load_suite(path)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}:{line}: variant '"), message
    for word in words:
        assert word in message, message


def test_a_grid_name_taken_by_another_variant_names_both(tmp_path):
    path = suite_file(tmp_path, 'GRID\n[[variant]]\nname = "gn-lr0.1"\nnorm = "gn"\n'
                      .replace("GRID\n", GRID))
    with pytest.raises(ValueError, match=re.escape(
            f"{path}:20: variant 'gn-lr0.1': duplicate variant name 'gn-lr0.1' (variant #1 "
            "(norm=gn, lr=0.1) has it too)")):
        load_suite(path)


def test_nothing_trains_on_a_bad_grid(tmp_path, capsys):
    from normlab.cli import main

    path = suite_file(tmp_path, GRID.replace("axes.lr", "axes.lrr"))
    out = tmp_path / "out"
    assert main(["suite", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"normlab suite: error: {path}:16: variant '{{norm}}-lr{{lr}}': "
                          "unknown axis field 'lrr'") and "\n" not in err
    assert not out.exists()


def test_the_readme_stays_short_and_shows_a_grid_and_a_sweep():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert len(text.split()) < 1500
    assert "\naxes." in text and "derive." in text and "\nnormlab sweep " in text
