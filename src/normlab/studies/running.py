"""The running-statistics study: BatchNorm's running averages against PreciseBN, per epoch.

BatchNorm evaluates with exponential running averages of its batch statistics, which lag
behind the weights they describe; PreciseBN recomputes them on training batches with the
weights fixed (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", section 3). A run with
``precise_bn`` writes both test accuracies each epoch (``test_acc`` with the running
statistics, ``test_acc_precise`` recalibrated). A suite is this study when some variant's
runs have both: each such variant (e.g. one BN momentum) is one line of the figure.
:func:`running_stats_parts` gives the report its blocks and figure, or None for any other
suite. Every sentence is generated from the numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MultipleLocator

from normlab.reports.collect import RunResults, SuiteResults, VariantResults
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

TITLE = "Running statistics against PreciseBN"
FIGURE = "running_stats.png"
RUNNING, PRECISE = "test_acc", "test_acc_precise"


def _pts(x: float) -> str:
    return f"{x:+.2f}".replace("+0.00", "0.00").replace("-0.00", "0.00")


def _precise_runs(v: VariantResults) -> list[RunResults]:
    return [r for r in v.with_metrics if any(PRECISE in m for m in r.metrics)]


@dataclass
class Line:
    """One variant: per epoch, each seed's test accuracy both ways."""

    label: str
    variant: VariantResults
    running: list[dict[int, float]]  # [epoch - 1] -> {seed: accuracy with running stats}
    precise: list[dict[int, float]]  # [epoch - 1] -> {seed: accuracy after PreciseBN}
    finished: int
    seeds: int
    family: dict | None = None  # epoch (or "mean") -> its gap, Holm-adjusted (adjust())

    @property
    def epochs(self) -> int:
        return len(self.running)

    def gap(self, epoch: int) -> Paired | None:
        """PreciseBN minus running statistics at ``epoch``, paired by seed (the same run);
        once :func:`adjust` has run, Holm-adjusted with the study's other comparisons."""
        if self.family is not None:
            return self.family.get(epoch)
        return paired_difference(self.precise[epoch - 1], self.running[epoch - 1])

    def mean_gap(self) -> Paired | None:
        """The gap averaged over the epochs every seed reached, paired by seed."""
        if self.family is not None:
            return self.family.get("mean")
        common = set.intersection(*(set(e) for e in self.precise)) if self.precise else set()
        if not common:
            return None
        a = {s: mean([e[s] for e in self.precise]) for s in common}
        b = {s: mean([e[s] for e in self.running]) for s in common}
        return paired_difference(a, b)


def _momentum(v: VariantResults) -> float | None:
    options = getattr(v.config.model, "norm_options", None) or {}
    value = options.get("momentum")
    return None if value is None else float(value)


def find_study(suite: SuiteResults) -> list[Line] | None:
    """One line per variant whose runs record PreciseBN's accuracy, or None when none do."""
    lines = []
    for v in suite.variants:
        runs = _precise_runs(v)
        if not runs and not getattr(v.config, "precise_bn", False):
            continue
        epochs = max((len(r.metrics) for r in runs), default=0)
        running = [{} for _ in range(epochs)]
        precise = [{} for _ in range(epochs)]
        for r in runs:
            for m in r.metrics:
                if PRECISE in m:
                    running[m["epoch"] - 1][r.seed] = float(m[RUNNING])
                    precise[m["epoch"] - 1][r.seed] = float(m[PRECISE])
        label = model_label(v.config.model) if v.config is not None else v.label
        lines.append(Line(label, v, running, precise, len(v.finished), len(v.runs)))
    if not lines:
        return None
    lines.sort(key=lambda line: (_momentum(line.variant) is None,
                                 _momentum(line.variant) or 0.0))
    return lines


# ----------------------------------------------------------------------------- numbers


def adjust(lines: list[Line]) -> int:
    """Every gap the study's verdict rests on (each variant's per epoch, and averaged over
    the epochs), Holm-adjusted as one family; returns the family's size."""
    family = []
    for line in lines:
        line.family = None
        gaps: dict = {e: line.gap(e) for e in range(1, line.epochs + 1)}
        if line.epochs > 1:
            gaps["mean"] = line.mean_gap()
        line.family = gaps
        family += list(gaps.values())
    holm(family)
    return sum(1 for p in family if p is not None and p.p is not None)


def _verdict(p: Paired | None) -> str:
    """'higher'/'lower' where the Holm-adjusted gap is resolved, 'same' where it is not,
    'unknown' with one seed."""
    if p is None:
        return "unknown"
    return {"up": "higher", "down": "lower", "none": "same", "untested": "unknown"}[
        p.direction]


