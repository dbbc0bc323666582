"""The engine: reproducibility, resume equality, the L1 gradient, divergence, config
mismatch, augmentation. Small subsets of the real MNIST, one or two epochs."""

import copy
import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import require_tool
from normlab import memory
from normlab.accel import kernels, normdrop
from normlab.cli import main
from normlab.fields import ConfigError
from normlab.models import dropout
from normlab.training import (
    RunConfig,
    TensorData,
    l1_penalty,
    read_metrics,
    resolve_protocol,
    train,
)
from normlab.training.augment import rotate, to_input
from normlab.training.config import from_stored
from normlab.training.engine import (
    add_l1_gradient,
    epoch_generator,
    l1_parameters,
    train_one_epoch,
)
from normlab.training.events import EpochFinished, Notice
from normlab.training.run import make_optimizer
from normlab.training.rundir import TIMING_FIELDS


def without_timing(history):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in history]


@pytest.fixture(scope="module")
def small(mnist):
    n = 1000
    return (
        TensorData(mnist.train_images[:n], mnist.train_labels[:n], mnist.mean, mnist.std),
        TensorData(mnist.test_images[:1000], mnist.test_labels[:1000], mnist.mean, mnist.std),
    )


def config(**kw):
    """A small run's config, fp32 unless given (the default precision is the machine's)."""
    proto = resolve_protocol("seed", {"epochs": kw.pop("epochs", 2), "batch_size": 64})
    return RunConfig.from_dict({"protocol": proto, "subset": 1000, "precision": "fp32", **kw})


def kill_after_epoch_1(event):
    """A listener that stops training (as Ctrl-C would) once epoch 1 is saved."""
    if isinstance(event, EpochFinished) and event.record["epoch"] == 1:
        raise KeyboardInterrupt


def test_same_seed_same_metrics_other_seed_differs(small, tmp_path):
    a = train(config(), tmp_path / "a", data=small)
    b = train(config(), tmp_path / "b", data=small)
    c = train(config(seed=2), tmp_path / "c", data=small)
    assert without_timing(a.history) == without_timing(b.history)
    assert without_timing(a.history) != without_timing(c.history)
    # It learns, by margins that hold on every kernel path (tests/test_dispatch.py's hosts;
    # the test accuracy of two epochs on 1,000 images swings with the path: 43-67% seen).
    first, last = a.history[0], a.history[-1]
    assert last["train_loss"] < 0.75 * first["train_loss"]  # 1.79 -> 0.84-0.90 seen
    assert last["train_acc"] > 50  # 76-77% seen
    assert last["test_acc"] > 20  # chance is 10%
    assert torch.equal(
        torch.load(tmp_path / "a/predictions.pt", weights_only=True)["pred"],
        torch.load(tmp_path / "b/predictions.pt", weights_only=True)["pred"],
    )


def test_interrupted_then_resumed_equals_uninterrupted(small, tmp_path):
    cfg = config(epochs=3, dropout=0.1)  # dropout: the RNG state must be restored too
    whole = train(cfg, tmp_path / "whole", data=small)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", data=small, listener=kill_after_epoch_1)
    assert len(read_metrics(tmp_path / "cut")) == 1
    assert not (tmp_path / "cut/predictions.pt").exists()
    resumed = train(cfg, tmp_path / "cut", data=small)
    assert without_timing(resumed.history) == without_timing(whole.history)
    assert without_timing(read_metrics(tmp_path / "cut")) == without_timing(whole.history)
    again = train(cfg, tmp_path / "cut", data=small)  # finished: not retrained
    assert again.skipped and without_timing(again.history) == without_timing(whole.history)


