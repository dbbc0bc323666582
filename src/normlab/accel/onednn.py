"""The training step's convolutions on PyTorch's own oneDNN, without PyTorch's per-call
set-up: the same kernels, the same numbers bit for bit, kept across steps.

On a CPU torch computes a convolution with oneDNN (through ideep), and a one-thread step
of the seed's 5,760-parameter network spends half its convolution time around the
kernels: every call builds oneDNN's descriptors, looks its primitive up in a cache,
reorders the weights, allocates and wraps its outputs (``torch.profiler`` and
``py-spy --native``: about a quarter of a step). The network's shapes do not change
from step to step, so :class:`Conv` creates each layer's primitives once (the forward,
the backward-data, the backward-weights and the weights' reorders, as torch creates them:
the activations in the caller's channels-last layout, the weights' layout left to
oneDNN, a user-managed scratchpad) and then only runs them.

The primitives are those of the oneDNN inside ``libtorch_cpu``, not of another copy:
a different oneDNN build or version may pick other kernels, which sum in another order.
``libtorch_cpu`` links oneDNN statically and exports none of its symbols, so
:func:`api` reads the addresses of the C API's functions from the library's ELF symbol
table (``.symtab``) and hands them to ``onednn.c``, compiled like
:mod:`normlab.accel.kernels`. Nothing here is trusted blindly: :func:`conv` checks
each new layer shape once against ``torch``'s own convolution and its backward on
random data, bit for bit, and a shape that differs (another CPU, another torch, a
thread count torch handles otherwise) keeps torch's path. Where anything is missing
(no symbol table, no compiler, not Linux, oneDNN not v3) :func:`conv` returns None and
the step calls torch as before, with the same numbers either way.

A layer's primitives and buffers are kept for the life of the process and are not
thread-safe: one training step at a time per process, as normlab trains.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import mmap
import os
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from normlab.accel import kernels

SOURCE = Path(__file__).with_name("onednn.c")
# The C API's functions onednn.c calls, in the order of its `api` struct.
NAMES = (
    "dnnl_engine_create", "dnnl_stream_create", "dnnl_memory_desc_create_with_strides",
    "dnnl_memory_desc_create_with_tag", "dnnl_memory_desc_destroy",
    "dnnl_memory_desc_get_size", "dnnl_memory_create",
    "dnnl_memory_set_data_handle", "dnnl_primitive_attr_create",
    "dnnl_primitive_attr_set_scratchpad_mode",
    "dnnl_convolution_forward_primitive_desc_create",
    "dnnl_convolution_backward_data_primitive_desc_create",
    "dnnl_convolution_backward_weights_primitive_desc_create",
    "dnnl_reorder_primitive_desc_create", "dnnl_primitive_desc_query_md",
    "dnnl_primitive_desc_query", "dnnl_primitive_desc_destroy", "dnnl_primitive_create",
    "dnnl_primitive_execute",
)
_ATEN = torch.ops.aten


def torch_library() -> Path:
    """The shared library holding torch's CPU kernels and its oneDNN."""
    return Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"


