"""Probes: what happens inside the network while it trains, sampled every few steps.

Off by default (``RunConfig.probe`` empty). Each kind asked for is recorded per layer at
every ``probe_every``-th training step (step 0, the initialised network, included):

- ``activations``: the input to each norm layer (in the MLP, to each nonlinearity: where the
  BN paper's Figure 1(b, c) looks) as its 15th, 50th and 85th percentiles with its mean and
  std, over the batch and every unit (the percentiles from an even subsample where a layer
  has more than 16,384 values), and the same percentiles of its first unit alone (one
  channel, or one of the MLP's sigmoids, as the paper draws). A block whose ReLU normlab
  folded into its norm (:class:`~normlab.accel.normdrop.FoldedReLU`) is recorded after the
  ReLU, as the unfused network computes it.
- ``weights``: each weight's norm ||w|| before the update and the relative update
  ||w' - w|| / ||w||, the effective step size of a weight that a following norm makes
  scale-invariant (van Laarhoven 2017). Weights are the parameters of two or more dimensions
  (convolutions, linear maps), not the norms' gains and biases.
- ``gradients``: the norm of each weight's gradient as the optimizer sees it (the loss's,
  with L1's term where there is one; weight decay is the optimizer's own).
- ``landscape``: the loss and its gradient along the gradient direction (Santurkar, Tsipras,
  Ilyas & Madry 2018, "How Does Batch Normalization Help Optimization?", Figure 4). On the
  step's batch, with the same dropout draw, the loss L and gradient g of all parameters at
  the weights w, then at w - eta g for eta = :data:`LANDSCAPE_STEPS` times the step's
  learning rate: the loss there and ||g(w - eta g) - g||. From these, per probe step, the
  loss's range along the direction, the largest gradient change ("gradient
  predictiveness") and the largest ||g(w - eta g) - g|| / ||eta g|| ("effective
  beta-smoothness"). It costs a forward and backward per point (benchmarks/README.md).

How it leaves training unchanged: the activations and the landscape come from forwards of
their own on the same batch through the model's own modules in training mode, before the
step, with the weights, the running statistics, the batch counters and the random
generator's state put back after, so the step itself (by hand, compiled or autograd) draws
the same dropout and updates the same statistics as without probes. Weights and gradients
are otherwise read, never written. A run with probes trains to the same numbers bit for bit
as one without (the tests check it).

Records go to ``probes.jsonl`` in the run's folder, one line per probe step, written at the
end of each epoch before its checkpoint; a resumed run drops the lines past its checkpoint
and so ends with the lines an uninterrupted run writes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from normlab.fields import ConfigError

KINDS = ("activations", "weights", "gradients", "landscape")
EVERY = 50  # the default interval, in training steps (benchmarks/README.md: its cost)
PERCENTILES = (15, 50, 85)  # the BN paper's Figure 1(b, c)
LANDSCAPE_STEPS = (0.5, 1.0, 2.0, 4.0)  # eta along -g, in units of the step's learning rate
FILE = "probes.jsonl"


def parse_probes(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """``"activations,weights"`` (or a list, or ``"all"``) as the kinds in :data:`KINDS`'s
    order; an unknown kind is a ConfigError naming the field."""
    if value is None:
        return ()
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [str(n).strip() for n in names if str(n).strip()]
    if names == ["all"]:
        return KINDS
    unknown = [n for n in names if n not in KINDS]
    if unknown:
        raise ConfigError("probe", f"unknown probe {unknown[0]!r}; choose from "
                                   f"{', '.join(KINDS)} (comma-separated) or all")
    return tuple(k for k in KINDS if k in names)


def probe_points(model: nn.Module, norm_classes: tuple[type, ...], net: str
                 ) -> dict[str, nn.Module]:
    """The modules whose input ``activations`` records, by qualified name: in the MLP its
    nonlinearities; in any other network every module of the run's norm classes (a model
    without a norm layer has none)."""
    from normlab.models.mlp import ACTIVATIONS

    kinds = tuple(ACTIVATIONS.values()) if net == "mlp" else norm_classes
    if not kinds:
        return {}
    return {name: m for name, m in model.named_modules()
            if name and isinstance(m, kinds) and type(m) is not nn.Identity}


def norm_classes(config) -> tuple[type, ...]:
    """The classes of ``config``'s (a ModelConfig) norm layers, built once each at a small
    width, and the fused modules normlab swaps in for BN and GN (none for no norm)."""
    from normlab.accel.normdrop import BatchNormDropout, GroupNormDropout
    from normlab.models.norms import make_norm, norm_spec

    found: list[type] = []
    for name in config.norms:
        if name == "none":
            continue
        spec = norm_spec(name)
        inputs = "features" if config.net == "mlp" and "features" in spec.inputs else "maps"
        with torch.random.fork_rng(devices=[]):  # (a norm may draw at construction)
            layer = make_norm(name, 4 * config.groups, config.groups, inputs,
                              **config.norm_options)
        found.append(type(layer))
    if any(issubclass(c, nn.modules.batchnorm._BatchNorm) for c in found):
        found.append(BatchNormDropout)
    if any(issubclass(c, nn.GroupNorm) for c in found):
        found.append(GroupNormDropout)
    return tuple(dict.fromkeys(found))


SAMPLE = 1 << 14  # a layer's percentiles from at most this many of its values


def _percentiles(values: torch.Tensor) -> list[float]:
    """:data:`PERCENTILES` of a flat tensor, numpy's way (linear interpolation, as
    ``torch.quantile``'s default, by selection instead of sorting), from every k-th value
    where there are more than :data:`SAMPLE`. A layer of the seed's network at batch 64 has
    up to 590,000 values; 16,384 of them, evenly spread, put a percentile within about 0.3
    percentile points of the whole's (its standard error), at a fortieth of the cost."""
    step = -(-values.numel() // SAMPLE)
    return [float(v) for v in np.percentile(values[::step].numpy(), PERCENTILES)]


def _summary(x: torch.Tensor) -> dict:
    """Percentiles, mean and std of all of ``x``, and percentiles of its first unit (channel
    0 of (B, C, ...))."""
    x = x.detach().float()
    out = dict(zip((f"p{p}" for p in PERCENTILES), _percentiles(x.reshape(-1)), strict=True))
    out.update(mean=float(x.mean()), std=float(x.std()) if x.numel() > 1 else 0.0)
    unit = (x[:, 0] if x.dim() > 1 else x).reshape(-1)
    out["unit"] = dict(zip((f"p{p}" for p in PERCENTILES), _percentiles(unit), strict=True))
    return out


def _weights(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.dim() >= 2}


@dataclass
class Prober:
    """Records the probes of one run (see the module). The training loop calls, at a step
    :meth:`due` says to probe: :meth:`before_step` before the step, :meth:`before_update`
    after the gradients are set and before the optimizer's step, :meth:`after_update` after
    it. :meth:`take` hands the records made since the last call to the run's writer."""

    model: nn.Module
    kinds: tuple[str, ...]
    every: int
    points: dict[str, nn.Module] = field(default_factory=dict)
    precision: str = "fp32"  # the run's: the probes' forwards run as its step's does
    records: list[dict] = field(default_factory=list)
    _pending: dict | None = None
    _before: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def for_run(cls, model: nn.Module, config) -> Prober | None:
        """The prober ``config`` (a RunConfig) asks for, or None without probes."""
        if not config.probe:
            return None
        points = (probe_points(model, norm_classes(config.model), config.model.net)
                  if "activations" in config.probe else {})
        return cls(model, config.probe, config.probe_every, points, config.precision)

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def before_step(self, x: torch.Tensor, y: torch.Tensor, step: int, epoch: int,
                    lr: float) -> None:
        """Start the step's record: with ``activations``, the norms' inputs on the batch
        ``x``; with ``landscape``, the loss and gradient along the gradient direction on
        (``x``, ``y``) at steps of the learning rate ``lr``. Everything these forwards
        change is put back (weights, running statistics, counters, the random generator)."""
        self._pending = {"epoch": epoch, "step": step}
        if "activations" in self.kinds and self.points:
            self._pending["activations"] = self._activations(x)
        if "landscape" in self.kinds:
            self._pending["landscape"] = landscape(self.model, x, y, lr, self.precision)

    def _activations(self, x: torch.Tensor) -> dict[str, dict]:
        from normlab.accel import _keep, autocast

        seen: dict[str, dict] = {}

        def hook(name):
            def record(module, args):
                h = args[0]
                if getattr(module, "relu", False):  # a ReLU folded into the norm
                    h = F.relu(h)
                seen[name] = _summary(h)
            return record

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in self.points.items()]
        restore = _keep(self.model)
        try:
            with torch.no_grad(), autocast(x.device, self.precision):
                self.model(x)
        finally:
            for handle in handles:
                handle.remove()
            restore()
        return {n: seen[n] for n in self.points if n in seen}

    def before_update(self) -> None:
        """Read the weights' and gradients' norms; keep the weights for the update's size."""
        record = self._pending
        weights = _weights(self.model)
        if "gradients" in self.kinds:
            record["gradients"] = {n: float(p.grad.norm()) if p.grad is not None else None
                                   for n, p in weights.items()}
        if "weights" in self.kinds:
            self._before = {n: p.detach().clone() for n, p in weights.items()}

    def after_update(self) -> None:
        """The relative update of each weight; the step's record is complete."""
        record, self._pending = self._pending, None
        if "weights" in self.kinds:
            out = {}
            for n, p in _weights(self.model).items():
                w = self._before[n]
                size = float(w.norm())
                out[n] = {"norm": size,
                          "update": float((p.detach() - w).norm()) / size if size else None}
            record["weights"] = out
            self._before = {}
        self.records.append(record)

    def take(self) -> list[dict]:
        out, self.records = self.records, []
        return out


