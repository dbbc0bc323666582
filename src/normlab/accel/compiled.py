"""torch.compile (inductor) for every step the hand step does not take: the zoo's norms, a
user's own norm, weight standardization, and every network but the seed's.

The hand step knows one network and four norms. Anything else trains through autograd, one
small ATen kernel per operation: an EvoNorm's statistics alone are a dozen passes over each
activation, forward and backward. Inductor fuses them into a few loops of C++ it compiles
with the system's compiler, and AOTAutograd makes the backward from the same graph.

- Its numbers agree with autograd's to rounding, not bitwise (it fuses and reorders the
  sums; what it generates depends on the CPU's vector ISA, which ``ATEN_CPU_CAPABILITY``
  caps as it does ATen's), so a run records it: ``RunConfig.compile`` is ``"inductor"``
  (written to config.json) or ``"off"`` (autograd, as normlab 0.11 and before trained).
- It is the default only where it was measured to pay (:data:`SPEEDUP`, from
  ``benchmarks/zoo_speed.py``): the zoo's norms, whose statistics are many small passes, a
  user's own norm, and the plain and residual networks. Where it was slower (GN + WS, which
  loses normlab's GN kernels; the MLP, whose step is too small) the run trains through
  autograd unless ``--compile inductor`` asks. ``$NORMLAB_COMPILE`` (``inductor`` or
  ``off``) overrides the default everywhere it applies (the tests train hundreds of tiny
  runs through autograd and set it ``off``; the compiled path has tests of its own).
- Each graph is compiled once per process per shape, then cached on disk
  (``$TORCHINDUCTOR_CACHE_DIR``, by default ``~/.cache/normlab/inductor``) for the next
  process: a suite's workers pay the compilation once, not per run.
- A compilation that fails leaves the step to autograd, and the run's paths say why.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from torch import nn

COMPILE = ("inductor", "off")
# graphs kept per compiled function: every norm and network a worker trains, in training
# and evaluation, at each batch shape (dynamo's default of 8 would fall back to eager)
CACHE_SIZE_LIMIT = 256


def cache_dir() -> Path:
    """Where inductor keeps what it compiled: ``$TORCHINDUCTOR_CACHE_DIR``, by default
    ``~/.cache/normlab/inductor`` (beside the C kernels' cache)."""
    root = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "normlab" / "inductor"


@functools.cache
def unavailable() -> str | None:
    """Why inductor cannot compile a CPU step here (no C++ compiler on the PATH), or None."""
    import shutil

    cxx = os.environ.get("CXX")
    if cxx and shutil.which(cxx):
        return None
    if any(shutil.which(name) for name in ("g++", "c++", "clang++")):
        return None
    return "no C++ compiler on the PATH (inductor builds C++): install g++"


# Autograd's time over the compiled step's (ms per training step at batch 64, fp32, 1
# thread, with SGD's update): the seed's network with each norm, and each other network
# with BN. Medians of alternating 20-step blocks in one process (benchmarks/zoo_speed.py
# --steps; the table is in benchmarks/README.md), on the 2-core Zen 3 AVX2 host. Compiling
# is the default where this is at least PAYS (a lever that pays 3%); below, autograd.
SPEEDUP = {"brn": 1.29, "gbn": 1.21, "frn": 1.89, "evo-s0": 2.23, "evo-b0": 2.59,
           "rms": 1.43, "gn+ws": 0.75, "mlp": 0.74, "plain": 1.03, "resnet": 1.10}
PAYS = 1.03


def measured(config) -> tuple[bool, str]:
    """Whether compiling pays for ``config``'s model (a :class:`ModelConfig` the hand step
    does not take), by :data:`SPEEDUP`, and in words why: in the MLP, the MLP's figure (its
    2 ms step is mostly the compiled graph's own overhead); else a norm's figure where it
    pays, else the network's (measured with BN), else the norm's. A norm that is not built
    in (your own, by import path or registered) is compiled: what it computes is unknown,
    and norms written as many small tensor operations, as the zoo's, are where it pays."""
    from normlab.models.norms import built_in

    norms = [n for n in config.norms if n != "none"]
    own = [n for n in norms if not built_in(n)]
    if own:
        return True, f"norm {own[0]!r} is your own: compiled"
    keys = ["gn+ws"] if config.weight_std and norms == ["gn"] else norms
    by_norm = max(((SPEEDUP[k], k) for k in keys if k in SPEEDUP), default=None)
    by_net = (SPEEDUP[config.net], f"net {config.net!r}") if config.net in SPEEDUP else None
    if config.net == "mlp":
        chosen = by_net
    elif by_norm is not None and by_norm[0] >= PAYS:
        chosen = by_norm
    else:
        chosen = by_net or by_norm
    if chosen is None:
        return False, "nothing measured for inductor to fuse: autograd"
    ratio, what = chosen
    return ratio >= PAYS, (f"{what}: the compiled step measured {ratio:.2f}x autograd's "
                           f"speed, so {'compiled' if ratio >= PAYS else 'autograd'}")


def default_compile(config=None) -> str:
    """``$NORMLAB_COMPILE`` where set; else ``"inductor"`` where a C++ compiler is found
    and compiling pays for ``config``'s model (:func:`measured`; None: any model), else
    ``"off"``."""
    given = os.environ.get("NORMLAB_COMPILE", "").strip().lower()
    if given:
        if given not in COMPILE:
            raise ValueError(f"NORMLAB_COMPILE must be one of {', '.join(COMPILE)}, "
                             f"got {given!r}")
        return given
    if unavailable() or (config is not None and not measured(config)[0]):
        return "off"
    return "inductor"


def compile_model(model: nn.Module) -> nn.Module:
    """``torch.compile(model)`` for training and evaluation steps: one graph per input shape
    (``dynamic=False``: each shape's own kernels, none generic), the cache on disk in
    :func:`cache_dir`, and room for every graph a worker process makes."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir()))  # before inductor sets
    import torch._dynamo  # its own default (a folder under /tmp) on first use
    import torch._inductor.config
    for key in ("cache_size_limit", "accumulated_cache_size_limit"):
        setattr(torch._dynamo.config, key, max(getattr(torch._dynamo.config, key),
                                               CACHE_SIZE_LIMIT))
    # random numbers from torch's generator, as autograd draws them (nn.Dropout's masks the
    # same as eager's for the same seed), not inductor's own
    torch._inductor.config.fallback_random = True
    from normlab.models.dropout import SparseDropout

    for module in model.modules():
        if isinstance(module, SparseDropout):  # left out of the graphs: the number of its
            # positions changes every step, and a graph specialised on it would be compiled
            # again at each new count. (Drawn inside the graph instead, as an opaque op
            # giving a dense mask, the step was 8-13% slower: BRN, FRN and EvoNorm-B0 at
            # dropout 0.01, one process, alternating, Zen 3 host.)
            module.forward = torch.compiler.disable(module.forward)
    return torch.compile(model, dynamic=False)
