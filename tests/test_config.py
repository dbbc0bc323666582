"""The typed config: one validation path naming the field, every config.json format normlab
has written, and the run directory object that reads them."""

import json
import shutil
from pathlib import Path

import pytest

from normlab.accel import kernels
from normlab.fields import ConfigError
from normlab.models import ModelConfig, Net
from normlab.training import RunConfig, RunDir, resolve_protocol
from normlab.training.config import from_stored

DATA = Path(__file__).parent / "data"
# What tests/data/config-*.json hold: every format normlab has written, one config.
EXPECTED = RunConfig(model=ModelConfig(norms=("bn",), groups=2, dropout=0.01,
                                       dropout_draw="bernoulli", kernels="aten"),
                     protocol=resolve_protocol("seed", {"epochs": 2}), l1=3e-5, subset=2000,
                     precision="fp32", augment="aten")


@pytest.mark.parametrize("version", ["0.1.0", "0.2.0", "0.4.0", "0.5.0", "0.6.0"])
def test_every_config_json_format_reads_to_the_same_config(version, tmp_path):
    stored = json.loads((DATA / f"config-{version}.json").read_text())
    assert stored["normlab"] == version
    # 0.1 drew masks with nn.Dropout, < 0.4 had torch's norms, < 0.5 torch's rotation
    assert from_stored(stored["run"]) == EXPECTED
    run = RunDir(tmp_path / "r")
    run.path.mkdir()
    shutil.copy(DATA / f"config-{version}.json", run.file("config.json"))
    assert run.config() == EXPECTED
    assert run.conflicts(EXPECTED) == []  # an old run directory resumes
    assert run.conflicts(RunConfig(l1=1e-3)) != []
    assert run.state() == "new"


def test_the_current_format_round_trips():
    assert RunConfig.from_dict(EXPECTED.to_dict()) == EXPECTED
    assert from_stored(EXPECTED.to_dict()) == EXPECTED
    assert RunConfig().model.dropout_draw == "positions"  # new runs: the faster draw
    assert from_stored(RunConfig().to_dict()) == RunConfig()
    stored = json.loads((DATA / "config-0.6.0.json").read_text())
    assert EXPECTED.to_dict() == stored["run"]  # this version still writes that format


def test_a_run_trained_with_the_kernels_before_0_6_evaluates_with_torchs_norms():
    """normlab 0.4 and 0.5 trained with the kernels and tested with torch's norms: such a
    config reads as eval_kernels="aten", so the run resumes with the test passes it had."""
    stored = json.loads((DATA / "config-0.5.0.json").read_text())["run"]
    stored["model"]["kernels"] = "normlab"
    config = from_stored(stored)
    assert (config.model.kernels, config.model.eval_kernels) == ("normlab", "aten")
    assert from_stored(config.to_dict()) == config
    new = ModelConfig(kernels="normlab")
    assert new.eval_kernels == ("normlab" if kernels.compiler() else "aten")
    assert ModelConfig(kernels="aten", eval_kernels="normlab").eval_kernels == "aten"
    with pytest.raises(ConfigError, match="eval_kernels must be one of normlab, aten"):
        ModelConfig(eval_kernels="fast")


@pytest.mark.parametrize(("data", "field", "words"), [
    ({"norm": "bx"}, "norm", "unknown norm 'bx'"),
    ({"norm": "gn", "groups": 3}, "groups", "does not divide"),
    ({"groups": "2"}, "groups", "groups must be an integer"),
    ({"dropout": 1.0}, "dropout", "in [0, 1)"),
    ({"dropout": True}, "dropout", "dropout must be a number"),
    ({"l1": -1}, "l1", "l1 must be a number >= 0"),
    ({"l1_scope": "bias"}, "l1_scope", "one of all, conv"),
    ({"dataset": "cifar"}, "dataset", "unknown dataset 'cifar'"),
    ({"subset": 0}, "subset", "positive number"),
    ({"seed": -1}, "seed", "non-negative"),
    ({"nrom": "bn"}, "nrom", "did you mean 'norm'?"),
    ({"protocol": {"name": "seed", "lr": 0}}, "lr", "lr must be > 0"),
    ({"protocol": {"name": "seed", "epochs": 1.5}}, "epochs", "epochs must be an integer"),
    ({"protocol": {"name": "slow"}}, "name", "unknown protocol 'slow'"),
])
def test_one_validation_path_names_the_field(data, field, words):
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict(data)
    assert err.value.field == field and words in str(err.value)