def symbols(path: Path, names: tuple[str, ...]) -> dict[str, int]:
    """The values (addresses relative to the load address) of the named functions in an
    ELF64 shared library's symbol table; a name found never or more than once is left
    out. Reads the section headers, then the symbol and string tables through mmap."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[:6] != b"\x7fELF\x02\x01":  # 64-bit little-endian
            return {}
        shoff, = struct.unpack_from("<Q", m, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", m, 0x3A)
        sections = [struct.unpack_from("<IIQQQQIIQQ", m, shoff + i * shentsize)
                    for i in range(shnum)]
        symtab = next((s for s in sections if s[1] == 2), None)  # SHT_SYMTAB
        if symtab is None:
            return {}
        strtab = sections[symtab[6]]  # sh_link
        str_off, str_size = strtab[4], strtab[5]
        sym = np.frombuffer(m, dtype=np.dtype([("name", "<u4"), ("info", "u1"),
                                               ("other", "u1"), ("shndx", "<u2"),
                                               ("value", "<u8"), ("size", "<u8")]),
                            count=symtab[5] // 24, offset=symtab[4])
        found: dict[str, int] = {}
        for name in names:
            key = b"\0" + name.encode() + b"\0"
            at = m.find(key, str_off, str_off + str_size)
            if at < 0:
                continue
            rows = sym[(sym["name"] == at + 1 - str_off) & (sym["shndx"] != 0)
                       & ((sym["info"] & 0xF) == 2)]  # defined STT_FUNC
            if len(rows) == 1:
                found[name] = int(rows["value"][0])
        del sym  # no view may outlive the mmap
        return found


def _cached_symbols(path: Path, names: tuple[str, ...]) -> dict[str, int]:
    """:func:`symbols`, kept beside the compiled kernels for this very file (its path,
    size and modification time): reading the table takes a few tenths of a second, and
    every worker process of a suite would pay them."""
    info = path.stat()
    key = hashlib.sha256(repr((str(path.resolve()), info.st_size, info.st_mtime_ns, names))
                         .encode()).hexdigest()[:16]
    cache = kernels.cache_dir() / f"onednn-symbols-{key}.json"
    try:
        return json.loads(cache.read_text())
    except (OSError, ValueError):
        pass
    found = symbols(path, names)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}")
        tmp.write_text(json.dumps(found))
        os.replace(tmp, cache)  # whole or not at all, for processes starting at once
    except OSError:
        pass
    return found


@functools.cache
def api() -> ctypes.CDLL | None:
    """``onednn.c`` loaded and pointed at torch's oneDNN, or None where that cannot be
    done (see the module)."""
    if os.name != "posix" or not torch.backends.mkldnn.is_available():
        return None
    try:
        lib = ctypes.CDLL(str(kernels.build(source=SOURCE)))
    except (kernels.KernelUnavailable, OSError):
        return None
    path = torch_library()
    lib.nl_dnnl_base.argtypes, lib.nl_dnnl_base.restype = [ctypes.c_char_p], ctypes.c_size_t
    base = lib.nl_dnnl_base(b"/" + path.name.encode())
    try:
        offsets = _cached_symbols(path, (*NAMES, "dnnl_version"))
    except OSError:
        return None
    if not base or len(offsets) != len(NAMES) + 1:
        return None

    class Version(ctypes.Structure):
        _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("patch", ctypes.c_int)]

    version = ctypes.CFUNCTYPE(ctypes.POINTER(Version))(base + offsets["dnnl_version"])()
    if version.contents.major != 3:  # onednn.c declares v3's C API
        return None
    fns = (ctypes.c_void_p * len(NAMES))(*(base + offsets[n] for n in NAMES))
    if lib.nl_dnnl_init(fns, len(NAMES)) != 0:
        return None
    p, i64p = ctypes.c_void_p, ctypes.POINTER(ctypes.c_int64)
    lib.nl_conv_create.argtypes = [i64p] * 8 + [ctypes.c_int, ctypes.c_int]
    lib.nl_conv_create.restype = p
    lib.nl_conv_impl.argtypes, lib.nl_conv_impl.restype = [p, ctypes.c_int], ctypes.c_char_p
    lib.nl_conv_forward.argtypes, lib.nl_conv_forward.restype = [p] * 4, ctypes.c_int
    lib.nl_conv_backward.argtypes, lib.nl_conv_backward.restype = [p] * 6, ctypes.c_int
    return lib


def _dims(*values: int) -> ctypes.Array:
    return (ctypes.c_int64 * len(values))(*values)


def _nhwc(shape) -> ctypes.Array:
    """The strides of a channels-last N C H W tensor as oneDNN's ``nhwc`` writes them
    (torch may give a dimension of size 1 any stride: the same memory, another
    descriptor, and oneDNN would pick another implementation for it)."""
    _, c, h, w = shape
    return _dims(h * w * c, 1, w * c, c)


class Conv:
    """One convolution layer's training primitives at one input shape: ``forward(x, w)``
    and ``backward(dy, x, w, data_grad)``, what ``F.conv2d`` and ``convolution_backward``
    compute, for channels-last ``x`` of that shape and weights of ``w``'s dtype and
    strides. Built by :func:`conv`."""

    def __init__(self, lib: ctypes.CDLL, handle: int, out_shape: tuple[int, ...],
                 dtype: torch.dtype, data_grad: bool) -> None:
        self.lib = lib
        self.handle = handle
        self.out_shape = out_shape
        self.dtype = dtype
        self.data_grad = data_grad

    def impl(self) -> tuple[str, str, str]:
        """oneDNN's names of the forward's, backward-data's and backward-weights'
        implementations (for the record and the tests)."""
        return tuple(self.lib.nl_conv_impl(self.handle, i).decode() for i in range(3))

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        y = torch.empty(self.out_shape, dtype=self.dtype, memory_format=torch.channels_last)
        if self.lib.nl_conv_forward(self.handle, x.data_ptr(), w.data_ptr(), y.data_ptr()):
            raise RuntimeError("oneDNN's convolution forward failed")
        return y

    def backward(self, dy: torch.Tensor, x: torch.Tensor, w: torch.Tensor,
                 data_grad: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(dx or None, dw)``: dw in fp32, in ``w``'s layout."""
        dy = dy.contiguous(memory_format=torch.channels_last)  # as torch's backward does
        dx = torch.empty_like(x) if data_grad else None
        dw = torch.empty_like(w, dtype=torch.float32)
        if self.lib.nl_conv_backward(self.handle, dy.data_ptr(), x.data_ptr(), w.data_ptr(),
                                     dx.data_ptr() if dx is not None else None,
                                     dw.data_ptr()):
            raise RuntimeError("oneDNN's convolution backward failed")
        return dx, dw


