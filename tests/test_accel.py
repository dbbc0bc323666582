"""The acceleration's seam (normlab.accel): the model stays plain PyTorch, swaps keep every
setting of what they replace (or refuse), the step is checked against autograd before it is
taken, --accel off trains the plain model, and a run records the paths it took."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from normlab import accel
from normlab.accel.normdrop import BatchNormDropout, GroupNormDropout
from normlab.cli import main
from normlab.models import ModelConfig, Net
from normlab.models.net import STAGES
from normlab.training.augment import to_input
from normlab.training.config import RunConfig, from_stored
from normlab.training.engine import TensorData, evaluate
from normlab.training.run import train


@pytest.fixture
def tiny_data(mnist):
    return (TensorData(mnist.train_images[:256], mnist.train_labels[:256], mnist.mean,
                       mnist.std),
            TensorData(mnist.test_images[:500], mnist.test_labels[:500], mnist.mean, mnist.std))


def test_the_models_package_is_plain_pytorch():
    """Importing normlab.models loads none of the acceleration, and a Net holds only torch's
    modules (and SparseDropout, a plain module drawing the dropped positions)."""
    code = ("import sys, normlab.models; "
            "print(sorted(k for k in sys.modules if k.startswith('normlab.accel')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"
    kinds = {type(m).__module__ for m in Net().modules()}
    assert kinds <= {"torch.nn.modules.conv", "torch.nn.modules.activation",
                     "torch.nn.modules.batchnorm", "torch.nn.modules.pooling",
                     "torch.nn.modules.container", "normlab.models.dropout", "normlab.models.net"}


def test_the_acceleration_reads_the_models_and_not_the_training():
    """normlab.accel and normlab.training no longer import each other: the training calls
    the acceleration (and reads its precision default), never the other way round, not even
    inside a function (0.10's hostinfo read training.config's default_precision)."""
    import ast

    folder = Path(accel.__file__).parent
    imported = {
        (path.name, node.module if isinstance(node, ast.ImportFrom) else alias.name)
        for path in folder.glob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert not {(f, m) for f, m in imported if m and m.startswith("normlab.training")}
    assert ("__init__.py", "normlab.models.config") in imported


def test_the_forward_walks_the_stages():
    model = Net().eval()
    x = torch.randn(2, 1, 28, 28)
    h = x
    for name in STAGES:
        h = getattr(model, name)(h)
    assert torch.equal(model(x), torch.log_softmax(h.flatten(1), -1))


@pytest.mark.parametrize("kernels", ["normlab", "aten"])
def test_swaps_keep_every_setting_and_share_parameters(kernels):
    torch.manual_seed(0)
    model = Net(norm="bn", dropout_value=0.1)
    for i, name in enumerate(("convblock1", "convblock2")):
        old = getattr(model, name)[2]
        getattr(model, name)[2] = nn.BatchNorm2d(old.num_features, eps=1e-3 * (i + 1),
                                                 momentum=0.3 + i * 0.1 if i else None)
    params = {id(p) for p in model.parameters()}
    buffers = {id(b) for b in model.buffers()}
    accel.accelerate(model, ModelConfig(kernels=kernels))
    assert {id(p) for p in model.parameters()} == params
    assert {id(b) for b in model.buffers()} == buffers
    first, second = model.convblock1[2], model.convblock2[2]
    assert type(first) is BatchNormDropout and first.p == 0.1
    assert (first.eps, first.momentum) == (1e-3, None)
    assert (second.eps, second.momentum) == (2e-3, 0.4)
    assert first.relu == (kernels == "normlab")


def test_a_norm_the_fused_modules_cannot_hold_is_left_as_it_is():
    model = Net(norm="gn", dropout_value=0.1)
    model.convblock1[2] = nn.GroupNorm(2, 8, affine=False)
    model.convblock2[2] = nn.BatchNorm2d(16, track_running_stats=False)
    hooked = model.convblock4[2]
    hook = hooked.register_forward_hook(lambda *args: None)
    done = accel.accelerate(model, ModelConfig(norms=("gn",), kernels="normlab"))
    assert type(model.convblock1[2]) is nn.GroupNorm and not model.convblock1[2].affine
    assert type(model.convblock2[2]) is nn.BatchNorm2d
    assert model.convblock4[2] is hooked
    assert type(model.convblock6[2]) is GroupNormDropout
    assert done["convblock1"] == done["convblock2"] == done["convblock4"] == "as it is"
    assert done["convblock6"] == "dropout fused, ReLU folded"
    # such a model trains through autograd, and the step says why
    hook.remove()
    step = accel.prepare(model.to(memory_format=torch.channels_last), None, "fp32")
    assert step.hand is None and "convblock1" in step.why_autograd


def _batch(n=8):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 28, 28, generator=gen).contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 10, (n,), generator=gen)


def _model(config: ModelConfig):
    torch.manual_seed(2)
    return Net.from_config(config).to(memory_format=torch.channels_last).train()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_prepared_step_is_autograds_on_the_same_modules_bitwise(precision):
    """Taken or refused, the step's numbers are autograd's on the swapped modules."""
    config = ModelConfig(norms=("bn",), kernels="normlab", dropout=0.05)
    a, b = _model(config), _model(config)
    accel.accelerate(a, config)
    step = accel.prepare(b, config, precision)
    x, y = _batch()
    torch.manual_seed(3)
    want = accel.autograd_step(a, x, y, precision)
    torch.manual_seed(3)
    got = step(x, y)
    assert torch.equal(want[0], got[0]) and torch.equal(want[1].float(), got[1].float())
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa.grad, pb.grad)
    for ba, bb in zip(a.buffers(), b.buffers(), strict=True):
        assert torch.equal(ba, bb)
    paths = step.paths()
    assert paths["step"] == ("hand" if step.hand is not None else "autograd")
    assert paths["precision"] == precision and paths["norms"] == "normlab kernels"


def test_a_changed_forward_is_caught_and_trains_through_autograd(monkeypatch):
    """The step is checked against autograd on the model before it is taken: a Net whose
    forward no longer matches the hand step (here: no log-softmax) is left to autograd."""
    config = ModelConfig(norms=("bn",), kernels="normlab")
    assert accel.prepare(_model(config), config, "fp32").hand is not None
    monkeypatch.setattr(Net, "forward", lambda self, x: self.convblock8(
        self.gap(self.convblock7(self.convblock6(self.convblock4(self.pool1(
            self.convblock3(self.convblock2(self.convblock1(x))))))))).flatten(1))
    model = _model(config)
    state = [t.clone() for t in model.state_dict().values()]
    rng = torch.get_rng_state()
    step = accel.prepare(model, config, "fp32")
    assert step.hand is None and "differs from autograd" in step.why_autograd
    assert all(torch.equal(a, b) for a, b in zip(state, model.state_dict().values(),
                                                 strict=True))
    assert torch.equal(torch.get_rng_state(), rng)  # the check left no trace


def test_accel_off_trains_the_plain_model_and_configs_say_so(tmp_path, tiny_data):
    config = RunConfig.from_options("seed", epochs=1, subset=256, accel="off", dropout=0.05)
    assert (config.model.kernels, config.model.eval_kernels, config.augment) == ("aten",) * 3
    assert config.to_dict()["accel"] == "off"
    assert "accel" not in RunConfig().to_dict()  # on: 0.8's format
    assert from_stored({k: v for k, v in RunConfig().to_dict().items()}).accel == "on"
    with pytest.raises(ValueError, match="accel must be one of on, off"):
        RunConfig(accel="fast")
    result = train(config, tmp_path / "off", data=tiny_data, threads=1)
    assert result.status == "ok"
    stored = json.loads((tmp_path / "off" / "config.json").read_text())
    assert stored["run"]["accel"] == "off"
    assert stored["paths"]["step"] == "autograd" and stored["paths"]["accel"] == "off"
    assert stored["paths"]["norms"] == "torch"


def test_a_run_records_the_paths_it_took(tmp_path, tiny_data):
    config = RunConfig.from_options("seed", epochs=1, subset=256, precision="fp32")
    train(config, tmp_path / "on", data=tiny_data, threads=1)
    paths = json.loads((tmp_path / "on" / "config.json").read_text())["paths"]
    assert paths["accel"] == "on" and paths["precision"] == "fp32"
    assert paths["hand_steps"] + paths["autograd_steps"] == 4  # 256 images, batch 64
    if paths["step"] == "hand":
        kept = [int(v.split("/")[0]) for v in paths["onednn_convs"].values()]
        assert all(0 <= k <= 7 for k in kept)
    assert paths["blocks"]["convblock1"] in ("dropout fused, ReLU folded", "dropout fused")


class _BatchCentred(nn.Module):
    """Subtracts the batch's mean in eval mode too: an image's output depends on the
    images beside it, so chunks of a batch cannot give the whole batch's numbers."""

    def forward(self, x):
        return x - x.mean(0, keepdim=True)


