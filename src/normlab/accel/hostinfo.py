"""What each acceleration path would be on this host, and why (``normlab info``).

It looks (CPU features, the C compiler, torch's oneDNN and its symbol table), then tries:
it builds the kernels, and trains one step of the seed's network (BatchNorm, batch 64) in
each precision through :func:`normlab.accel.prepare`, reporting the paths it took.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

FEATURES = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "asimd", "sve")
FORCING = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "NORMLAB_MARCH", "CC")


def cpu() -> tuple[str, list[str]]:
    """The CPU's model name and which of :data:`FEATURES` it has (Linux's /proc/cpuinfo)."""
    from normlab.accel.kernels import cpu_flags

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
                break
    except OSError:
        pass
    return name, [f for f in FEATURES if f in cpu_flags()]


def _step_paths(precision: str) -> str:
    from normlab.accel import autocast, kernels, prepare
    from normlab.models import ModelConfig, Net

    torch.manual_seed(0)
    config = ModelConfig(norms=("bn",))
    model = Net.from_config(config).to(memory_format=torch.channels_last)
    step = prepare(model, config, precision)
    x = torch.randn(64, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    step(x, torch.randint(0, 10, (64,)))
    model.eval()
    test = torch.randn(1000, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), autocast(test.device, precision):
        step.infer(test)  # a test pass's batch: in chunks if they give its numbers
    paths = step.paths()
    convs = next(iter(paths.get("onednn_convs", {}).values()), "0/7")
    tested = next(iter(paths.get("test_forward", {}).values()), "whole")
    text = f"{paths['step']} step; norms: {paths['norms']}; convolutions on kept oneDNN " \
           f"primitives: {convs}; test pass: {tested}"
    if paths.get("why_autograd"):
        text += f" (autograd: {paths['why_autograd']})"
    if step.hand is not None and kernels.compiler():
        layers = next(iter(step.hand._layers.values()), [])
        impls = sorted({layer.impl()[0] for layer in layers if layer is not None})
        if impls:
            text += f"; oneDNN implementations: {', '.join(impls)}"
    return text


def describe() -> list[tuple[str, str]]:
    """(path, what it is here and why) lines."""
    from normlab.accel import default_precision, kernels, onednn

    name, features = cpu()
    have = " ".join(features) or "none of " + ", ".join(FEATURES)
    lines = [("cpu", f"{name} ({platform.machine()}); features: {have}"),
             ("torch", f"{torch.__version__}; ATen CPU capability "
                       f"{torch.backends.cpu.get_cpu_capability()}; "
                       f"{torch.get_num_threads()} threads")]
    forced = [f"{k}={os.environ[k]}" for k in FORCING if k in os.environ]
    if forced:
        lines.append(("forced", " ".join(forced)))
    precision = default_precision()
    lines.append(("precision", f"{precision} by default ("
                  + ("this CPU computes bf16 natively: AMX or AVX512-BF16" if precision == "bf16"
                     else "no native bf16 here (AMX or AVX512-BF16): fp32") + ")"))
    cc = kernels.compiler()
    if cc is None:
        lines.append(("kernels", "torch's ReLU and norms: no C compiler on the PATH "
                                 "(install gcc for normlab's kernels)"))
    else:
        try:
            kernels.library()
            lines.append(("kernels", f"normlab's C kernels, built by {cc} with "
                                     f"-march={kernels.march()} in {kernels.cache_dir()}"))
        except kernels.KernelUnavailable as err:
            lines.append(("kernels", f"torch's norms: {str(err).splitlines()[0]}"))
    if not torch.backends.mkldnn.is_available():
        lines.append(("oneDNN", "torch was built without oneDNN: torch's convolutions"))
    elif not torch.backends.mkldnn.enabled:
        lines.append(("oneDNN", "torch's oneDNN is turned off: torch's convolutions"))
    elif onednn.api() is None:
        lines.append(("oneDNN", "torch's oneDNN C API not found in libtorch_cpu's symbol "
                                "table (or no C compiler): torch's convolutions"))
    else:
        lines.append(("oneDNN", f"torch's own oneDNN through {onednn.torch_library().name}'s "
                                "symbol table; each layer checked against torch when made"))
    for p in dict.fromkeys((precision, "fp32")):
        try:
            lines.append((f"step {p}", _step_paths(p)))
        except Exception as err:  # report, don't fail: this is a diagnosis
            lines.append((f"step {p}", f"failed: {type(err).__name__}: {err}"))
    lines.append(("compile", compile_line()))
    lines.append(("norms", norms()))
    lines.append(("nets", nets()))
    return lines


def compile_line() -> str:
    from normlab.accel import compiled

    why = compiled.unavailable()
    if why:
        return f"torch.compile off: {why}; the steps below that would compile use autograd"
    forced = os.environ.get("NORMLAB_COMPILE")
    return (f"torch.compile (inductor) where it pays (normlab.accel.compiled.SPEEDUP), its "
            f"cache in {compiled.cache_dir()}"
            + (f"; NORMLAB_COMPILE={forced} overrides that" if forced else ""))


def _default_step(config) -> str:
    from normlab.accel import compiled, left_to_autograd

    if left_to_autograd(config) is None:
        return "hand"
    return "compiled" if compiled.default_compile(config) == "inductor" else "autograd"


def norms() -> str:
    """The step each norm gets by default on the seed's network."""
    from normlab.models import ModelConfig
    from normlab.models.norms import norm_specs

    groups: dict[str, list[str]] = {}
    for spec in norm_specs():
        groups.setdefault(_default_step(ModelConfig(norms=(spec.name,))), []).append(spec.name)
    ws = _default_step(ModelConfig(norms=("gn",), weight_std=True))
    groups.setdefault(ws, []).append("gn+ws")
    groups.setdefault("compiled", []).append("yours by import path")
    said = {"hand": "the step above", "compiled": "compiled (torch.compile)",
            "autograd": "autograd (compiling measured no faster, or nothing to compile)"}
    return "; ".join(f"{', '.join(names)}: {said[step]}" for step, names in groups.items())


def nets() -> str:
    """The networks and the step each gets with BN (the hand step knows the seed's only)."""
    from normlab.models import ModelConfig, net_specs

    others = [f"{spec.name} ({spec.title}): {_default_step(ModelConfig(net=spec.name))}"
              for spec in net_specs() if spec.name != "seed"]
    return (f"with BN: seed (the seed's CNN): the step above; {'; '.join(others)}; yours by "
            "import path as its norm says (a compiled norm compiles the whole network)")
