"""ms per training step of normlab at two git revisions (or two option sets), side by side:
what one change is worth.

Each measurement is a fresh process (``python -c`` with the revision's ``src`` first on
``sys.path``, tcmalloc preloaded when installed, as the ``normlab`` command runs) that
trains ``--steps`` steps of the seed protocol on real MNIST after a 20-step warm-up, through
``train_one_epoch`` as ``normlab train`` does, one thread, the config's defaults unless
``--option`` says otherwise. The two sides alternate, A B A B, and the script prints each
round and the ratio of the medians. The revisions are checked out into temporary
worktrees of this repository (nothing in the working tree changes).

    python benchmarks/revisions.py 56731c2 HEAD                  # one commit's change
    python benchmarks/revisions.py HEAD HEAD --b-option augment=aten   # an option's worth
    python benchmarks/revisions.py e9daa13 896da89 --option norm=gn --option precision=fp32
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from normlab.memory import tcmalloc

ROOT = Path(__file__).resolve().parents[1]
STEP = r'''
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
from normlab.data import load_dataset
from normlab.training import RunConfig, TensorData, train_one_epoch
from normlab.training.engine import l1_parameters, memory_format
from normlab.training.run import make_optimizer
steps, options = int(sys.argv[2]), json.loads(sys.argv[3])
torch.set_num_threads(1)
ds = load_dataset("mnist")
n = steps * 64
data = TensorData(ds.train_images[:n], ds.train_labels[:n], ds.mean, ds.std)
warm = TensorData(ds.train_images[:1280], ds.train_labels[:1280], ds.mean, ds.std)
config = RunConfig.from_options(**options)
torch.manual_seed(config.seed)
model = config.make_model().to(memory_format=memory_format(torch.device("cpu"), 1,
                                                           config.model))
opt, _, _ = make_optimizer(model, config, steps)
extra = {"augment": config.augment} if hasattr(config, "augment") else {}
try:  # 0.9 and after: the model is plain, the acceleration prepares its step
    from normlab import accel
    extra["step"] = accel.prepare(model, config.model, config.precision,
                                  enabled=config.accel == "on")
except ImportError:  # before: the model was built accelerated
    pass
if config.l1:
    extra.update(l1=config.l1, l1_params=l1_parameters(model, config.l1_scope))
for part in (warm, data):
    out = train_one_epoch(model, part, opt, seed=config.seed, epoch=1, batch_size=64,
                          rotation=config.protocol.rotation, precision=config.precision,
                          **extra)
print(1000 * out["train_seconds"] / steps)
'''


def parse_options(items: list[str]) -> dict[str, object]:
    options: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--option takes KEY=VALUE, got {item!r}")
        for cast in (int, float):
            try:
                options[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            options[key] = value
    return options


def measure(src: Path, steps: int, options: dict) -> float:
    env = {**os.environ, "PYTHONPATH": ""}
    if tcmalloc():
        env["LD_PRELOAD"] = str(tcmalloc())
    done = subprocess.run([sys.executable, "-c", STEP, str(src), str(steps),
                           json.dumps(options)], capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"the measurement at {src} failed:\n{done.stderr[-3000:]}")
    return float(done.stdout.split()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", help="a git revision (A)")
    parser.add_argument("b", help="a git revision (B)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="a normlab train option for both sides (norm=gn, precision=fp32)")
    parser.add_argument("--a-option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--b-option", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    shared = parse_options(args.option)
    sides = {"A": (args.a, {**shared, **parse_options(args.a_option)}),
             "B": (args.b, {**shared, **parse_options(args.b_option)})}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {}
        for name, (rev, _) in sides.items():
            trees[name] = Path(tmp) / name
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q",
                            str(trees[name]), rev], check=True)
        try:
            times: dict[str, list[float]] = {"A": [], "B": []}
            for r in range(1, args.rounds + 1):
                for name, (_, options) in sides.items():
                    times[name].append(measure(trees[name] / "src", args.steps, options))
                print(f"round {r}: A {times['A'][-1]:.2f} ms/step, B {times['B'][-1]:.2f} "
                      f"ms/step", flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                str(tree)], check=False)
    a, b = statistics.median(times["A"]), statistics.median(times["B"])
    for name, (rev, options) in sides.items():
        print(f"{name}: {rev} {options or ''}")
    print(f"median: A {a:.2f} ms/step, B {b:.2f} ms/step; A/B = {a / b:.3f}")


if __name__ == "__main__":
    main()
