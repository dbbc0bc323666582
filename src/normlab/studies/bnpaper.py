"""The BN paper's Figure 1, reproduced: Ioffe & Szegedy (ICML 2015), section 4.1.

A suite is this study when it has the MLP (``net = "mlp"``) with BN and without a norm, in
otherwise equal variants, and the runs recorded ``activations`` probes. The figure:

(a) test accuracy against training steps, with and without BN (mean over seeds, min-max);
(b, c) the 15th, 50th and 85th percentiles of one last-hidden-layer sigmoid's input over
    training, without and with BN (one seed, as the paper draws one network).

Three claims of the paper are tested, each as the per-seed difference BN − none (the two
variants of a seed see the same batches and start from the same initial weights: paired),
Holm-adjusted as one family: the test accuracy at the end, the test accuracy after the
first epoch (the speed), and how far that sigmoid input's median moves over training, in
units of its 15-85 percentile width (the stability of the distribution).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from normlab import probes
from normlab.reports.collect import SuiteResults, VariantResults
from normlab.reports.doc import Block, Bullets, Heading, Para, Table
from normlab.reports.figures import NORM_COLOURS, figure_section
from normlab.reports.page import Image
from normlab.reports.stats import ALPHA, POWER, Comparison, claim_text, holm, one_sample

TITLE = "The BN paper's Figure 1"
FIGURE = "bn_paper.png"
PAPER = ("Ioffe & Szegedy 2015, section 4.1 and Figure 1: on MNIST, an MLP of three "
         "sigmoid layers of 100 units, batch 60, 50,000 steps. (a) The batch-normalized "
         "network has the higher test accuracy and gets there faster. (b, c) For a typical "
         "sigmoid of the last hidden layer, the input's distribution in the original "
         "network changes a lot over training, in mean and in variance; with BN it is much "
         "more stable, which the paper takes to be what helps training (its 'internal "
         "covariate shift').")


@dataclass
class Arm:
    """One variant of the study (BN or none): its finished runs' metrics and probes."""

    variant: VariantResults
    metrics: dict[int, list[dict]]  # seed -> epochs
    probes: dict[int, list[dict]]  # seed -> records with activations
    steps_per_epoch: int

    @property
    def label(self) -> str:
        return self.variant.label


@dataclass
class Study:
    bn: Arm
    none: Arm
    layer: str  # the last hidden layer's sigmoid (its module name)


def _arm(v: VariantResults, steps_per_epoch: int) -> Arm:
    done = [r for r in v.finished if r.metrics]
    records = {r.seed: [x for x in probes.read(r.dir) if x.get("activations")] for r in done}
    return Arm(v, {r.seed: r.metrics for r in done},
               {s: x for s, x in records.items() if x}, steps_per_epoch)


def _key(v: VariantResults) -> str:
    d = v.config.to_dict()
    d.pop("seed", None)
    d["model"] = {k: x for k, x in d["model"].items() if k != "norm"}
    return json.dumps(d, sort_keys=True)


