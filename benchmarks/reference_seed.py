"""The seed's training pipeline, rebuilt without torchvision, as a speed comparison point.

What it reproduces (from the seed's ``S6/datasets/mnist.py``, ``S6/utils/training.py`` and
``S6/models/model.py``):

* Data: the MNIST uint8 images in a map-style Dataset whose ``__getitem__`` does what
  ``torchvision.datasets.MNIST.__getitem__`` + the seed's transforms did, one image at a
  time: ``Image.fromarray(img.numpy(), mode="L")``; ``RandomRotation((-7, 7), fill=(1,))``
  = one angle from ``torch.empty(1).uniform_(-7, 7)`` (torch's global RNG, as torchvision
  draws it) and ``img.rotate(angle, NEAREST, expand=False, center=None, fillcolor=(1,))``
  (the call torchvision's PIL backend makes); ``ToTensor`` = ``np.array`` copy,
  ``view(28, 28, 1).permute(2, 0, 1).contiguous()``, ``float().div(255)``; ``Normalize`` =
  clone, the ``std == 0`` check, ``sub_(0.1307).div_(0.3081)``. The label is ``int(...)``.
* Loader: ``DataLoader(batch_size=64, shuffle=True)`` with ``num_workers=0``: that is what
  the seed's ``get_dataloader`` passes when CUDA is off (with CUDA it used 4 workers and
  pinned memory; ``workers=`` here lets you try that, but on a 2-core machine the workers
  compete with the training threads). Batches are the default collate's contiguous
  (N, 1, 28, 28) float tensors; the model is in the default (contiguous) memory format.
* Model: ``normlab.models.Net`` built as the seed's (``SEED_MODEL``: BN, dropout 0.01,
  ``nn.Dropout`` from ATen; the same layers, order and state dict as the seed's).
* Loop: the seed's ``train_model``: ``zero_grad()``, forward, ``F.nll_loss``,
  ``loss.item()`` appended to a list, backward, ``step()``, ``argmax(dim=1, keepdim=True)``
  and ``.eq(...).sum().item()`` for the running accuracy, and a tqdm bar over the loader
  whose description (loss, batch id, running accuracy) is set every step
  (``set_description`` refreshes the bar each call). SGD(lr=0.1, momentum=0.9) and
  StepLR(step_size=8, gamma=0.01) stepped once per epoch (``run``).
* Test: the seed's usual ``test``: per-image ToTensor + Normalize through a non-shuffling
  DataLoader of batch 64, summed NLL and correct count read with ``.item()`` per batch.
* Threads: torch's default thread count unless ``threads`` is given.

What it does not reproduce: torchvision itself (its PyPI build does not load beside the
CPU torch here), the notebook front end (tqdm printed to a Colab cell; here the bar goes
to stderr, or to ``progress_file``), the GPU, the downloads, the plots and the
misclassified-image pass. The per-epoch learning-rate and loss/accuracy lists are kept
as the seed kept them.

How it was checked to be faithful (Pillow 13.0.0, ``pip install pillow==13.0.0``):
the calls are the ones torchvision's PIL code path makes, minus torchvision's own Python
layers around them (``_log_api_usage_once``, argument checks, ``get_dimensions``, the
``Compose`` loop, ``F.rotate``/``F_pil.rotate`` dispatch, ``_parse_fill``), so per image
it does no more work than the real pipeline, i.e. it is not slower than the real thing;
``python benchmarks/reference_seed.py --check`` times the per-image transform with and
without a stand-in for those layers. The issue's measurements of the seed's own code on
this machine kind (16.4 s per epoch at 2 threads, 22.1 s at 1 thread, i.e. about 17.5 and
23.6 ms per step) are the external check: this script should land at or below them.

In-process use (another script can alternate this with normlab's engine)::

    from reference_seed import make_loader, make_model_and_optimizer, train_epoch, test
    loader = make_loader(ds.train_images, ds.train_labels, seed=1)
    model, opt, sched = make_model_and_optimizer(seed=1)
    stats = train_epoch(model, loader, opt, max_steps=200, threads=2)
    acc = test(model, ds.test_images, ds.test_labels)

    python benchmarks/reference_seed.py --steps 300 --threads 1 2   # ms/step at each setting
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from normlab.models import ModelConfig, Net

# The seed's model exactly: BN, dropout 0.01 drawn by nn.Dropout (one random number per
# unit). normlab's own default draws only the dropped positions (faster, same distribution).
SEED_MODEL = ModelConfig(norms=("bn",), groups=2, dropout=0.01, dropout_draw="bernoulli")

MEAN, STD = (0.1307,), (0.3081,)
DEGREES = (-7.0, 7.0)
FILL = (1,)


def _to_tensor(pic: Image.Image) -> torch.Tensor:
    """torchvision's ToTensor for a mode-L PIL image."""
    img = torch.from_numpy(np.array(pic, np.uint8, copy=True))
    img = img.view(pic.size[1], pic.size[0], 1).permute((2, 0, 1)).contiguous()
    return img.to(dtype=torch.get_default_dtype()).div(255)