def test_ints_are_taken_for_floats_and_the_model_is_built_from_its_config():
    config = RunConfig.from_dict({"norm": "gn", "groups": 1, "dropout": 0, "l1": 0})
    assert config.model == ModelConfig(norms=("gn",), groups=1, dropout=0.0)
    assert isinstance(config.model.dropout, float) and isinstance(config.l1, float)
    net = Net.from_config(config.model)
    assert net.config == config.model and sum(p.numel() for p in net.parameters()) == 5760
    assert ModelConfig.from_dict({"norm": "bn+ln"}).norms == ("bn", "ln")


def test_run_dir_states_and_tolerant_metrics(tmp_path):
    run = RunDir(tmp_path / "r")
    assert run.state() == "new" and run.config() is None and run.metrics() == []
    run.write_config(EXPECTED, {"device": "cpu", "threads": 1})
    run.write_metrics([{"epoch": 1, "status": "ok"}])
    with open(run.file("metrics.jsonl"), "a") as fh:
        fh.write('{"epoch": 2, "sta')  # being appended right now
    assert run.metrics() == [{"epoch": 1, "status": "ok"}] and run.state() == "partial"
    run.record_failure("RuntimeError: boom")
    assert run.state() == "failed" and run.failure() == "RuntimeError: boom"
    with run.lock():
        assert run.training() and run.failure() is None  # a new attempt clears it
    run.write_metrics([{"epoch": 1, "status": "ok"}])
    run.append_metrics({"epoch": 2, "status": "diverged"})
    run.file("predictions.pt").write_bytes(b"")
    assert run.state() == "diverged" and not run.training()
    run.file("config.json").write_text('{"run": {"norm": "bx"}}')
    with pytest.raises(ValueError, match=r"unreadable run config.*unknown norm"):
        run.config()


def test_a_suite_folder_of_normlab_0_1_is_read_and_continued_with_its_dropout(tmp_path):
    from normlab.experiments import load_suite
    from normlab.experiments.plan import check_out
    from normlab.reports import load_results

    shutil.copy(DATA / "suite-0.1.0.json", tmp_path / "suite.json")  # s6-quick, seeds 1, 2
    results = load_results(tmp_path)
    assert [v.config.model.dropout_draw for v in results.variants] == ["bernoulli"] * 5
    assert [v.config.l1 for v in results.variants] == [0.0, 0.0, 0.0, 3e-5, 1e-3]
    suite = load_suite("s6-quick")
    with pytest.raises(ValueError, match="--dropout-draw bernoulli continues it") as err:
        check_out(suite, tmp_path, [1, 2])
    if suite.variants[0].config.model.kernels == "normlab":
        assert "--kernels aten continues it" in str(err.value)
    if suite.variants[0].config.precision == "bf16":
        assert "--precision fp32 continues it" in str(err.value)
    if suite.variants[0].config.augment == "normlab":
        assert "--augment aten continues it" in str(err.value)
    old = suite.with_model(dropout_draw="bernoulli", kernels="aten").with_config(
        precision="fp32", augment="aten")
    check_out(old, tmp_path, [1, 2])  # the same suite


def test_run_directories_of_an_older_normlab_are_refused_naming_the_flags(tmp_path):
    """A suite folder whose run directories an older normlab wrote (here one of 0.4: no
    augment, torch's norms, fp32): the refusal names every flag that continues it, and with
    them the same folder is the same suite again."""
    from normlab.experiments import load_suite
    from normlab.experiments.plan import check_out

    suite = load_suite("s6-quick")
    variant = suite.variants[0]
    run = RunDir(tmp_path / variant.name / "seed1")
    run.path.mkdir(parents=True)
    stored = json.loads((DATA / "config-0.4.0.json").read_text())
    old = variant.config_for(1).to_dict()
    del old["augment"]
    old["model"]["kernels"], old["precision"] = "aten", "fp32"
    run.file("config.json").write_text(json.dumps({**stored, "run": old}))
    current = suite.variants[0].config
    with pytest.raises(ValueError, match="run directories hold runs with other configs") as err:
        check_out(suite, tmp_path, [1])
    if current.augment == "normlab":
        assert "--augment aten continues it" in str(err.value)
    if current.model.kernels == "normlab":
        assert "--kernels aten continues it" in str(err.value)
    if current.precision == "bf16":
        assert "--precision fp32 continues it" in str(err.value)
    check_out(suite.with_model(kernels="aten").with_config(precision="fp32", augment="aten"),
              tmp_path, [1])


