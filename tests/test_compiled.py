"""The compiled step (normlab.accel.compiled): where the hand step does not go, torch.compile
computes autograd's numbers to rounding and the config says so; a compilation that fails
leaves the run to autograd with the numbers autograd gives; a compiled run resumes to an
uninterrupted one's numbers; and nothing changes where the hand step goes.

Compiling costs seconds per graph (the first time on a machine; then inductor's cache on
disk), so these tests compile two small models: the seed's CNN with FRN (a zoo norm) and the
BN paper's MLP with BN (another network, with running statistics)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from normlab import accel
from normlab.accel import compiled as compiled_module
from normlab.fields import ConfigError
from normlab.models import ModelConfig, build_model
from normlab.training.config import RunConfig, continue_hint, from_stored
from normlab.training.engine import TensorData
from normlab.training.protocols import resolve_protocol
from normlab.training.run import train
from normlab.training.rundir import TIMING_FIELDS

CASES = {"seed-frn": ModelConfig(norms=("frn",), dropout=0.0),
         "mlp-bn": ModelConfig(norms=("bn",), net="mlp")}

# A user's own norm, written only for this test: RMSNorm with a learned shift, on feature
# vectors and conv maps alike.
USER_MODULE = "normlab_test_compiled_norm"
USER_SOURCE = '''
    import torch
    from torch import nn


    class ShiftedRMS(nn.Module):
        inputs = ("maps", "features")

        def __init__(self, channels, eps=1e-5):
            super().__init__()
            self.eps = eps
            self.weight = nn.Parameter(torch.ones(channels))
            self.bias = nn.Parameter(torch.zeros(channels))

        def forward(self, x):
            shape = (1, -1) + (1,) * (x.dim() - 2)
            dims = tuple(range(1, x.dim()))
            y = x * torch.rsqrt(x.square().mean(dims, keepdim=True) + self.eps)
            return y * self.weight.view(shape) + self.bias.view(shape)
'''


@pytest.fixture
def compiling(monkeypatch):
    """The default these tests are about: inductor (conftest sets it off for the others)."""
    monkeypatch.delenv("NORMLAB_COMPILE", raising=False)
    if compiled_module.unavailable():
        from conftest import require_tool

        require_tool(False, "a C++ compiler (g++) for torch.compile")


def state(model: torch.nn.Module) -> list[torch.Tensor]:
    return [*(p.grad for p in model.parameters()), *model.buffers()]


def twins(config: ModelConfig, channels_last: bool = False):
    """One model twice, and its two steps: through autograd, and compiled."""
    torch.manual_seed(0)
    eager = build_model(config)
    if channels_last:
        eager = eager.to(memory_format=torch.channels_last)
    model = copy.deepcopy(eager)
    return (eager, model, accel.prepare(eager, config, "fp32"),
            accel.prepare(model, config, "fp32", compile="inductor"))


@pytest.mark.parametrize("case", CASES)
def test_the_compiled_step_is_autograds_to_rounding_and_says_so(case, compiling):
    """Its contract on any CPU: compiled, autograd's numbers to rounding; where inductor
    cannot compile (torch 2.13's inductor emits vector code that does not build under
    ATEN_CPU_CAPABILITY=default, the generic host kind of test_dispatch.py), autograd's
    bit for bit, and the paths say which."""
    config = CASES[case]
    eager, model, reference, step = twins(config, channels_last=True)
    x = torch.randn(64, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (64,))
    # the MLP's test pass in chunks (cheap to compile); the CNN's in one (one graph less)
    size = 1000 if case == "mlp-bn" else accel.EVAL_CHUNK
    test = torch.randn(size, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    pairs = []
    for seed in range(2):
        torch.manual_seed(seed)
        want = [*reference(x, y)]
        torch.manual_seed(seed)
        got = [*step(x, y)]
        pairs += [*zip(got, want, strict=True), *zip(state(model), state(eager), strict=True)]
    eager.eval(), model.eval()
    with torch.no_grad():  # the test pass, in chunks where they give the whole batch
        pairs.append((step.infer(test), reference.infer(test)))
    paths = step.paths()
    assert paths["compiled_steps"] in (0, 2) and "why_autograd" in paths
    if paths["compiled_steps"]:
        assert paths["step"] == "compiled" and paths["compile"] == "inductor"
        for got, want in pairs:
            torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-5)
    else:  # refused: autograd's numbers, and why
        assert paths["step"] == "autograd"
        assert paths["compile"].startswith("inductor failed, autograd since: ")
        assert all(torch.equal(got, want) for got, want in pairs)
    assert reference.paths()["step"] == "autograd" and "compile" not in reference.paths()


def test_a_compilation_that_fails_leaves_the_run_to_autograd_with_its_numbers(monkeypatch):
    """The compiled model fails in its backward, after its forward has moved the running
    statistics: they, the gradients and the generator are put back, the step is autograd's
    bit for bit, and the paths say why."""
    config = CASES["mlp-bn"]

    class FailsInBackward(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            out = self.model(x)
            out.register_hook(lambda grad: (_ for _ in ()).throw(RuntimeError("no C++")))
            return out

    monkeypatch.setattr(compiled_module, "compile_model", FailsInBackward)
    monkeypatch.setattr(compiled_module, "unavailable", lambda: None)
    eager, model, reference, step = twins(config)
    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    for seed in range(2):
        torch.manual_seed(seed)
        want = reference(x, y)
        torch.manual_seed(seed)
        got = step(x, y)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        assert all(torch.equal(a, b) for a, b in zip(state(model), state(eager), strict=True))
    paths = step.paths()
    assert paths["step"] == "autograd" and paths["compiled_steps"] == 0
    assert paths["compile"] == "inductor failed, autograd since: RuntimeError: no C++"


def test_the_config_records_the_compiled_step_where_it_applies(monkeypatch, compiling):
    frn = RunConfig(model=CASES["seed-frn"])
    assert frn.compile == "inductor" and frn.to_dict()["compile"] == "inductor"
    assert from_stored(frn.to_dict()) == frn
    bn = RunConfig()  # the hand step's: nothing to compile, and nothing written
    assert bn.compile == "off" and "compile" not in bn.to_dict()
    assert RunConfig(model=CASES["seed-frn"], accel="off").compile == "off"
    assert RunConfig(model=CASES["seed-frn"], compile="off").compile == "off"
    # where compiling was measured no faster (accel.compiled.SPEEDUP), autograd unless asked
    for slower in (ModelConfig(norms=("gn",), weight_std=True), CASES["mlp-bn"],
                   ModelConfig(norms=("brn",), net="mlp")):
        assert RunConfig(model=slower).compile == "off"
        assert RunConfig(model=slower, compile="inductor").compile == "inductor"
    for pays in (ModelConfig(norms=("rms",)), ModelConfig(norms=("frn",), weight_std=True),
                 ModelConfig(norms=("bn",), net="resnet", net_options={"depth": 8})):
        assert RunConfig(model=pays).compile == "inductor"
    assert compiled_module.measured(ModelConfig(norms=("gn",), weight_std=True)) == (
        False, f"gn+ws: the compiled step measured {compiled_module.SPEEDUP['gn+ws']:.2f}x "
        "autograd's speed, so autograd")
    monkeypatch.setenv("NORMLAB_COMPILE", "inductor")
    assert RunConfig(model=CASES["mlp-bn"]).compile == "inductor"
    monkeypatch.setenv("NORMLAB_COMPILE", "off")
    assert RunConfig(model=CASES["seed-frn"]).compile == "off"
    with pytest.raises(ConfigError, match="compile must be one of inductor, off"):
        RunConfig(model=CASES["mlp-bn"], compile="jit")
    # a run of 0.11 (through autograd, no field) reads as off, and a new default says how
    # to continue it
    stored = RunConfig(model=CASES["seed-frn"], compile="off").to_dict()
    assert "compile" not in stored and from_stored(stored).compile == "off"
    monkeypatch.delenv("NORMLAB_COMPILE")
    from normlab.training.config import config_diff

    diffs = config_diff(from_stored(stored).to_dict(), frn.to_dict())
    assert diffs == ["compile: None -> 'inductor'"]
    assert "--compile off continues it" in continue_hint(diffs)


def test_a_compiled_run_resumes_to_an_uninterrupted_runs_numbers(mnist, tmp_path, compiling):
    data = (TensorData(mnist.train_images[:640], mnist.train_labels[:640], mnist.mean,
                       mnist.std),
            TensorData(mnist.test_images[:500], mnist.test_labels[:500], mnist.mean,
                       mnist.std))
    proto = resolve_protocol("seed", {"epochs": 2, "batch_size": 64, "lr": 0.05})
    config = RunConfig(model=CASES["mlp-bn"], protocol=proto, subset=640, precision="fp32",
                       compile="inductor")
    whole = train(config, tmp_path / "whole", device="cpu", threads=1, data=data)
    first = train(config, tmp_path / "split", device="cpu", threads=1, data=data, until=1)
    assert first.paused
    rest = train(config, tmp_path / "split", device="cpu", threads=1, data=data)

    def numbers(history):
        return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in history]

    assert numbers(rest.history) == numbers(whole.history)
    stored = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert stored["run"]["compile"] == "inductor"
    assert stored["paths"]["step"] == "compiled" and stored["paths"]["compile"] == "inductor"


def test_a_users_norm_by_import_path_gets_the_compiled_step(importable, compiling):
    norm = f"{USER_MODULE}:ShiftedRMS"
    # compiled by default, on the seed's network as on any (trained here in the MLP, whose
    # graph compiles in seconds)
    assert RunConfig(model=ModelConfig(norms=(norm,))).compile == "inductor"
    config = ModelConfig(norms=(norm,), net="mlp")
    eager, model, reference, step = twins(config)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    want, got = reference(x, y), step(x, y)
    paths = step.paths()
    if paths["compiled_steps"]:  # taken: autograd's numbers to rounding
        assert paths["step"] == "compiled" and paths["compile"] == "inductor"
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
        for a, b in zip(state(model), state(eager), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    else:  # refused: autograd's, bit for bit
        assert paths["compile"].startswith("inductor failed")
        assert all(torch.equal(a, b) for a, b in zip(state(model), state(eager), strict=True))


def test_info_names_the_step_each_norm_and_net_gets_by_default(compiling):
    from normlab.accel import hostinfo
    from normlab.models.norms import norm_names

    said = dict(part.split(": ", 1)[::-1] for part in hostinfo.norms().split("; "))
    steps = {name: step.split(" ")[0] for step, names in said.items()
             for name in names.split(", ")}
    assert set(steps) == {*norm_names(), "gn+ws", "yours by import path"}
    for name, step in steps.items():
        if name in ("bn", "ln", "gn", "in"):
            assert step == "the", name  # "the step above": the hand step
        elif name == "yours by import path" or compiled_module.SPEEDUP.get(name, 0) >= 1.03:
            assert step == "compiled", name
        else:
            assert step == "autograd", name
    nets = hostinfo.nets()
    assert "mlp (the BN paper's MLP): autograd" in nets
    assert "resnet (He et al.'s CIFAR ResNet): compiled" in nets


def test_a_second_run_in_a_process_compiles_nothing(compiling):
    """A suite's worker trains one model after another: the next model of the same network
    and norm runs the graphs the first one compiled (a suite pays compilation once per
    process, not per run)."""
    from torch._dynamo.utils import counters

    config = CASES["mlp-bn"]
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    graphs, taken = [], []
    for seed in range(2):
        torch.manual_seed(seed)
        step = accel.prepare(build_model(config), config, "fp32", compile="inductor")
        step(x, y)
        taken.append(step.paths()["compiled_steps"] == 1)
        graphs.append(counters["stats"]["unique_graphs"])
    if not taken[0]:  # refused on this host kind (see the first test): autograd, both
        assert taken == [False, False]
        return
    assert taken == [True, True] and graphs[0] >= 1 and graphs[1] == graphs[0]
