"""Inside the network: the report's section for runs with probes (:mod:`normlab.probes`).

It applies to any suite some of whose runs recorded probes. Per variant (mean over its
seeds with probes): the input to the last probed layer (the layer nearest the output; in
the MLP its last sigmoid) as the 15th, 50th and 85th percentiles of its first unit over the
training steps, as the BN paper's Figure 1(b, c) draws them; and the weights' total norm
and relative update per step, the effective step size of a scale-invariant weight. A table
gives the numbers at the first and the last probe. Nothing here is a verdict: the studies
built on the probes (bn-paper) give theirs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from normlab import probes
from normlab.reports.collect import SuiteResults, VariantResults
from normlab.reports.doc import Block, Para, Table
from normlab.reports.figures import norm_colours, norm_key, save
from normlab.reports.page import Image

TITLE = "Inside the network"
ACTIVATIONS = "inside_activations.png"
WEIGHTS = "inside_weights.png"
UP_TO = 8  # variants drawn (their panels); the table lists every one


@dataclass
class Probed:
    """One variant's probe records, by seed."""

    variant: VariantResults
    runs: dict[int, list[dict]]  # seed -> records in step order

    @property
    def label(self) -> str:
        return self.variant.label

    def layer(self) -> str | None:
        """The last probed layer (nearest the output), or None without activations."""
        for records in self.runs.values():
            for r in records:
                if r.get("activations"):
                    return list(r["activations"])[-1]
        return None

    def steps(self) -> list[int]:
        """The probe steps every seed recorded (seeds may have trained for different
        lengths: a diverged run stops early)."""
        sets = [{r["step"] for r in records} for records in self.runs.values()]
        return sorted(set.intersection(*sets)) if sets else []

    def series(self, value) -> tuple[np.ndarray, np.ndarray]:
        """(steps, the mean over seeds of ``value(record)``) over :meth:`steps`; a record
        ``value`` gives None for is left out of the mean (NaN if no seed has it)."""
        steps = self.steps()
        by_seed = [{r["step"]: value(r) for r in records} for records in self.runs.values()]
        out = []
        for s in steps:
            got = [d[s] for d in by_seed if d.get(s) is not None]
            out.append(float(np.mean(got)) if got else math.nan)
        return np.array(steps, dtype=float), np.array(out)


def find(suite: SuiteResults) -> list[Probed]:
    """The variants with at least one run that recorded probes."""
    found = []
    for v in suite.variants:
        runs = {r.seed: got for r in v.runs if (got := probes.read(r.dir))}
        if runs:
            found.append(Probed(v, runs))
    return found


def _unit(layer: str, key: str):
    def value(record: dict) -> float | None:
        stats = record.get("activations", {}).get(layer)
        return None if stats is None else stats["unit"][key]
    return value