def test_run_directory_contents(small, tmp_path):
    train(config(epochs=1), tmp_path / "r", data=small)
    saved = json.loads((tmp_path / "r/config.json").read_text())
    assert saved["run"] == config(epochs=1).to_dict()
    assert {"normlab", "torch", "device"} <= set(saved)
    (line,) = read_metrics(tmp_path / "r")
    for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr", "seconds"):
        assert isinstance(line[key], float)
    ckpt = torch.load(tmp_path / "r/checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and "torch" in ckpt["rng"]
    pred = torch.load(tmp_path / "r/predictions.pt", weights_only=True)
    assert pred["pred"].shape == pred["target"].shape == pred["confidence"].shape == (1000,)
    assert ((pred["confidence"] > 0) & (pred["confidence"] <= 1)).all()


def test_config_mismatch_is_refused_naming_fields(small, tmp_path):
    train(config(epochs=1), tmp_path / "r", data=small)
    with pytest.raises(ValueError, match=r"l1: 0.0 -> 0.001.*norm: 'bn' -> 'gn'"):
        train(config(epochs=1, norm="gn", l1=1e-3), tmp_path / "r", data=small)


@pytest.mark.parametrize("scope", ["all", "conv"])
def test_l1_gradient_is_lambda_sign_w(scope):
    torch.manual_seed(0)
    cfg = RunConfig.from_dict({"dropout": 0.0, "l1_scope": scope})
    model = cfg.make_model()
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    lam = 0.01

    def grads(with_l1):
        model.zero_grad()
        loss = torch.nn.functional.nll_loss(model(x), y)
        if with_l1:
            loss = loss + lam * l1_penalty(l1_parameters(model, scope))
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    data, total = grads(False), grads(True)
    covered = {id(p) for p in l1_parameters(model, scope)}
    for name, p in model.named_parameters():
        expected = data[name] + (lam * p.sign() if id(p) in covered else 0)
        assert torch.allclose(total[name], expected, atol=1e-6), name
    n_covered = sum(p.numel() for p in l1_parameters(model, scope))
    assert n_covered == (5760 if scope == "all" else 5632)


def test_l1_penalty_is_added_once():
    params = [torch.tensor([1.0, -2.0]), torch.tensor([3.0]), torch.tensor([-4.0, 0.5])]
    assert l1_penalty(params).item() == pytest.approx(10.5)  # not a running sum per tensor


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_add_l1_gradient_is_autograds_bitwise(precision):
    """The L1 term's gradient added by hand equals backpropagating loss + λ·Σ|w| bit for
    bit, with weights at exactly 0 (sgn 0), in bf16 autocast, and for a parameter the loss
    does not reach (its gradient is the term alone)."""
    torch.manual_seed(0)
    model = RunConfig.from_dict({"dropout": 0.0, "kernels": "aten"}).make_model()
    with torch.no_grad():
        model.convblock1[0].weight[0, 0, 0] = 0.0
    extra = torch.nn.Parameter(torch.tensor([0.5, -2.0, 0.0]))
    params = [*model.parameters(), extra]
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    lam = 3e-3

    def grads(by_hand):
        for p in params:
            p.grad = None
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            loss = torch.nn.functional.nll_loss(model(x).float(), y)
        if by_hand:
            loss.backward()
            add_l1_gradient(params, lam)
        else:
            (loss + lam * l1_penalty(params)).backward()
        return [p.grad.clone() for p in params]

    autograd, hand = grads(False), grads(True)
    for a, b in zip(autograd, hand, strict=True):
        assert torch.equal(a, b)
    assert torch.equal(hand[-1], lam * extra.detach().sign())


def test_train_one_epoch_step_is_loss_plus_lambda_l1_once(small):
    """One step of the engine equals a step taken by hand with loss + λ·Σ|w| added once,
    parameter for parameter, exactly; the seed's step (the penalty added inside the loop
    over parameters) does not."""
    images, labels = small[0].images[:64], small[0].labels[:64]
    data = TensorData(images, labels, small[0].mean, small[0].std)
    lam, seed = 1e-3, 5
    torch.manual_seed(0)
    engine_model = RunConfig.from_dict({"dropout": 0.0}).make_model()
    by_hand, seed_bug = copy.deepcopy(engine_model), copy.deepcopy(engine_model)

    def sgd(model):
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    train_one_epoch(engine_model, data, sgd(engine_model), seed=seed, epoch=1, batch_size=64,
                    rotation=0.0, l1=lam, l1_params=list(engine_model.parameters()))
    order = torch.randperm(64, generator=epoch_generator(seed, 1))  # the engine's batch order
    x, y = to_input(images[order], data.mean, data.std), labels[order]
    for model, buggy in ((by_hand, False), (seed_bug, True)):
        model.train()
        opt = sgd(model)
        loss = torch.nn.functional.nll_loss(model(x), y)
        if buggy:  # the seed: the running sum added to the loss once per parameter tensor
            l1 = 0
            for p in model.parameters():
                l1 = l1 + p.abs().sum()
                loss = loss + lam * l1
        else:
            loss = loss + lam * torch.stack([p.abs().sum() for p in model.parameters()]).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for (name, a), b in zip(engine_model.named_parameters(), by_hand.parameters(), strict=True):
        assert torch.equal(a, b), name
    assert any(not torch.equal(a, c) for a, c in
               zip(engine_model.parameters(), seed_bug.parameters(), strict=True))


def test_nan_loss_is_detected_and_stops(small, tmp_path):
    cfg = config(epochs=3, norm="none", dropout=0.0)
    cfg = dataclasses.replace(cfg, protocol=resolve_protocol("seed", {"lr": 1e6}))
    result = train(cfg, tmp_path / "nan", data=small)
    assert result.status == "diverged"
    assert "loss became nan/inf at epoch 1, step" in result.message
    assert "smaller learning rate" in result.message
    lines = read_metrics(tmp_path / "nan")
    assert len(lines) == 1 and lines[0]["status"] == "diverged"
    assert train(cfg, tmp_path / "nan", data=small).status == "diverged"  # kept


def test_chance_accuracy_is_flagged(small, tmp_path, monkeypatch):
    import normlab.training.run as run_mod

    monkeypatch.setattr(run_mod, "CHANCE_MIN_STEPS", 1)
    # lambda so large that every weight is driven to zero: the seed's L1 failure mode
    result = train(config(epochs=3, l1=5.0), tmp_path / "l1", data=small)
    assert result.status == "diverged" and "at chance level after epoch 1" in result.message
    assert len(result.history) == 1
    # stop_at_chance off (a trainability study): every epoch trains, none is "diverged"
    kept = dataclasses.replace(config(epochs=3, l1=5.0), stop_at_chance=False)
    assert kept.to_dict()["stop_at_chance"] is False
    assert "stop_at_chance" not in config(epochs=3, l1=5.0).to_dict()  # 0.14's format
    assert from_stored(kept.to_dict()) == kept
    result = train(kept, tmp_path / "l1-on", data=small)
    assert result.status == "ok" and len(result.history) == 3
    assert all(r["test_acc"] < 15 and r["status"] == "ok" for r in result.history)
    # a nan loss stops such a run all the same
    record = {"epoch": 1, "first_bad_step": 7, "train_loss": float("nan"), "test_loss": 1.0,
              "test_acc": 9.8}
    assert run_mod.divergence(record, 100, at_chance=False).startswith("diverged: loss")
    assert run_mod.divergence({**record, "first_bad_step": -1, "train_loss": 2.3}, 100,
                              at_chance=False) == ""


def test_rotation_by_zero_is_identity(mnist):
    x = to_input(mnist.train_images[:16], 0.0, 1.0)
    assert torch.equal(rotate(x, torch.zeros(16)), x)


def test_rotation_keeps_a_centred_digits_mass_in_place(mnist):
    x = mnist.train_images[:64].unsqueeze(1).float() / 255
    rotated = rotate(x, torch.full((64,), 7.0))
    ys, xs = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")

    def centre(img):
        m = img.sum((1, 2, 3))
        return torch.stack(((img[:, 0] * ys).sum((1, 2)) / m, (img[:, 0] * xs).sum((1, 2)) / m), 1)

    assert (centre(rotated) - centre(x)).abs().max() < 1.5  # pixels
    assert rotated.sum() == pytest.approx(x.sum().item(), rel=0.05)
    assert not torch.equal(rotated, x)
    # 90 degrees is counter-clockwise and exact on the pixel grid
    quarter = rotate(x[:1], torch.tensor([90.0]))
    assert torch.equal(quarter[0, 0], torch.rot90(x[0, 0], 1))


def test_train_command(mnist, tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train", "--subset", "500", "--epochs", "1", "--norm", "gn", "--groups", "2",
            "--l1", "1e-4", "--seed", "3", "--quiet", "--out", str(out)]
    assert main(args) == 0
    saved = json.loads((out / "config.json").read_text())["run"]
    assert saved["model"]["norm"] == "gn" and saved["l1"] == 1e-4
    assert saved["protocol"]["epochs"] == 1
    assert main(args) == 0
    assert "already finished" in capsys.readouterr().out
    assert main([*args[:-2], "--lr", "0.05", "--out", str(out)]) == 2
    assert "protocol.lr: 0.1 -> 0.05" in capsys.readouterr().err


def test_bad_protocol_field():
    with pytest.raises(ConfigError, match=r"unknown protocol field 'lrr'.*; valid keys: epochs"):
        resolve_protocol("seed", {"lrr": 0.1})
    with pytest.raises(ValueError, match="unknown protocol 'adam'; choose one of seed, fast"):
        resolve_protocol("adam")


def test_a_run_directory_is_trained_by_one_process_at_a_time(small, tmp_path):
    import os

    out = tmp_path / "locked"
    out.mkdir()
    (out / ".lock").write_text(str(os.getppid()))  # a live process holds it
    with pytest.raises(ValueError, match="is being trained by process"):
        train(config(epochs=1), out, data=small)
    (out / ".lock").write_text("999999999")  # its process is gone: a stale lock
    assert train(config(epochs=1), out, data=small).status == "ok"
    assert not (out / ".lock").exists()


def test_resuming_with_another_thread_count_warns(small, tmp_path):
    cfg = config(epochs=2)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "r", data=small, threads=1, listener=kill_after_epoch_1)
    events = []
    try:
        train(cfg, tmp_path / "r", data=small, threads=2, listener=events.append)
    finally:
        torch.set_num_threads(1)
    notices = [e.message for e in events if isinstance(e, Notice)]
    assert len(notices) == 1 and "started with threads 1, resumed with 2" in notices[0]


