"""Forced CPU dispatch for the benchmarks: run on this host as a CPU with fewer instructions
would, and say what each process actually got.

    avx2     ATEN_CPU_CAPABILITY=avx2    ONEDNN_MAX_CPU_ISA=AVX2         NORMLAB_MARCH=x86-64-v3
    avx512   ATEN_CPU_CAPABILITY=avx512  ONEDNN_MAX_CPU_ISA=AVX512_CORE  NORMLAB_MARCH=x86-64-v4
    native   none of them set: what this CPU gets by itself

torch reads the first two once, when it is imported, so a script applies them by running
itself again with them set (:func:`reexec`); every process it spawns inherits them. A
forced setting cannot give what the CPU lacks: ``avx512`` on an AVX2 host is still AVX2.
Forcing takes instructions away, not native bf16 detection: normlab's default precision
reads the CPU's features, so a forced AVX2 or AVX-512 (without bf16) run must say
``precision="fp32"``, as those hosts' default is (:func:`precision`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile

ISAS = {
    "native": {},
    "avx512": {"ATEN_CPU_CAPABILITY": "avx512", "ONEDNN_MAX_CPU_ISA": "AVX512_CORE",
               "NORMLAB_MARCH": "x86-64-v4"},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
             "NORMLAB_MARCH": "x86-64-v3"},
}
KEYS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "NORMLAB_MARCH")
MARK = "NORMLAB_BENCH_ISA"  # set by the re-exec: the process runs under that setting


def environment(isa: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """``base`` (default ``os.environ``) with the three settings of ``isa`` and no others."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in KEYS}
    env.update(ISAS[isa])
    env[MARK] = isa
    return env


def reexec(isa: str | None) -> None:
    """Run this script again under ``isa``'s dispatch, unless it already runs under it (or
    ``isa`` is None: leave the environment as it is)."""
    if isa is None or os.environ.get(MARK) == isa:
        return
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], environment(isa))


def precision(isa: str | None) -> str | None:
    """normlab's default precision on a host of this kind: fp32 on AVX2 and AVX-512 (no
    native bf16); on ``native`` (or None) whatever normlab picks for this CPU."""
    return "fp32" if isa in ("avx2", "avx512") else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--isa`` and ``--precision``, as every script that runs as another host kind takes
    them; :func:`apply` acts on them."""
    parser.add_argument("--isa", default=None, choices=tuple(ISAS),
                        help="run as a host of this kind would (isa.py; default: the "
                             "environment as it is)")
    parser.add_argument("--precision", default=None, choices=("fp32", "bf16"),
                        help="default: the host kind's (fp32 under --isa avx2 or avx512, "
                             "else normlab's for this CPU: bf16 with AMX or AVX512-BF16)")


def apply(args: argparse.Namespace) -> str | None:
    """Run this script again under ``args.isa`` (:func:`reexec`), then the precision to
    train in: ``--precision``, else the host kind's (:func:`precision`; None: normlab's
    default for this CPU)."""
    reexec(args.isa)
    return args.precision or precision(args.isa)


@contextlib.contextmanager
def _stdout_to(path: str):
    """The process's file descriptor 1 (where oneDNN's verbose lines go) into ``path``."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(path, "w") as sink:
        os.dup2(sink.fileno(), 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def dispatch(kernels: bool = False) -> str:
    """What this process got: ATen's CPU capability, the implementation oneDNN picks for
    an fp32 channels-last convolution of the seed's network (its ISA is in the name, e.g.
    ``brg_conv_fwd:avx2``) and, with ``kernels``, the ``-march`` normlab's kernels are built
    for. Runs one small convolution."""
    import torch
    import torch.nn.functional as F

    x = torch.randn(64, 8, 26, 26).contiguous(memory_format=torch.channels_last)
    w = torch.randn(16, 8, 3, 3).contiguous(memory_format=torch.channels_last)
    verbose = torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON)
    with tempfile.NamedTemporaryFile("r", suffix=".log") as log:
        with _stdout_to(log.name), verbose:
            F.conv2d(x, w)
        text = log.read()
    impl = re.findall(r"exec,cpu,convolution,([^,]+),", text)
    words = [f"aten {torch.backends.cpu.get_cpu_capability()}",
             f"oneDNN conv {impl[-1] if impl else '(not oneDNN)'}"]
    if kernels:
        from normlab.accel import kernels as nk

        words.append(f"kernels -march={nk.march()}")
    return ", ".join(words)