def test_a_suite_folder_of_normlab_0_5_is_continued_with_its_test_passes(tmp_path):
    """normlab 0.5 trained with the kernels and tested with torch's norms: its run
    directories are refused naming --eval-kernels aten, and continued with it."""
    from normlab.experiments import load_suite
    from normlab.experiments.plan import check_out

    suite = load_suite("s6-quick").with_model(kernels="normlab", eval_kernels="normlab")
    variant = suite.variants[0]
    run = RunDir(tmp_path / variant.name / "seed1")
    run.path.mkdir(parents=True)
    stored = json.loads((DATA / "config-0.5.0.json").read_text())
    old = variant.config_for(1).to_dict()
    del old["model"]["eval_kernels"]
    run.file("config.json").write_text(json.dumps({**stored, "run": old}))
    with pytest.raises(ValueError, match="--eval-kernels aten continues it"):
        check_out(suite, tmp_path, [1])
    check_out(suite.with_model(eval_kernels="aten"), tmp_path, [1])


def test_options_as_the_command_line_and_the_notebook_give_them():
    """One flat path from options to a config: run fields, model fields and the named
    protocol's fields together; None keeps a default; a stray name lists what is valid."""
    config = RunConfig.from_options("fast", norm="gn", groups=1, dropout=None, epochs=3,
                                    lr=0.05, precision="bf16", dropout_draw="bernoulli")
    assert config == RunConfig(
        model=ModelConfig(norms=("gn",), groups=1, dropout_draw="bernoulli"),
        protocol=resolve_protocol("fast", {"epochs": 3, "lr": 0.05}), precision="bf16")
    assert RunConfig.from_options() == RunConfig()
    with pytest.raises(ConfigError, match=r"unknown option 'rotate'.*did you mean 'rotation'"):
        RunConfig.from_options(rotate=5)
    with pytest.raises(ConfigError) as err:
        RunConfig.from_options(groups=3, norm="gn")
    assert err.value.field == "groups"


def test_the_default_precision_is_the_machines_and_stored_ones_are_kept(monkeypatch):
    """bf16 autocast by default only where the CPU computes bf16 natively; a stored config
    keeps the precision it was trained in (one without any, normlab 0.1's, is fp32)."""
    import normlab.accel

    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(normlab.accel, "native_bf16", lambda native=native: native)
        assert RunConfig().precision == expected
        assert RunConfig.from_options().precision == expected
        stored = RunConfig(precision="bf16" if expected == "fp32" else "fp32").to_dict()
        assert from_stored(stored).precision == stored["precision"]
        del stored["precision"]
        assert from_stored(stored).precision == "fp32"


def test_every_refusal_to_continue_names_the_flag_that_continues():
    from normlab.training.config import continue_hint

    hints = {
        "model.dropout_draw: 'bernoulli' -> 'positions'": "--dropout-draw bernoulli",
        "model.kernels: 'aten' -> 'normlab'": "--kernels aten",
        "model.kernels: 'normlab' -> 'aten'": "--kernels normlab",
        "model.eval_kernels: 'aten' -> 'normlab'": "--eval-kernels aten",
        "model.eval_kernels: 'normlab' -> 'aten'": "--eval-kernels normlab",
        "augment: 'aten' -> 'normlab'": "--augment aten",
        "augment: 'normlab' -> 'aten'": "--augment normlab",
        "precision: 'fp32' -> 'bf16'": "--precision fp32",
        "precision: 'bf16' -> 'fp32'": "--precision bf16",
    }
    for diff, flag in hints.items():
        hint = continue_hint([diff])
        assert flag in hint and hint.count("continues it") == 1, (diff, hint)
    assert continue_hint(["l1: 0.0 -> 0.001"]) == ""