def landscape(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float,
              precision: str = "fp32") -> dict:
    """The batch loss (NLL) and its gradient g over all trainable parameters at the
    weights w, then at w - eta g for eta in :data:`LANDSCAPE_STEPS` times ``lr``, each
    forward in training mode from the same random state (the same dropout draw), at the
    run's ``precision`` (bf16: under autocast, as its step; the loss and gradients in fp32
    as the step's are). Returns
    ``{"lr", "etas", "loss0", "grad0", "loss": [...], "grad_change": [...]}`` (grad0 =
    ||g||; grad_change = ||g(w - eta g) - g||); non-finite values as None. The weights,
    gradients, buffers and random state are put back."""
    from normlab.accel import _keep, autocast

    params = [p for p in model.parameters() if p.requires_grad]
    weights = [p.detach().clone() for p in params]
    restore = _keep(model)
    rng = torch.get_rng_state()

    def loss_and_grad() -> tuple[float, list[torch.Tensor]]:
        torch.set_rng_state(rng)
        with torch.enable_grad():
            with autocast(x.device, precision):
                out = model(x)
            loss = F.nll_loss(out.float(), y)
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        return float(loss.detach()), [torch.zeros_like(p) if g is None else g.detach()
                             for p, g in zip(params, grads, strict=True)]

    etas = [m * lr for m in LANDSCAPE_STEPS]
    try:
        loss0, g0 = loss_and_grad()
        size = math.sqrt(sum(float(g.square().sum()) for g in g0))
        losses, changes = [], []
        for eta in etas:
            with torch.no_grad():
                for p, w, g in zip(params, weights, g0, strict=True):
                    torch.add(w, g, alpha=-eta, out=p.data)
            loss, g = loss_and_grad()
            losses.append(loss)
            changes.append(math.sqrt(sum(float((a - b).square().sum())
                                         for a, b in zip(g, g0, strict=True))))
    finally:
        with torch.no_grad():
            for p, w in zip(params, weights, strict=True):
                p.copy_(w)
        restore()

    def finite(v: float) -> float | None:
        return v if math.isfinite(v) else None

    return {"lr": lr, "etas": etas, "loss0": finite(loss0), "grad0": finite(size),
            "loss": [finite(v) for v in losses], "grad_change": [finite(v) for v in changes]}


