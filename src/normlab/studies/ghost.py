"""The ghost-batch study: BatchNorm's statistics over virtual batches at a fixed SGD batch.

Ghost BatchNorm (Hoffer et al. 2017) normalises each chunk of ``virtual_batch`` images of
a batch with that chunk's own statistics. With the optimizer's batch fixed, shrinking the
virtual batch makes only the normalization statistics noisier: the batch-size study moves
both at once. A suite is a ghost-batch study when some of its ``gbn`` variants differ only
in ``virtual_batch`` (two or more values): each such family is one line of the figure.
:func:`ghost_batch_parts` gives the report its blocks and figure, or None for any other
suite. Every sentence is generated from the numbers.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullLocator

from normlab.reports.collect import SuiteResults, VariantResults
from normlab.reports.doc import Block, Bullets, Heading, Para, Table
from normlab.reports.figures import figure_section, model_label
from normlab.reports.page import Image
from normlab.reports.stats import (
    Paired,
    family_note,
    holm,
    mean,
    paired_difference,
    sample_std,
    t975,
)

TITLE = "Ghost batch: BatchNorm's statistics over virtual batches"
FIGURE = "ghost_batch.png"
NORM = "gbn"
OPTION = "virtual_batch"


def default_virtual_batch() -> int:
    """GhostBatchNorm2d's own default, for a variant that does not set the option."""
    import inspect

    from normlab.models.zoo import GhostBatchNorm2d

    return int(inspect.signature(GhostBatchNorm2d).parameters[OPTION].default)


def _options(v: VariantResults) -> dict:
    return dict(getattr(v.config.model, "norm_options", None) or {})


def _pts(x: float) -> str:
    return f"{x:+.2f}".replace("+0.00", "0.00").replace("-0.00", "0.00")


def _mean_std(values: list[float], digits: int = 2) -> str:
    if not values:
        return "—"
    std = sample_std(values)
    return f"{mean(values):.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


@dataclass
class Point:
    """One virtual batch size: the final test accuracy and train loss of each finished seed."""

    virtual: int
    variant: VariantResults
    acc: dict[int, float] = field(default_factory=dict)
    loss: dict[int, float] = field(default_factory=dict)
    unfinished: int = 0


@dataclass
class Line:
    label: str
    batch: int  # the optimizer's batch size
    points: list[Point]  # by virtual batch, ascending
    family: dict | None = None  # (virtual, "acc" | "loss") -> Paired, Holm-adjusted

    @property
    def measured(self) -> list[Point]:
        return [p for p in self.points if p.acc]

    @property
    def reference(self) -> Point | None:
        """The largest measured virtual batch (the whole batch: BatchNorm's statistics)."""
        pts = self.measured
        return pts[-1] if pts else None


def _family_key(v: VariantResults) -> str:
    """The variant's config without seed and virtual batch size."""
    d = copy.deepcopy(v.config.to_dict())
    d.pop("seed", None)
    options = d["model"].get("norm_options") or {}
    options.pop(OPTION, None)
    d["model"]["norm_options"] = options
    return json.dumps(d, sort_keys=True)


def find_study(suite: SuiteResults) -> list[Line] | None:
    """The suite's ghost-batch lines, or None when no two gbn variants differ only in the
    virtual batch size."""
    families: dict[str, list[VariantResults]] = {}
    for v in suite.variants:
        if v.config is not None and v.config.model.norms == (NORM,):
            families.setdefault(_family_key(v), []).append(v)
    lines = []
    for members in families.values():
        by_virtual: dict[int, VariantResults] = {}
        for v in members:
            vb = _options(v).get(OPTION)
            by_virtual.setdefault(int(vb) if vb is not None else default_virtual_batch(), v)
        if len(by_virtual) < 2:
            continue
        points = []
        for vb in sorted(by_virtual):
            v = by_virtual[vb]
            done = [r for r in v.finished if r.metrics]
            points.append(Point(vb, v, {r.seed: float(r.final["test_acc"]) for r in done},
                                {r.seed: float(r.final["train_loss"]) for r in done},
                                len(v.runs) - len(done)))
        config = members[0].config
        others = {k: x for k, x in _options(members[0]).items() if k != OPTION}
        model = dataclasses.replace(config.model, norm_options=others)  # the line's label
        lines.append(Line(model_label(model), config.protocol.batch_size, points))
    return lines or None


# ----------------------------------------------------------------------------- numbers


def adjust(lines: list[Line]) -> None:
    """Every comparison the study's verdict rests on, Holm-adjusted as one family: each
    virtual batch's test accuracy minus the whole batch's, and the smallest virtual batch's
    final training loss minus the whole batch's, in every line."""
    family = []
    for line in lines:
        ref, line.family = line.reference, {}
        for p in line.measured[:-1]:
            line.family[(p.virtual, "acc")] = paired_difference(p.acc, ref.acc)
        if len(line.measured) > 1:
            small = line.measured[0]
            line.family[(small.virtual, "loss")] = paired_difference(small.loss, ref.loss)
        family += list(line.family.values())
    holm(family)