def test_bf16_autocast_trains_and_is_part_of_the_config(small, tmp_path):
    fp32 = train(config(epochs=1), tmp_path / "fp32", data=small)
    bf16 = train(config(epochs=1, precision="bf16"), tmp_path / "bf16", data=small)
    assert bf16.history[0]["test_acc"] > 50  # it learns
    assert abs(bf16.history[0]["test_acc"] - fp32.history[0]["test_acc"]) < 10
    assert without_timing(bf16.history) != without_timing(fp32.history)
    saved = json.loads((tmp_path / "bf16/config.json").read_text())["run"]
    assert saved["precision"] == "bf16"
    with pytest.raises(ValueError, match=r"precision: 'bf16' -> 'fp32'"):
        train(config(epochs=1), tmp_path / "bf16", data=small)  # not resumed in another


def test_what_rotates_the_images_is_part_of_the_config(small, tmp_path, monkeypatch):
    """augment = "normlab" rotates every training batch with the C kernel (not the
    evaluation's, which is not rotated), "aten" with torch's ops; a folder trained with one
    is not continued with the other, and the refusal names the flag that continues it."""
    require_tool(kernels.compiler() is not None, "a C compiler (cc)")
    calls = []
    real = kernels.rotate_normalize
    monkeypatch.setattr(kernels, "rotate_normalize", lambda *a: calls.append(1) or real(*a))
    ours = train(config(epochs=1, augment="normlab"), tmp_path / "c", data=small)
    assert len(calls) == 16  # 1000 images in batches of 64
    theirs = train(config(epochs=1, augment="aten"), tmp_path / "aten", data=small)
    assert len(calls) == 16
    assert abs(ours.history[0]["test_acc"] - theirs.history[0]["test_acc"]) < 5
    saved = json.loads((tmp_path / "aten/config.json").read_text())["run"]
    assert saved["augment"] == "aten"
    with pytest.raises(ValueError, match=r"augment: 'aten' -> 'normlab'.*--augment aten "
                                         r"continues it"):
        train(config(epochs=1, augment="normlab"), tmp_path / "aten", data=small)


