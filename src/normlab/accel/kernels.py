"""ReLU -> BatchNorm / GroupNorm for channels-last CPU tensors, two passes each way, in C;
and the 2x2 max pooling.

torch's CPU norms take several passes over a channels-last tensor, with the ReLU before
them two more: in a one-thread training step of the seed's network ReLU and BatchNorm
were a third of the time, ReLU and GroupNorm more (benchmarks/README.md). ``kernels.c``
does a training-mode forward in two passes (statistics, then the affine, the ReLU applied
on the way in) and the backward in two (gradient sums, then the input's gradient, the
ReLU's mask applied on the way out), with a following dropout folded in: its 1/(1-p) in
the affine as :mod:`normlab.accel.normdrop` does, its dropped units zeroed as the output
is written and read as 0 in the gradient (the same numbers as zeroing copies, without
them). It reads fp32 and bf16 and sums in double, each sum in a fixed order, so a result
does not depend on the machine's vector width. GroupNorm covers normlab's LayerNorm (1
group) and InstanceNorm (C groups). :func:`max_pool_2x2` is torch's 2x2 max pooling pick
for pick, in one pass, keeping a byte per output instead of an int64 index.

The kernels are compiled on first use with the system's C compiler (``$CC`` or ``cc``)
into ``$NORMLAB_KERNEL_CACHE`` (default ``~/.cache/normlab/kernels``), keyed by the source,
the flags and the CPU, and loaded with ctypes: no torch headers, about a second to build.
Evaluation uses them too where the config says so (:func:`batch_norm_eval`: BatchNorm
from its running statistics in one pass; GroupNorm's training forward). Where they do not
apply (another device, a contiguous layout, other dtypes) the ReLU and the norm are
torch's. A run's config says whether its norms use them in training and in evaluation
(``ModelConfig.kernels``, ``ModelConfig.eval_kernels``): the numbers differ from torch's
at rounding level.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable

from normlab.eager import eager

SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ("-O3", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-fPIC", "-shared")
# The instruction sets the C code is built for: ``native`` (this CPU's), or what another
# host would get, ``x86-64-v3`` (AVX2) or ``x86-64`` (SSE2: the generic branches), set by
# ``$NORMLAB_MARCH`` or per build; the sums are in a fixed order, so every build computes
# the same numbers (tests/test_dispatch.py compares them bitwise).
MARCHES = ("native", "x86-64-v4", "x86-64-v3", "x86-64")


# What each x86-64 level needs of the CPU (the psABI's levels, as /proc/cpuinfo names them)
_V3 = {"cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3", "avx", "avx2", "bmi1", "bmi2",
       "f16c", "fma", "abm", "movbe", "xsave"}
NEEDS = {"x86-64": set(), "x86-64-v3": _V3,
         "x86-64-v4": _V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}}


def march() -> str:
    """``$NORMLAB_MARCH`` (default ``native``): the ``-march`` the kernels are built for. A
    level this CPU cannot run is refused (a build for it would stop the process with an
    illegal instruction)."""
    value = os.environ.get("NORMLAB_MARCH", "native")
    if value not in MARCHES:
        raise KernelUnavailable(f"NORMLAB_MARCH={value!r}: choose one of {', '.join(MARCHES)}")
    needs = NEEDS.get(value, set()) if platform.machine() == "x86_64" else set()
    missing = sorted(needs - cpu_flags())
    if missing:
        raise KernelUnavailable(f"NORMLAB_MARCH={value}: this CPU lacks {' '.join(missing)}; "
                                "choose a level it has (x86-64-v3, x86-64) or native")
    return value


def flags(arch: str | None = None) -> tuple[str, ...]:
    """The compiler flags for a build for ``arch`` (default :func:`march`)."""
    return (*FLAGS, f"-march={arch or march()}")
MAX_LANES = 128  # LMAX in kernels.c
_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}


class KernelUnavailable(ValueError):
    """The C kernel cannot be built here (no compiler, or it failed). A ValueError: the
    remedy is a setting (``kernels = "aten"``), and commands report it in one line."""


def compiler() -> str | None:
    """The C compiler normlab would use: ``$CC`` or ``cc``, if it is on the PATH."""
    return shutil.which(os.environ.get("CC", "cc"))


def cache_dir() -> Path:
    """Where compiled kernels are kept: ``$NORMLAB_KERNEL_CACHE``, by default
    ``~/.cache/normlab/kernels``."""
    root = os.environ.get("NORMLAB_KERNEL_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "normlab" / "kernels"


@functools.cache
def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU's feature flags where Linux lists them."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache  # read once: march() asks on every library() call, once per step
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as Linux lists them (``avx2``, ``avx512f``, ...; none
    elsewhere)."""
    return frozenset(_cpu_id().partition(":")[2].split())