def _pair(line: Line, p: Point, what: str) -> Paired | None:
    """``p``'s difference from the line's whole batch in ``what`` ("acc" or "loss"), as
    adjusted by :func:`adjust` (None for the whole batch itself)."""
    return (line.family or {}).get((p.virtual, what))


def _verdict(p: Paired | None, up: str, down: str) -> str:
    """``up``/``down`` where the Holm-adjusted difference is resolved, 'flat' where it is
    not, 'unknown' with one seed."""
    if p is None:
        return "unknown"
    return {"up": up, "down": down, "none": "flat", "untested": "unknown"}[p.direction]


def _holm(p: Paired) -> str:
    if p.p_holm is None:
        return ""
    return ", Holm p < 0.001" if p.p_holm < 0.001 else f", Holm p = {p.p_holm:.3f}"


def _interval(p: Paired, digits: int = 2) -> str:
    lo, hi = p.interval
    if lo == hi:
        return f"the same on each of the {p.n} seeds"
    return f"95% interval [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def _diff(p: Paired | None, digits: int = 2) -> str:
    if p is None:
        return "—"
    text = f"{p.mean:+.{digits}f}"
    if p.interval is not None:
        text += f" [{p.interval[0]:+.{digits}f}, {p.interval[1]:+.{digits}f}]"
    return text


def _table(line: Line) -> Table:
    ref = line.reference
    rows = []
    for p in line.points:
        n = len(p.acc)
        done = f" ({n}/{n + p.unfinished})" if p.unfinished else ""
        same = ref is None or p is ref
        rows.append([
            str(p.virtual) + (" (whole batch)" if p.virtual >= line.batch else ""),
            _mean_std(list(p.acc.values())) + done,
            "—" if same else _diff(_pair(line, p, "acc")),
            _mean_std(list(p.loss.values()), 4) + done,
            "—" if same else _diff(_pair(line, p, "loss") or paired_difference(p.loss,
                                                                                ref.loss), 4),
        ])
    ref_name = f"virtual batch {ref.virtual}" if ref else "the largest virtual batch"
    return Table(["virtual batch", "test accuracy %", f"− {ref_name} [95%]",
                  "final train loss", f"− {ref_name} [95%]"], rows, "lrrrr")


def _line_text(line: Line) -> list[str]:
    pts, ref = line.measured, line.reference
    if len(pts) < 2:
        return [f"{line.label}: fewer than two virtual batch sizes finished: no comparison yet."]
    small = pts[0]
    acc, loss = _pair(line, small, "acc"), _pair(line, small, "loss")
    if acc is None:
        return [f"{line.label}: virtual batch {small.virtual} and {ref.virtual} share no "
                "finished seed: no paired comparison yet."]
    big_acc, small_acc = mean(list(ref.acc.values())), mean(list(small.acc.values()))
    what = (f"{line.label}, SGD batch {line.batch}: test accuracy {big_acc:.2f}% with "
            f"statistics over {ref.virtual} images, {small_acc:.2f}% over {small.virtual} "
            f"({_pts(acc.mean)} points")
    if acc.interval is None:
        return [what + "; one seed: no interval, not evidence either way)."]
    words = {"higher": "**higher** with the smaller virtual batch",
             "lower": "**lower** with the smaller virtual batch",
             "flat": "**no difference** resolved"}
    items = [what + f", {_interval(acc)}{_holm(acc)}): "
                    f"{words[_verdict(acc, 'higher', 'lower')]}."]
    if loss is not None and loss.interval is not None:
        lw = {"higher": "**higher** (the noisier statistics fit the training data less "
                        "closely)",
              "lower": "**lower**", "flat": "**no difference** resolved"}
        items.append(f"Final training loss at virtual batch {small.virtual} minus at "
                     f"{ref.virtual}: {loss.mean:+.4f} ({_interval(loss, 4)}{_holm(loss)}): "
                     f"{lw[_verdict(loss, 'higher', 'lower')]}.")
    moved = []
    for p in pts[:-1]:
        d = _pair(line, p, "acc")
        if d is not None and d.direction in ("up", "down"):
            moved.append(f"{p.virtual} ({_pts(d.mean)})")
    if moved:
        items.append("Virtual batches whose test accuracy differs from "
                     f"{ref.virtual}'s, Holm-adjusted: {', '.join(moved)}.")
    else:
        items.append(f"No virtual batch's test accuracy differs resolvably from "
                     f"{ref.virtual}'s (Holm-adjusted).")
    return items