def smoothness(record: dict) -> dict[str, float] | None:
    """Santurkar et al.'s three quantities from one probe record's landscape: ``loss_range``
    (the largest minus the smallest loss along the direction, w itself included),
    ``grad_change`` (the largest ||g(w - eta g) - g||) and ``beta`` (the largest
    ||g(w - eta g) - g|| / (eta ||g||)). None without a landscape; inf where a loss or
    gradient along the direction was not finite."""
    got = record.get("landscape")
    if not got:
        return None
    losses = [got["loss0"], *got["loss"]]
    if any(v is None for v in (*losses, *got["grad_change"], got["grad0"])):
        return {"loss_range": math.inf, "grad_change": math.inf, "beta": math.inf}
    size = got["grad0"]
    betas = [c / (eta * size) if size else 0.0
             for c, eta in zip(got["grad_change"], got["etas"], strict=True)]
    return {"loss_range": max(losses) - min(losses), "grad_change": max(got["grad_change"]),
            "beta": max(betas)}


def total_norm(record: dict) -> float | None:
    """||w|| of all the weights of one probe record together (None without weights)."""
    weights = record.get("weights")
    if not weights:
        return None
    return math.sqrt(sum(w["norm"] ** 2 for w in weights.values()))


def total_update(record: dict) -> float | None:
    """The relative update of all the weights together: sqrt(sum ||dw||^2) / ||w||."""
    weights = record.get("weights")
    if not weights:
        return None
    moved = sum((w["update"] * w["norm"]) ** 2 for w in weights.values()
                if w["update"] is not None)
    total = total_norm(record)
    return math.sqrt(moved) / total if total else None


