"""Every norm and network against BN on the seed's CNN: epoch and test-pass times, compiled
(torch.compile, inductor) and through autograd, in one sitting, alternating.

Each measurement is ``normlab train --subset 6400 --epochs 2 --threads 1 --lr 0.02`` in a
fresh process (tcmalloc as normlab runs), as issue 28 measured: the second epoch's
``train_seconds`` (100 steps at batch 64) and ``test_seconds`` (10,000 images). The first
epoch minus the second is what compiling costs that process (inductor's cache on disk warm
after the first round: ``--cold`` gives every compiled process an empty one). Rounds
alternate compiled and autograd runs of every case; each figure is the median over rounds.

For the networks it also counts the floating-point operations of one training step
(``torch.utils.flop_counter``, forward and backward) and divides by the measured step time,
against this CPU's fp32 peak per core (two FMA units, 8 lanes under AVX2 or 16 under
AVX-512, at the clock /proc/cpuinfo reports).

    python benchmarks/zoo_speed.py                    # every norm, the nets, 2 rounds
    python benchmarks/zoo_speed.py --norms frn,rms --nets none --rounds 3
    python benchmarks/zoo_speed.py --isa avx2         # as an AVX2 host (fp32)
    python benchmarks/zoo_speed.py --steps            # in one process, step by step

``--steps`` times the training step alone (ms per step, batch 64, 1 thread, the default
dropout, with SGD's
update, no data loading), compiled and autograd side by side in one process: blocks of 20
steps, alternating, the median of ``--rounds`` (default 15) blocks. A shared machine's
speed drifts by tens of percent between processes minutes apart; alternating 20-step
blocks cancels most of that drift. It is what ``normlab.accel.compiled.SPEEDUP`` records.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import isa

NORMS = ("bn", "gn", "ln", "in", "brn", "gbn", "frn", "evo-s0", "evo-b0", "rms", "gn+ws")
NETS = {"mlp": [], "plain": ["--net-option", "depth=20"], "resnet": ["--net-option", "depth=20"]}
HAND = ("gn", "ln", "in")  # the hand step's either way: timed once (BN both ways, a control)


def run(case: list[str], compile: str, folder: Path, cold: bool,
        precision: str | None) -> dict:
    """One ``normlab train`` of ``case``; its two epochs' times."""
    out = folder / f"run-{len(list(folder.iterdir()))}"
    env = dict(os.environ)
    if cold and compile == "inductor":
        env["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-", dir=folder)
    argv = [sys.executable, "-m", "normlab", "train", *case, "--subset", "6400", "--epochs",
            "2", "--threads", "1", "--lr", "0.02", "--compile", compile, "--quiet",
            "--out", str(out), *(["--precision", precision] if precision else [])]
    subprocess.run(argv, check=False, env=env, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    paths = json.loads((out / "config.json").read_text())["paths"]
    return {"epoch": records[-1]["train_seconds"], "test": records[-1]["test_seconds"],
            "warmup": records[0]["train_seconds"] + records[0]["test_seconds"]
            - records[-1]["train_seconds"] - records[-1]["test_seconds"],
            "step": paths["step"], "acc": records[-1]["test_acc"]}


def case_args(name: str) -> list[str]:
    if name in NETS:
        return ["--net", name, *NETS[name], "--norm", "bn"]
    if name == "gn+ws":
        return ["--norm", "gn", "--weight-std"]
    return ["--norm", name]


def step_flops(name: str) -> float:
    """Floating-point operations of one training step (batch 64) of network ``name``."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from normlab.models import ModelConfig, build_model

    options = {"depth": 20} if name in ("plain", "resnet") else {}
    model = build_model(ModelConfig(net=name, net_options=options))
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    with FlopCounterMode(display=False) as counter:
        F.nll_loss(model(x), y).backward()
    return float(counter.get_total_flops())


def peak_gflops() -> float:
    """fp32 GFLOP/s of one core: 2 FMA units x lanes x 2 flops x the clock."""
    import torch

    lanes = 16 if torch.backends.cpu.get_cpu_capability() == "AVX512" else 8
    mhz = 0.0
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz"):
            mhz = float(line.split(":")[1])
            break
    return 2 * lanes * 2 * mhz / 1000


def step_times(name: str, rounds: int, precision: str | None) -> dict[str, float]:
    """ms per training step of case ``name``: compiled, autograd and (BN) the hand step."""
    import time

    import torch

    from normlab import accel
    from normlab.models import ModelConfig, build_model

    torch.set_num_threads(1)
    net = name if name in NETS else "seed"
    config = ModelConfig(net=net, net_options={"depth": 20} if net in ("plain", "resnet")
                         else {}, norms=("gn" if name == "gn+ws" else
                                         "bn" if net != "seed" else name,),
                         weight_std=name == "gn+ws")
    precision = precision or accel.default_precision()
    x = torch.randn(64, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (64,))
    sides = {}
    for compile in ("inductor", "off"):
        torch.manual_seed(0)
        model = build_model(config).to(memory_format=torch.channels_last)
        step = accel.prepare(model, config, precision, compile=compile)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        sides[compile] = (step, opt)
        for _ in range(3):  # compile, warm up
            step(x, y), opt.step(), opt.zero_grad()
    times: dict[str, list[float]] = {c: [] for c in sides}
    for r in range(rounds):
        for compile in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            step, opt = sides[compile]
            t0 = time.perf_counter()
            for _ in range(20):
                step(x, y), opt.step(), opt.zero_grad()
            times[compile].append((time.perf_counter() - t0) / 20 * 1000)
    return {c: statistics.median(t) for c, t in times.items()} | {
        "path": sides["inductor"][0].paths()["step"]}


def main_steps(names: list[str], rounds: int, precision: str | None) -> None:
    print(f"host: {isa.dispatch(kernels=True)}; ms per training step (batch 64, 1 thread), "
          f"medians of {rounds} alternating 20-step blocks in one process")
    print("| case | compiled path | autograd ms | compiled ms | autograd / compiled |")
    print("|---|---|---:|---:|---:|")
    for name in names:
        got = step_times(name, rounds, precision)
        print(f"| {name} | {got['path']} | {got['off']:.1f} | {got['inductor']:.1f} | "
              f"{got['off'] / got['inductor']:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--norms", default=",".join(NORMS),
                        help="seed-net norms to time, or 'none' (default: all)")
    parser.add_argument("--nets", default=",".join(NETS),
                        help="networks to time with BN, or 'none' (default: mlp,plain,resnet)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="alternating rounds (default 2; with --steps 15)")
    parser.add_argument("--steps", action="store_true",
                        help="time the step alone, in one process (see above)")
    parser.add_argument("--cold", action="store_true",
                        help="every compiled process starts with an empty inductor cache")
    isa.add_arguments(parser)
    args = parser.parse_args()
    precision = isa.apply(args)
    names = [n for n in args.norms.split(",") if n and n != "none"]
    names += [n for n in args.nets.split(",") if n and n != "none"]
    if args.steps:
        main_steps(names, args.rounds or 15, precision)
        return
    args.rounds = args.rounds or 2
    if "bn" not in names:
        names.insert(0, "bn")
    times: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for r in range(args.rounds):
            for name in names:
                modes = ("inductor", "off") if r % 2 == 0 else ("off", "inductor")
                for compile in ("off",) if name in HAND else modes:
                    got = run(case_args(name), compile, folder, args.cold, precision)
                    times.setdefault((name, compile), []).append(got)
                    print(f"round {r + 1} {name:7} {compile:8} step {got['step']:9} epoch "
                          f"{got['epoch']:6.2f} s test {got['test']:5.2f} s warm-up "
                          f"{got['warmup']:5.1f} s", file=sys.stderr, flush=True)

    def med(name: str, compile: str, key: str) -> float:
        return statistics.median(t[key] for t in times[(name, compile)])

    bn = med("bn", "off", "epoch"), med("bn", "off", "test")  # the hand step's
    print(f"host: {isa.dispatch(kernels=True)}; BN (hand step) epoch {bn[0]:.2f} s, test pass "
          f"{bn[1]:.2f} s; medians of {args.rounds} rounds")
    print("| case | step | autograd epoch | compiled epoch | compiled × autograd | "
          "× BN epoch (autograd / compiled) | × BN test pass (autograd / compiled) | "
          "compile warm-up |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name in names:
        if name in HAND:
            eager, te = med(name, "off", "epoch"), med(name, "off", "test")
            print(f"| {name} | hand | {eager:.2f} s | | | {eager / bn[0]:.2f} / | "
                  f"{te / bn[1]:.2f} / | |")
            continue
        eager, comp = med(name, "off", "epoch"), med(name, "inductor", "epoch")
        te, tc = med(name, "off", "test"), med(name, "inductor", "test")
        step = times[(name, "inductor")][-1]["step"]
        print(f"| {name} | {step} | {eager:.2f} s | {comp:.2f} s | {eager / comp:.2f} | "
              f"{eager / bn[0]:.2f} / {comp / bn[0]:.2f} | {te / bn[1]:.2f} / {tc / bn[1]:.2f} "
              f"| {med(name, 'inductor', 'warmup'):.1f} s |")
    nets = [n for n in names if n in NETS]
    if nets:
        peak = peak_gflops()
        print(f"\nfp32 peak of one core here: {peak:.0f} GFLOP/s")
        print("| net (BN) | GFLOP per step | autograd GFLOP/s (% of peak) | "
              "compiled GFLOP/s (% of peak) |")
        print("|---|---:|---:|---:|")
        for name in nets:
            flops = step_flops(name) / 1e9
            rates = [flops / (med(name, c, "epoch") / 100) for c in ("off", "inductor")]
            print(f"| {name} | {flops:.2f} | {rates[0]:.1f} ({100 * rates[0] / peak:.0f}%) | "
                  f"{rates[1]:.1f} ({100 * rates[1] / peak:.0f}%) |")


if __name__ == "__main__":
    main()
