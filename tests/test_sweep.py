"""`normlab sweep`: a grid from the command line is the suite a hand-written grid is, its
sweep.toml continues it, bad values fail by their flag before anything is written, and a
sweep killed mid-training resumes to the numbers of an uninterrupted one. Also the TOML
writer it uses."""

import contextlib
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import no_report
from normlab.cli import main
from normlab.experiments import comparable_metrics, load_suite, manifest
from normlab.experiments.sweep import split_values
from normlab.files import parse_toml, toml_text
from normlab.models.config import MODEL_KEYS
from normlab.training import RunDir

HAS_NETS = "net" in MODEL_KEYS

# (flags, the grid's axes, name and label templates, runs per seed, the description); the
# flags in another order than the axes (the sweep orders them), with fixed options
NORM_LR_BATCH = (["--batch-size", "8,64"], """\
    axes.norm = ["none", "bn", "gn"]
    axes.batch_size = [8, 64]
    axes.lr = [0.01, 0.1]
""", "{norm}-batch_size{batch_size}-lr{lr}", "{norm_label}, batch_size {batch_size}, lr {lr}",
    12, "normlab sweep --norm none,bn,gn --dropout 0 --epochs 2 --batch-size 8,64 "
        "--lr 0.01,0.1 --dataset mnist --subset 640")  # (protocol fields: batch_size, lr)
DEPTH = (["--net", "plain", "--net-option", "depth=10,20,40"], """\
    net = "plain"
    axes.net_options.depth = [10, 20, 40]
    axes.norm = ["none", "bn", "gn"]
    axes.lr = [0.01, 0.1]
""", "depth{net_options.depth}-{norm}-lr{lr}", "{net}, {norm_label}, lr {lr}", 18,
    "normlab sweep --net plain --net-option depth=10,20,40 --norm none,bn,gn --dropout 0 "
    "--epochs 2 --lr 0.01,0.1 --dataset mnist --subset 640")
CASES = [NORM_LR_BATCH, *([DEPTH] if HAS_NETS else [])]  # DEPTH: `normlab sweep --help`'s


def sweep_and_toml(case) -> tuple[list[str], str]:
    flags, grid, name, label, _, _ = case
    sweep = ["--lr", "0.01,0.1", "--norm", "none,bn,gn", *flags, "--epochs", "2",
             "--dropout", "0", "--subset", "640", "--seeds", "3"]
    toml = textwrap.dedent(f"""\
        name = "study"
        description = "by hand"
        dataset = "mnist"
        seeds = 3
        subset = 640

        [protocol]
        name = "seed"

        [protocol.overrides]
        epochs = 2

        [[variant]]
        name = "{name}"
        label = "{label}"
        dropout = 0.0
    """) + textwrap.dedent(grid)
    return sweep, toml


def plan_lines(capsys, argv) -> list[str]:
    assert main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("suite study  (")
    return lines[1:]  # the first line names the source file


# ----------------------------------------------------------------------------- the TOML writer


def test_toml_text_reads_back_equal():
    data = {
        "name": 'a "quoted" \\ back\nslash\t λ ± \x7f \x01', "n": -3, "big": 10**20,
        "floats": [0.001, 3.0, 1e-05, -0.0, 1e300, math.inf, -math.inf], "yes": False,
        "empty": [], "nested": [[1, 2], ["x"], []], "inline": [{"a": 1, "b": {"c": [True]}}],
        "odd key": 1, "dotted.key": "v",
        "protocol": {"name": "seed", "overrides": {"epochs": 2, "odd key": {"x": 1}}},
        "variant": [{"name": "{norm}", "norm_options": {}, "axes": {
            "net": ["plain"], "net_options": {"depth": [10, 20]}, "norm": ["bn", {
                "name": "gn-ws", "norm": "gn", "weight_std": True}]}}, {"name": "b"}],
    }
    text = toml_text(data)
    assert parse_toml(text, "x.toml") == data
    assert list(parse_toml(text, "x.toml")["variant"][0]["axes"]) == ["net", "net_options",
                                                                       "norm"]
    assert "axes.net_options.depth = [10, 20]" in text  # in place: the axes keep their order
    assert math.isnan(parse_toml(toml_text({"x": math.nan}), "x")["x"])
    for bad in (None, {1, 2}, object()):
        with pytest.raises(TypeError, match="no TOML form"):
            toml_text({"x": bad})