def _interval(p: Paired) -> str:
    lo, hi = p.interval
    if lo == hi:
        return f"the same on each of the {p.n} seeds"
    return f"95% interval [{_pts(lo)}, {_pts(hi)}]"


def _mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    std = sample_std(values)
    return f"{mean(values):.2f}" + ("" if std is None else f" ± {std:.2f}")


def _table(lines: list[Line]) -> Table:
    rows = []
    for line in lines:
        for e in range(1, line.epochs + 1):
            p = line.gap(e)
            gap = "—" if p is None else _pts(p.mean) + (
                "" if p.interval is None else f" [{_pts(p.interval[0])}, {_pts(p.interval[1])}]")
            rows.append([line.label, str(e), _mean_std(list(line.running[e - 1].values())),
                         _mean_std(list(line.precise[e - 1].values())), gap])
    return Table(["variant", "epoch", "running statistics %", "PreciseBN %",
                  "PreciseBN − running [95%]"], rows, "lrrrr")


WORDS = {"higher": "PreciseBN **raises** the test accuracy",
         "lower": "PreciseBN **lowers** the test accuracy",
         "same": "**no difference** resolved"}


def _line_text(line: Line) -> str:
    if not line.epochs:
        return f"{line.label}: no epoch yet."
    last = line.gap(line.epochs)
    overall = line.mean_gap()
    text = f"{line.label}: "
    if last is None or last.interval is None:
        return text + ("one seed: no interval, not evidence either way" + (
            "" if last is None else f" (final epoch {_pts(last.mean)} points)") + ".")
    text += (f"final epoch {line.epochs}: {_pts(last.mean)} points ({_interval(last)}): "
             f"{WORDS[_verdict(last)]}")
    if overall is not None and overall.interval is not None and line.epochs > 1:
        text += (f"; averaged over the {line.epochs} epochs {_pts(overall.mean)} points "
                 f"({_interval(overall)}): {WORDS[_verdict(overall)]}")
    epochs = [e for e in range(1, line.epochs + 1) if _verdict(line.gap(e)) in ("higher",
                                                                                 "lower")]
    if epochs:
        text += (f"; epochs with a resolved gap (Holm-adjusted): "
                 f"{', '.join(f'{e} ({_pts(line.gap(e).mean)})' for e in epochs)}")
    return text + "."


def _headline(lines: list[Line]) -> str:
    verdicts = [(line, line.mean_gap() if line.epochs > 1 else line.gap(line.epochs))
                for line in lines if line.epochs]
    if not verdicts or all(_verdict(p) == "unknown" for _, p in verdicts):
        return ("With fewer than two seeds, these numbers cannot say whether the running "
                "statistics lag behind the weights: that needs at least two (--seeds 3).")
    shown = [(line, p) for line, p in verdicts if _verdict(p) in ("higher", "lower")]
    flat = [line.label for line, p in verdicts if _verdict(p) == "same"]
    if not shown:
        return (f"**No lag shown**: for {', '.join(flat)}, no difference between the test "
                "accuracy with the running statistics and PreciseBN's is resolved, epoch by "
                "epoch on average (Holm-adjusted): "
                "at this scale the running averages describe the weights well enough.")
    parts = [f"for {line.label} PreciseBN {'raises' if p.mean > 0 else 'lowers'} the test "
             f"accuracy by {abs(p.mean):.2f} points on average ({_interval(p)})"
             for line, p in shown]
    head = ("**Yes**, the running statistics and the recalibrated ones give different test "
            "accuracies, resolved with the family-wise error held by Holm: "
            + "; ".join(parts) + ".")
    if flat:
        head += f" No difference resolved for {', '.join(flat)}."
    return head


def _same_weights(lines: list[Line]) -> str:
    """A sentence when every variant's PreciseBN accuracy is the same on every seed and
    epoch they share: then they trained to the same weights (BN's momentum enters only
    the running statistics) and differ in their running averages alone."""
    if len(lines) < 2:
        return ""
    shared = 0
    for e in range(min(line.epochs for line in lines)):
        seeds = set.intersection(*(set(line.precise[e]) for line in lines))
        for s in seeds:
            if len({line.precise[e][s] for line in lines}) > 1:
                return ""
            shared += 1
    if not shared:
        return ""
    return ("The variants' PreciseBN accuracies are the same on every seed and epoch: they "
            "trained to the same weights (BN's momentum enters only the running statistics, "
            "which training does not use), so the differences between their running-statistics "
            "accuracies come from the running averages alone.")


