"""normlab's s6 suite on one GPU against the seed's pipeline on the same GPU, in one run.

The seed side is the seed notebook on CUDA: ``reference_seed.SeedMNIST`` (per-image Pillow
rotation) in a shuffling ``DataLoader(batch_size=64, num_workers=4, pin_memory=True)`` (what
the seed's loader passed with CUDA), each batch copied to the GPU, the seed's loop with
per-step ``.item()``; it is timed for ``--seed-steps`` steps and one test pass, and its
suite time is extrapolated to 5 models x 20 epochs (the seed's own full run took ~45 min on
a hosted GPU). The normlab side trains the whole ``s6`` suite at one seed for real
(``--precision``), data and augmentation on the device, no host synchronisation inside an
epoch, one run at a time. Prints both, and ``ratio_gpu_suite=<x>``. First it counts the
host synchronisations inside one epoch of the engine (torch's CUDA sync debug mode, between
its first and its last step; the claim is 0), printed as ``syncs_per_epoch=<n>``.

    NORMLAB_DATA=.data python benchmarks/bench_gpu.py          # after normlab data fetch
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import reference_seed as seed

from normlab.data import load_dataset
from normlab.experiments import SerialExecutor, load_suite
from normlab.experiments.runner import run_suite
from normlab.models import Net
from normlab.training import RunConfig
from normlab.training.engine import train_one_epoch
from normlab.training.events import ignore
from normlab.training.run import load_split_tensors, make_optimizer

STEPS_PER_EPOCH, EPOCHS, VARIANTS = 938, 20, 5


def seed_side(ds, steps: int, device: torch.device) -> float:
    """Seconds of one seed-pipeline epoch on ``device`` (``steps`` steps, scaled to 938,
    plus a test pass)."""
    loader = torch.utils.data.DataLoader(
        seed.SeedMNIST(ds.train_images, ds.train_labels), batch_size=64, shuffle=True,
        num_workers=4, pin_memory=True)
    torch.manual_seed(1)
    model = Net.from_config(seed.SEED_MODEL).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.train()
    start, done = time.perf_counter(), 0
    for data, target in loader:
        data, target = data.to(device), target.to(device)
        opt.zero_grad()
        out = model(data)
        loss = F.nll_loss(out, target)
        loss.item()
        loss.backward()
        opt.step()
        out.argmax(dim=1).eq(target).sum().item()
        done += 1
        if done == steps:
            break
    train = (time.perf_counter() - start) * STEPS_PER_EPOCH / done
    start = time.perf_counter()
    test = torch.utils.data.DataLoader(seed.SeedMNIST(ds.test_images, ds.test_labels, False),
                                       batch_size=64, num_workers=4, pin_memory=True)
    model.eval()
    with torch.no_grad():
        for data, target in test:
            F.nll_loss(model(data.to(device)), target.to(device), reduction="sum").item()
    return train + time.perf_counter() - start


def syncs_in_an_epoch(device: torch.device, precision: str) -> int:
    """Host synchronisations between the first and the last step of one epoch (10,000
    images) of the s6 BN model, with L1 and the one-cycle schedule: everything a step does."""
    config = RunConfig.from_dict({"subset": 10_000, "l1": 3e-5, "precision": precision,
                                  "protocol": {"name": "fast", "epochs": 1}})
    train, _ = load_split_tensors(config, device)
    model = config.make_model().to(device, memory_format=torch.channels_last)
    batch = config.protocol.batch_size
    opt, _, per_step = make_optimizer(model, config, steps_per_epoch=-(-10_000 // batch))
    after_step: list[int] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            train_one_epoch(model, train, opt, seed=1, epoch=1, batch_size=batch, rotation=7.0,
                            l1=config.l1, l1_params=list(model.parameters()),
                            step_scheduler=per_step, precision=precision,
                            on_step=lambda _: after_step.append(len(caught)))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught[after_step[0]:after_step[-1]][:3]:
        print(f"  sync: {w.message}", flush=True)
    return after_step[-1] - after_step[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed-steps", type=int, default=300)
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark is for a GPU machine")
    device = torch.device("cuda")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    print(f"syncs_per_epoch={syncs_in_an_epoch(device, args.precision)}", flush=True)
    ds = load_dataset("mnist")
    epoch = seed_side(ds, args.seed_steps, device)
    seed_suite = epoch * EPOCHS * VARIANTS
    print(f"seed pipeline: {epoch:.1f} s per epoch -> s6 suite (5 x 20 epochs) "
          f"{seed_suite / 60:.1f} min (extrapolated)", flush=True)
    suite = load_suite("s6").with_config(precision=args.precision)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        run_suite(suite, out, executor=SerialExecutor("cuda"), listener=ignore,
                  log=lambda _: None)
        ours = time.perf_counter() - start
        acc = {p.parent.parent.name: float(p.read_text().splitlines()[-1].split(
            '"test_acc": ')[1].split(",")[0]) for p in Path(out).glob("*/seed1/metrics.jsonl")}
    print(f"normlab s6 suite ({args.precision}, report included): {ours:.1f} s; final test "
          f"accuracy {acc}")
    print(f"ratio_gpu_suite={seed_suite / ours:.1f}")


if __name__ == "__main__":
    main()