def _matches(layer: Conv, x: torch.Tensor, w: torch.Tensor, stride, padding) -> bool:
    """Whether ``layer`` computes torch's numbers for this shape: one forward and backward
    on random data (a generator of its own), compared with torch's bit for bit."""
    gen = torch.Generator().manual_seed(0)
    xr = torch.empty_like(x).copy_(torch.randn(x.shape, generator=gen))
    wr = torch.empty_like(w).copy_(torch.randn(w.shape, generator=gen) * 0.3)
    y = F.conv2d(xr, wr, None, stride, padding)
    dy = torch.empty(y.shape, dtype=y.dtype, memory_format=torch.channels_last)
    dy.copy_(torch.randn(y.shape, generator=gen))  # as the step's gradients: channels-last
    dx, dw, _ = _ATEN.convolution_backward.default(
        dy, xr, wr, None, list(stride), list(padding), [1, 1], False, [0, 0], 1,
        [layer.data_grad, True, False])
    ours = layer.forward(xr, wr)
    our_dx, our_dw = layer.backward(dy, xr, wr, layer.data_grad)
    same = torch.equal(ours, y) and torch.equal(our_dw, dw.float())
    return same and (not layer.data_grad or torch.equal(our_dx, dx))


_LAYERS: dict[tuple, Conv | None] = {}


def conv(x: torch.Tensor, w: torch.Tensor, stride: tuple[int, int],
         padding: tuple[int, int] | str, dilation: tuple[int, int], groups: int,
         data_grad: bool) -> Conv | None:
    """The primitives of a layer without bias (``F.conv2d(x, w, None, stride, padding,
    dilation, groups)``) for this input, created and checked the first time a shape is
    seen in this process and kept; None where this module does not apply (channels-last
    fp32 or bf16 ``x`` and ``w`` of one dtype, numeric padding, no dilation, one group)
    or the check found other numbers than torch's."""
    if isinstance(padding, str) or tuple(dilation) != (1, 1) or groups != 1:
        return None
    key = (tuple(x.shape), x.stride(), x.dtype, tuple(w.shape), w.stride(), w.dtype,
           tuple(stride), tuple(padding), data_grad, torch.get_num_threads(), _torch_settings())
    if key in _LAYERS:
        return _LAYERS[key]
    _LAYERS[key] = layer = _create(x, w, stride, padding, data_grad)
    return layer


def _torch_settings() -> tuple:
    """What else decides how torch computes a convolution on a CPU: a layer checked under
    other settings is checked again."""
    mkldnn = torch.backends.mkldnn
    return (mkldnn.enabled, mkldnn.deterministic, getattr(mkldnn.conv, "fp32_precision", None),
            getattr(mkldnn, "fp32_precision", None))


def _create(x, w, stride, padding, data_grad) -> Conv | None:
    lib = api()
    if (lib is None or not torch.backends.mkldnn.enabled
            or x.dtype not in (torch.float32, torch.bfloat16) or w.dtype != x.dtype
            or x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last)
            or not w.is_contiguous(memory_format=torch.channels_last)):
        return None
    n, _, h, wd = x.shape
    o, _, kh, kw = w.shape
    (sh, sw), (ph, pw) = stride, padding
    out = (n, o, (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1)
    handle = lib.nl_conv_create(_dims(*x.shape), _nhwc(x.shape), _dims(*w.shape),
                                _nhwc(w.shape), _dims(*out), _nhwc(out),
                                _dims(sh, sw), _dims(ph, pw, ph, pw),
                                32 if x.dtype == torch.float32 else 16, int(data_grad))
    if not handle:
        return None
    layer = Conv(lib, handle, out, x.dtype, data_grad)
    return layer if _matches(layer, x, w, stride, padding) else None