def _headline(lines: list[Line]) -> str:
    verdicts = []
    for line in lines:
        pts, ref = line.measured, line.reference
        if len(pts) < 2:
            continue
        acc = _pair(line, pts[0], "acc")
        verdicts.append((line, pts[0], ref, acc, _verdict(acc, "higher", "lower")))
    if not verdicts:
        return ""
    if all(v[4] == "unknown" for v in verdicts):
        return ("With one finished seed at an end of the range, these numbers cannot say "
                "whether noisier statistics change the accuracy: that needs at least two "
                "seeds (--seeds 3).")
    parts = []
    for line, small, ref, acc, verdict in verdicts:
        if verdict == "flat":
            parts.append(f"**No effect shown** for {line.label}: at a fixed SGD batch of "
                         f"{line.batch}, normalising over {small.virtual} images instead of "
                         f"{ref.virtual} changes the test accuracy by {_pts(acc.mean)} points "
                         f"({_interval(acc)}{_holm(acc)}), not resolved.")
        elif verdict in ("higher", "lower"):
            word = "raises" if verdict == "higher" else "lowers"
            parts.append(f"**Yes** for {line.label}: at a fixed SGD batch of {line.batch}, "
                         f"normalising over {small.virtual} images instead of {ref.virtual} "
                         f"{word} the test accuracy by {abs(acc.mean):.2f} points "
                         f"({_interval(acc)}{_holm(acc)}): the statistics' noise alone, with the "
                         "optimizer's batch unchanged.")
    return " ".join(parts)


def ghost_batch_blocks(lines: list[Line]) -> list[Block]:
    adjust(lines)
    blocks: list[Block] = [Para(
        "Final test accuracy (%) and final training loss at each virtual batch size, mean ± "
        "sample std over the finished seeds (n/N where not all N finished), and the paired "
        "difference from the largest virtual batch (the whole batch: BatchNorm's own "
        "statistics) with its 95% paired t interval. The runs of a seed see the same "
        "batches and start from the same weights, so the pairing is fair.")]
    for line in lines:
        if len(lines) > 1:
            blocks.append(Heading(f"{line.label}, SGD batch {line.batch}", 3))
        blocks.append(_table(line))
    head = _headline(lines)
    if head:
        blocks.append(Para(head))
    blocks += [Heading("From the whole batch to the smallest virtual batch", 3),
               Bullets([t for line in lines for t in _line_text(line)])]
    losses = {id(c) for line in lines for (_, kind), c in (line.family or {}).items()
              if kind == "loss"}
    note = family_note([c for line in lines for c in (line.family or {}).values()],
                       "each virtual batch's test accuracy minus the whole batch's, and the "
                       "smallest virtual batch's training loss minus the whole batch's; "
                       "paired t over seeds",
                       lambda c: "in training loss" if id(c) in losses else "points of "
                                                                           "accuracy")
    if note:
        blocks.append(Para(note))
    blocks.append(Para(
        "Evaluation: BN statistics in eval mode are the running averages, updated once per "
        "virtual batch in training; the test pass is the same computation at every virtual "
        "batch size, so differences come from training."))
    return blocks


# ----------------------------------------------------------------------------- figure


def _half_width(values: list[float]) -> float:
    std = sample_std(values)
    return 0.0 if std is None else t975(len(values) - 1) * std / np.sqrt(len(values))


def ghost_batch_figure(lines: list[Line]) -> Figure:
    """Test accuracy and final train loss against the virtual batch size (log2 axis), mean
    over seeds with the 95% t interval of the mean."""
    fig = Figure(figsize=(10, 4.6), layout="constrained")
    axes = fig.subplots(1, 2)
    colours = iter(("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"))
    virtuals = sorted({p.virtual for line in lines for p in line.points})
    for line in lines:
        pts = line.measured
        if not pts:
            continue
        colour = next(colours, "0.3")
        x = np.array([p.virtual for p in pts], dtype=float)
        for ax, key in zip(axes, ("acc", "loss"), strict=True):
            vals = [list(getattr(p, key).values()) for p in pts]
            ax.errorbar(x, [mean(v) for v in vals], yerr=[_half_width(v) for v in vals],
                        color=colour, marker="o", markersize=5, capsize=3, linewidth=1.6,
                        label=f"{line.label}, batch {line.batch}")
    for ax, ylabel in zip(axes, ("final test accuracy %", "final training loss"), strict=True):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(virtuals))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(v) for v in virtuals])
        ax.set_xlabel("virtual batch (images per BN statistic); log₂ axis")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    axes[0].legend(loc="best", fontsize=9, frameon=False)
    fig.suptitle("Ghost BatchNorm at a fixed SGD batch: mean over seeds, bars: 95% t "
                 "interval of the mean", fontsize=11)
    return fig


def ghost_batch_parts(suite: SuiteResults, figs_dir: str | Path
                      ) -> tuple[list[Block], list[Image]] | None:
    """The report's ghost-batch section and figure, or None when ``suite`` is not a
    ghost-batch study."""
    lines = find_study(suite)
    if lines is None:
        return None
    return figure_section(
        ghost_batch_blocks(lines), any(line.measured for line in lines),
        lambda: ghost_batch_figure(lines), Path(figs_dir) / FIGURE,
        "Test accuracy and training loss against the virtual batch size",
        "Final test accuracy (left) and final training loss (right) against the virtual batch "
        "size over which BatchNorm computes its statistics, the SGD batch fixed; mean over "
        "seeds with the 95% t interval of the mean.")
