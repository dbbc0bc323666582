"""The normalization zoo (normlab.models.zoo) against its references.

Bitwise (torch.equal) where the computation is the same; allclose with the tolerance
stated where it is not:
- BatchRenorm2d: nn.BatchNorm2d at r_max=1, d_max=0 (bitwise); a float64 formula with
  r, d clipped and held constant (float32 vs float64: rtol 1e-5, atol 1e-5).
- GhostBatchNorm2d: nn.BatchNorm2d applied chunk by chunk, and on the whole batch when the
  virtual batch covers it (bitwise).
- FilterResponseNorm2d, EvoNormS0, EvoNormB0: timm 1.0.29's FilterResponseNormTlu2d,
  EvoNorm2dS0, EvoNorm2dB0 (the same ops in the same order: bitwise).
- StdConv2d: timm's StdConv2d (timm standardises with F.batch_norm: rtol 1e-5, atol 1e-6
  of each tensor's largest magnitude).
- RMSNorm2d: torch.nn.RMSNorm on the (B, H, W, C) tensor times the per-channel weight
  (another reduction order: rtol 1e-6, atol 1e-6).
- NoisyBatchNorm2d/1d: nn.BatchNorm2d/1d at shift 0 and scale 1, and nn.BatchNorm2d/1d
  times the scale plus the shift drawn from the same seed (bitwise).
timm is installed without its torchvision requirement (see the Makefile), so its layer
files are imported without running timm/__init__.py, which imports torchvision.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import itertools
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import require_tool
from normlab.fields import ConfigError
from normlab.models.zoo import (
    BatchRenorm2d,
    EvoNormB0,
    EvoNormS0,
    FilterResponseNorm2d,
    GhostBatchNorm2d,
    NoisyBatchNorm1d,
    NoisyBatchNorm2d,
    RMSNorm2d,
    StdConv2d,
)

SEED_WIDTHS = (8, 16, 12, 14, 14)  # the seed network's normalised conv blocks
# The seed network's convolutions: (in, out, kernel, padding), as models.net.LAYOUT.
SEED_CONVS = ((1, 8, 3, 0), (8, 16, 3, 0), (16, 8, 1, 0), (8, 12, 3, 0), (12, 14, 3, 0),
              (14, 14, 3, 1), (14, 10, 1, 0))


def maps(*shape: int, seed: int = 0, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale + shift


def randomize(module: nn.Module, seed: int = 1) -> nn.Module:
    """Give every parameter random values (ones and zeros would hide a swapped scale/shift)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if p.dim() == 1 else 0.0))
    return module


