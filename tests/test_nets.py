"""Networks as an axis (normlab.models.nets): every network with every norm that has a
meaning in it trains, parameter counts against their closed forms, the errors, import
paths that run only what is meant, and a user's own network in worker processes and Ray."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import no_report, require_tool, set_ray_environment, suite_toml
from normlab.cli import main
from normlab.experiments.suite import default_label
from normlab.fields import ConfigError
from normlab.models import (
    ModelConfig,
    Net,
    build_model,
    count_parameters,
    net_label,
    net_names,
    norm_names,
    norm_spec,
)
from normlab.models.resnet import BasicBlock
from normlab.training.config import RunConfig, from_stored
from normlab.training.engine import TensorData
from normlab.training.protocols import resolve_protocol
from normlab.training.run import train
from normlab.training.rundir import CHANCE_ACC

HAVE_RAY = importlib.util.find_spec("ray") is not None
SMALL = {"plain": {"depth": 5, "width": 8}, "resnet": {"depth": 8, "width": 8}, "mlp": {}}
FEATURE_NORMS = ("bn", "brn", "gbn", "ln", "gn", "rms", "noisy-bn", "none")  # the MLP's

# A user's own network, as a person would write it: it takes the norm factory normlab
# gives it and an option of its own.
USER_MODULE = "normlab_test_usernets"
USER_SOURCE = '''
    """A user's own network for tests/test_nets.py."""
    import torch
    import torch.nn.functional as F
    from torch import nn


    class TinyNet(nn.Module):
        label = "Tiny"

        def __init__(self, norm_layer, width=6):
            super().__init__()
            self.conv = nn.Conv2d(1, width, 5, stride=2)
            self.norm = norm_layer(width)
            self.fc = nn.Linear(width, 10)
            self.register_buffer("width", torch.tensor(width))

        def forward(self, x):
            x = F.relu(self.norm(self.conv(x))).mean(dim=(2, 3))
            return F.log_softmax(self.fc(x), dim=-1)


    def not_a_module():
        raise AssertionError("called")