@pytest.mark.parametrize("norm", ["bn", "ln", "none"])
def test_the_gpu_path_reads_nothing_on_the_host_inside_an_epoch(small, norm, monkeypatch):
    """The code a GPU runs (dense dropout masks drawn on the device), exercised on the CPU:
    between the first and the last step no tensor is read on the host (on a GPU every such
    read is a synchronisation); the epoch's sums are read once, after the last step. With
    the CPU's dropout (positions drawn on the host) the same check fails."""
    for module in (dropout, normdrop):
        monkeypatch.setattr(module, "draws_positions", lambda device: False)
    reads: list[str] = []

    def spy(name: str):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kw):
            reads.append(name)
            return original(self, *args, **kw)
        return read

    for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, spy(name))
    cfg = config(norm=norm, dropout=0.05, l1=1e-4,
                 protocol=resolve_protocol("fast", {"epochs": 1, "batch_size": 64}))
    torch.manual_seed(0)
    model = cfg.make_model()
    opt, _, per_step = make_optimizer(model, cfg, steps_per_epoch=-(-len(small[0]) // 64))
    reads_before_step: list[int] = []
    metrics = train_one_epoch(
        model, small[0], opt, seed=1, epoch=1, batch_size=64, rotation=7.0, l1=cfg.l1,
        l1_params=list(model.parameters()), step_scheduler=per_step,
        on_step=lambda seen: reads_before_step.append(len(reads)))
    assert len(reads_before_step) == 16
    assert reads_before_step[-1] == 0, reads  # nothing read while stepping
    # at the end, once: the steps' losses (numpy: summed in order), accuracy and L1
    assert sorted(reads) == ["item", "item", "numpy"], reads
    assert 0 < metrics["train_loss"] < 3 and metrics["first_bad_step"] == -1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc and /proc")
def test_the_allocator_changes_no_number(mnist, tmp_path):
    """The `normlab` command runs with tcmalloc preloaded when it is installed (CI installs
    it) and glibc's malloc tuned; NORMLAB_MALLOC=glibc keeps only the tuning, =system
    neither. Each run's config.json records which; the metrics are the same under each."""
    require_tool(memory.tcmalloc() is not None, "tcmalloc (Debian: libtcmalloc-minimal4)")
    histories = []
    for mode, expected in (("", "tcmalloc"), ("glibc", "glibc, tuned"), ("system", "glibc")):
        env = {k: v for k, v in os.environ.items() if k not in ("NORMLAB_MALLOC", "LD_PRELOAD")}
        out = tmp_path / (mode or "default")
        subprocess.run([sys.executable, "-m", "normlab", "train", "--subset", "640", "--epochs",
                        "2", "--threads", "1", "--quiet", "--out", str(out)],
                       env={**env, "NORMLAB_MALLOC": mode} if mode else env, check=True,
                       stdout=subprocess.DEVNULL)
        assert json.loads((out / "config.json").read_text())["malloc"] == expected
        histories.append(without_timing(read_metrics(out)))
    assert histories[0] == histories[1] == histories[2] and len(histories[0]) == 2


@pytest.mark.parametrize("nesterov,weight_decay", [(False, 0.0), (True, 0.0), (False, 5e-4),
                                                   (True, 1e-3)])
def test_foreach_sgd_is_the_loops_bitwise_on_the_cpu(nesterov, weight_decay):
    """make_optimizer asks for torch's foreach SGD (torch's CPU default is the per-tensor
    loop): the same weights and momentum buffers, bit for bit, step after step."""
    from normlab.models import Net

    models = [Net(norm="bn") for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, nesterov=nesterov,
                            weight_decay=weight_decay, foreach=foreach)
            for m, foreach in zip(models, (None, True), strict=True)]
    gen = torch.Generator().manual_seed(2)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=gen) for p in models[0].parameters()]
        for model, opt in zip(models, opts, strict=True):
            for p, g in zip(model.parameters(), grads, strict=True):
                p.grad = g.clone()
            opt.step()
    for pa, pb in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(pa, pb)
        assert torch.equal(opts[0].state[pa]["momentum_buffer"],
                           opts[1].state[pb]["momentum_buffer"])
    assert make_optimizer(models[0], config(), 10)[0].defaults["foreach"] is True