def build(cc: str | None = None, source: Path = SOURCE, arch: str | None = None) -> Path:
    """Compile ``kernels.c`` (or another of normlab's C sources; or reuse the cached
    build) for ``arch`` (default :func:`march`); returns the shared library."""
    cc = cc or compiler()
    cflags = flags(arch)
    if cc is None:
        raise KernelUnavailable(
            f"no C compiler found ({os.environ.get('CC', 'cc')!r} is not on the PATH); "
            "install one (Debian: apt install gcc) or set kernels = \"aten\" "
            "(--kernels aten) to use torch's norms"
        )
    key = hashlib.sha256(
        b"\0".join([source.read_bytes(), " ".join(cflags).encode(), cc.encode(),
                    _cpu_id().encode()])
    ).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built under a unique name and renamed: processes building at once never see half a file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([cc, *cflags, "-o", tmp, str(source), "-lm"],
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise KernelUnavailable(
                f"{cc} could not build {source.name}:\n{done.stderr.strip()[-2000:]}\n"
                "set kernels = \"aten\" (--kernels aten) to use torch's norms"
            )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def library() -> ctypes.CDLL:
    """The loaded kernels, built for :func:`march` on first use; raises
    :class:`KernelUnavailable`."""
    return library_for(march())


@functools.cache
def library_for(arch: str) -> ctypes.CDLL:
    """The kernels built for ``arch`` (one of :data:`MARCHES`), loaded."""
    lib = ctypes.CDLL(str(build(arch=arch)))
    p, i64, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
    signatures = {
        "bn_forward": [p, p, i64, i64, i64, i64, p, p, p, p, f64, f64, f64, p, p, i64],
        "bn_backward": [p, p, p, i64, i64, i64, i64, p, f64, p, p, p, p, i64, p],
        "gn_forward": [p, p, i64, i64, i64, i64, i64, p, p, f64, f64, p, p, i64],
        "gn_backward": [p, p, p, i64, i64, i64, i64, i64, p, f64, p, p, p, p, i64, p],
    }
    for name, argtypes in signatures.items():
        for suffix in ("f32", "bf16", "f32_relu", "bf16_relu"):
            fn = getattr(lib, f"nl_{name}_{suffix}")
            fn.argtypes, fn.restype = argtypes, ctypes.c_int
    for suffix in ("f32", "bf16", "f32_relu", "bf16_relu"):
        fn = getattr(lib, f"nl_bn_eval_{suffix}")
        fn.argtypes, fn.restype = [p, p, i64, i64, i64, p, p, p, p, f64], None
    for name in ("maxpool2_forward", "maxpool2_backward"):
        for suffix in ("f32", "bf16"):
            fn = getattr(lib, f"nl_{name}_{suffix}")
            fn.argtypes, fn.restype = [p, p, p, i64, i64, i64, i64], None
    f32 = ctypes.c_float
    lib.nl_rotate_normalize.argtypes = [p, i64, p, p, i64, i64, i64, f32, f32, p]
    lib.nl_rotate_normalize.restype = ctypes.c_int
    return lib


@functools.cache
def _function(name: str, dtype: torch.dtype, relu: bool = False):
    return getattr(library(), f"nl_{name}_{_SUFFIX[dtype]}{'_relu' if relu else ''}")


def _call(fn, *args) -> None:
    if fn(*args):
        raise ValueError("a dropped unit's index is outside the tensor")


def no_drop() -> torch.Tensor:
    """``drop`` for no dropped unit."""
    return torch.empty(0, dtype=torch.long)


def _bitmap(n: int) -> torch.Tensor:
    """Scratch for the backward's bitmap of dropped units (BITMAP_SLACK in kernels.c)."""
    return torch.empty(n // 8 + 32, dtype=torch.uint8)


@functools.cache
def lanes(channels: int) -> int:
    """Values per block: the least common multiple of C and 16 (the kernel takes 16 lanes
    at a time and needs lane j to hold channel j % C)."""
    return channels * 16 // math.gcd(channels, 16)


def applies(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """Whether the kernels can take this input: a CPU fp32/bf16 4-d tensor in channels-last
    layout whose channel count C has lcm(C, 16) <= 128 (every width up to 16, and 24, 32,
    ..., 128) and an fp32 affine."""
    return (
        x.device.type == "cpu"
        and x.dim() == 4
        and x.dtype in _SUFFIX
        and x.shape[1] > 0 and lanes(x.shape[1]) <= MAX_LANES
        and x.numel() > x.shape[1]
        and x.is_contiguous(memory_format=torch.channels_last)
        and weight is not None
        and weight.dtype == torch.float32
    )


def _grad_like(grad: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An output gradient as the kernels read it: ``dtype``, channels-last."""
    return grad.to(dtype).contiguous(memory_format=torch.channels_last)


def _grads(x: torch.Tensor, grad: torch.Tensor):
    """A backward's buffers: the output gradient as the kernels read it, fresh dx, dw, db."""
    dw, db = torch.empty(2, x.shape[1]).unbind()
    return _grad_like(grad, x.dtype), torch.empty_like(x), dw, db


def bn_forward(x, weight, bias, running_mean, running_var, momentum: float, eps: float,
               scale: float, relu: bool, drop: torch.Tensor):
    """The training forward of :func:`batch_norm` without autograd: ``(y, saved)``, where
    ``saved`` (mean, invstd in double) is what :func:`bn_backward` needs besides x."""
    _, c, h, w = x.shape
    y = torch.empty_like(x)
    saved = torch.empty(2 * c, dtype=torch.float64)  # mean, invstd
    _call(_function("bn_forward", x.dtype, relu),
          x.data_ptr(), y.data_ptr(), x.numel(), c, h * w, lanes(c), weight.data_ptr(),
          bias.data_ptr(), running_mean.data_ptr(), running_var.data_ptr(), momentum, eps,
          scale, saved.data_ptr(), drop.data_ptr(), drop.numel())
    return y, saved


def bn_backward(x, weight, saved, drop, grad, scale: float, relu: bool):
    """The backward of :func:`bn_forward`: ``(dx, dweight, dbias)``."""
    grad, dx, dw, db = _grads(x, grad)
    _, c, h, w = x.shape
    bits = _bitmap(x.numel())  # held here: the C call must not outlive it
    _call(_function("bn_backward", x.dtype, relu),
          x.data_ptr(), grad.data_ptr(), dx.data_ptr(), x.numel(), c, h * w, lanes(c),
          weight.data_ptr(), scale, saved.data_ptr(), dw.data_ptr(), db.data_ptr(),
          drop.data_ptr(), drop.numel(), bits.data_ptr())
    return dx, dw, db


def gn_forward(x, groups: int, weight, bias, eps: float, scale: float, relu: bool,
               drop: torch.Tensor):
    """The forward of :func:`group_norm` without autograd: ``(y, saved)``, as
    :func:`bn_forward`'s."""
    n, c, h, w = x.shape
    y = torch.empty_like(x)
    saved = torch.empty(2 * n * groups, dtype=torch.float64)  # mean, invstd
    _call(_function("gn_forward", x.dtype, relu),
          x.data_ptr(), y.data_ptr(), n, h * w, c, groups, lanes(c), weight.data_ptr(),
          bias.data_ptr(), eps, scale, saved.data_ptr(), drop.data_ptr(), drop.numel())
    return y, saved


def gn_backward(x, groups: int, weight, saved, drop, grad, scale: float, relu: bool):
    """The backward of :func:`gn_forward`: ``(dx, dweight, dbias)``."""
    grad, dx, dw, db = _grads(x, grad)
    n, c, h, w = x.shape
    bits = _bitmap(x.numel())  # held here: the C call must not outlive it
    _call(_function("gn_backward", x.dtype, relu),
          x.data_ptr(), grad.data_ptr(), dx.data_ptr(), n, h * w, c, groups, lanes(c),
          weight.data_ptr(), scale, saved.data_ptr(), dw.data_ptr(), db.data_ptr(),
          drop.data_ptr(), drop.numel(), bits.data_ptr())
    return dx, dw, db


class _BatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, scale, relu,
                drop):
        y, saved = bn_forward(x, weight, bias, running_mean, running_var, momentum, eps,
                              scale, relu, drop)
        ctx.save_for_backward(x, weight, saved, drop)
        ctx.scale, ctx.relu = scale, relu
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        dx, dw, db = bn_backward(*ctx.saved_tensors, grad, ctx.scale, ctx.relu)
        return dx, dw, db, None, None, None, None, None, None, None


class _GroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, groups, weight, bias, eps, scale, relu, drop):
        y, saved = gn_forward(x, groups, weight, bias, eps, scale, relu, drop)
        ctx.save_for_backward(x, weight, saved, drop)
        ctx.groups, ctx.scale, ctx.relu = groups, scale, relu
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight, saved, drop = ctx.saved_tensors
        dx, dw, db = gn_backward(x, ctx.groups, weight, saved, drop, grad, ctx.scale,
                                 ctx.relu)
        return dx, None, dw, db, None, None, None, None


def _check(x: torch.Tensor, drop: torch.Tensor | None, *tensors: torch.Tensor) -> torch.Tensor:
    """Raise unless the kernels can take these; returns ``drop`` as the kernels read it."""
    if not applies(x, tensors[0]):
        raise ValueError("normlab's kernels take a CPU fp32/bf16 4-d channels-last tensor "
                         "(see normlab.accel.kernels.applies)")
    for t in tensors:
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError("the norm's weight, bias and running statistics must be "
                             "contiguous fp32 tensors")
    if drop is None:
        return no_drop()
    if drop.dtype != torch.long or drop.dim() != 1 or drop.device.type != "cpu":
        raise ValueError("drop must be a 1-d CPU int64 tensor of unit indices")
    return drop.contiguous()


@eager
def batch_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    momentum: float,
    eps: float,
    scale: float = 1.0,
    relu: bool = False,
    drop: torch.Tensor | None = None,
) -> torch.Tensor:
    """Training-mode ``F.batch_norm(relu(x) if relu else x, ...) * scale`` by the kernel:
    batch statistics, running statistics updated in place (``momentum`` as torch's,
    unbiased variance). ``drop``: the units a following dropout zeroes, as logical
    (row-major NCHW) indices (:func:`~normlab.models.dropout.bernoulli_positions`): the
    output is 0 there and so is the gradient that flows back through them, exactly as
    ``drop_positions`` after the norm gives. ``x`` must satisfy :func:`applies`;
    differentiable in x, weight, bias; an index outside ``x`` raises ValueError."""
    drop = _check(x, drop, weight, bias, running_mean, running_var)
    return _BatchNorm.apply(x, weight, bias, running_mean, running_var, float(momentum),
                            float(eps), float(scale), bool(relu), drop)


@eager
def batch_norm_eval(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    relu: bool = False,
) -> torch.Tensor:
    """Eval-mode ``F.batch_norm(relu(x) if relu else x, running_mean, running_var, ...)``
    by the kernel, in one pass: ``(v - running_mean) / sqrt(running_var + eps) * w + b``
    with the per-channel factors computed in double. Not differentiable (for evaluation);
    ``x`` must satisfy :func:`applies`."""
    _check(x, None, weight, bias, running_mean, running_var)
    _, c, _, _ = x.shape
    y = torch.empty_like(x)
    _function("bn_eval", x.dtype, relu)(x.data_ptr(), y.data_ptr(), x.numel(), c, lanes(c),
                                        weight.data_ptr(), bias.data_ptr(),
                                        running_mean.data_ptr(), running_var.data_ptr(),
                                        float(eps))
    return y


@eager
def group_norm(
    x: torch.Tensor,
    groups: int,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    scale: float = 1.0,
    relu: bool = False,
    drop: torch.Tensor | None = None,
) -> torch.Tensor:
    """``F.group_norm(relu(x) if relu else x, groups, ...) * scale`` by the kernel, with
    ``drop`` as :func:`batch_norm`'s. ``x`` must satisfy :func:`applies` and ``groups``
    divide its channels; differentiable in x, weight, bias."""
    if groups < 1 or x.shape[1] % groups:
        raise ValueError(f"{groups} groups do not divide {x.shape[1]} channels")
    drop = _check(x, drop, weight, bias)
    return _GroupNorm.apply(x, int(groups), weight, bias, float(eps), float(scale),
                            bool(relu), drop)


def pool_applies(x: torch.Tensor) -> bool:
    """Whether :func:`max_pool_2x2` can take ``x``: a CPU fp32/bf16 4-d channels-last
    tensor."""
    return (x.device.type == "cpu" and x.dim() == 4 and x.dtype in _SUFFIX
            and x.is_contiguous(memory_format=torch.channels_last))


def pool_forward(x: torch.Tensor):
    """The forward of :func:`max_pool_2x2` without autograd: ``(y, picks)``, a byte per
    output saying which of its window's four values it took."""
    n, c, h, w = x.shape
    y = torch.empty((n, c, h // 2, w // 2), dtype=x.dtype, memory_format=torch.channels_last)
    picks = torch.empty(y.numel(), dtype=torch.uint8)
    _function("maxpool2_forward", x.dtype)(x.data_ptr(), y.data_ptr(), picks.data_ptr(),
                                           n, h, w, c)
    return y, picks


def pool_backward(picks: torch.Tensor, grad: torch.Tensor, shape, dtype: torch.dtype):
    """The backward of :func:`pool_forward`: the input's gradient (``shape``, ``dtype``)."""
    n, c, h, w = shape
    grad = _grad_like(grad, dtype)
    dx = torch.empty(shape, dtype=dtype, memory_format=torch.channels_last)
    _function("maxpool2_backward", dtype)(grad.data_ptr(), picks.data_ptr(), dx.data_ptr(),
                                          n, h, w, c)
    return dx


class _MaxPool2x2(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y, picks = pool_forward(x)
        ctx.save_for_backward(picks)
        ctx.shape, ctx.dtype = x.shape, x.dtype
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (picks,) = ctx.saved_tensors
        return pool_backward(picks, grad, ctx.shape, ctx.dtype)


@eager
def max_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2, 2)`` by the kernel, one pass and a byte per output for the
    backward (torch keeps an int64 index): the same values and gradients as torch's CPU
    kernel, which it follows pick for pick (the first largest value of a window in (h, w)
    order, a NaN taking over). ``x`` must satisfy :func:`pool_applies`."""
    if not pool_applies(x):
        raise ValueError("normlab's max pooling takes a CPU fp32/bf16 4-d channels-last "
                         "tensor")
    return _MaxPool2x2.apply(x)


ROTATE_MAX = 4096  # image sides at most (ROTATE_MAX in kernels.c)


def rotate_normalize(images: torch.Tensor, idx: torch.Tensor, degrees: torch.Tensor,
                     mean: float, std: float) -> torch.Tensor:
    """``to_input(images[idx], mean, std, degrees)`` (:mod:`normlab.training.augment`) in one
    pass: each uint8 image rotated about its centre by its angle, nearest pixel, black
    outside, then normalised, as float (N, 1, H, W). The geometry is torch's affine_grid +
    grid_sample computed in double instead of float32: a pixel whose source lies within
    float32 rounding of a half-way point may come from the other neighbour (one pixel in
    10 million did, at +-7 degrees), so a run's config records which computed its inputs
    (``RunConfig.augment``). ``images``: CPU uint8 (n, H, W); ``idx``: int64 indices into
    it; ``degrees``: one float per index."""
    if images.dtype != torch.uint8 or images.dim() != 3 or images.device.type != "cpu":
        raise ValueError("images must be a CPU uint8 tensor of shape (n, H, W)")
    n, h, w = images.shape
    if max(h, w) > ROTATE_MAX:
        raise ValueError(f"images larger than {ROTATE_MAX} pixels a side are not supported")
    idx = idx.to(torch.long).contiguous()
    degrees = degrees.to(torch.float32).contiguous()
    if degrees.shape != idx.shape or idx.dim() != 1:
        raise ValueError("idx and degrees must be 1-d and of the same length")
    images = images.contiguous()
    out = torch.empty((idx.numel(), 1, h, w))
    if library().nl_rotate_normalize(images.data_ptr(), n, idx.data_ptr(), degrees.data_ptr(),
                                     idx.numel(), h, w, float(mean), float(std),
                                     out.data_ptr()):
        raise ValueError(f"an index is outside the {n} images")
    return out
