"""normlab's C kernels for ReLU -> BatchNorm / GroupNorm: against float64 references, inside
the network against torch's ops, reproducible, and failing clearly where they cannot be
built. Under CI a missing C compiler is a failure, not a skip."""

import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import require_tool
from normlab.accel import accelerated_net, kernels
from normlab.models import ModelConfig
from normlab.models.config import default_kernels
from normlab.models.dropout import bernoulli_positions, drop_positions
from normlab.training.augment import to_input

CL = torch.channels_last


@pytest.fixture(scope="module", autouse=True)
def compiled():
    require_tool(kernels.compiler() is not None, "a C compiler (cc)")
    kernels.library()


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    w = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(c, generator=g, dtype=torch.float64)
    grad = torch.randn(shape, generator=g, dtype=torch.float64)
    return x, w, b, grad


def _kernel_run(fn, x, w, b, grad, dtype):
    xk = x.to(dtype).contiguous(memory_format=CL).requires_grad_()
    wk, bk = w.float().requires_grad_(), b.float().requires_grad_()
    y = fn(xk, wk, bk)
    assert y.dtype == dtype and y.is_contiguous(memory_format=CL)
    return (y, *torch.autograd.grad(y, (xk, wk, bk), grad.to(dtype).contiguous(memory_format=CL)))


def _reference_run(fn, x, w, b, grad):
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    y = fn(xr, wr, br)
    return (y, *torch.autograd.grad(y, (xr, wr, br), grad))


def _close(got, want, dtype):
    """Relative to each tensor's scale: fp32 to ~1e-6, bf16 to its 8-bit mantissa."""
    tol = 2e-5 if dtype == torch.float32 else 6e-2
    for a, r in zip(got, want, strict=True):
        scale = r.abs().max().item()
        assert (a.double() - r).abs().max().item() <= tol * max(scale, 1.0), (a, r)


