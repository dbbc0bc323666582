"""One home per norm (issue 21): the NormSpec registry that the model, suites, the workbook,
the reports and the accelerator read; norms of the user's own, registered in a session or
named by import path; every norm trains; a norm's settings reach the trained modules, in
this process, in worker processes (``normlab suite --jobs 2``) and on Ray.

Real MNIST: 2,000 training and 1,000 test images for the one-epoch runs, 300 training
images for the suites. The Ray test starts a local Ray on 127.0.0.1 only, with its own
token, as tests/test_ray.py does; without Ray it skips (fails under CI=true).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from openpyxl import load_workbook
from torch import nn

from conftest import no_report, require_tool, set_ray_environment, suite_toml
from normlab import accel
from normlab.cli import main
from normlab.experiments import load_suite, run_suite
from normlab.experiments.executors import ProcessExecutor
from normlab.experiments.suite import default_label
from normlab.fields import ConfigError
from normlab.models import (
    ModelConfig,
    Net,
    count_parameters,
    norm_names,
    norm_spec,
    norm_specs,
    register_norm,
)
from normlab.models import norms as norms_module
from normlab.models.zoo import StdConv2d
from normlab.training.config import RunConfig, from_stored
from normlab.training.engine import TensorData
from normlab.training.protocols import resolve_protocol
from normlab.training.run import train
from normlab.workbook import left_out, workbook_norms, write_workbook

HAVE_RAY = importlib.util.find_spec("ray") is not None
ZOO = ("brn", "gbn", "frn", "evo-s0", "evo-b0", "rms", "noisy-bn")

# A user's own norm, as a person would write it: a BatchNorm under another name that keeps
# the settings it was built with in a buffer, so a trained checkpoint shows them.
USER_MODULE = "normlab_test_usernorms"
USER_SOURCE = '''
    """A user's own norm for tests/test_norm_registry.py."""
    import torch
    from torch import nn


    class MyBN(nn.BatchNorm2d):
        title = "My BatchNorm"
        label = "MyBN"

        def __init__(self, num_features, **options):
            super().__init__(num_features, **options)
            self.register_buffer("settings", torch.tensor(
                [self.eps, self.momentum, float(self.affine)], dtype=torch.float64))
