"""Seconds of one test pass (10,000 MNIST test images, batches of 1,000, as every epoch of
a run ends) with the norms' evaluation by normlab's kernels (``eval_kernels = "normlab"``,
normlab 0.6's default) against torch's ReLU and norms (``"aten"``, normlab 0.5's), per norm.

Both sides are the same freshly initialised network (seed 1, one state dict; BatchNorm's
running statistics at their initial values: the work of a test pass does not depend on
them), channels-last as training keeps it, in one process, one thread, the default
precision, alternating A B A B; the median of ``--rounds`` is printed with the test loss
of each side (they agree to rounding, not bitwise).

    python benchmarks/eval_pass.py                 # bn, gn, ln; 5 rounds
    python benchmarks/eval_pass.py --norm gn --rounds 9
"""

from __future__ import annotations

import argparse
import statistics

import torch

from normlab.accel import accelerated_net
from normlab.data import load_dataset
from normlab.memory import keep_freed_memory
from normlab.models import ModelConfig
from normlab.training.config import default_precision
from normlab.training.engine import TensorData, evaluate

SIDES = ("aten", "normlab")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--norm", nargs="+", default=["bn", "gn", "ln"])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    keep_freed_memory()
    torch.set_num_threads(1)
    precision = default_precision()
    ds = load_dataset("mnist")
    test = TensorData(ds.test_images, ds.test_labels, ds.mean, ds.std)
    print(f"torch {torch.__version__}, precision {precision}, 1 thread, "
          f"{args.rounds} rounds")
    for norm in args.norm:
        torch.manual_seed(1)
        models = {side: accelerated_net(ModelConfig(norms=(norm,), kernels="normlab",
                                                    eval_kernels=side))
                  for side in SIDES}
        models["normlab"].load_state_dict(models["aten"].state_dict())
        seconds: dict[str, list[float]] = {side: [] for side in SIDES}
        loss = {}
        for model in models.values():
            model.to(memory_format=torch.channels_last)  # in place, as nn.Module.to is
            evaluate(model, test, precision=precision)  # warm-up
        for _ in range(args.rounds):
            for side in SIDES:
                metrics = evaluate(models[side], test, precision=precision)
                seconds[side].append(metrics["test_seconds"])
                loss[side] = metrics["test_loss"]
        a, b = (statistics.median(seconds[side]) for side in SIDES)
        print(f"{norm}: torch's norms {a:.3f} s, normlab's kernels {b:.3f} s -> {a / b:.2f}x  "
              f"(test loss {loss['aten']:.6f} / {loss['normlab']:.6f})")


if __name__ == "__main__":
    main()