def activations_figure(found: list[Probed]) -> Figure:
    """One panel per variant: the 15/50/85th percentiles of the last probed layer's first
    unit over the training steps (mean over seeds), the 15-85 band shaded."""
    shown = [p for p in found if p.layer() is not None][:UP_TO]
    cols = min(4, len(shown))
    rows = -(-len(shown) // cols)
    fig = Figure(figsize=(3.4 * cols + 0.6, 2.9 * rows + 0.8), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    colours = norm_colours([norm_key(p.variant.config.model) for p in shown
                            if p.variant.config is not None])
    for ax, p in zip(axes, shown, strict=False):
        layer = p.layer()
        x, lo = p.series(_unit(layer, "p15"))
        _, mid = p.series(_unit(layer, "p50"))
        _, hi = p.series(_unit(layer, "p85"))
        colour = (colours.get(norm_key(p.variant.config.model), "#1f77b4")
                  if p.variant.config is not None else "#1f77b4")
        ax.fill_between(x, lo, hi, color=colour, alpha=0.2, linewidth=0)
        for y, style in ((lo, ":"), (mid, "-"), (hi, ":")):
            ax.plot(x, y, color=colour, linestyle=style, linewidth=1.4)
        ax.set_title(f"{p.label}\n{layer}, unit 0", fontsize=9.5)
        ax.set_xlabel("training step")
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.grid(True, alpha=0.3)
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    axes[0].set_ylabel("input value")
    fig.suptitle("The input to the last probed layer over training: 15th, 50th (solid) and "
                 "85th percentiles of its first unit, mean over seeds", fontsize=11)
    return fig


def weights_figure(found: list[Probed]) -> Figure:
    """The weights' total norm and relative update per step, one line per variant."""
    shown = [p for p in found if p.steps() and any(r.get("weights") for rs in p.runs.values()
                                                   for r in rs)][:UP_TO]
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    colours = norm_colours([norm_key(p.variant.config.model) for p in shown
                            if p.variant.config is not None])
    extra = iter(("#bcbd22", "#17becf", "#8c564b", "#e377c2", "#7f7f7f", "#9edae5"))
    used: set[str] = set()
    for p in shown:
        key = norm_key(p.variant.config.model) if p.variant.config is not None else p.label
        colour = colours.get(key, "#1f77b4")
        if colour in used:  # two variants of one norm: tell them apart
            colour = next(extra, colour)
        used.add(colour)
        x, norm = p.series(probes.total_norm)
        _, update = p.series(probes.total_update)
        left.plot(x, norm, color=colour, label=p.label, linewidth=1.6)
        right.plot(x, update, color=colour, label=p.label, linewidth=1.2)
    left.set_ylabel("||w||, all weights together")
    right.set_ylabel("||Δw|| / ||w|| per step")
    right.set_yscale("log")
    for ax in (left, right):
        ax.set_xlabel("training step")
        ax.grid(True, alpha=0.3)
    left.legend(fontsize=8.5, frameon=False)
    fig.suptitle("The weights (convolutions and linear maps) over training: their norm and "
                 "the relative size of each update, mean over seeds", fontsize=11)
    return fig


def _fmt(x: float | None, digits: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


def inside_blocks(found: list[Probed]) -> list[Block]:
    rows = []
    for p in found:
        steps = p.steps()
        layer = p.layer()
        first_last = []
        for value in ([_unit(layer, "p15"), _unit(layer, "p50"), _unit(layer, "p85")]
                      if layer else []):
            _, y = p.series(value)
            first_last.append((y[0], y[-1]) if len(y) else (math.nan, math.nan))
        band = (" / ".join(_fmt(a) for a, _ in first_last) + " → "
                + " / ".join(_fmt(b) for _, b in first_last)) if first_last else "—"
        _, norm = p.series(probes.total_norm)
        _, update = p.series(probes.total_update)
        rows.append([p.label, str(len(p.runs)), f"{steps[0]}–{steps[-1]}" if steps else "—",
                     layer or "—", band,
                     f"{_fmt(norm[0])} → {_fmt(norm[-1])}" if len(norm) else "—",
                     f"{_fmt(update[0])} → {_fmt(update[-1])}" if len(update) else "—"])
    every = sorted({r["step"] for p in found for rs in p.runs.values() for r in rs})
    return [
        Para("Recorded by the runs' probes (`--probe`; each run's probes.jsonl), which change "
             "no number a run computes. The input to a norm is recorded as the unfused "
             "network computes it (after the ReLU normlab folds into the norm); in the MLP "
             "the input to each sigmoid, as the BN paper's Figure 1(b, c). The relative "
             "update ||Δw|| / ||w|| is a weight's effective step size: where a norm follows "
             "the weight its scale does not change the output, and only this ratio moves "
             f"it. Probe steps here: {every[0]} to {every[-1]}."),
        Table(["variant", "seeds", "steps", "layer", "unit 0: p15 / p50 / p85, first → last",
               "||w||, first → last", "||Δw|| / ||w||, first → last"], rows, "lrllrrr"),
    ]


def inside_parts(suite: SuiteResults, figs_dir: str | Path
                 ) -> tuple[list[Block], list[Image]] | None:
    """The report's section (blocks and figures, written into ``figs_dir``), or None when
    no run of ``suite`` recorded probes."""
    found = find(suite)
    if not found:
        return None
    figs = Path(figs_dir)
    images = []
    if any(p.layer() for p in found):
        images.append(Image(save(activations_figure(found), figs / ACTIVATIONS),
                            "The input to the last probed layer over training",
                            "15th, 50th and 85th percentiles of the first unit's input, per "
                            "variant, mean over its seeds with probes."))
    if any(r.get("weights") for p in found for rs in p.runs.values() for r in rs):
        images.append(Image(save(weights_figure(found), figs / WEIGHTS),
                            "The weights' norm and relative update over training",
                            "||w|| of all weights together and ||Δw|| / ||w|| per step, per "
                            "variant, mean over its seeds with probes."))
    blocks = inside_blocks(found)
    if len(found) > UP_TO:
        blocks.append(Para(f"{len(found)} variants have probes: the figures draw the first "
                           f"{UP_TO}, the table lists them all."))
    return blocks, images