def test_values_split_at_top_level_commas():
    assert split_values("0.01,0.1") == ["0.01", "0.1"]
    assert split_values("[1, 2],[3],'a,b',{\"k\": 1, \"j\": 2}") == [
        "[1, 2]", "[3]", "'a,b'", '{"k": 1, "j": 2}']


# ----------------------------------------------------------------------------- planning


@pytest.mark.parametrize("case", CASES, ids=[c[2] for c in CASES])
def test_a_sweep_plans_as_the_hand_written_grid(tmp_path, capsys, case):
    sweep, toml = sweep_and_toml(case)
    out = tmp_path / "study"
    swept = plan_lines(capsys, ["sweep", *sweep, "--out", str(out), "--dry-run"])
    path = tmp_path / "by-hand.toml"
    path.write_text(toml)
    by_hand = plan_lines(capsys, ["suite", str(path), "--out", str(out), "--dry-run"])
    assert swept == by_hand
    assert len([line for line in swept if "/seed3 " in line]) == case[4]
    assert not out.exists()  # --dry-run writes nothing


@pytest.mark.parametrize("case", CASES, ids=[c[2] for c in CASES])
def test_the_sweep_file_is_the_same_suite(tmp_path, case):
    """What sweep.toml holds, loaded as any suite file: the sweep's suite (the hand-written
    grid's variants and runs), and the command line in its description."""
    from normlab.cli import build_parser
    from normlab.experiments.sweep import sweep_suite

    sweep, toml = sweep_and_toml(case)
    out = tmp_path / "study"
    suite, text, path = sweep_suite(build_parser().parse_args(["sweep", *sweep, "--out",
                                                               str(out)]))
    assert path == out / "sweep.toml" and not out.exists()
    out.mkdir()
    path.write_text(text)
    assert manifest(load_suite(path), [1, 2, 3]) == manifest(suite, [1, 2, 3])
    hand = tmp_path / "study.toml"
    hand.write_text(toml)
    by_hand, swept = manifest(load_suite(hand), [1, 2, 3]), manifest(suite, [1, 2, 3])
    assert swept["variants"] == by_hand["variants"] and swept["runs"] == by_hand["runs"]
    assert suite.description == case[-1]


@pytest.mark.parametrize(("flags", "words"), [
    (["--lr", "0.1,abc"], "--lr: expected a number, got 'abc'"),
    (["--norm", "bn,nosuch"], "--norm: unknown norm 'nosuch'"),
    (["--norm", "gn", "--groups", "1,3"], "--groups: GroupNorm with 3 groups does not divide"),
    (["--lr", "0.1,-1"], "--lr: lr must be > 0"),
    (["--batch-size", "8,8"], "--batch-size: '8' is given twice"),
    (["--weight-std", "yes"], "--weight-std: expected true or false"),
    (["--norm-option", "momentum"], "--norm-option: expected KEY=VALUE"),
    (["--norm", "bn", "--norm-option", "momentom=0.1,0.2"],
     "--norm-option momentom: norm 'bn' does not take norm_options"),
    (["--lr", "0.1,0.2"], "--name: a suite's name must be a slug"),
])
def test_a_bad_value_names_its_flag_and_writes_nothing(tmp_path, capsys, flags, words):
    out = tmp_path / ("bad name" if "--name" in words else "out")
    assert main(["sweep", *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("normlab sweep: error: ") and "\n" not in err, err
    assert words in err, err
    assert not out.exists()


# ----------------------------------------------------------------------------- kill, resume


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SIGKILL")
def test_a_killed_sweep_continues_to_the_uninterrupted_numbers(mnist, tmp_path, monkeypatch,
                                                               capsys):
    argv = ["sweep", "--norm", "bn,gn", "--subset", "640", "--epochs", "2", "--jobs", "1",
            "--threads", "1", "--quiet"]
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "normlab", *argv, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not RunDir(out / "bn/seed1").metrics():  # the first epoch is written
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert (out / "sweep.toml").exists()  # written before anything trained
    assert not RunDir(out / "gn/seed1").finished()

    no_report(monkeypatch)
    assert main([*argv, "--out", str(out)]) == 0  # the same command continues it
    reference = tmp_path / "reference"
    assert main([*argv, "--out", str(reference)]) == 0
    for run in ("bn/seed1", "gn/seed1"):
        assert RunDir(out / run).finished()
        assert comparable_metrics(out / run) == comparable_metrics(reference / run), run
    capsys.readouterr()
    assert main(["suite", str(out / "sweep.toml"), "--out", str(out), "--dry-run"]) == 0
    assert "0 of 2 runs to train" in capsys.readouterr().out