def running_stats_blocks(lines: list[Line]) -> list[Block]:
    adjust(lines)
    same = _same_weights(lines)
    return [
        Para("Test accuracy (%) after each epoch, evaluated twice on the same weights: with "
             "BatchNorm's exponential running statistics (what every normlab run reports), and "
             "with statistics recalibrated on training batches after the epoch (PreciseBN). "
             "Mean ± sample std over seeds, and the paired difference PreciseBN − running "
             "with its 95% paired t interval over seeds (both numbers come from the same run)."),
        _table(lines),
        Para(_headline(lines)),
        *([Para(same)] if same else []),
        Heading("Per variant", 3),
        Bullets([_line_text(line) for line in lines]),
        *([Para(note)] if (note := family_note(
            [p for line in lines for p in (line.family or {}).values()],
            "each variant's gap per epoch, and averaged over the epochs; paired t over "
            "seeds", "points")) else []),
        Para("For reference: Wu & Johnson (2021, \"Rethinking 'Batch' in BatchNorm\", section "
             "3) find that the running averages lag behind the weights when the momentum is "
             "small or the weights change quickly, and that a too large momentum leaves them "
             "estimated from the last few batches only; PreciseBN removes both effects."),
    ]


# ----------------------------------------------------------------------------- figure


def _half(values: list[float]) -> float:
    std = sample_std(values)
    return 0.0 if std is None else t975(len(values) - 1) * std / np.sqrt(len(values))


def running_stats_figure(lines: list[Line]) -> Figure:
    """Left: test accuracy per epoch, running statistics (solid) and PreciseBN (dashed),
    mean over seeds. Right: PreciseBN − running per epoch with the 95% t interval."""
    fig = Figure(figsize=(11, 4.8), layout="constrained")
    acc_ax, gap_ax = fig.subplots(1, 2)
    colours = iter(("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"))
    last = 1
    for line in lines:
        colour = next(colours, "0.3")
        epochs = [e for e in range(1, line.epochs + 1) if line.running[e - 1]]
        if not epochs:
            continue
        last = max(last, epochs[-1])
        run = [mean(list(line.running[e - 1].values())) for e in epochs]
        pre = [mean(list(line.precise[e - 1].values())) for e in epochs]
        acc_ax.plot(epochs, run, color=colour, marker="o", markersize=4, linewidth=1.6,
                    label=f"{line.label}: running")
        acc_ax.plot(epochs, pre, color=colour, marker="s", markersize=4, linewidth=1.4,
                    linestyle="--", label=f"{line.label}: PreciseBN")
        diffs = [[line.precise[e - 1][s] - line.running[e - 1][s]
                  for s in line.precise[e - 1] if s in line.running[e - 1]] for e in epochs]
        offset = (lines.index(line) - (len(lines) - 1) / 2) * 0.06
        gap_ax.errorbar(np.array(epochs) + offset, [mean(d) for d in diffs],
                        yerr=[_half(d) for d in diffs], color=colour, marker="o",
                        markersize=4, capsize=3, linewidth=1.4, label=line.label)
    gap_ax.axhline(0, color="0.3", linewidth=0.8)
    for ax in (acc_ax, gap_ax):
        ax.set_xlabel("epoch")
        ax.set_xlim(0.5, last + 0.5)
        ax.xaxis.set_major_locator(MultipleLocator(max(1, int(np.ceil(last / 10)))))
        ax.grid(True, alpha=0.3)
    acc_ax.set_ylabel("test accuracy %")
    acc_ax.set_title("solid: running statistics; dashed: PreciseBN (mean over seeds)",
                     fontsize=9.5)
    gap_ax.set_ylabel("PreciseBN − running (points)")
    gap_ax.set_title("paired difference, bars: 95% t interval over seeds", fontsize=9.5)
    acc_ax.legend(loc="lower right", fontsize=8, frameon=False)
    fig.suptitle("BatchNorm's running statistics against PreciseBN, per epoch", fontsize=11.5)
    return fig


def running_stats_parts(suite: SuiteResults, figs_dir: str | Path
                        ) -> tuple[list[Block], list[Image]] | None:
    """The report's running-statistics section and figure, or None when no run of ``suite``
    recorded PreciseBN's accuracy."""
    lines = find_study(suite)
    if lines is None:
        return None
    return figure_section(
        running_stats_blocks(lines), any(line.epochs for line in lines),
        lambda: running_stats_figure(lines), Path(figs_dir) / FIGURE,
        "Test accuracy per epoch with running statistics and with PreciseBN",
        "Per epoch: test accuracy with BatchNorm's running statistics (solid) and with "
        "statistics recalibrated on training batches (PreciseBN, dashed), mean over seeds; "
        "right: their paired difference with the 95% t interval.",
        waiting="No epoch finished yet: the figure comes with the first results.")
