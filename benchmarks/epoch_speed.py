"""Training speed of normlab's engine against the seed's pipeline, on this machine.

Both train the BN model with the seed protocol (batch 64, SGD 0.1/0.9, rotation ±7°) on
real MNIST for the same number of steps, after a warm-up. The "seed pipeline" rebuilds
what the seed notebook did: a map-style Dataset that rotates and normalises one image per
__getitem__, a shuffling DataLoader that collates 64 of them, and the model in the default
(contiguous) memory format. normlab keeps the data as one uint8 tensor, augments whole
batches and runs channels-last. Prints seconds per epoch, images per second and the ratio.

    python benchmarks/epoch_speed.py                  # 300 steps each
    python benchmarks/epoch_speed.py --steps 938      # a whole epoch each
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from normlab.data import load_dataset
from normlab.models import Net
from normlab.training import TensorData
from normlab.training.augment import rotate
from normlab.training.engine import train_one_epoch


class SeedStyleDataset(torch.utils.data.Dataset):
    """Per-image transforms, as torchvision's RandomRotation + ToTensor + Normalize did."""

    def __init__(self, images, labels, mean, std, degrees=7.0):
        self.images, self.labels = images, labels
        self.mean, self.std, self.degrees = mean, std, degrees

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i].float().div(255).view(1, 1, 28, 28)
        angle = (torch.rand(1) * 2 - 1) * self.degrees
        x = rotate(x, angle)[0]
        return (x - self.mean) / self.std, self.labels[i]


def seed_pipeline(ds, steps: int, workers: int) -> float:
    torch.manual_seed(1)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = torch.utils.data.DataLoader(
        SeedStyleDataset(ds.train_images, ds.train_labels, ds.mean, ds.std),
        batch_size=64, shuffle=True, num_workers=workers,
    )
    model.train()
    start = None
    for step, (x, y) in enumerate(loader):
        if step == 20:
            start = time.perf_counter()
        if step == 20 + steps:
            break
        loss = F.nll_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def normlab_pipeline(ds, steps: int) -> float:
    torch.manual_seed(1)
    model = Net().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    n = 64 * (steps + 20)
    warm = TensorData(ds.train_images[: 64 * 20], ds.train_labels[: 64 * 20], ds.mean, ds.std)
    data = TensorData(ds.train_images[64 * 20 : n], ds.train_labels[64 * 20 : n], ds.mean, ds.std)
    train_one_epoch(model, warm, opt, seed=1, epoch=1, batch_size=64, rotation=7.0)
    return train_one_epoch(model, data, opt, seed=1, epoch=2, batch_size=64, rotation=7.0)[
        "train_seconds"
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="timed steps per pipeline")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--workers", type=int, default=0,
                        help="DataLoader workers for the seed pipeline (default: 0)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    ds = load_dataset("mnist")
    steps_per_epoch = -(-len(ds.train_labels) // 64)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.steps} timed steps of 64")
    results = {}
    for name, fn in (("seed pipeline", lambda: seed_pipeline(ds, args.steps, args.workers)),
                     ("normlab", lambda: normlab_pipeline(ds, args.steps))):
        seconds = fn()
        per_step = seconds / args.steps
        results[name] = per_step
        print(f"{name:>14}: {per_step * 1e3:6.1f} ms/step  {64 / per_step:7.0f} img/s  "
              f"{per_step * steps_per_epoch:6.1f} s/epoch (60,000 images)")
    print(f"speed-up normlab / seed pipeline: {results['seed pipeline'] / results['normlab']:.2f}x")


if __name__ == "__main__":
    main()