@pytest.mark.parametrize("norm", ["bn", "gn", "ln", "in"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_test_pass_in_chunks_is_the_whole_batchs_bitwise(norm, precision, mnist):
    """Taken or refused, Step.infer gives the model's output on the whole batch bit for
    bit, and the record says which it did; evaluate's metrics through it are the plain
    forward's."""
    config = ModelConfig(norms=(norm,), kernels="normlab", dropout=0.05)
    model = _model(config)
    step = accel.prepare(model, config, precision)
    x, y = _batch(n=64)
    for _ in range(2):  # running statistics that are not the initial ones
        step(x, y)
    model.eval()
    data = TensorData(mnist.test_images[:600], mnist.test_labels[:600], mnist.mean,
                      mnist.std)
    # 300 images: a whole chunk and a smaller one
    test = to_input(data.images[:300], data.mean, data.std, memory_format=torch.channels_last)
    with torch.no_grad(), accel.autocast(test.device, precision):
        want = model(test)
        for _ in range(2):  # the checked call, then the decided one
            assert torch.equal(step.infer(test), want)
    record = step.paths()["test_forward"]["300x1x28x28"]
    assert record in (f"chunks of {accel.EVAL_CHUNK}",
                      f"whole (chunks of {accel.EVAL_CHUNK} differ)")
    plain = evaluate(model, data, 300, precision=precision)
    through = evaluate(model, data, 300, precision=precision, forward=step.infer)
    assert (plain["test_loss"], plain["test_acc"]) == (through["test_loss"],
                                                       through["test_acc"])


def test_a_forward_whose_images_depend_on_each_other_goes_whole():
    model = nn.Sequential(nn.Flatten(), _BatchCentred()).eval()
    step = accel.Step(model, "fp32")
    x = torch.randn(600, 1, 28, 28)
    for _ in range(2):
        assert torch.equal(step.infer(x), model(x))
    assert step.eval_chunks == {x.shape: 0}
    assert step.paths()["test_forward"] == {
        "600x1x28x28": f"whole (chunks of {accel.EVAL_CHUNK} differ)"}
    assert torch.equal(accel.Step(model, "fp32", "off").infer(x), model(x))


def test_info_says_what_each_path_would_be(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for key in ("cpu", "torch", "precision", "kernels", "oneDNN", "step fp32", "compile",
                "norms", "nets"):
        assert any(line.startswith(key) for line in out.splitlines()), key
    assert "step; norms:" in out
    assert "test pass: chunks of 250" in out or "test pass: whole (chunks of 250 differ)" in out


def test_accel_flags_reach_the_configs(tmp_path):
    from normlab.experiments.suite import load_suite
    from normlab.training.cli import config_from_args, configure

    parser = argparse.ArgumentParser()
    configure(parser)
    args = parser.parse_args(["--out", str(tmp_path), "--accel", "off"])
    assert config_from_args(args).accel == "off"
    assert config_from_args(parser.parse_args(["--out", str(tmp_path)])).accel == "on"
    suite = load_suite("s6-quick").with_config(accel="off")
    assert {v.config.accel for v in suite.variants} == {"off"}
    assert main(["suite", "s6-quick", "--accel", "off", "--dry-run",
                 "--out", str(tmp_path / "s")]) == 0
