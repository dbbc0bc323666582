"""The test pass's forward in smaller chunks: faster where a batch of 1,000 images overflows
the caches, and the same numbers only if every image's logits do not depend on how many
images go through with it. This measures both.

The test pass (``evaluate``: 10,000 MNIST test images in batches of 1,000, as every epoch
of a run ends) is run with the model's forward split into chunks of ``--chunks`` images
(the logits concatenated back into the batch of 1,000, so the loss is summed over the same
1,000 rows as before). For each chunk size it prints the seconds (median of ``--rounds``,
alternating with the batch of 1,000 in one process) and whether the logits of all 10,000
images, the test loss and the accuracy equal the batch-of-1,000 pass's bit for bit. The
network is trained for ``--train-steps`` steps first (running statistics and weights as a
real test pass sees them), as ``normlab train`` sets it up, under ``--isa``'s dispatch.

    python benchmarks/eval_chunks.py --isa avx2
    python benchmarks/eval_chunks.py --isa native --norm gn --chunks 500 200 100
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import isa


class Chunked:
    """``model`` whose calls go through in chunks of ``size`` inputs, concatenated."""

    def __init__(self, model, size: int) -> None:
        self.model, self.size = model, size

    def __call__(self, x):
        import torch

        if len(x) <= self.size:
            return self.model(x)
        return torch.cat([self.model(part) for part in x.split(self.size)])

    def __getattr__(self, name):
        return getattr(self.model, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    isa.add_arguments(parser)
    parser.add_argument("--norm", default="bn")
    parser.add_argument("--chunks", type=int, nargs="+", default=[500, 250, 125, 64])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--train-steps", type=int, default=100)
    args = parser.parse_args()
    precision = isa.apply(args)
    import torch
    from profile_engine import prepared

    from normlab.data import load_dataset
    from normlab.training import RunConfig, TensorData, evaluate, train_one_epoch

    config = RunConfig.from_options(norm=args.norm, precision=precision)
    model, opt, data, kwargs = prepared(config, 1, args.train_steps)
    train_one_epoch(model, data, opt, epoch=1, **kwargs)
    ds = load_dataset(config.dataset)
    test = TensorData(ds.test_images, ds.test_labels, ds.mean, ds.std)
    batch = config.protocol.eval_batch_size
    print(f"{config.norm}, {config.precision}, 1 thread, test batch {batch}, "
          f"{isa.dispatch(kernels=True)}", flush=True)

    def logits(forward) -> torch.Tensor:
        from normlab.training.augment import to_input
        from normlab.training.engine import _layout, autocast

        model.eval()
        outs = []
        with torch.no_grad():
            for begin in range(0, len(test), batch):
                x = to_input(test.images[begin : begin + batch], test.mean, test.std,
                             memory_format=_layout(model))
                with autocast(x.device, config.precision):
                    outs.append(forward(x).float())
        return torch.cat(outs)

    reference = logits(model)
    base = evaluate(model, test, batch, precision=config.precision)
    for size in args.chunks:
        chunked = Chunked(model, size)
        same_logits = torch.equal(logits(chunked), reference)
        got = evaluate(chunked, test, batch, precision=config.precision)
        same = (same_logits and got["test_loss"] == base["test_loss"]
                and got["test_acc"] == base["test_acc"])
        times = {batch: [], size: []}
        for r in range(args.rounds):
            for k, m in ((batch, model), (size, chunked))[:: 1 if r % 2 else -1]:
                times[k].append(evaluate(m, test, batch, precision=config.precision)
                                ["test_seconds"])
        a, b = statistics.median(times[batch]), statistics.median(times[size])
        print(f"chunks of {size:>4}: {b:.3f} s against {a:.3f} s in one batch of {batch} -> "
              f"{a / b:.2f}x; logits, test loss and accuracy "
              f"{'bitwise the same' if same else 'DIFFER'}", flush=True)


if __name__ == "__main__":
    main()