# (shape, groups): widths of the seed's network (8, 16, 12, 14: lanes 16, 16, 48, 112),
# maps whose value count is not a whole number of lane blocks, and a 1x1 map.
SHAPES = [((6, 8, 5, 5), 2), ((4, 16, 6, 6), 2), ((3, 12, 5, 3), 2), ((5, 14, 3, 3), 1),
          ((2, 14, 8, 8), 14), ((7, 4, 1, 1), 1), ((2, 32, 3, 3), 4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize(("shape", "groups"), SHAPES)
def test_batch_norm_matches_float64(shape, groups, relu, dtype):
    x, w, b, grad = _inputs(shape, dtype)
    c, scale, momentum = shape[1], 1.25, 0.1
    mean0, var0 = torch.randn(c), torch.rand(c) + 0.5
    rm, rv = mean0.clone(), var0.clone()
    got = _kernel_run(lambda x, w, b: kernels.batch_norm(x, w, b, rm, rv, momentum, 1e-5,
                                                         scale, relu), x, w, b, grad, dtype)
    rm_ref, rv_ref = mean0.double(), var0.double()
    want = _reference_run(lambda x, w, b: scale * F.batch_norm(
        F.relu(x) if relu else x, rm_ref, rv_ref, w, b, True, momentum, 1e-5), x, w, b, grad)
    _close(got, want, dtype)
    _close((rm, rv), (rm_ref, rv_ref), dtype)  # running stats: momentum, unbiased variance


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize(("shape", "groups"), SHAPES)
def test_group_norm_matches_float64(shape, groups, relu, dtype):
    x, w, b, grad = _inputs(shape, dtype, seed=1)
    scale = 1.25
    got = _kernel_run(lambda x, w, b: kernels.group_norm(x, groups, w, b, 1e-5, scale, relu),
                      x, w, b, grad, dtype)
    want = _reference_run(lambda x, w, b: scale * F.group_norm(
        F.relu(x) if relu else x, groups, w, b, 1e-5), x, w, b, grad)
    _close(got, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize(("shape", "groups"), SHAPES)
def test_batch_norm_eval_matches_float64(shape, groups, relu, dtype):
    x, w, b, _ = _inputs(shape, dtype, seed=2)
    c = shape[1]
    rm, rv = torch.randn(c), torch.rand(c) + 0.5
    rm0, rv0 = rm.clone(), rv.clone()
    got = kernels.batch_norm_eval(x.to(dtype).contiguous(memory_format=CL), w.float(),
                                  b.float(), rm, rv, 1e-5, relu)
    assert got.dtype == dtype and got.is_contiguous(memory_format=CL)
    want = F.batch_norm(F.relu(x) if relu else x, rm.double(), rv.double(), w, b, False,
                        0.0, 1e-5)
    _close((got,), (want,), dtype)
    assert torch.equal(rm, rm0) and torch.equal(rv, rv0)  # eval: the statistics are read


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", ["bn", "gn"])
@pytest.mark.parametrize(("shape", "groups"), SHAPES)
def test_folded_dropout_equals_zeroing_copies_bitwise(shape, groups, norm, dtype):
    """The kernels given the dropped units give exactly what dropping them after the
    kernel gives (``drop_positions``: zero the output, and a copy of the gradient)."""
    x, w, b, grad = _inputs(shape, dtype, seed=5)
    drop = bernoulli_positions(x.numel(), 0.2, torch.Generator().manual_seed(9))
    assert 0 < drop.numel() < x.numel()

    def norm_fn(drop_arg):
        if norm == "bn":
            stats = (torch.zeros(shape[1]), torch.ones(shape[1]))
            return lambda xk, wk, bk: kernels.batch_norm(xk, wk, bk, *stats, 0.1, 1e-5, 1.25,
                                                         relu=True, drop=drop_arg)
        return lambda xk, wk, bk: kernels.group_norm(xk, groups, wk, bk, 1e-5, 1.25,
                                                     relu=True, drop=drop_arg)

    folded = _kernel_run(norm_fn(drop), x, w, b, grad, dtype)
    after = norm_fn(None)
    composed = _kernel_run(lambda *a: drop_positions(after(*a), drop), x, w, b, grad, dtype)
    for got, want in zip(folded, composed, strict=True):
        assert torch.equal(got, want)
    assert (folded[0].flatten()[drop] == 0).all()  # logical indices, whatever the layout


def test_dropped_units_outside_the_tensor_are_refused_before_anything_changes():
    x = torch.randn(2, 8, 3, 3).contiguous(memory_format=CL)
    w, b, mean, var = torch.ones(8), torch.zeros(8), torch.zeros(8), torch.ones(8)
    for bad in (torch.tensor([0, x.numel()]), torch.tensor([-1])):
        with pytest.raises(ValueError, match="outside the tensor"):
            kernels.batch_norm(x, w, b, mean, var, 0.1, 1e-5, drop=bad)
        with pytest.raises(ValueError, match="outside the tensor"):
            kernels.group_norm(x, 2, w, b, 1e-5, drop=bad)
    assert torch.equal(mean, torch.zeros(8)) and torch.equal(var, torch.ones(8))
    with pytest.raises(ValueError, match="int64"):
        kernels.batch_norm(x, w, b, mean, var, 0.1, 1e-5, drop=torch.tensor([0.0]))


def _pool_input(shape, kind, dtype):
    g = torch.Generator().manual_seed(2)
    if kind == "ties":  # few distinct values: many windows with equal maxima
        x = torch.randint(0, 3, shape, generator=g).float()
    else:
        x = torch.randn(shape, generator=g)
    if kind == "inf":
        x[0, :, :4, :4] = float("-inf")
        x[0, 0, 0, 1] = float("inf")
    if kind == "nan":
        x.view(-1)[torch.randperm(x.numel(), generator=g)[:40]] = float("nan")
    return x.to(dtype).contiguous(memory_format=CL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["randn", "ties", "inf", "nan"])
@pytest.mark.parametrize("shape", [(3, 8, 24, 24), (2, 11, 7, 9), (2, 3, 4, 4), (1, 16, 6, 5)])
def test_max_pool_picks_as_torch_does(shape, kind, dtype):
    """Values and gradients bitwise torch's (NaN where torch has NaN): 8-channel vector
    blocks, remainders, odd sizes, ties, infinities, NaNs."""
    x = _pool_input(shape, kind, dtype)
    g = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2).to(dtype)
    g = g.contiguous(memory_format=CL)
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, want = kernels.max_pool_2x2(ours), F.max_pool2d(theirs, 2, 2)
    y.backward(g)
    want.backward(g)
    assert y.dtype == dtype and y.is_contiguous(memory_format=CL)
    assert torch.equal(y.isnan(), want.isnan())
    assert torch.equal(y.detach().nan_to_num(), want.detach().nan_to_num())
    assert torch.equal(ours.grad, theirs.grad)


def test_the_network_pools_with_the_kernel_only_where_it_applies():
    net = accelerated_net(ModelConfig(kernels="normlab"))
    assert type(net.pool1).__name__ == "MaxPool2x2"
    assert type(accelerated_net(ModelConfig(kernels="aten")).pool1) is torch.nn.MaxPool2d
    x = torch.randn(2, 8, 6, 6)  # contiguous: torch's pooling, the same numbers
    assert not kernels.pool_applies(x)
    assert torch.equal(net.pool1(x), F.max_pool2d(x, 2, 2))
    with pytest.raises(ValueError, match="channels-last"):
        kernels.max_pool_2x2(x)


def test_rotation_gives_torchs_pixels(mnist):
    """The C rotation against ``to_input`` (torch's affine_grid + grid_sample in float32) on
    real digits at random angles: the same values, pixel for pixel, but for a pixel whose
    source is within float32 rounding of a half-way point (about one in 10 million: the
    geometry is in double); at 0 degrees the plain normalisation, at 90 a quarter turn."""
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(mnist.train_labels), generator=g)[:2000]
    angles = (torch.rand(2000, generator=g) * 2 - 1) * 15
    ours = kernels.rotate_normalize(mnist.train_images, idx, angles, mnist.mean, mnist.std)
    theirs = to_input(mnist.train_images[idx], mnist.mean, mnist.std, angles)
    assert ours.shape == theirs.shape == (2000, 1, 28, 28) and ours.dtype == torch.float32
    assert (ours != theirs).sum().item() <= 10  # of 1.6 million
    zero = torch.zeros(8)
    assert torch.equal(kernels.rotate_normalize(mnist.train_images, idx[:8], zero, mnist.mean,
                                                mnist.std),
                       to_input(mnist.train_images[idx[:8]], mnist.mean, mnist.std))
    quarter = kernels.rotate_normalize(mnist.train_images, idx[:8], zero + 90, 0.0, 1.0)
    turned = torch.rot90(mnist.train_images[idx[:8]].float() / 255, 1, (1, 2)).unsqueeze(1)
    assert torch.equal(quarter, turned)  # counter-clockwise, as torchvision turns a PIL image


def test_rotation_refuses_what_it_cannot_take():
    images = torch.zeros(4, 28, 28, dtype=torch.uint8)
    with pytest.raises(ValueError, match="outside the 4 images"):
        kernels.rotate_normalize(images, torch.tensor([4]), torch.zeros(1), 0.1, 0.3)
    with pytest.raises(ValueError, match="uint8"):
        kernels.rotate_normalize(images.float(), torch.tensor([0]), torch.zeros(1), 0.1, 0.3)
    with pytest.raises(ValueError, match="same length"):
        kernels.rotate_normalize(images, torch.tensor([0, 1]), torch.zeros(1), 0.1, 0.3)


def test_relu_keeps_torchs_edge_cases():
    """relu(NaN) is NaN (a diverging run stays visible) and relu'(0) is 0."""
    x = torch.zeros(2, 8, 3, 3).contiguous(memory_format=CL)
    x[0, 0, 0, 0] = float("nan")
    w, b = torch.ones(8), torch.zeros(8)
    y = kernels.group_norm(x, 2, w, b, 1e-5, 1.0, True)
    assert y[0, :4].isnan().all() and not y[1].isnan().any()  # that image's group only
    x = torch.zeros(4, 8, 3, 3).contiguous(memory_format=CL)
    x[:, :, 0, 0] = torch.arange(1.0, 5.0).view(4, 1)  # positive, so the norm is defined
    x.requires_grad_()
    y = kernels.batch_norm(x, w.clone().requires_grad_(), b, torch.zeros(8), torch.ones(8),
                           0.1, 1e-5, 1.0, True)
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y) + x.detach())
    assert (gx[:, :, 1:, :] == 0).all() and (gx[:, :, 0, 0] != 0).all()