# ----------------------------------------------------------------------------- the file


def append(run_dir: str | Path, records: list[dict]) -> None:
    """Append an epoch's records to the run's probes.jsonl (flushed to disk)."""
    if not records:
        return
    with open(Path(run_dir) / FILE, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.flush()


def keep_epochs(run_dir: str | Path, epochs: int) -> None:
    """Keep the records of the first ``epochs`` epochs (a resumed run's checkpoint), drop
    the rest and any line cut short by a kill: what an uninterrupted run has at that point."""
    path = Path(run_dir) / FILE
    if not path.exists():
        return
    kept = [r for r in _lines(path) if r["epoch"] <= epochs]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    tmp.replace(path)


def read(run_dir: str | Path) -> list[dict]:
    """A run's probe records (none without probes.jsonl), in step order."""
    path = Path(run_dir) / FILE
    return list(_lines(path)) if path.exists() else []


def _lines(path: Path) -> Iterable[dict]:
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the last line of a run killed while writing it
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):
            yield record


def add_arguments(parser) -> None:
    """``--probe`` and ``--probe-every``, as train, suite and sweep take them."""
    parser.add_argument("--probe", metavar="KINDS", default=None,
                        help="record inside the network during training, into each run's "
                             f"probes.jsonl: {', '.join(KINDS)} (comma-separated) or all; "
                             "the norms' inputs as percentiles, each weight's norm and "
                             "relative update, each gradient's norm, the loss and its "
                             "gradient along the gradient direction (landscape: 5 more "
                             "forward and backward passes per probe). It changes no number "
                             "the run computes (default: no probes)")
    parser.add_argument("--probe-every", metavar="STEPS", type=int, default=None,
                        help=f"the probes' interval in training steps (default: {EVERY}; "
                             "its cost is in benchmarks/README.md)")