def find_study(suite: SuiteResults) -> Study | None:
    """BN and no-norm MLP variants alike but for the norm, with activation probes; else None."""
    mlp = [v for v in suite.variants if v.config is not None and v.config.model.net == "mlp"
           and "activations" in v.config.probe and v.config.model.norms in (("bn",), ("none",))]
    bn = [v for v in mlp if v.config.model.norms == ("bn",)]
    none = [v for v in mlp if v.config.model.norms == ("none",)]
    pair = next(((a, b) for a in bn for b in none if _key(a) == _key(b)), None)
    if pair is None:
        return None
    config = pair[0].config
    n = config.subset or 60000
    steps = -(-n // config.protocol.batch_size)
    arms = [_arm(v, steps) for v in pair]
    layer = next((list(rs[0]["activations"])[-1] for arm in arms
                  for rs in arm.probes.values()), "hidden.8")
    return Study(arms[0], arms[1], layer)


# ----------------------------------------------------------------------------- numbers


def drift(records: list[dict], layer: str) -> float | None:
    """How far the unit's median moved from the first probe to the last, in units of its
    mean 15-85 percentile width over the run."""
    units = [r["activations"][layer]["unit"] for r in records if layer in r["activations"]]
    if len(units) < 2:
        return None
    width = float(np.mean([u["p85"] - u["p15"] for u in units]))
    return abs(units[-1]["p50"] - units[0]["p50"]) / width if width > 0 else None


def comparisons(study: Study) -> list[Comparison]:
    """The paper's three claims as paired differences BN − none, Holm-adjusted together."""
    seeds = sorted(set(study.bn.metrics) & set(study.none.metrics))
    final = [study.bn.metrics[s][-1]["test_acc"] - study.none.metrics[s][-1]["test_acc"]
             for s in seeds]
    first = [study.bn.metrics[s][0]["test_acc"] - study.none.metrics[s][0]["test_acc"]
             for s in seeds]
    family = [one_sample("final test accuracy, BN − none (points)", final),
              one_sample("test accuracy after the first epoch, BN − none (points)", first)]
    moved = [(drift(study.bn.probes[s], study.layer), drift(study.none.probes[s], study.layer))
             for s in seeds if s in study.bn.probes and s in study.none.probes]
    moved = [b - a for a, b in moved if a is not None and b is not None]
    family.append(one_sample("median's drift in 15-85 widths, none − BN", moved))
    return holm(family)


def verdict(family: list[Comparison]) -> str:
    final, first, moved = family
    shown = [c.direction == "up" for c in family]
    word = ("**Yes**" if all(shown) else "**Partly**" if any(shown) else "**No**")
    parts = []
    parts.append("BN ends with the higher test accuracy" if final.direction == "up" else
                 "the final test accuracies do not differ resolvably" if final.direction in (
                     "none", "untested") else "BN ends with the lower test accuracy")
    parts.append("is ahead after the first epoch" if first.direction == "up" else
                 "is not resolvably ahead after the first epoch" if first.direction in (
                     "none", "untested") else "is behind after the first epoch")
    parts.append("and its last-layer sigmoid input moves less over training" if
                 moved.direction == "up" else
                 "and how far the sigmoid input moves does not differ resolvably" if
                 moved.direction in ("none", "untested") else
                 "and its sigmoid input moves more over training, not less")
    return f"{word}: here {parts[0]}, {parts[1]}, {parts[2]}."


# ----------------------------------------------------------------------------- figure


def bn_paper_figure(study: Study) -> Figure:
    fig = Figure(figsize=(13, 4.3), layout="constrained")
    ax_a, ax_b, ax_c = fig.subplots(1, 3)
    for arm, colour in ((study.none, NORM_COLOURS["none"]), (study.bn, NORM_COLOURS["bn"])):
        seeds = sorted(arm.metrics)
        epochs = min(len(arm.metrics[s]) for s in seeds)
        x = np.arange(1, epochs + 1) * arm.steps_per_epoch
        acc = np.array([[arm.metrics[s][e]["test_acc"] for e in range(epochs)] for s in seeds])
        ax_a.plot(x, acc.mean(0), color=colour, marker="o", markersize=3, label=arm.label)
        if len(seeds) > 1:
            ax_a.fill_between(x, acc.min(0), acc.max(0), color=colour, alpha=0.15,
                              linewidth=0)
    ax_a.set_title("(a) test accuracy", fontsize=10.5)
    ax_a.set_xlabel("training step")
    ax_a.set_ylabel("test accuracy %")
    ax_a.legend(fontsize=9, frameon=False, loc="lower right")
    limits = []
    for ax, arm, tag in ((ax_b, study.none, "(b) without BN"), (ax_c, study.bn, "(c) with BN")):
        seed = min(arm.probes) if arm.probes else None
        if seed is None:
            ax.set_visible(False)
            continue
        records = [r for r in arm.probes[seed] if study.layer in r["activations"]]
        x = [r["step"] for r in records]
        lines = {k: [r["activations"][study.layer]["unit"][k] for r in records]
                 for k in ("p15", "p50", "p85")}
        colour = NORM_COLOURS["bn" if arm is study.bn else "none"]
        ax.fill_between(x, lines["p15"], lines["p85"], color=colour, alpha=0.2, linewidth=0)
        for k, style in (("p15", ":"), ("p50", "-"), ("p85", ":")):
            ax.plot(x, lines[k], color=colour, linestyle=style, linewidth=1.4)
        ax.set_title(f"{tag}: sigmoid input, {study.layer} unit 0, seed {seed}", fontsize=10)
        ax.set_xlabel("training step")
        limits += [min(lines["p15"]), max(lines["p85"])]
    for ax in (ax_b, ax_c):  # one scale for both, as the paper's (b) and (c) share theirs
        if limits:
            pad = 0.05 * (max(limits) - min(limits) or 1)
            ax.set_ylim(min(limits) - pad, max(limits) + pad)
        ax.grid(True, alpha=0.3)
    ax_a.grid(True, alpha=0.3)
    for ax in (ax_a, ax_b, ax_c):  # steps in the tens of thousands: few ticks, no overlap
        ax.xaxis.set_major_locator(MaxNLocator(5))
    fig.suptitle("Ioffe & Szegedy's Figure 1 on normlab's MLP: lines 15th, 50th (solid) and "
                 "85th percentiles", fontsize=11)
    return fig


def bn_paper_blocks(study: Study) -> list[Block]:
    family = comparisons(study)
    rows = []
    for arm in (study.none, study.bn):
        seeds = sorted(arm.metrics)
        first = [arm.metrics[s][0]["test_acc"] for s in seeds]
        final = [arm.metrics[s][-1]["test_acc"] for s in seeds]
        moved = [d for s in seeds if s in arm.probes
                 and (d := drift(arm.probes[s], study.layer)) is not None]
        rows.append([arm.label, str(len(seeds)), f"{np.mean(first):.2f}",
                     f"{np.mean(final):.2f}", f"{np.mean(moved):.2f}" if moved else "—"])
    config = study.bn.variant.config
    steps = study.bn.steps_per_epoch * config.protocol.epochs
    m = sum(c.tested for c in family)
    return [
        Para(f"**The paper.** {PAPER}"),
        Para(f"**Here.** The same network (`--net mlp`, sigmoid, 100-100-100), batch "
             f"{config.protocol.batch_size}, plain SGD at lr {config.protocol.lr:g} "
             f"(momentum {config.protocol.momentum:g}; the paper does not give its rate), "
             f"{steps:,} steps ({config.protocol.epochs} epochs of "
             f"{study.bn.steps_per_epoch:,} steps: {steps / 50000:.0%} of the paper's 50,000, "
             "to fit a 2-core machine), a sigmoid input probed every "
             f"{config.probe_every} steps."),
        Table(["variant", "seeds", "test acc. % after epoch 1", "final test acc. %",
               "median's drift (15-85 widths)"], rows, "lrrrr"),
        Para(verdict(family)),
        Heading("The paper's claims, tested", 3),
        Bullets([
            claim_text(family[0], "BN ends higher, as the paper found",
                       "the opposite: BN ends lower than no norm"),
            claim_text(family[1], "BN is ahead early: it trains faster, as the paper found",
                       "the opposite: BN is behind early"),
            claim_text(family[2], "the sigmoid input moves less with BN, as the paper's "
                       "(b, c)", "the opposite: it moves more with BN"),
        ]),
        Para(f"**Statistics.** {m} comparisons in one family, each a one-sample t on the "
             "per-seed differences (BN and no norm share a seed's batches and initial "
             f"weights); the family-wise error held at {ALPHA:.0%} by Holm's method. The "
             f"smallest difference each resolves with {POWER:.0%} power at Holm's strictest "
             "level: " + "; ".join(
                 f"{c.name} {c.resolvable:.2f}" for c in family if c.resolvable is not None)
             + ". The drift is |median at the last probe − median at the first| over the "
               "mean 15-85 width, for unit 0 of the last hidden layer's sigmoid. Santurkar "
               "et al. (2018) argue that this stability is not why BN helps: `--norm "
               "noisy-bn` (BN whose output distribution moves at every step) tests that."),
    ]


def bn_paper_parts(suite: SuiteResults, figs_dir: str | Path
                   ) -> tuple[list[Block], list[Image]] | None:
    study = find_study(suite)
    if study is None:
        return None
    measured = bool(study.bn.metrics and study.none.metrics)
    blocks = bn_paper_blocks(study) if measured else []
    return figure_section(
        blocks, measured, lambda: bn_paper_figure(study), Path(figs_dir) / FIGURE,
        "The BN paper's Figure 1 on normlab's MLP",
        "(a) Test accuracy against training steps, with and without BN (mean over seeds, "
        "min-max band); (b, c) the 15th, 50th and 85th percentiles of unit 0 of the last "
        "hidden layer's sigmoid input over training, without and with BN (one seed).")