def _train_step(kernel_choice, seed=3, dtype=torch.float32):
    torch.manual_seed(seed)
    model = accelerated_net(ModelConfig(norms=("bn",), kernels=kernel_choice))
    model = model.to(memory_format=CL).train()
    x = torch.randn(16, 1, 28, 28).contiguous(memory_format=CL)
    with torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
        out = model(x)
    loss = F.nll_loss(out.float(), torch.arange(16) % 10)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    return out.detach().float(), grads, [b.clone() for b in model.buffers()]


def test_the_network_trains_as_with_torchs_ops():
    """The same step (same init, input and dropout draws) through the kernels and through
    torch's ReLU and BatchNorm: equal to rounding, and bitwise equal run to run."""
    ours, aten = _train_step("normlab"), _train_step("aten")
    assert torch.allclose(ours[0], aten[0], atol=1e-4)
    for a, b in zip(ours[1] + ours[2], aten[1] + aten[2], strict=True):
        assert torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-4)
    again = _train_step("normlab")
    for a, b in zip([ours[0], *ours[1], *ours[2]], [again[0], *again[1], *again[2]],
                    strict=True):
        assert torch.equal(a, b)
    bf16 = _train_step("normlab", dtype=torch.bfloat16)
    assert bf16[0].isfinite().all() and all(g.isfinite().all() for g in bf16[1])


