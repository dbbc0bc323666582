"""Say, for this host, what each acceleration path of a training step would be, and why.

It reads the CPU's features, finds the C compiler and torch's oneDNN, builds normlab's
kernels, and trains one step of the seed's network in each precision through
``normlab.accel.prepare``, printing the paths it took, and lists the networks (``--net``)
with the step each gets. Set ATEN_CPU_CAPABILITY,
ONEDNN_MAX_CPU_ISA or NORMLAB_MARCH to see what another CPU would get.

Examples:
  normlab info
  ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 NORMLAB_MARCH=x86-64-v3 normlab info
"""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    pass


def run(args: argparse.Namespace) -> int:
    from normlab.accel import report

    lines = report()
    width = max(len(key) for key, _ in lines)
    for key, text in lines:
        print(f"{key:<{width}}  {text}")
    return 0
