"""Weight decay under BatchNorm: the S6 study's regularizers seen through normalization.

A convolution followed by BN computes the same function at any scale of its weights, so L2
cannot make such a network simpler. What it does (van Laarhoven 2017, "L2 Regularization
versus Batch and Weight Normalization"; Zhang, Wang, Xu & Grosse 2019, "Three Mechanisms of
Weight Decay Regularization", ICLR) is shrink the weights, which raises the effective step
size ||Δw|| / ||w||. Without a norm, L2 shrinks the weights too, but there the scale is the
function.

A suite is this study when it has variants with BN and without a norm, each without a
regularizer and with L2 (``weight_decay``) and/or L1, otherwise alike, whose runs recorded
``weights`` probes. Per norm and regularizer, paired by seed against the same norm without
one: the weights' total norm at the last probe, the mean relative update over the last
epoch's probes (both over the runs that did not diverge), and the final test accuracy; all
Holm-adjusted as one family.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from normlab import probes
from normlab.reports.collect import SuiteResults, VariantResults
from normlab.reports.doc import Block, Bullets, Heading, Para, Table
from normlab.reports.figures import figure_section
from normlab.reports.page import Image
from normlab.reports.stats import ALPHA, POWER, Paired, holm, mean, paired_difference

TITLE = "Weight decay under BatchNorm"
FIGURE = "weight_decay.png"
NORMS = ("bn", "none")
CLAIM = ("van Laarhoven (2017) and Zhang et al. (2019): with BN after a convolution, L2 does "
         "not regularize the function (it is the same at any scale of the weights); it "
         "shrinks the weights, which raises the effective learning rate ||Δw|| / ||w||, and "
         "that is how it changes training.")


def _reg(v: VariantResults) -> str | None:
    """'none', 'L2' or 'L1' (None: both, not this study's)."""
    c = v.config
    if c.weight_decay and c.l1:
        return None
    return "L2" if c.weight_decay else "L1" if c.l1 else "none"


def _key(v: VariantResults) -> str:
    d = v.config.to_dict()
    for k in ("seed", "weight_decay", "l1", "l1_scope"):
        d.pop(k, None)
    d["model"] = {k: x for k, x in d["model"].items() if k != "norm"}
    return json.dumps(d, sort_keys=True)


@dataclass
class Arm:
    """One norm with one regularizer: per seed, its final test accuracy and probes, and
    which seeds diverged (their weights stop where the run stopped, often blown up: the
    weight measures and the figure leave them out; their accuracy is their outcome)."""

    variant: VariantResults
    norm: str
    reg: str
    acc: dict[int, float]
    records: dict[int, list[dict]]
    diverged: frozenset[int] = frozenset()

    def trained(self) -> dict[int, list[dict]]:
        """The probe records of the seeds that did not diverge."""
        return {s: r for s, r in self.records.items() if s not in self.diverged}

    @property
    def label(self) -> str:
        return self.variant.label

    def norm_at_end(self) -> dict[int, float]:
        return {s: probes.total_norm(r[-1]) for s, r in self.trained().items() if r}

    def update_late(self) -> dict[int, float]:
        """Mean relative update over the last epoch's probes, per seed."""
        out = {}
        for s, rs in self.trained().items():
            last = [r for r in rs if r["epoch"] == rs[-1]["epoch"]]
            values = [u for r in last if (u := probes.total_update(r)) is not None]
            if values:
                out[s] = mean(values)
        return out


def find_study(suite: SuiteResults) -> list[Arm] | None:
    """The BN and no-norm arms with and without a regularizer, with weight probes."""
    candidates = [v for v in suite.variants if v.config is not None
                  and v.config.model.norms in (("bn",), ("none",))
                  and "weights" in v.config.probe and _reg(v) is not None]
    groups: dict[str, list[VariantResults]] = {}
    for v in candidates:
        groups.setdefault(_key(v), []).append(v)
    for members in groups.values():
        regs = {(v.config.model.norms[0], _reg(v)) for v in members}
        if {("bn", "none"), ("none", "none")} <= regs and len(regs) >= 4:
            arms = []
            for v in members:
                done = [r for r in v.finished if r.metrics]
                arms.append(Arm(v, v.config.model.norms[0], _reg(v),
                                {r.seed: r.final["test_acc"] for r in done},
                                {r.seed: got for r in done
                                 if (got := [x for x in probes.read(r.dir) if x.get("weights")])},
                                frozenset(r.seed for r in done if r.diverged)))
            order = {("bn", "none"): 0, ("bn", "L2"): 1, ("bn", "L1"): 2, ("none", "none"): 3,
                     ("none", "L2"): 4, ("none", "L1"): 5}
            arms.sort(key=lambda a: order.get((a.norm, a.reg), 9))
            return arms
    return None


@dataclass
class Effect:
    arm: Arm
    base: Arm
    weight_norm: Paired | None
    update: Paired | None
    accuracy: Paired | None


def effects(arms: list[Arm]) -> list[Effect]:
    """Each regularized arm against its norm's unregularized one, Holm-adjusted together."""
    base = {a.norm: a for a in arms if a.reg == "none"}
    found = []
    for a in arms:
        if a.reg == "none" or a.norm not in base:
            continue
        b = base[a.norm]
        found.append(Effect(a, b, paired_difference(a.norm_at_end(), b.norm_at_end()),
                            paired_difference(a.update_late(), b.update_late()),
                            paired_difference(a.acc, b.acc)))
    holm([p for e in found for p in (e.weight_norm, e.update, e.accuracy)])
    return found


def _fmt(p: Paired | None, digits: int = 3) -> str:
    if p is None:
        return "—"
    text = f"{p.mean:+.{digits}g}"
    if p.interval is None:
        return text + " (one seed)"
    lo, hi = p.interval
    holm_p = "< 0.001" if p.p_holm < 0.001 else f"{p.p_holm:.3f}"
    return f"{text} [{lo:+.{digits}g}, {hi:+.{digits}g}], Holm p {holm_p}"


def _word(p: Paired | None, up: str, down: str) -> str:
    if p is None:
        return "not measured"
    return {"up": up, "down": down, "none": "not resolved", "untested": "one seed"}[p.direction]


def verdict(found: list[Effect]) -> str:
    bn_l2 = next((e for e in found if e.arm.norm == "bn" and e.arm.reg == "L2"), None)
    if bn_l2 is None:
        return ""
    shrinks = bn_l2.weight_norm is not None and bn_l2.weight_norm.direction == "down"
    faster = bn_l2.update is not None and bn_l2.update.direction == "up"
    word = "**Yes**" if shrinks and faster else "**Partly**" if shrinks or faster else "**No**"
    return (f"{word}: with BN, L2 {'shrinks' if shrinks else 'does not resolvably shrink'} "
            f"the weights and {'raises' if faster else 'does not resolvably raise'} their "
            "effective step size ||Δw|| / ||w||, as van Laarhoven and Zhang et al. describe; "
            f"its effect on the test accuracy here: "
            f"{_word(bn_l2.accuracy, 'higher', 'lower')}.")


def weight_decay_figure(arms: list[Arm]) -> Figure:
    fig = Figure(figsize=(13, 4.2), layout="constrained")
    ax_n, ax_u, ax_a = fig.subplots(1, 3)
    colours = {("bn", "none"): "#1f77b4", ("bn", "L2"): "#6baed6", ("bn", "L1"): "#08306b",
               ("none", "none"): "#7f7f7f", ("none", "L2"): "#bdbdbd", ("none", "L1"): "#252525"}
    for a in arms:
        colour = colours.get((a.norm, a.reg), "#e377c2")
        style = "-" if a.norm == "bn" else "--"
        trained = a.trained()
        seeds = sorted(trained)
        left = f" ({len(a.diverged)} diverged, left out)" if a.diverged else ""
        if seeds:
            steps = sorted(set.intersection(*({r["step"] for r in trained[s]} for s in seeds)))
            by_seed = [{r["step"]: r for r in trained[s]} for s in seeds]
            norm = [np.mean([probes.total_norm(d[t]) for d in by_seed]) for t in steps]
            upd = [np.mean([probes.total_update(d[t]) or np.nan for d in by_seed]) for t in steps]
            ax_n.plot(steps, norm, color=colour, linestyle=style, label=a.label)
            ax_u.plot(steps, upd, color=colour, linestyle=style, label=a.label, linewidth=1)
        runs = [r for r in a.variant.finished if r.metrics and r.seed not in a.diverged]
        if runs:
            epochs = min(len(r.metrics) for r in runs)
            acc = [np.mean([r.metrics[e]["test_acc"] for r in runs]) for e in range(epochs)]
            ax_a.plot(range(1, epochs + 1), acc, color=colour, linestyle=style, marker="o",
                      markersize=3, label=a.label + left)
    ax_n.set_title("||w||, all weights together", fontsize=10)
    ax_u.set_title("effective step ||Δw|| / ||w||", fontsize=10)
    ax_u.set_yscale("log")
    ax_a.set_title("test accuracy %", fontsize=10)
    for ax, x in ((ax_n, "training step"), (ax_u, "training step"), (ax_a, "epoch")):
        ax.set_xlabel(x)
        ax.grid(True, alpha=0.3)
    ax_a.legend(fontsize=8, frameon=False, loc="lower right")
    fig.suptitle("Weight decay with and without BN: the weights' norm, their effective step "
                 "and the test accuracy (mean over seeds; solid BN, dashed no norm)",
                 fontsize=11)
    return fig


def _resolution(found: list[Effect]) -> str:
    """The smallest difference the seeds resolve, per quantity (its range over the arms)."""
    parts = []
    for what, get in (("||w||", lambda e: e.weight_norm), ("effective step", lambda e: e.update),
                      ("test accuracy (points)", lambda e: e.accuracy)):
        sizes = [r for e in found if (p := get(e)) is not None
                 and (r := p.resolvable) is not None]
        if sizes:
            low, high = min(sizes), max(sizes)
            parts.append(f"{what} {low:.3g}" + (f" to {high:.3g}" if high > low else ""))
    if not parts:
        return ""
    return (f" The smallest difference these seeds resolve with {POWER:.0%} power at Holm's "
            f"strictest level: {'; '.join(parts)}.")


def weight_decay_blocks(arms: list[Arm]) -> list[Block]:
    found = effects(arms)
    rows = []
    for a in arms:
        n = a.norm_at_end()
        u = a.update_late()
        rows.append([a.label, str(len(a.acc)), f"{mean(list(a.acc.values())):.2f}" if a.acc
                     else "—", f"{mean(list(n.values())):.2f}" if n else "—",
                     f"{mean(list(u.values())):.4f}" if u else "—"])
    items = []
    for e in found:
        items.append(f"{e.arm.label} against {e.base.label}: ||w|| at the end "
                     f"{_fmt(e.weight_norm)} ({_word(e.weight_norm, 'larger', 'smaller')}); "
                     f"effective step over the last epoch {_fmt(e.update)} "
                     f"({_word(e.update, 'larger', 'smaller')}); final test accuracy "
                     f"{_fmt(e.accuracy)} points ({_word(e.accuracy, 'higher', 'lower')}).")
    m = sum(1 for e in found for p in (e.weight_norm, e.update, e.accuracy)
            if p is not None and p.p is not None)
    blocks: list[Block] = [
        Para(f"**The claim.** {CLAIM}"),
        Table(["variant", "seeds", "final test acc. %", "||w|| at the end",
               "||Δw|| / ||w||, last epoch"], rows, "lrrrr"),
    ]
    head = verdict(found)
    if head:
        blocks.append(Para(head))
    blocks += [Heading("Each regularizer against the same norm without one", 3), Bullets(items),
               Para(f"**Statistics.** {m} comparisons in one family (paired t over seeds: the "
                    "variants of a seed see the same batches and start from the same "
                    f"weights), Holm-adjusted at {ALPHA:.0%}. ||w|| is all the weights "
                    "(convolutions and linear maps) together at the last probe; the effective "
                    "step is their relative update per step, averaged over the last epoch's "
                    "probes. A run that diverged stopped early, its weights often blown up: it "
                    "is left out of those two measures and of the figure's curves, and counts "
                    "in the accuracy at its last epoch." + _resolution(found))]
    return blocks


def weight_decay_parts(suite: SuiteResults, figs_dir: str | Path
                       ) -> tuple[list[Block], list[Image]] | None:
    arms = find_study(suite)
    if arms is None:
        return None
    measured = any(a.records for a in arms)
    return figure_section(
        weight_decay_blocks(arms) if measured else [], measured,
        lambda: weight_decay_figure(arms), Path(figs_dir) / FIGURE,
        "Weight decay with and without BN",
        "The weights' total norm and effective step size over training, and the test "
        "accuracy per epoch, for BN (solid) and no norm (dashed), each without a regularizer, "
        "with L2 and with L1; means over seeds.")