'''
USER_NORM = f"{USER_MODULE}:MyBN"
USER_OPTIONS = {"eps": 1e-3, "momentum": 0.05, "affine": False}
BN_OPTIONS = {"eps": 1e-4, "momentum": 0.2}  # the built-in bn with non-default settings
SUITE = suite_toml(("mybn", {"norm": USER_NORM}), ("bn", {"norm": "bn"}),
                   description="a user's norm by import path, and BN, with their settings")
# the tables suite_toml writes as strings, inline
SUITE = SUITE.replace(f'norm = "{USER_NORM}"\n', f'norm = "{USER_NORM}"\n'
                      'norm_options = { eps = 1e-3, momentum = 0.05, affine = false }\n')
SUITE = SUITE.replace('norm = "bn"\n',
                      'norm = "bn"\nnorm_options = { eps = 1e-4, momentum = 0.2 }\n')


@pytest.fixture
def session_norms():
    """Norms registered by a test are unregistered after it."""
    before = dict(norms_module._REGISTRY)
    yield
    norms_module._REGISTRY.clear()
    norms_module._REGISTRY.update(before)


@pytest.fixture(scope="module")
def data(mnist):
    return (TensorData(mnist.train_images[:2000], mnist.train_labels[:2000], mnist.mean,
                       mnist.std),
            TensorData(mnist.test_images[:1000], mnist.test_labels[:1000], mnist.mean,
                       mnist.std))


def quick(**model) -> RunConfig:
    """One epoch of the seed's network and protocol on 2,000 images, at batch 32 and lr 0.05
    (63 steps: at the seed's batch 64 and lr 0.1 the slowest norms, EvoNorm-B0 and RMSNorm,
    are still within a few points of 25% after 32 steps)."""
    proto = resolve_protocol("seed", {"epochs": 1, "batch_size": 32, "lr": 0.05})
    return RunConfig.from_dict({"protocol": proto, "subset": 2000, "precision": "fp32", **model})


# ----------------------------------------------------------------------------- the registry


def test_the_registry_holds_every_norm_once_with_its_flags():
    assert norm_names()[:12] == ("bn", "ln", "gn", "in", "none", *ZOO)
    specs = {s.name: s for s in norm_specs()}
    assert {n for n, s in specs.items() if s.batch_stats} == {"bn", "brn", "gbn", "evo-b0",
                                                              "noisy-bn"}
    assert {n for n, s in specs.items() if s.accel} == {"bn", "ln", "gn", "in"}
    assert {n for n, s in specs.items() if s.grouped} == {"gn", "evo-s0"}
    assert workbook_norms() == ("bn", "ln", "gn", "in") and left_out() == ZOO
    assert len({s.label for s in specs.values()}) == len(specs)  # labels tell them apart
    assert all(s.title and s.path is None for s in specs.values())


@pytest.mark.parametrize("norm", ZOO)
def test_every_zoo_norm_builds_on_the_seeds_network(norm):
    model = Net(norm=norm, groups=2)
    kinds = {type(model.convblock1[2]).__name__}
    assert kinds <= {"BatchRenorm2d", "GhostBatchNorm2d", "FilterResponseNorm2d", "EvoNormS0",
                     "EvoNormB0", "RMSNorm2d", "NoisyBatchNorm2d"}
    out = model(torch.randn(4, 1, 28, 28))
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    assert count_parameters(model) >= 5632  # the convolutions' 5,632, then the norms'


def test_unknown_names_and_bad_paths_say_what_is_wrong():
    with pytest.raises(ConfigError, match=r"unknown norm 'bx'; choose one of 'bn', .*'rms', "
                                          r"'noisy-bn', or your own by import path "
                                          r"'package.module:Attr'"):
        Net(norm="bx")
    with pytest.raises(ConfigError, match=r"module 'no_such_pkg.norms' does not import "
                                          r"\(ModuleNotFoundError"):
        Net(norm="no_such_pkg.norms:Mine")
    with pytest.raises(ConfigError, match=r"torch.nn has no attribute 'NoSuchNorm'"):
        Net(norm="torch.nn:NoSuchNorm")
    with pytest.raises(ConfigError, match=r"'math:pi' names a float, not an nn.Module subclass"):
        Net(norm="math:pi")
    with pytest.raises(ConfigError, match="not an import path"):
        Net(norm="a b:c")


def test_options_are_checked_when_the_config_is_made():
    with pytest.raises(ConfigError, match=r"norm 'bn' does not take norm_options "
                                          r"\{'momentom': 0.1\}") as err:
        ModelConfig(norms=("bn",), norm_options={"momentom": 0.1})
    assert err.value.field == "norm_options"
    with pytest.raises(ConfigError, match="norm 'none' does not take norm_options"):
        ModelConfig(norms=("none",), norm_options={"eps": 1e-3})
    with pytest.raises(ConfigError, match="groups is not a norm option"):
        ModelConfig(norms=("gn",), norm_options={"groups": 4})
    with pytest.raises(ConfigError, match="EvoNorm-S0 with 3 groups does not divide"):
        ModelConfig(norms=("evo-s0",), groups=3)
    with pytest.raises(ConfigError, match="must be a number, bool, string or list"):
        ModelConfig(norm_options={"eps": {"a": 1}})
    with pytest.raises(ConfigError, match="weight_std must be true or false"):
        ModelConfig(weight_std="yes")


def test_a_config_written_by_0_9_reads_back_equal_and_the_new_fields_only_when_set():
    old = {"norm": "gn", "groups": 2, "dropout": 0.01, "dropout_draw": "positions",
           "kernels": "aten", "eval_kernels": "aten"}
    config = ModelConfig.from_dict(old)
    assert config.to_dict() == old and config == ModelConfig(norms=("gn",), kernels="aten")
    assert config.norm_options == {} and config.weight_std is False
    new = dataclasses.replace(config, norm_options={"eps": 1e-4, "affine": False},
                              weight_std=True)
    stored = json.loads(json.dumps(new.to_dict()))
    assert stored == {**old, "norm_options": {"affine": False, "eps": 1e-4}, "weight_std": True}
    assert ModelConfig.from_dict(stored) == new != config
    assert hash(new) == hash(ModelConfig.from_dict(stored))  # frozen and hashable, as before
    run = RunConfig(model=new)
    assert RunConfig.from_dict(json.loads(json.dumps(run.to_dict()))) == run


def test_settings_reach_the_built_and_the_accelerated_modules(importable):
    """eps, momentum and affine as given, on the plain model and after the accelerator has
    swapped in its fused modules (which keep every setting or leave the block as it is)."""
    for norm, options, kind in (("bn", BN_OPTIONS, nn.BatchNorm2d),
                                ("brn", {"eps": 1e-3, "momentum": 0.01, "r_max": 2.0},
                                 nn.BatchNorm2d),
                                (USER_NORM, USER_OPTIONS, nn.BatchNorm2d),
                                ("gn", {"eps": 1e-3, "affine": True}, nn.GroupNorm)):
        config = ModelConfig(norms=(norm,), norm_options=options)
        model = Net.from_config(config).to(memory_format=torch.channels_last)
        step = accel.prepare(model, config, "fp32")
        layers = [m for m in model.modules() if isinstance(m, kind)]
        assert len(layers) == 5, norm
        for m in layers:
            for key, value in options.items():
                assert getattr(m, key) == value, (norm, key)
        if norm == USER_NORM:
            assert not any(p.numel() for m in layers for p in m.parameters())  # affine=False
        paths = step.paths()
        if norm_spec(norm).accel:
            assert "accel=False" not in paths.get("why_autograd", "")
            assert any(type(m).__name__.endswith("Dropout") for m in layers)  # fused, kept
        else:
            assert paths["why_autograd"].startswith(f"norm {norm!r} is left to autograd")
            assert step.hand is None and all(type(m).__name__ != "BatchNormDropout"
                                             for m in layers)


def test_weight_standardization_is_a_model_switch_left_to_autograd():
    model = Net(norm="gn", weight_std=True)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 7 and all(type(m) is StdConv2d for m in convs)
    assert count_parameters(model) == 5760 and model.config.to_dict()["weight_std"] is True
    model = model.to(memory_format=torch.channels_last)
    step = accel.prepare(model, model.config, "fp32")
    assert step.hand is None and "StdConv2d" in step.why_autograd
    # without the config too: the hand step itself refuses a convolution that is not Conv2d
    step = accel.prepare(Net(norm="gn", weight_std=True).to(memory_format=torch.channels_last),
                         None, "fp32")
    assert step.hand is None and "convolution is StdConv2d" in step.why_autograd


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("norm, weight_std", [*((n, False) for n in norm_names()[:12]),
                                               ("gn", True)])
def test_every_norm_trains_one_epoch_well_above_chance(norm, weight_std, data, tmp_path):
    """One epoch of the seed's network on 2,000 images: the test accuracy on 1,000 test
    images well above chance (10%, ± about 1% at 1,000 images). ``none`` normalizes
    nothing: at this lr the unnormalized net stays near chance this early (what the
    lr-range study is about), so it is only required to train."""
    config = quick(norm=norm, weight_std=weight_std)
    result = train(config, tmp_path, device="cpu", threads=1, data=data)
    assert len(result.history) == 1
    if norm == "none":
        assert result.status in ("ok", "diverged")
        return
    assert result.status == "ok", result.message
    assert result.history[-1]["test_acc"] >= 25.0, result.history[-1]
    paths = json.loads((tmp_path / "config.json").read_text())["paths"]
    if not norm_spec(norm).accel or weight_std:
        assert paths["step"] == "autograd" and paths["why_autograd"]


def test_a_norm_registered_in_a_session_trains_here_and_not_in_workers(data, tmp_path,
                                                                      session_norms):
    def instance_norm(channels, eps=1e-5):  # statistics per image and channel
        return nn.GroupNorm(channels, channels, eps=eps)

    spec = register_norm("mine", instance_norm, title="My instance norm", label="Mine",
                         batch_stats=False)
    assert norm_spec("mine") is spec and "mine" in norm_names() and "mine" in left_out()
    with pytest.raises(ConfigError, match="built-in norm"):
        register_norm("bn", instance_norm)
    model = Net(norm="mine", norm_options={"eps": 1e-3})
    assert {m.eps for m in model.modules() if isinstance(m, nn.GroupNorm)} == {1e-3}
    config = quick(norm="mine", norm_options={"eps": 1e-3})
    assert default_label(config) == "Mine (eps=0.001)"
    result = train(config, tmp_path / "run", device="cpu", threads=1, data=data)
    assert result.status == "ok" and result.history[-1]["test_acc"] >= 25.0
    stored = json.loads((tmp_path / "run" / "config.json").read_text())
    assert stored["run"]["model"]["norm"] == "mine"
    assert "'mine' is left to autograd" in stored["paths"]["why_autograd"]
    # worker processes would not know it: refused before anything starts
    suite = load_suite(write(tmp_path, suite_toml(("mine", {"norm": "mine"})), "mine.toml"))
    with pytest.raises(ValueError, match=r"norm 'mine' was registered in this session.*"
                                         r"import path"):
        run_suite(suite, tmp_path / "suite", executor=ProcessExecutor(2), quiet=True,
                  log=lambda _: None)


# ----------------------------------------------------------------------------- surfaces


def test_labels_and_the_dry_run_say_the_settings(importable, tmp_path):
    gn_ws = RunConfig(model=ModelConfig(norms=("gn",), weight_std=True))
    assert default_label(gn_ws) == "GN (2 groups) + WS"
    assert default_label(RunConfig(model=ModelConfig(norms=("bn",), norm_options={
        "momentum": 0.01}))) == "BN (momentum=0.01)"
    suite = load_suite(write(tmp_path, SUITE, "user.toml"))
    labels = {v.name: v.label for v in suite.variants}
    assert labels == {"mybn": "MyBN (affine=False, eps=0.001, momentum=0.05)",
                      "bn": "BN (eps=0.0001, momentum=0.2)"}
    assert main(["suite", str(tmp_path / "user.toml"), "--dry-run", "--out",
                 str(tmp_path / "out")]) == 0


def test_a_bad_norm_option_in_a_suite_names_its_line(tmp_path, capsys):
    text = suite_toml(("bn", {"norm": "bn"})) + "norm_options = { momentom = 0.01 }\n"
    path = write(tmp_path, text, "bad.toml")
    assert main(["suite", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"{path}:14: variant 'bn': norm 'bn' does not take norm_options" in err


def test_the_command_lines_take_norms_options_and_switches(importable, capsys):
    from normlab.training import cli as train_cli

    parser = argparse.ArgumentParser()
    train_cli.configure(parser)
    args = parser.parse_args(["--out", "x", "--norm", USER_NORM, "--norm-option", "eps=1e-3",
                              "--norm-option", "momentum=0.05", "--norm-option",
                              "affine=False", "--weight-std", "--precise-bn"])
    config = train_cli.config_from_args(args)
    assert config.model.norms == (USER_NORM,) and config.model.norm_options == USER_OPTIONS
    assert config.model.weight_std and config.precise_bn
    plain = train_cli.config_from_args(parser.parse_args(["--out", "x"]))
    assert plain.model == ModelConfig() and not plain.precise_bn
    assert main(["summary", "--norm", "gn", "--weight-std"]) == 0
    assert "StdConv2d" in capsys.readouterr().out
    assert main(["summary", "--norm", "frn"]) == 0
    assert "parameters: 5,824" in capsys.readouterr().out
    assert main(["summary", "--norm", "bn", "--norm-option", "momentom=1"]) == 2
    assert "does not take norm_options" in capsys.readouterr().err
    assert main(["train", "--out", "x", "--norm", "nope"]) == 2  # one line, nothing trained
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown norm 'nope'" in err and not Path("x").exists()


def test_the_workbook_says_which_norms_it_leaves_out(tmp_path, capsys):
    path = write_workbook(tmp_path / "wb.xlsx")
    wb = load_workbook(path)
    assert wb.sheetnames == ["Inputs", "BatchNorm", "LayerNorm", "GroupNorm", "InstanceNorm",
                             "Check"]
    note = wb["Inputs"]["A5"].value
    assert note.startswith("Not in this workbook: brn, gbn, frn, evo-s0, evo-b0, rms, noisy-bn (")
    assert main(["sheet", "--out", str(tmp_path / "cli.xlsx")]) == 0
    assert "Not in this workbook: brn, gbn" in capsys.readouterr().out


# ----------------------------------------------------------------------------- elsewhere


def write(folder: Path, text: str, name: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def check_user_runs(out: Path) -> None:
    """The suite's runs kept their settings: config.json records the import path and the
    options; the user's norm went through autograd (named in the accelerator's record); its
    trained modules had the settings (the checkpoint's ``settings`` buffers, the absent
    affine parameters) and the model built from config.json loads that checkpoint."""
    for name, norm, options in (("mybn", USER_NORM, USER_OPTIONS), ("bn", "bn", BN_OPTIONS)):
        run = out / name / "seed1"
        stored = json.loads((run / "config.json").read_text())
        model = stored["run"]["model"]
        assert (model["norm"], model["norm_options"]) == (norm, options), name
        assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").open()] == [1]
        weights = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
        built = from_stored(stored["run"]).make_model()
        built.load_state_dict(weights)  # strict: the same modules, parameters and buffers
        norms = [m for m in built.modules() if isinstance(m, nn.BatchNorm2d)]
        assert len(norms) == 5 and all(
            getattr(m, k) == v for m in norms for k, v in options.items())
        if name == "mybn":
            assert stored["paths"]["step"] == "autograd"
            assert USER_NORM in stored["paths"]["why_autograd"]
            blocks = [k[:-len(".settings")] for k in weights if k.endswith(".settings")]
            assert len(blocks) == 5
            for block in blocks:
                assert weights[f"{block}.settings"].tolist() == [1e-3, 0.05, 0.0]
                assert f"{block}.weight" not in weights  # affine=False
                assert not torch.equal(weights[f"{block}.running_var"],
                                       torch.ones_like(weights[f"{block}.running_var"]))
        else:
            assert "accel=False" not in stored["paths"].get("why_autograd", "")


def test_a_norm_by_import_path_trains_in_a_jobs_2_suite(importable, tmp_path, monkeypatch):
    """`normlab suite FILE --jobs 2` with the module on PYTHONPATH, as a person runs it (here
    in this process, whose sys.path the spawned workers get; the report is left out: its
    test-batch study alone takes minutes on two cores)."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(importable), *filter(None, [os.environ.get("PYTHONPATH")])]))
    no_report(monkeypatch)
    path = write(tmp_path, SUITE, "user.toml")
    out = tmp_path / "out"
    assert main(["suite", str(path), "--jobs", "2", "--threads", "1", "--device", "cpu",
                 "--quiet", "--out", str(out)]) == 0
    check_user_runs(out)
    from normlab.reports import load_results
    from normlab.reports.stats import summarise
    from normlab.reports.tables import summary_csv

    summary = summary_csv([summarise(v) for v in load_results(out).variants]).splitlines()
    assert summary[0].split(",")[:3] == ["variant", "label", "parameters"]
    assert summary[1].startswith('mybn,"MyBN (affine=False, eps=0.001, momentum=0.05)",5632,')
    assert summary[2].startswith('bn,"BN (eps=0.0001, momentum=0.2)",5760,')


@pytest.fixture
def ray_environment(monkeypatch):
    """The tests' Ray environment (conftest), as tests/test_ray.py's."""
    set_ray_environment(monkeypatch.setenv)


def test_a_norm_by_import_path_trains_on_ray(importable, tmp_path, ray_environment,
                                             monkeypatch):
    """The module is on this process's sys.path only (not PYTHONPATH, not the working
    folder): the Ray workers import it because the executor gives its tasks the folder."""
    require_tool(HAVE_RAY, "Ray (pip install 'normlab[ray]')")
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, SUITE, "user.toml")
    out = tmp_path / "out"
    no_report(monkeypatch)
    assert main(["suite", str(path), "--executor", "ray", "--cpus-per-run", "1",
                 "--device", "cpu", "--quiet", "--out", str(out)]) == 0
    assert not sys.modules["ray"].is_initialized()
    check_user_runs(out)