def _normalize(tensor: torch.Tensor) -> torch.Tensor:
    """torchvision's Normalize (not in place)."""
    tensor = tensor.clone()
    mean = torch.as_tensor(MEAN, dtype=tensor.dtype, device=tensor.device)
    std = torch.as_tensor(STD, dtype=tensor.dtype, device=tensor.device)
    if (std == 0).any():
        raise ValueError("std evaluated to zero")
    return tensor.sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))


def _random_rotation(img: Image.Image) -> Image.Image:
    """RandomRotation((-7, 7), fill=(1,)) on a PIL image: nearest, no expand, centre."""
    angle = float(torch.empty(1).uniform_(DEGREES[0], DEGREES[1]).item())
    return img.rotate(angle, Image.NEAREST, False, None, fillcolor=FILL)


class SeedMNIST(torch.utils.data.Dataset):
    """torchvision.datasets.MNIST's __getitem__ with the seed's transforms, per image."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, train: bool = True):
        self.data, self.targets, self.train = images, labels, train

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        img, target = self.data[index], int(self.targets[index])
        img = Image.fromarray(img.numpy(), mode="L")
        if self.train:
            img = _random_rotation(img)
        return _normalize(_to_tensor(img)), target


def make_loader(images_uint8: torch.Tensor, labels: torch.Tensor, seed: int | None = None,
                *, train: bool = True, workers: int = 0) -> torch.utils.data.DataLoader:
    """The seed's loader (batch 64, shuffled for training). ``seed`` seeds torch's global
    RNG (the seed notebook's ``torch.manual_seed(1)``), which drives both the shuffle and
    the rotation angles."""
    if seed is not None:
        torch.manual_seed(seed)
    return torch.utils.data.DataLoader(
        SeedMNIST(images_uint8, labels, train), batch_size=64, shuffle=train,
        num_workers=workers, pin_memory=False,
    )


def make_model_and_optimizer(seed: int | None = None):
    """Net() (BN, dropout 0.01), SGD(0.1, momentum 0.9), StepLR(8, 0.01)."""
    if seed is not None:
        torch.manual_seed(seed)
    model = Net.from_config(SEED_MODEL)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=8, gamma=0.01)
    return model, optimizer, scheduler


@contextlib.contextmanager
def num_threads(threads: int | None):
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_epoch(model, loader, optimizer, max_steps: int | None = None,
                threads: int | None = None, progress_file=None) -> dict:
    """The seed's ``train_model`` for one epoch (or ``max_steps`` batches).

    Returns seconds (wall time of the loop, data loading included), steps, the mean of
    the per-step losses, and the running accuracy % at the end."""
    out = progress_file if progress_file is not None else sys.stderr
    with num_threads(threads):
        start = time.perf_counter()
        train_batch_loss, train_batch_acc = [], []
        model.train()
        pbar = tqdm(loader, file=out, total=max_steps or len(loader))
        correct = processed = steps = 0
        for batch_idx, (data, target) in enumerate(pbar):
            optimizer.zero_grad()
            y_pred = model(data)
            loss = F.nll_loss(y_pred, target)
            train_batch_loss.append(loss.item())
            loss.backward()
            optimizer.step()
            pred = y_pred.argmax(dim=1, keepdim=True)
            correct += pred.eq(target.view_as(pred)).sum().item()
            processed += len(data)
            pbar.set_description(
                desc=f"Loss={loss.item()} Batch_id={batch_idx} "
                f"Accuracy={100 * correct / processed:0.2f}"
            )
            train_batch_acc.append(100 * correct / processed)
            steps += 1
            if max_steps is not None and steps >= max_steps:
                break  # before the loader prepares a batch that would not be used
        pbar.close()
        seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "steps": steps,
        "loss": float(np.mean(train_batch_loss)) if train_batch_loss else float("nan"),
        "acc": train_batch_acc[-1] if train_batch_acc else float("nan"),
    }


def test(model, images: torch.Tensor, labels: torch.Tensor, threads: int | None = None) -> float:
    """The seed's test pass: returns accuracy %."""
    loader = make_loader(images, labels, train=False)
    with num_threads(threads), torch.no_grad():
        model.eval()
        test_loss, correct = 0.0, 0
        for data, target in loader:
            output = model(data)
            test_loss += F.nll_loss(output, target, reduction="sum").item()
            pred = output.argmax(dim=1, keepdim=True)
            correct += pred.eq(target.view_as(pred)).sum().item()
    return 100.0 * correct / len(loader.dataset)


def run(ds, epochs: int = 20, seed: int = 1, threads: int | None = None, progress_file=None):
    """The seed protocol end to end; returns per-epoch (train stats, test accuracy)."""
    loader = make_loader(ds.train_images, ds.train_labels, seed)
    model, optimizer, scheduler = make_model_and_optimizer()
    history = []
    for _ in range(epochs):
        stats = train_epoch(model, loader, optimizer, threads=threads,
                            progress_file=progress_file)
        scheduler.step()
        history.append((stats, test(model, ds.test_images, ds.test_labels, threads)))
    return history


# --- the faithfulness check -------------------------------------------------------------

class _TorchvisionLayers:
    """A stand-in for the Python work torchvision adds around the same calls (per-call
    usage logging, type checks, get_dimensions, dispatch, _parse_fill): a lower bound."""

    @staticmethod
    def rotate(img):
        torch._C._log_api_usage_once("torchvision.transforms.functional.rotate")
        if not isinstance(img, torch.Tensor):
            _ = (len(img.getbands()), *img.size)  # get_dimensions
        degrees = [float(d) for d in DEGREES]
        angle = float(torch.empty(1).uniform_(degrees[0], degrees[1]).item())
        fill = tuple(int(x) for x in FILL) if len(FILL) == len(img.getbands()) else FILL
        return img.rotate(angle, Image.NEAREST, False, None, fillcolor=fill)


def faithfulness_check(ds, n: int = 3000) -> None:
    images, labels = ds.train_images[:n], ds.train_labels[:n]
    plain = SeedMNIST(images, labels)

    def with_layers(i):
        img = Image.fromarray(images[i].numpy(), mode="L")
        img = _TorchvisionLayers.rotate(img)
        torch._C._log_api_usage_once("torchvision.transforms.ToTensor")
        x = _to_tensor(img)
        torch._C._log_api_usage_once("torchvision.transforms.Normalize")
        return _normalize(x), int(labels[i])

    timings = {"this script": [], "+ torchvision-like layers": []}
    for _ in range(3):
        for name, fn in (("this script", plain.__getitem__),
                         ("+ torchvision-like layers", with_layers)):
            t = time.perf_counter()
            for i in range(n):
                fn(i)
            timings[name].append((time.perf_counter() - t) / n * 1e6)
    for name, ts in timings.items():
        print(f"per-image transform, {name:>26}: {np.median(ts):6.1f} us "
              f"({64 * np.median(ts) / 1e3:.2f} ms per batch of 64)")
    torch.manual_seed(0)
    x, _ = plain[0]
    print(f"one sample: shape {tuple(x.shape)}, dtype {x.dtype}, contiguous "
          f"{x.is_contiguous()}, min {x.min():.4f} (fill 1/255 normalised = "
          f"{(1 / 255 - MEAN[0]) / STD[0]:.4f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="timed steps per setting")
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--check", action="store_true", help="time the per-image transform")
    parser.add_argument("--show-bar", action="store_true", help="tqdm to stderr, not devnull")
    args = parser.parse_args()
    from normlab.data import load_dataset

    ds = load_dataset("mnist")
    print(f"torch {torch.__version__}, default threads {torch.get_num_threads()}, "
          f"Pillow {Image.__version__}, workers {args.workers}")
    if args.check:
        faithfulness_check(ds)
    sink = None if args.show_bar else open(os.devnull, "w")  # noqa: SIM115
    results: dict[int, list[float]] = {t: [] for t in args.threads}
    for r in range(args.rounds):
        for t in args.threads:
            loader = make_loader(ds.train_images, ds.train_labels, seed=1 + r,
                                 workers=args.workers)
            model, opt, _ = make_model_and_optimizer(seed=1 + r)
            train_epoch(model, loader, opt, max_steps=20, threads=t, progress_file=sink)
            stats = train_epoch(model, loader, opt, max_steps=args.steps, threads=t,
                                progress_file=sink)
            results[t].append(stats["seconds"] / stats["steps"] * 1e3)
            print(f"round {r}: {t} thread(s): {results[t][-1]:.1f} ms/step")
    for t, ms in results.items():
        print(f"threads={t}: median {np.median(ms):.1f} ms/step = "
              f"{np.median(ms) * 938 / 1e3:.1f} s per 938-step epoch")


if __name__ == "__main__":
    main()