def step(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> dict[str, torch.Tensor]:
    """One forward and backward of ``module`` on a copy of ``x``; the output, the input's
    gradient, the parameters' gradients and the buffers afterwards, by name."""
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = module(x)
    (y * grad).sum().backward()
    out = {"y": y.detach(), "x.grad": x.grad}
    out.update({f"{n}.grad": p.grad for n, p in module.named_parameters()})
    out.update({n: b.clone() for n, b in module.named_buffers()})
    return out


def assert_same(ours: dict, ref: dict, *, bitwise: bool = True, rtol: float = 0.0,
                atol: float = 0.0, atol_of_max: bool = False) -> None:
    """Each tensor of ``ours`` torch.equal to ``ref``'s, or allclose with rtol and atol
    (with ``atol_of_max``, atol times the reference tensor's largest magnitude)."""
    assert ours.keys() == ref.keys()
    for name in ref:
        if bitwise:
            assert torch.equal(ours[name], ref[name]), name
        else:
            scale = float(ref[name].abs().max()) if atol_of_max else 1.0
            torch.testing.assert_close(ours[name], ref[name], rtol=rtol, atol=atol * scale,
                                       msg=lambda m, name=name: f"{name}: {m}")


# --- timm, imported without torchvision ---------------------------------------------------------

@pytest.fixture(scope="module")
def timm_layers() -> types.SimpleNamespace:
    """timm's reference layers. timm/__init__.py imports timm.layers, whose __init__ imports
    torchvision (create_norm, norm_act); torchvision is not installed beside the CPU torch.
    So the three layer files are imported under stand-in ``timm`` and ``timm.layers``
    packages (their own imports are only torch and other timm.layers files), and
    sys.modules is restored afterwards."""
    spec = importlib.util.find_spec("timm")
    require_tool(spec is not None, "timm 1.0.29 (make test installs it with --no-deps)")
    root = Path(spec.submodule_search_locations[0])
    saved = {k: m for k, m in sys.modules.items() if k == "timm" or k.startswith("timm.")}
    for name, path in (("timm", root), ("timm.layers", root / "layers")):
        package = types.ModuleType(name)
        package.__path__ = [str(path)]
        sys.modules[name] = package
    try:
        frn = importlib.import_module("timm.layers.filter_response_norm")
        evo = importlib.import_module("timm.layers.evo_norm")
        std = importlib.import_module("timm.layers.std_conv")
    finally:
        for k in [k for k in sys.modules if k == "timm" or k.startswith("timm.")]:
            del sys.modules[k]
        sys.modules.update(saved)
    assert "torchvision" not in sys.modules
    return types.SimpleNamespace(FilterResponseNormTlu2d=frn.FilterResponseNormTlu2d,
                                 EvoNorm2dS0=evo.EvoNorm2dS0, EvoNorm2dB0=evo.EvoNorm2dB0,
                                 StdConv2d=std.StdConv2d)


def test_timm_is_the_pinned_version(timm_layers):
    from importlib.metadata import version

    assert version("timm") == "1.0.29"


# --- BatchRenorm2d ------------------------------------------------------------------------------

@pytest.mark.parametrize("affine", [True, False])
def test_brn_with_r1_d0_is_batchnorm(affine):
    brn = BatchRenorm2d(6, affine=affine, r_max=1.0, d_max=0.0)
    bn = nn.BatchNorm2d(6, affine=affine)
    if affine:
        randomize(bn)
        brn.load_state_dict(bn.state_dict())
    for k in range(3):  # running statistics far from the batch's: r and d would be large
        x, grad = maps(5, 6, 7, 7, seed=k, scale=3.0, shift=2.0), maps(5, 6, 7, 7, seed=10 + k)
        assert_same(step(brn, x, grad), step(bn, x, grad))
    assert int(brn.num_batches_tracked) == 3
    brn.eval()
    bn.eval()
    x, grad = maps(5, 6, 7, 7, seed=20), maps(5, 6, 7, 7, seed=21)
    assert_same(step(brn, x, grad), step(bn, x, grad))


def brn_float64(x, weight, bias, running_mean, running_var, *, eps, momentum, r_max, d_max,
                detach=True):
    """Batch renorm's training step from the paper's formulas, in float64."""
    var_b, mu_b = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    sigma_b = torch.sqrt(var_b + eps)
    sigma_run = torch.sqrt(running_var + eps)
    r = torch.clamp(sigma_b / sigma_run, 1 / r_max, r_max)
    d = torch.clamp((mu_b - running_mean) / sigma_run, -d_max, d_max)
    if detach:
        r, d = r.detach(), d.detach()
    view = (1, -1, 1, 1)
    x_hat = (x - mu_b.view(view)) / sigma_b.view(view)
    y = weight.view(view) * (x_hat * r.view(view) + d.view(view)) + bias.view(view)
    n = x.numel() / x.shape[1]
    new_mean = (1 - momentum) * running_mean + momentum * mu_b.detach()
    new_var = (1 - momentum) * running_var + momentum * var_b.detach() * n / (n - 1)
    return y, r, d, new_mean, new_var


def test_brn_against_float64_formula():
    C = 4
    brn = randomize(BatchRenorm2d(C, r_max=2.0, d_max=1.0, momentum=0.2))
    # Channel by channel: r clipped high, in range, clipped low, in range; d clipped at
    # +1, in range, clipped at -1, in range (the batch's std is 1, its mean 0).
    mean0 = torch.tensor([-3.0, 0.2, 5.0, -0.3], dtype=torch.float64)
    var0 = torch.tensor([0.01, 0.8, 16.0, 1.5], dtype=torch.float64)
    brn.running_mean.copy_(mean0)
    brn.running_var.copy_(var0)
    x, grad = maps(8, C, 5, 5, seed=3), maps(8, C, 5, 5, seed=4)
    r, d = brn.corrections(x)
    assert not r.requires_grad and not d.requires_grad

    x64 = x.double().requires_grad_(True)
    w64 = brn.weight.detach().double().requires_grad_(True)
    b64 = brn.bias.detach().double().requires_grad_(True)
    params = dict(eps=brn.eps, momentum=brn.momentum, r_max=2.0, d_max=1.0)
    y64, r64, d64, mean64, var64 = brn_float64(x64, w64, b64, mean0, var0, **params)
    assert r64.tolist()[0] == 2.0 and r64.tolist()[2] == 0.5 and 0.5 < r64[1] < 2.0
    assert d64.tolist()[0] == 1.0 and d64.tolist()[2] == -1.0 and abs(d64[3]) < 1.0
    (y64 * grad.double()).sum().backward()
    ref = {"y": y64, "x.grad": x64.grad, "weight.grad": w64.grad, "bias.grad": b64.grad,
           "running_mean": mean64, "running_var": var64,
           "num_batches_tracked": torch.tensor(1)}
    ref = {k: v.detach().to(torch.long if k == "num_batches_tracked" else torch.float32)
           for k, v in ref.items()}
    torch.testing.assert_close(r, r64.float(), rtol=1e-6, atol=0)
    torch.testing.assert_close(d, d64.float(), rtol=1e-6, atol=1e-7)
    assert_same(step(brn, x, grad), ref, bitwise=False, rtol=1e-5, atol=1e-5)

    # r and d carry no gradient: with them differentiated, the input's gradient moves.
    x64b = x.double().requires_grad_(True)
    y64b = brn_float64(x64b, w64.detach(), b64.detach(), mean0, var0, **params,
                       detach=False)[0]
    (y64b * grad.double()).sum().backward()
    assert (x64b.grad - x64.grad).abs().max() > 1e-2


def test_brn_eval_is_batchnorm_eval():
    brn, bn = randomize(BatchRenorm2d(5)), nn.BatchNorm2d(5)
    brn.running_mean.copy_(torch.linspace(-1, 1, 5))
    brn.running_var.copy_(torch.linspace(0.5, 3, 5))
    bn.load_state_dict(brn.state_dict())
    brn.eval()
    bn.eval()
    x, grad = maps(3, 5, 6, 6, seed=7), maps(3, 5, 6, 6, seed=8)
    assert_same(step(brn, x, grad), step(bn, x, grad))


def test_brn_and_gbn_running_statistics_recalibrate_as_batchnorms():
    """torch.optim.swa_utils.update_bn (PreciseBN's recipe: reset, momentum None, a
    cumulative average over the batches) takes both, and gives BN's statistics of the same
    batches (per chunk for ghost BN)."""
    from torch.optim.swa_utils import update_bn

    batches = [maps(8, 4, 5, 5, seed=k, shift=k) for k in range(3)]
    brn, bn = nn.Sequential(BatchRenorm2d(4)), nn.Sequential(nn.BatchNorm2d(4))
    gbn, bn_chunks = nn.Sequential(GhostBatchNorm2d(4, virtual_batch=4)), nn.Sequential(
        nn.BatchNorm2d(4))
    for model, data in ((brn, batches), (bn, batches), (gbn, batches),
                        (bn_chunks, [c for b in batches for c in b.split(4)])):
        update_bn(data, model)
    for ours, ref in ((brn, bn), (gbn, bn_chunks)):
        assert torch.equal(ours[0].running_mean, ref[0].running_mean)
        assert torch.equal(ours[0].running_var, ref[0].running_var)
        assert ours[0].momentum == 0.1  # restored


def test_brn_warmup_ramps_the_limits():
    # momentum 0 freezes the running statistics far from the batch's, so r and d sit at
    # the limits in force: 1/r_max(t) (the batch std is ~1, the running one 10) and d_max(t).
    brn = BatchRenorm2d(3, momentum=0.0, r_max=3.0, d_max=5.0, warmup_steps=4)
    brn.running_mean.fill_(-100.0)
    brn.running_var.fill_(100.0)
    r_max0, d_max0 = brn.limits()
    assert float(r_max0) == 1.0 and float(d_max0) == 0.0  # step 0 is plain BN
    for t in range(6):
        frac = min(t / 4, 1.0)
        r_max_t, d_max_t = 1 + 2 * frac, 5 * frac
        r, d = brn.corrections(maps(4, 3, 5, 5, seed=t))
        torch.testing.assert_close(r, torch.full((3,), 1 / r_max_t), rtol=1e-6, atol=0)
        torch.testing.assert_close(d, torch.full((3,), d_max_t), rtol=1e-6, atol=0)
        brn(maps(4, 3, 5, 5, seed=t))
    assert int(brn.num_batches_tracked) == 6
    # Eval neither uses r, d nor counts.
    brn.eval()
    brn(maps(4, 3, 5, 5))
    assert int(brn.num_batches_tracked) == 6


@pytest.mark.parametrize("options, field", [
    ({"r_max": 0.5}, "r_max"), ({"d_max": -1.0}, "d_max"), ({"warmup_steps": -1}, "warmup_steps"),
    ({"warmup_steps": 2.5}, "warmup_steps"), ({"eps": 0.0}, "eps"), ({"momentum": 1.5}, "momentum"),
    ({"affine": "yes"}, "affine"),
])
def test_brn_rejects_bad_options(options, field):
    with pytest.raises(ConfigError, match=field) as err:
        BatchRenorm2d(8, **options)
    assert err.value.field == field


# --- GhostBatchNorm2d ---------------------------------------------------------------------------

@pytest.mark.parametrize("batch, virtual", [(12, 4), (10, 4), (7, 3)])
def test_gbn_is_batchnorm_per_chunk(batch, virtual):
    gbn = randomize(GhostBatchNorm2d(6, virtual_batch=virtual, momentum=0.3))
    bn = nn.BatchNorm2d(6, momentum=0.3)
    bn.load_state_dict(gbn.state_dict())

    class PerChunk(nn.Module):  # the reference: BN applied to each chunk in turn
        def __init__(self):
            super().__init__()
            self.bn = bn

        def forward(self, x):
            return torch.cat([self.bn(chunk) for chunk in x.split(virtual)])

    ref = PerChunk()
    chunks = -(-batch // virtual)
    for k in range(2):
        x, grad = maps(batch, 6, 5, 5, seed=k, shift=1.0), maps(batch, 6, 5, 5, seed=5 + k)
        ours, theirs = step(gbn, x, grad), step(ref, x, grad)
        assert_same(ours, {k.removeprefix("bn."): v for k, v in theirs.items()})
    assert int(gbn.num_batches_tracked) == 2 * chunks
    gbn.eval()
    bn.eval()
    x, grad = maps(batch, 6, 5, 5, seed=9), maps(batch, 6, 5, 5, seed=10)
    assert_same(step(gbn, x, grad), step(bn, x, grad))


@pytest.mark.parametrize("virtual", [8, 16])
def test_gbn_is_batchnorm_when_the_virtual_batch_covers_the_batch(virtual):
    gbn = randomize(GhostBatchNorm2d(4, virtual_batch=virtual))
    bn = nn.BatchNorm2d(4)
    bn.load_state_dict(gbn.state_dict())
    for k in range(2):
        x, grad = maps(8, 4, 6, 6, seed=k), maps(8, 4, 6, 6, seed=3 + k)
        assert_same(step(gbn, x, grad), step(bn, x, grad))
    gbn.eval()
    bn.eval()
    assert torch.equal(gbn(maps(8, 4, 6, 6)), bn(maps(8, 4, 6, 6)))


@pytest.mark.parametrize("virtual", [0, -2, 2.5, True])
def test_gbn_rejects_bad_virtual_batch(virtual):
    with pytest.raises(ConfigError, match="virtual_batch"):
        GhostBatchNorm2d(8, virtual_batch=virtual)


# --- NoisyBatchNorm2d ---------------------------------------------------------------------------

NOISY = ((NoisyBatchNorm2d, nn.BatchNorm2d, (6, 5, 4, 4)),
         (NoisyBatchNorm1d, nn.BatchNorm1d, (6, 5)))


@pytest.mark.parametrize("noisy, bn, shape", NOISY)
def test_noisy_bn_without_noise_is_batchnorm(noisy, bn, shape):
    ours = randomize(noisy(5, shift=0.0, scale=1.0))
    ref = bn(5)
    ref.load_state_dict(ours.state_dict())
    for k in range(2):
        x, grad = maps(*shape, seed=k, shift=k), maps(*shape, seed=9 + k)
        assert_same(step(ours, x, grad), step(ref, x, grad))
    ours.eval(), ref.eval()
    assert_same(step(ours, x, grad), step(ref, x, grad))


class NoisyReference(nn.Module):
    """BatchNorm, then its output times s plus m, (s, m) drawn as the formula says."""

    def __init__(self, bn, shift, scale):
        super().__init__()
        self.bn, self.shift, self.scale = bn, shift, scale

    def forward(self, x):
        y = self.bn(x)
        u = torch.rand(2, y.shape[1])
        view = (1, -1) + (1,) * (y.dim() - 2)
        s, m = 1 + (self.scale - 1) * (2 * u[0] - 1), self.shift * (2 * u[1] - 1)
        return y * s.view(view) + m.view(view)


@pytest.mark.parametrize("noisy, bn, shape", NOISY)
def test_noisy_bn_is_batchnorm_then_the_drawn_scale_and_shift(noisy, bn, shape):
    ours = randomize(noisy(5, shift=0.7, scale=1.8, momentum=0.2))
    ref = NoisyReference(bn(5, momentum=0.2), 0.7, 1.8)
    ref.bn.load_state_dict(ours.state_dict())
    for k in range(3):  # a new draw each step, the same from the same generator state
        x, grad = maps(*shape, seed=k, scale=2.0), maps(*shape, seed=20 + k)
        torch.manual_seed(100 + k)
        got = step(ours, x, grad)
        torch.manual_seed(100 + k)
        want = step(ref, x, grad)
        assert_same(got, {name.removeprefix("bn."): v for name, v in want.items()})


def test_noisy_bn_noise_is_per_channel_within_its_bounds_and_changes_every_step():
    norm = NoisyBatchNorm2d(16, affine=False, shift=0.5, scale=1.5)
    torch.manual_seed(0)
    draws = []
    for k in range(4):
        y = norm(maps(32, 16, 6, 6, seed=k))
        # BN's output has mean 0 and (biased) std ~1 per channel: y's are m and ~s.
        m = y.mean(dim=(0, 2, 3))
        s = y.std(dim=(0, 2, 3), unbiased=False)
        assert (m.abs() <= 0.5 + 1e-5).all()
        assert (s >= 0.5 - 1e-3).all() and (s <= 1.5 + 1e-3).all()
        draws.append(m)
    assert all(not torch.allclose(a, b) for a, b in itertools.pairwise(draws))
    assert int(norm.num_batches_tracked) == 4
    state = torch.get_rng_state()
    norm.eval()
    norm(maps(4, 16, 6, 6))  # eval draws nothing: BN's eval
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("options, field", [
    ({"shift": -0.1}, "shift"), ({"scale": 0.9}, "scale"), ({"scale": 2.0}, "scale"),
    ({"scale": "big"}, "scale"),
])
def test_noisy_bn_rejects_bad_options(options, field):
    with pytest.raises(ConfigError, match=field):
        NoisyBatchNorm2d(4, **options)


# --- against timm ------------------------------------------------------------------------------

def train_and_eval(ours: nn.Module, ref: nn.Module, shape=(4, 8, 6, 6), steps: int = 2,
                   shift: float = 0.0) -> None:
    """``ours`` and ``ref`` (with ours' parameters) bitwise equal over training steps and
    in eval: outputs, gradients, buffers."""
    ref.load_state_dict(ours.state_dict())
    for k in range(steps):
        x, grad = maps(*shape, seed=k, shift=shift), maps(*shape, seed=7 + k)
        assert_same(step(ours, x, grad), step(ref, x, grad))
    ours.eval()
    ref.eval()
    x, grad = maps(*shape, seed=20, shift=shift), maps(*shape, seed=21)
    assert_same(step(ours, x, grad), step(ref, x, grad))


@pytest.mark.parametrize("eps", [1e-6, 1e-3])
def test_frn_is_timms_filter_response_norm_tlu(timm_layers, eps):
    ours = randomize(FilterResponseNorm2d(8, eps=eps))
    train_and_eval(ours, timm_layers.FilterResponseNormTlu2d(8, eps=eps), shift=0.3)
    # The TLU: tau is the floor of every output.
    assert (ours(maps(4, 8, 6, 6)) >= ours.tau.view(1, -1, 1, 1)).all()


def test_frn_learnable_eps():
    frn = randomize(FilterResponseNorm2d(3, eps=1e-6, learnable_eps=True))
    with torch.no_grad():
        frn.eps_learned.fill_(-0.5)  # used as |eps_learned|, so the epsilon stays positive
    x = maps(2, 3, 1, 1, seed=1, scale=0.3)  # 1x1 maps, where the epsilon matters
    x64 = x.double()
    nu2 = x64.square().mean(dim=(2, 3), keepdim=True)
    view = (1, -1, 1, 1)
    y64 = torch.maximum(frn.weight.double().view(view) * x64 / torch.sqrt(nu2 + 1e-6 + 0.5)
                        + frn.bias.double().view(view), frn.tau.double().view(view))
    y = frn(x)
    torch.testing.assert_close(y, y64.float(), rtol=1e-5, atol=1e-6)
    y.sum().backward()
    assert frn.eps_learned.grad is not None and frn.eps_learned.grad != 0


@pytest.mark.parametrize("channels, groups", [(8, 2), (12, 4), (14, 1)])
def test_evonorm_s0_is_timms(timm_layers, channels, groups):
    train_and_eval(randomize(EvoNormS0(channels, groups=groups)),
                   timm_layers.EvoNorm2dS0(channels, groups=groups), shape=(3, channels, 5, 5))


def test_evonorm_b0_is_timms(timm_layers):
    ours = randomize(EvoNormB0(8, momentum=0.2))
    ours.running_var.copy_(torch.linspace(0.5, 2.0, 8))
    train_and_eval(ours, timm_layers.EvoNorm2dB0(8, momentum=0.2), steps=3, shift=0.5)
    assert not torch.equal(ours.running_var, torch.linspace(0.5, 2.0, 8))


def test_evonorm_defaults_are_timms(timm_layers):
    b0, ref_b0 = EvoNormB0(8), timm_layers.EvoNorm2dB0(8)
    assert (b0.eps, b0.momentum) == (ref_b0.eps, ref_b0.momentum) == (1e-3, 0.1)
    assert EvoNormS0(8).eps == timm_layers.EvoNorm2dS0(8, groups=2).eps == 1e-5
    assert StdConv2d(8, 8, 3).eps == timm_layers.StdConv2d(8, 8, 3).eps == 1e-6


@pytest.mark.parametrize("c_in, c_out, kernel, padding, bias", [
    (8, 16, 3, 0, False), (14, 14, 3, 1, False), (16, 8, 1, 0, True)])
def test_std_conv_is_timms(timm_layers, c_in, c_out, kernel, padding, bias):
    torch.manual_seed(0)
    ours = StdConv2d(c_in, c_out, kernel, padding=padding, bias=bias)
    ref = timm_layers.StdConv2d(c_in, c_out, kernel, padding=padding, bias=bias)
    ref.load_state_dict(ours.state_dict())
    x, grad = maps(3, c_in, 9, 9, seed=2), maps(3, c_out, 9 - kernel + 1 + 2 * padding,
                                                9 - kernel + 1 + 2 * padding, seed=3)
    # timm standardises through F.batch_norm, here var_mean: equal to rounding. Gradients
    # are sums of hundreds of products that partly cancel (the weight's reach ~1000, as
    # 1/sigma of a filter is ~15): atol is 1e-6 of each tensor's largest magnitude.
    assert_same(step(ours, x, grad), step(ref, x, grad), bitwise=False, rtol=1e-5, atol=1e-6,
                atol_of_max=True)
    # Each filter standardised: mean 0, variance var / (var + eps) (eps is not negligible
    # beside the variance of a default-initialised filter, about 1 / (3 fan_in)).
    raw_var = ours.weight.detach().double().var(dim=(1, 2, 3), unbiased=False)
    var, mean = torch.var_mean(ours.standardized_weight().detach().double(), dim=(1, 2, 3),
                               unbiased=False)
    torch.testing.assert_close(mean, torch.zeros_like(mean), rtol=0, atol=1e-6)
    torch.testing.assert_close(var, raw_var / (raw_var + ours.eps), rtol=1e-5, atol=0)


# --- RMSNorm2d ----------------------------------------------------------------------------------

class TorchRMS(nn.Module):
    """torch.nn.RMSNorm over (H, W, C) of the permuted (B, H, W, C) tensor, no affine, times
    the per-channel weight."""

    def __init__(self, channels, eps, shape):
        super().__init__()
        self.norm = nn.RMSNorm(shape, eps=eps, elementwise_affine=False)
        self.weight = nn.Parameter(torch.ones(channels))

    def forward(self, x):
        y = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return y * self.weight.view(1, -1, 1, 1)


@pytest.mark.parametrize("eps", [None, 1e-5])
def test_rms_norm_is_torchs(eps):
    B, C, H, W = 4, 12, 6, 6
    ours = randomize(RMSNorm2d(C, eps=eps))
    ref = TorchRMS(C, eps, (H, W, C))
    ref.load_state_dict(ours.state_dict())
    for k in range(2):
        x, grad = maps(B, C, H, W, seed=k, shift=0.5), maps(B, C, H, W, seed=5 + k)
        # The same formula, summed in another order (permuted): equal to rounding.
        assert_same(step(ours, x, grad), step(ref, x, grad), bitwise=False, rtol=1e-6,
                    atol=1e-6)


# --- construction -------------------------------------------------------------------------------

@pytest.mark.parametrize("make, field", [
    (lambda: EvoNormS0(14, groups=4), "groups"), (lambda: EvoNormS0(8, groups=0), "groups"),
    (lambda: EvoNormB0(8, momentum=-0.1), "momentum"), (lambda: EvoNormB0(8, eps=-1), "eps"),
    (lambda: FilterResponseNorm2d(8, eps=0), "eps"), (lambda: RMSNorm2d(8, eps=-1e-6), "eps"),
    (lambda: FilterResponseNorm2d(0), "num_features"), (lambda: StdConv2d(8, 8, 3, eps=0), "eps"),
    (lambda: FilterResponseNorm2d(8, learnable_eps=1), "learnable_eps"),
])
def test_bad_options_name_the_option(make, field):
    with pytest.raises(ConfigError, match=field):
        make()


# --- drop-in for the seed network's norms, under bf16 autocast ----------------------------------

ZOO = {
    "brn": lambda c: BatchRenorm2d(c, r_max=2.0, d_max=1.0),
    "gbn": lambda c: GhostBatchNorm2d(c, virtual_batch=4),
    "frn": lambda c: FilterResponseNorm2d(c, learnable_eps=True),
    "evo-s0": lambda c: EvoNormS0(c, groups=2),
    "evo-b0": lambda c: EvoNormB0(c),
    "rms": lambda c: RMSNorm2d(c),
    "noisy-bn": lambda c: NoisyBatchNorm2d(c),
}


@pytest.mark.parametrize("name", ZOO)
def test_norms_at_the_seed_widths_under_bf16_autocast(name):
    for channels in sorted(set(SEED_WIDTHS)):
        conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        norm = randomize(ZOO[name](channels))
        twin = copy.deepcopy(norm)  # the same step on the same input, in float32
        x = maps(6, channels, 8, 8, seed=channels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = conv(x)
            torch.manual_seed(channels)  # the same noise for noisy BN's twin
            y = norm(h)
        assert h.dtype == y.dtype == torch.bfloat16
        assert y.shape == x.shape
        # Statistics in float32: only the output's rounding to bf16 differs from float32.
        torch.manual_seed(channels)
        torch.testing.assert_close(y.float(), twin(h.float()), rtol=1e-2, atol=1e-2)
        y.float().square().mean().backward()
        for n, p in norm.named_parameters():
            assert p.grad is not None and p.grad.dtype == torch.float32, n
            assert torch.isfinite(p.grad).all(), n
        for n, b in norm.named_buffers():
            assert b.dtype == twin.get_buffer(n).dtype, n
            if b.is_floating_point():
                assert b.dtype == torch.float32 and torch.isfinite(b).all(), n
                torch.testing.assert_close(b, twin.get_buffer(n), rtol=1e-2, atol=1e-3)
        assert torch.isfinite(conv.weight.grad).all()


def test_std_conv_at_the_seed_convolutions_under_bf16_autocast():
    for c_in, c_out, kernel, padding in SEED_CONVS:
        conv = StdConv2d(c_in, c_out, kernel, padding=padding, bias=False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = conv(maps(4, c_in, 12, 12, seed=c_in))
        assert y.dtype == torch.bfloat16
        y.float().sum().backward()
        assert conv.weight.grad.dtype == torch.float32 and torch.isfinite(conv.weight.grad).all()