def test_where_the_kernels_do_not_apply_torchs_ops_run():
    torch.manual_seed(0)
    model = accelerated_net(ModelConfig(norms=("bn",), kernels="normlab")).train()
    x = torch.randn(4, 1, 28, 28)  # contiguous: torch's ReLU and BatchNorm
    assert not kernels.applies(model.convblock1[0](x), model.convblock1[2].weight)
    model(x).sum().backward()
    assert model.convblock1[0].weight.grad.isfinite().all()
    bad = torch.randn(2, 9, 3, 3).contiguous(memory_format=CL)  # lcm(9, 16) > 128
    assert not kernels.applies(bad, torch.ones(9))
    with pytest.raises(ValueError, match="channels-last"):
        kernels.batch_norm(torch.randn(2, 8, 3, 3), torch.ones(8), torch.zeros(8),
                           torch.zeros(8), torch.ones(8), 0.1, 1e-5)
    with pytest.raises(ValueError, match="3 groups do not divide 8 channels"):
        kernels.group_norm(torch.randn(2, 8, 3, 3).contiguous(memory_format=CL), 3,
                           torch.ones(8), torch.zeros(8), 1e-5)


@pytest.mark.parametrize("norm", ["bn", "gn", "ln"])
def test_the_test_pass_goes_through_the_kernels_with_eval_kernels(norm, monkeypatch):
    """With eval_kernels (the default with the kernels) the network's evaluation under
    no_grad runs the kernels and agrees with torch's ReLU and norms (eval_kernels="aten")
    to rounding; with autograd on, or eval_kernels="aten", torch's run."""
    torch.manual_seed(0)
    model = accelerated_net(ModelConfig(norms=(norm,), kernels="normlab",
                                        eval_kernels="normlab"))
    model = model.to(memory_format=CL)
    for _ in range(3):  # running statistics that are not the initial ones
        model(torch.randn(16, 1, 28, 28).contiguous(memory_format=CL)).sum().backward()
    aten = accelerated_net(ModelConfig(norms=(norm,), kernels="normlab", eval_kernels="aten"))
    aten = aten.to(memory_format=CL)
    aten.load_state_dict(model.state_dict())
    model.eval()
    aten.eval()
    x = torch.randn(32, 1, 28, 28).contiguous(memory_format=CL)
    calls = []
    for name in ("batch_norm_eval", "group_norm"):
        original = getattr(kernels, name)
        monkeypatch.setattr(kernels, name,
                            lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    with torch.no_grad():
        ours, theirs = model(x), aten(x)
    assert calls == [{"bn": "batch_norm_eval"}.get(norm, "group_norm")] * 5
    assert torch.allclose(ours, theirs, atol=1e-4)
    calls.clear()
    with torch.autocast("cpu", torch.bfloat16), torch.no_grad():
        assert torch.allclose(model(x).float(), aten(x).float(), atol=0.15)
    assert len(calls) == 5
    calls.clear()
    model(x)  # autograd on: torch's norms, differentiable
    assert calls == []


def test_a_missing_compiler_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("NORMLAB_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-cc")
    assert kernels.compiler() is None
    assert default_kernels() == "aten"  # the default where nothing can build them
    with pytest.raises(kernels.KernelUnavailable, match=r"no C compiler.*--kernels aten"):
        kernels.build()
    assert list(tmp_path.iterdir()) == []


def test_a_failing_build_says_why_and_leaves_no_file(tmp_path, monkeypatch):
    monkeypatch.setenv("NORMLAB_KERNEL_CACHE", str(tmp_path))
    fake = tmp_path / "fake-cc"
    fake.write_text("#!/bin/sh\necho 'kernels.c:1: error: something broke' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(kernels.KernelUnavailable, match="something broke"):
        kernels.build(str(fake))
    assert [p.name for p in tmp_path.iterdir()] == ["fake-cc"]


def test_the_build_is_cached_per_source_and_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("NORMLAB_KERNEL_CACHE", str(tmp_path / "cache"))
    cc = kernels.compiler()
    first = kernels.build(cc)
    assert first.exists() and first.parent == tmp_path / "cache"
    assert kernels.build(cc) == first  # reused, not rebuilt
    other = tmp_path / "cc"
    other.symlink_to(shutil.which(cc))
    assert kernels.build(str(other)) != first  # another compiler: another build


def test_the_layout_follows_the_kernels():
    """Channels-last on one thread; on more, only where normlab's kernels do the norms
    (torch's are faster contiguous there)."""
    from normlab.training.engine import memory_format

    cpu = torch.device("cpu")
    assert memory_format(cpu, 1, ModelConfig(kernels="aten")) == CL
    assert memory_format(cpu, 2, ModelConfig(norms=("gn",), kernels="normlab")) == CL
    assert memory_format(cpu, 2, ModelConfig(kernels="aten")) == torch.contiguous_format
    for norms in (("none",), ("bn", "ln")):  # nothing, or not everything, for the kernels
        assert memory_format(cpu, 2, ModelConfig(norms=norms, kernels="normlab")) == \
            torch.contiguous_format


def test_a_march_the_cpu_cannot_run_is_refused(monkeypatch):
    """NORMLAB_MARCH=x86-64-v4 on an AVX2 CPU (Zen 3's flags, without AVX-512) would build a
    library that stops the process with an illegal instruction: refused, naming what lacks."""
    zen3 = frozenset(["fpu", "sse", "sse2", "cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2",
                      "ssse3", "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe",
                      "xsave"])
    monkeypatch.setattr(kernels, "cpu_flags", lambda: zen3)
    monkeypatch.setattr(kernels.platform, "machine", lambda: "x86_64")
    for ok in ("native", "x86-64-v3", "x86-64"):
        monkeypatch.setenv("NORMLAB_MARCH", ok)
        assert kernels.march() == ok
    monkeypatch.setenv("NORMLAB_MARCH", "x86-64-v4")
    with pytest.raises(kernels.KernelUnavailable, match="lacks avx512bw avx512cd"):
        kernels.march()
    monkeypatch.setenv("NORMLAB_MARCH", "pentium")
    with pytest.raises(kernels.KernelUnavailable, match="choose one of"):
        kernels.march()