'''
USER_NET = f"{USER_MODULE}:TinyNet"


def quick(batch_size: int = 32, lr: float = 0.05, **model) -> RunConfig:
    """One epoch on 2,000 images, by default at batch 32 and lr 0.05 (test_norm_registry's)."""
    proto = resolve_protocol("seed", {"epochs": 1, "batch_size": batch_size, "lr": lr})
    return RunConfig.from_dict({"protocol": proto, "subset": 2000, "precision": "fp32", **model})


def pairs() -> list[tuple[str, str, dict]]:
    """(net, norm, extra model fields): every norm where it has a meaning, GN + WS in the
    conv nets, and SkipInit and Fixup without a norm."""
    out = [("mlp", norm, {}) for norm in FEATURE_NORMS]
    for net in ("plain", "resnet"):
        out += [(net, norm, {}) for norm in norm_names()[:12]]
        out.append((net, "gn", {"weight_std": True}))
    out += [("resnet", "none", {"residual_init": "skipinit"}),
            ("resnet", "none", {"residual_init": "fixup"})]
    return out


# ----------------------------------------------------------------------------- the nets


def test_the_registry_holds_the_nets_and_the_seed_is_the_default():
    assert net_names() == ("seed", "mlp", "plain", "resnet")
    assert ModelConfig().net == "seed" and ModelConfig().dropout == 0.01
    assert ModelConfig(net="mlp").dropout == 0.0  # the other nets' default: none
    model = build_model(ModelConfig())
    assert isinstance(model, Net) and count_parameters(model) == 5760
    for net in ("mlp", "plain", "resnet"):
        out = build_model(ModelConfig(net=net, net_options=SMALL[net]))(torch.randn(3, 1, 28, 28))
        assert out.shape == (3, 10) and torch.allclose(out.exp().sum(1), torch.ones(3))


def norm_params(norm: str, channels: int) -> int:
    return {"none": 0, "rms": channels}.get(norm, 2 * channels)


@pytest.mark.parametrize("hidden", [(100, 100, 100), (50,), (300, 20)])
@pytest.mark.parametrize("norm", FEATURE_NORMS)
def test_the_mlps_parameter_count_is_its_closed_form(hidden, norm):
    widths = (784, *hidden, 10)
    expected = sum(a * b + b for a, b in itertools.pairwise(widths))
    expected += sum(norm_params(norm, h) for h in hidden)
    model = build_model(ModelConfig(norms=(norm,), net="mlp", net_options={"hidden": hidden}))
    assert count_parameters(model) == expected
    if hidden == (100, 100, 100):
        assert expected == {"none": 99_710, "rms": 100_010}.get(norm, 100_310)


def resnet_count(n: int, w: int, norm: str, residual_init: str = "standard") -> int:
    """ResNet-(6n+2) at width w: a 3x3 conv 1 -> w, then per stage 2n 3x3 convs (the first
    of stages 2 and 3 from the narrower width), a norm after each conv, a linear 4w -> 10;
    option-A shortcuts have no parameters. SkipInit adds a gain per block, Fixup five
    scalars per block and two more."""
    convs = 9 * w + 2 * n * 9 * w * w                      # stem, stage 1
    convs += 9 * w * 2 * w + (2 * n - 1) * 9 * (2 * w) ** 2  # stage 2
    convs += 9 * 2 * w * 4 * w + (2 * n - 1) * 9 * (4 * w) ** 2
    norms = norm_params(norm, w) + 2 * n * sum(norm_params(norm, c) for c in (w, 2 * w, 4 * w))
    scalars = {"standard": 0, "skipinit": 3 * n, "fixup": 5 * 3 * n + 2}[residual_init]
    return convs + norms + 4 * w * 10 + 10 + scalars


@pytest.mark.parametrize("depth,width", [(8, 8), (20, 16), (14, 4)])
@pytest.mark.parametrize("norm", ["bn", "gn", "rms", "none"])
def test_resnet_and_plain_parameter_counts_are_their_closed_forms(depth, width, norm):
    n = (depth - 2) // 6
    options = {"depth": depth, "width": width}
    resnet = build_model(ModelConfig(norms=(norm,), net="resnet", net_options=options))
    assert count_parameters(resnet) == resnet_count(n, width, norm)
    # plain-(6n+2) is ResNet-(6n+2) without its shortcuts, which hold no parameters
    plain = build_model(ModelConfig(norms=(norm,), net="plain", net_options=options))
    assert count_parameters(plain) == resnet_count(n, width, norm)
    for init in ("skipinit", "fixup"):
        model = build_model(ModelConfig(norms=(norm,), net="resnet",
                                        net_options={**options, "residual_init": init}))
        assert count_parameters(model) == resnet_count(n, width, norm, init)


def test_resnet_20_at_width_16_has_269_434_parameters_with_bn():
    model = build_model(ModelConfig(net="resnet", net_options={"depth": 20}))
    assert count_parameters(model) == 269_434  # He et al.'s 0.27M less 2 x 144 input weights
    assert sum(isinstance(m, BasicBlock) for m in model.modules()) == 9
    plain = build_model(ModelConfig(net="plain", net_options={"depth": 40}))
    convs = [m for m in plain.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 39 and [c.stride for c in convs].count((2, 2)) == 2


def test_skipinit_and_fixup_start_every_block_as_the_identity():
    x = torch.randn(4, 16, 7, 7)
    for init in ("skipinit", "fixup"):
        torch.manual_seed(0)
        model = build_model(ModelConfig(norms=("none",), net="resnet",
                                        net_options={"residual_init": init}))
        block = model.blocks[-1]
        assert torch.equal(block(x.relu().repeat(1, 4, 1, 1)), x.relu().repeat(1, 4, 1, 1))
        if init == "fixup":  # zero output layer: uniform log-probabilities at the start
            out = model(torch.randn(2, 1, 28, 28))
            assert torch.allclose(out, torch.full_like(out, -torch.log(torch.tensor(10.))))
            # He init (std sqrt(2 / fan-out), fan-out 16 x 3 x 3) times L^(-1/2), L = 9
            expected = (2 / (16 * 9)) ** 0.5 / 9 ** 0.5
            assert abs(model.blocks[0].conv1.weight.std().item() / expected - 1) < 0.1
            assert not model.blocks[0].conv2.weight.any()


def pair_config(net: str, norm: str, extra: dict) -> RunConfig:
    """The run :func:`test_every_net_trains_one_epoch_above_chance_with_each_norm` trains."""
    options, extra = dict(SMALL[net]), dict(extra)
    weight_std = extra.pop("weight_std", False)
    options.update(extra)
    step = ({"batch_size": 8, "lr": 0.02} if norm != "none" else
            {"batch_size": 2, "lr": 0.05 if net == "mlp" else 0.01})
    return quick(norm=norm, net=net, net_options=options, weight_std=weight_std, **step)


def train_pair(pair: tuple[str, str, dict], out: str) -> tuple[str, list[dict], dict]:
    """Train one pair into ``out`` on one thread (in a worker process); its status,
    metrics and config.json."""
    from normlab.data import load_dataset

    mnist = load_dataset("mnist")
    data = (TensorData(mnist.train_images[:2000], mnist.train_labels[:2000], mnist.mean,
                       mnist.std),
            TensorData(mnist.test_images[:1000], mnist.test_labels[:1000], mnist.mean,
                       mnist.std))
    result = train(pair_config(*pair), out, device="cpu", threads=1, data=data)
    return result.status, result.history, json.loads((Path(out) / "config.json").read_text())


@pytest.fixture(scope="module")
def trained(mnist, tmp_path_factory) -> dict:
    """Every pair of :func:`pairs` trained, two at a time in spawned worker processes of one
    thread each (the same numbers as in this process: the runs are bitwise reproducible for
    the same seed and threads)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    folder = tmp_path_factory.mktemp("pairs")
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {(net, norm, str(extra)): pool.submit(train_pair, (net, norm, extra),
                                                        str(folder / f"{i}"))
                   for i, (net, norm, extra) in enumerate(pairs())}
        return {key: future.result() for key, future in futures.items()}


@pytest.mark.parametrize("net, norm, extra", pairs(),
                         ids=lambda v: v if isinstance(v, str) else
                         "-".join(f"{k}={w}" for k, w in v.items()) or "defaults")
def test_every_net_trains_one_epoch_above_chance_with_each_norm(net, norm, extra, trained):
    """One epoch on 2,000 images, the test accuracy on 1,000 test images above chance:
    at least normlab's at-chance line, 15% (``CHANCE_ACC``; chance is 10% ± 1% at 1,000
    images). Small sizes keep it quick: plain-5 and ResNet-8 at width 8, batch 8 and lr
    0.02 (250 steps). Without a norm these nets learn slowly (what the depth and BN-paper
    studies are about), so they get batch 2 (1,000 steps) at lr 0.01 (the MLP's sigmoids
    0.05). On an AVX2 Zen 3, natively and with ATen's generic kernels, the lowest were
    plain-5 with IN (18.5%: per-channel statistics of each image, then global average
    pooling, leave little to classify), SkipInit (20.5%) and plain-5 with EvoNorm-B0
    (20.7%); BN 40-80%."""
    status, history, stored = trained[(net, norm, str(extra))]
    assert status == "ok", history[-1]
    assert history[-1]["test_acc"] >= CHANCE_ACC, history[-1]
    assert stored["run"]["model"]["net"] == net
    assert stored["paths"]["step"] == "autograd"
    assert f"net {net!r} trains through autograd" in stored["paths"]["why_autograd"]


# ----------------------------------------------------------------------------- the config


def test_a_config_of_0_10_reads_back_equal_and_the_net_is_written_only_when_set():
    stored = {"norm": "bn", "groups": 2, "dropout": 0.01, "dropout_draw": "positions",
              "kernels": "normlab", "eval_kernels": "normlab"}  # 0.10.1's model, as written
    config = ModelConfig.from_dict(stored)
    assert config.net == "seed" and config.to_dict() == stored
    resnet = ModelConfig(norms=("none",), net="resnet", net_options={"depth": 8})
    data = resnet.to_dict()
    assert data["net"] == "resnet" and data["net_options"] == {"depth": 8}
    assert ModelConfig.from_dict(data) == resnet and hash(ModelConfig.from_dict(data))
    run = RunConfig(model=resnet)
    assert from_stored(run.to_dict()) == run


@pytest.mark.parametrize("model, field, words", [
    ({"net": "nosuch"}, "net", "unknown net 'nosuch'; choose one of 'seed', 'mlp'"),
    ({"norms": ("frn",), "net": "mlp"}, "norm", "norm 'frn' has no meaning in net 'mlp'"),
    ({"norms": ("in",), "net": "mlp"}, "norm", "does not normalise feature vectors (N, C)"),
    ({"norms": ("evo-b0",), "net": "mlp"}, "norm", "choose one of bn, ln, gn, none, brn, gbn"),
    ({"net": "resnet", "net_options": {"depth": 21}}, "net_options", "must be 6n+2"),
    ({"net": "resnet", "net_options": {"dpth": 20}}, "net_options",
     "has no option 'dpth'; its options: depth, width, residual_init"),
    ({"net": "resnet", "net_options": {"residual_init": "x"}}, "net_options",
     "residual_init must be one of standard, skipinit, fixup"),
    ({"net": "plain", "net_options": {"depth": 2}}, "net_options", "depth must be an integer"),
    ({"net": "mlp", "net_options": {"activation": "tanh"}}, "net_options",
     "activation must be one of sigmoid, relu"),
    ({"net": "mlp", "weight_std": True}, "weight_std", "takes no conv_layer"),
    ({"net": "seed", "net_options": {"depth": 3}}, "net_options", "takes no net_options"),
    ({"net": "plain", "norms": ("gn",), "groups": 3}, "groups", "3 groups does not divide 16"),
    ({"net": "builtins:print"}, "net", "names a builtin_function_or_method, not an nn.Module"),
    ({"net": "os:getcwd"}, "net", "nothing was called"),
    ({"net": "normlab_no_such_module:Net"}, "net", "does not import"),
    ({"norms": ("builtins:print",)}, "norm", "not an nn.Module subclass or a NormSpec"),
    ({"norms": ("os:getcwd",)}, "norm", "nothing was called"),
    ({"norms": ("normlab_no_such_module:Norm",)}, "norm", "does not import"),
])
def test_every_new_error_names_its_field(model, field, words):
    with pytest.raises(ConfigError) as err:
        ModelConfig(**model)
    assert err.value.field == field and words in str(err.value)
    assert "\n" not in str(err.value)


def test_an_import_path_is_checked_before_anything_it_names_is_called(importable, tmp_path,
                                                                      capsys):
    """`--net`/`--norm` naming a function, and a folder whose config.json and suite.json
    name one (a folder someone sent), are refused for train, suite, report and resume
    without calling it (``not_a_module`` raises "called"; ``print`` would print)."""
    for flag in ("--net", "--norm"):
        for path in ("builtins:print", "os:getcwd", f"{USER_MODULE}:not_a_module",
                     "normlab_no_such_module:X"):
            assert main(["train", "--out", str(tmp_path / "run"), flag, path]) == 2
            out, err = capsys.readouterr()
            assert out == "" and err.count("\n") == 1 and "called" not in err.replace(
                "nothing was called", "")
    assert not (tmp_path / "run").exists()
    bad = f"{USER_MODULE}:not_a_module"
    suite = write(tmp_path, suite_toml(("v", {"net": bad})), "bad.toml")
    assert main(["suite", str(suite), "--dry-run", "--out", str(tmp_path / "s")]) == 2
    assert "not an nn.Module subclass or a NetSpec" in capsys.readouterr().err
    # a suite trained here, then its files edited to name the function: resume and report
    sent = tmp_path / "sent"
    good = write(tmp_path, suite_toml(("v", {"net": "mlp", "norm": "none"}), subset=64), "ok.toml")
    assert main(["suite", str(good), "--quiet", "--device", "cpu", "--out", str(sent)]) == 0
    for name in ("suite.json", "v/seed1/config.json"):
        path = sent / name
        path.write_text(path.read_text().replace('"mlp"', json.dumps(bad)))
    capsys.readouterr()
    assert main(["suite", str(good), "--quiet", "--device", "cpu", "--out", str(sent)]) == 2
    assert "not an nn.Module subclass" in capsys.readouterr().err
    assert main(["train", "--out", str(sent / "v/seed1"), "--net", "mlp", "--norm", "none"]) == 2
    assert "not an nn.Module subclass" in capsys.readouterr().err
    main(["report", str(sent)])  # the report may say what it cannot read, never call it
    out, err = capsys.readouterr()
    assert "AssertionError" not in out + err and "called" not in (out + err).replace(
        "nothing was called", "")


def test_labels_name_the_network():
    skip = RunConfig(model=ModelConfig(norms=("none",), net="resnet",
                                       net_options={"residual_init": "skipinit"}))
    assert net_label(skip.model) == "ResNet-20 + SkipInit"
    assert default_label(skip) == "ResNet-20 + SkipInit, no norm"
    mlp = RunConfig(model=ModelConfig(net="mlp", norms=("bn",)))
    assert default_label(mlp) == "MLP 100-100-100 (sigmoid), BN"
    plain = RunConfig(model=ModelConfig(net="plain", net_options={"depth": 40, "width": 8}))
    assert default_label(plain) == "plain-40, width 8, BN"
    assert default_label(RunConfig()) == "BN"  # the seed's net: as before


def test_the_summary_and_info_commands_know_the_nets(capsys):
    assert main(["summary", "--net", "resnet", "--net-option", "depth=20"]) == 0
    assert "parameters: 269,434" in capsys.readouterr().out
    assert main(["summary", "--net", "mlp", "--norm", "bn"]) == 0
    assert "parameters: 100,310" in capsys.readouterr().out
    assert main(["summary", "--net", "mlp", "--norm", "frn"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "norm 'frn' has no meaning in net 'mlp'" in err
    from normlab.accel.hostinfo import nets

    assert "mlp (the BN paper's MLP)" in nets() and "resnet" in nets()


# ----------------------------------------------------------------------------- executors

SUITE = suite_toml(("tiny", {"net": USER_NET, "norm": "bn"}), ("tiny-gn", {"norm": "gn"}),
                   description="a user's network by import path, with an option")
SUITE = SUITE.replace('name = "tiny-gn"\n', f'name = "tiny-gn"\nnet = "{USER_NET}"\n')
SUITE = SUITE.replace('norm = "bn"\n', 'norm = "bn"\nnet_options = { width = 4 }\n')


def check_user_runs(out: Path) -> None:
    widths = {"tiny": 4, "tiny-gn": 6}
    for name, width in widths.items():
        run = out / name / "seed1"
        stored = json.loads((run / "config.json").read_text())
        model = stored["run"]["model"]
        assert model["net"] == USER_NET
        assert model.get("net_options", {}) == ({"width": 4} if width == 4 else {})
        assert (json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["status"]
                == "ok")
        weights = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
        assert int(weights["width"]) == width and weights["conv.weight"].shape[0] == width
        assert f"net {USER_NET!r} trains through autograd" in stored["paths"]["why_autograd"]
        rebuilt = from_stored(stored["run"]).make_model()
        assert int(rebuilt.width) == width


def write(folder: Path, text: str, name: str) -> Path:
    path = folder / name
    path.write_text(text)
    return path


def test_a_net_by_import_path_trains_in_a_jobs_2_suite(importable, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(importable), *filter(None, [os.environ.get("PYTHONPATH")])]))
    no_report(monkeypatch)
    path = write(tmp_path, SUITE, "user.toml")
    out = tmp_path / "out"
    assert main(["suite", str(path), "--jobs", "2", "--threads", "1", "--device", "cpu",
                 "--quiet", "--out", str(out)]) == 0
    check_user_runs(out)
    labels = {v["name"]: v["label"] for v in json.loads((out / "suite.json").read_text())[
        "variants"]}
    assert labels == {"tiny": "Tiny (width=4), BN", "tiny-gn": "Tiny, GN (2 groups)"}


def test_a_net_by_import_path_trains_on_ray(importable, tmp_path, monkeypatch):
    """The module is on this process's sys.path only: the Ray workers import it because
    the executor gives its tasks the folder."""
    require_tool(HAVE_RAY, "Ray (pip install 'normlab[ray]')")
    set_ray_environment(monkeypatch.setenv)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.chdir(tmp_path)
    no_report(monkeypatch)
    path = write(tmp_path, SUITE, "user.toml")
    out = tmp_path / "out"
    assert main(["suite", str(path), "--executor", "ray", "--cpus-per-run", "1",
                 "--device", "cpu", "--quiet", "--out", str(out)]) == 0
    assert not sys.modules["ray"].is_initialized()
    check_user_runs(out)


def test_the_norms_of_feature_vectors_are_the_references():
    """In the MLP, BN is BatchNorm1d, LN is LayerNorm over the features, RMSNorm is
    torch's RMSNorm: equal outputs on the same input."""
    x = torch.randn(16, 12)
    layers = {name: ModelConfig(norms=(name,), net="mlp").norm_layer("features")(12)
              for name in ("bn", "ln", "rms", "brn", "gbn")}
    assert isinstance(layers["bn"], nn.BatchNorm1d)
    torch.testing.assert_close(layers["ln"](x), nn.LayerNorm(12)(x))
    torch.testing.assert_close(layers["rms"](x), nn.RMSNorm(12, eps=torch.finfo().eps)(x))
    ref = nn.BatchNorm1d(12)
    layers["brn"].r_max, layers["brn"].d_max = 1.0, 0.0  # BRN at r_max 1, d_max 0 is BN
    torch.testing.assert_close(layers["brn"](x), ref(x))
    layers["gbn"].virtual_batch = 16
    torch.testing.assert_close(layers["gbn"](x), nn.BatchNorm1d(12)(x))
    for name in ("frn", "in", "evo-s0", "evo-b0"):
        assert "features" not in norm_spec(name).inputs
