"""What probes cost a training epoch (normlab.probes; issue 29: at the default interval at
most 5% more).

One process, one thread, 6,400 MNIST images at batch 64 (100 steps per epoch), the seed
protocol's step with SGD's update. For each case, epochs alternate without probes and with
the probes of ``--probe`` (default activations, weights and gradients) at the interval
given, ``--rounds`` times, and the figure is the median epoch time with probes over the
median without. The probed epoch's extra work: a forward of its own at each probe step
(with the running statistics and the random generator put back), the percentiles of each
norm's input, and the weights' and gradients' norms; with ``landscape``, five forward and
backward passes more.

    python benchmarks/probe_cost.py                      # every case, intervals 25 and 1
    python benchmarks/probe_cost.py --every 25,100 --rounds 9
    python benchmarks/probe_cost.py --probe landscape --every 50
    python benchmarks/probe_cost.py --isa avx2           # as an AVX2 host (fp32)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import isa

CASES = {  # name: RunConfig fields
    "seed + BN (hand step)": {"norm": "bn"},
    "seed + GN (hand step)": {"norm": "gn"},
    "seed + FRN (autograd)": {"norm": "frn", "compile": "off"},
    "MLP + BN (autograd)": {"net": "mlp", "norm": "bn", "dropout": 0.0},
    "seed, no norm (autograd)": {"norm": "none", "dropout": 0.0},
}


def measure(fields: dict, data, everies: list[int], rounds: int,
            precision: str | None, kinds: str = "activations,weights,gradients") -> dict:
    """Median epoch seconds of one case without probes (key None) and at each interval."""
    import torch

    from normlab import accel
    from normlab.probes import Prober
    from normlab.training import RunConfig, resolve_protocol
    from normlab.training.engine import memory_format, train_one_epoch

    proto = resolve_protocol("seed", {"lr": 0.02})
    config = RunConfig.from_dict({"protocol": proto, "subset": 6400, **fields,
                                  **({"precision": precision} if precision else {})})
    torch.manual_seed(0)
    model = config.make_model().to(memory_format=memory_format(torch.device("cpu"), 1,
                                                               config.model))
    step = accel.prepare(model, config.model, config.precision, compile=config.compile)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, foreach=True)
    probers = {e: Prober.for_run(model, RunConfig.from_dict(
        {**config.to_dict(), "probe": kinds, "probe_every": e})) for e in everies}
    times: dict = {None: [], **{e: [] for e in everies}}
    epochs = iter(range(1, 10_000))

    def timed(prober) -> float:
        start = time.perf_counter()
        train_one_epoch(model, data, opt, seed=1, epoch=next(epochs), batch_size=64,
                        rotation=7.0, step=step, prober=prober, precision=config.precision,
                        augment=config.augment)
        if prober is not None:
            prober.take()
        return time.perf_counter() - start

    timed(None)  # warm-up: the kernels' and primitives' first calls
    for _ in range(rounds):
        for key in (None, *everies):
            times[key].append(timed(probers[key] if key else None))
    return {key: statistics.median(t) for key, t in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--every", default="25,1",
                        help="probe intervals in steps, comma-separated (default 25,1)")
    parser.add_argument("--rounds", type=int, default=7, help="alternations (default 7)")
    parser.add_argument("--probe", default="activations,weights,gradients",
                        help="the probes, as --probe takes them (default "
                             "activations,weights,gradients)")
    isa.add_arguments(parser)
    args = parser.parse_args()
    precision = isa.apply(args)  # None: normlab's default for this CPU

    import torch

    from normlab.data import load_dataset
    from normlab.training import TensorData

    torch.set_num_threads(1)
    ds = load_dataset("mnist")
    data = TensorData(ds.train_images[:6400], ds.train_labels[:6400], ds.mean, ds.std)
    everies = [int(e) for e in args.every.split(",")]
    print(f"host: {isa.dispatch()}; torch {torch.__version__}, 1 thread; "
          f"{args.rounds} rounds of 100-step epochs, alternating; probes {args.probe}")
    print()
    print("| case | epoch without probes | " + " | ".join(
        f"with probes every {e} | ratio" for e in everies) + " |")
    print("|---|---:|" + "---:|---:|" * len(everies))
    for name, fields in CASES.items():
        got = measure(fields, data, everies, args.rounds, precision, args.probe)
        cells = []
        for e in everies:
            cells += [f"{got[e]:.2f} s", f"{got[e] / got[None]:.3f}"]
        print(f"| {name} | {got[None]:.2f} s | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
