"""The batch-size study: test error against batch size per norm, after Wu & He (2018).

A suite is a batch-size study when some of its variants differ only in the protocol's
batch size (and learning rate): each such family is one line of the figure, one column
of the table. :func:`batch_size_parts` gives the report its blocks and figure, or None
for any other suite. Every sentence is generated from the numbers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.stats
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullLocator

from normlab.reports.collect import SuiteResults, VariantResults
from normlab.reports.doc import Block, Bullets, Heading, Para, Table
from normlab.reports.figures import figure_section, norm_colours, norm_key, norm_rank
from normlab.reports.page import Image
from normlab.reports.stats import mean, sample_std

TITLE = "Test error against batch size"
FIGURE = "batch_size_error.png"
# Wu & He, "Group Normalization" (ECCV 2018), Figure 1 / Table 2: ResNet-50 on ImageNet,
# validation error % at 32, 16, 8, 4, 2 images per GPU.
PAPER_BATCHES = (32, 16, 8, 4, 2)
PAPER = {"BN": (23.6, 23.7, 24.8, 27.3, 34.7), "GN": (24.1, 24.2, 24.0, 24.2, 24.1)}
DATASET_NAMES = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}


@dataclass
class Point:
    """One batch size of one line: the final test errors (%) of its finished seeds."""

    batch: int
    lr: float
    variant: VariantResults
    errors: list[float] = field(default_factory=list)
    unfinished: int = 0  # runs without a final result yet (missing, training, failed)

    @property
    def mean(self) -> float | None:
        return mean(self.errors) if self.errors else None

    @property
    def std(self) -> float | None:
        return sample_std(self.errors)

    def text(self) -> str:
        if not self.errors:
            return "—"
        std = self.std
        out = f"{self.mean:.2f}" + ("" if std is None else f" ± {std:.2f}")
        return out + (f" ({len(self.errors)}/{len(self.errors) + self.unfinished})"
                      if self.unfinished else "")


@dataclass
class Line:
    """Variants that differ only in batch size (and learning rate): one norm's curve."""

    label: str
    norm: str  # the norm key (figures.norm_key): "gn", "gn+ws", ...
    points: list[Point]  # by batch size, ascending

    def by_batch(self) -> dict[int, Point]:
        return {p.batch: p for p in self.points}

    @property
    def measured(self) -> list[Point]:
        return [p for p in self.points if p.errors]


@dataclass
class Study:
    lines: list[Line]
    batches: list[int]  # every batch size of the study, ascending
    lr_rule: str  # how lr follows the batch size, in words
    seeds: int  # the most finished seeds of any point


def _family_key(v: VariantResults) -> str:
    """The variant's config without seed, batch size and learning rate."""
    d = v.config.to_dict()
    d.pop("seed", None)
    d["protocol"] = {k: x for k, x in d["protocol"].items() if k not in ("batch_size", "lr")}
    return json.dumps(d, sort_keys=True)


def _line_label(v: VariantResults) -> str:
    from normlab.experiments.suite import default_label

    return default_label(v.config)


def _lr_rule(lines: list[Line]) -> str:
    pairs = {(p.batch, p.lr) for line in lines for p in line.points}
    ratios = {round(lr / b, 12) for b, lr in pairs}
    lrs = {lr for _, lr in pairs}
    if len(lrs) == 1:
        return f"the same learning rate, {next(iter(lrs)):g}, at every batch size"
    if len(ratios) == 1:
        big = max(b for b, _ in pairs)
        return (f"the learning rate scaled linearly with the batch size, lr = "
                f"{big * next(iter(ratios)):g} × B / {big}")
    return "learning rates " + ", ".join(f"{lr:g} at {b}" for b, lr in sorted(pairs))


def find_study(suite: SuiteResults) -> Study | None:
    """The suite's batch-size lines, or None when no two variants differ only in batch size."""
    families: dict[str, list[VariantResults]] = {}
    for v in suite.variants:
        if v.config is not None:
            families.setdefault(_family_key(v), []).append(v)
    lines = []
    for members in families.values():
        by_batch: dict[int, VariantResults] = {}
        for v in members:  # a batch size twice in a family (two lrs): the first one counts
            by_batch.setdefault(v.config.protocol.batch_size, v)
        if len(by_batch) < 2:
            continue
        points = []
        for b in sorted(by_batch):
            v = by_batch[b]
            done = [r for r in v.finished if r.metrics]
            points.append(Point(b, v.config.protocol.lr, v,
                                [100.0 - r.final["test_acc"] for r in done],
                                len(v.runs) - len(done)))
        lines.append(Line(_line_label(members[0]), norm_key(members[0].config.model), points))
    if not lines:
        return None
    lines.sort(key=lambda line: norm_rank(line.norm))  # stable: a norm's lines keep their order
    batches = sorted({p.batch for line in lines for p in line.points})
    seeds = max((len(p.errors) for line in lines for p in line.points), default=0)
    return Study(lines, batches, _lr_rule(lines), seeds)


# ----------------------------------------------------------------------------- figure


def batch_size_figure(study: Study, dataset: str) -> Figure:
    """Test error (%) against batch size, log2 axis shrinking to the right like Wu & He's
    Figure 1; per norm the mean over seeds, with a min–max band over seeds."""
    fig = Figure(figsize=(8.5, 5.2), layout="constrained")
    ax = fig.subplots()
    colours = norm_colours(list(dict.fromkeys(line.norm for line in study.lines)))
    for line in study.lines:
        pts = line.measured
        if not pts:
            continue
        colour = colours[line.norm]
        x = np.array([p.batch for p in pts], dtype=float)
        m = np.array([p.mean for p in pts])
        lo = np.array([min(p.errors) for p in pts])
        hi = np.array([max(p.errors) for p in pts])
        ax.plot(x, m, color=colour, marker="o", markersize=5, linewidth=1.8,
                label=line.label)
        if any(len(p.errors) > 1 for p in pts):
            ax.fill_between(x, lo, hi, color=colour, alpha=0.14, linewidth=0)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(study.batches))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(b) for b in study.batches])
    lo_b, hi_b = min(study.batches), max(study.batches)
    ax.set_xlim(hi_b * 2 ** 0.25, lo_b / 2 ** 0.25)  # inverted: the batch shrinks rightwards
    ax.set_xlabel("batch size (images per step), shrinking to the right; log₂ axis")
    ax.set_ylabel("test error % (100 − final test accuracy)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=9.5, frameon=False)
    seeds = f"{study.seeds} seed{'s' if study.seeds != 1 else ''}"
    name = DATASET_NAMES.get(dataset, dataset)
    fig.suptitle(f"Test error vs batch size on {name} (line: mean over {seeds}; "
                 "band: min–max)", fontsize=11.5)
    return fig


# ----------------------------------------------------------------------------- numbers


@dataclass
class Trend:
    """Error at the smallest batch minus error at the largest, with a Welch 95% interval."""

    small: Point
    large: Point
    rise: float
    interval: tuple[float, float] | None

    @property
    def verdict(self) -> str:
        """'rises', 'falls', 'flat' (interval includes 0) or 'unknown' (no interval)."""
        if self.interval is None:
            return "unknown"
        lo, hi = self.interval
        return "rises" if lo > 0 else "falls" if hi < 0 else "flat"


def trend(line: Line) -> Trend | None:
    pts = line.measured
    if len(pts) < 2:
        return None
    small, large = pts[0], pts[-1]
    rise = small.mean - large.mean
    interval = None
    if len(small.errors) > 1 and len(large.errors) > 1:
        if (small.std or 0) == 0 and (large.std or 0) == 0:
            interval = (rise, rise)
        else:
            ci = scipy.stats.ttest_ind(small.errors, large.errors, equal_var=False
                                       ).confidence_interval(0.95)
            interval = (float(ci.low), float(ci.high))
    return Trend(small, large, rise, interval)


def _pts(x: float) -> str:
    return f"{x:+.2f}".replace("+0.00", "0.00").replace("-0.00", "0.00")


def _trend_text(line: Line, t: Trend) -> str:
    what = (f"{line.label}: {t.large.mean:.2f}% at batch {t.large.batch} → "
            f"{t.small.mean:.2f}% at batch {t.small.batch} ({_pts(t.rise)} points")
    if t.interval is None:
        return what + "; one seed at an end, so no interval: not evidence either way)."
    lo, hi = t.interval
    words = {"rises": "the error **rises** as the batch shrinks (interval excludes 0)",
             "falls": "the error **falls** as the batch shrinks (interval excludes 0)",
             "flat": "**flat** within seed noise (interval includes 0)"}[t.verdict]
    return what + f", 95% interval [{_pts(lo)}, {_pts(hi)}]): {words}."


def _headline(study: Study, trends: dict[str, Trend]) -> str:
    bn = next((line for line in study.lines if line.norm == "bn"), None)
    others = [line for line in study.lines if line.norm in ("gn", "ln")]
    if bn is None or bn.label not in trends or not others:
        return ""
    t = trends[bn.label]
    flat = [line for line in others if line.label in trends
            and trends[line.label].verdict == "flat"]
    not_flat = [line for line in others if line.label in trends and line not in flat]
    if t.verdict == "unknown":
        return ("With one finished seed at an end of the range, these numbers cannot say "
                "whether BN's error rises as the batch shrinks: that needs at least two "
                "finished seeds at the smallest and the largest batch (--seeds 3).")
    bn_rises = t.verdict == "rises"
    gn_ln_flat = not not_flat
    names = " and ".join(line.label for line in others)
    if bn_rises and gn_ln_flat:
        head = (f"**Yes**: BN's error rises by {t.rise:.2f} points from batch {t.large.batch} to "
                f"{t.small.batch}, while {names} stay flat within seed noise: the pattern of "
                "Wu & He's Figure 1.")
    elif bn_rises:
        moves = "; ".join(f"{line.label} {trends[line.label].verdict} "
                          f"({_pts(trends[line.label].rise)})" for line in not_flat)
        head = (f"**Partly**: BN's error rises by {t.rise:.2f} points from batch "
                f"{t.large.batch} to {t.small.batch}, but not every batch-independent norm "
                f"stays flat ({moves}).")
    else:
        state = {"flat": "stays flat within seed noise", "falls": "falls"}[t.verdict]
        head = (f"**No**: here BN's error {state} as the batch shrinks ({_pts(t.rise)} points "
                f"from batch {t.large.batch} to {t.small.batch}); Wu & He's degradation of BN "
                "does not show at this scale.")
    by = {line.norm: line.by_batch() for line in study.lines}
    gaps = []
    for ref in ("gn", "ln"):
        if ref in by:
            for b in (t.small.batch, t.large.batch):
                p, q = by["bn"].get(b), by[ref].get(b)
                if p is not None and q is not None and p.errors and q.errors:
                    gaps.append(f"BN − {ref.upper()} at batch {b}: {_pts(p.mean - q.mean)}")
    return head + (f" ({'; '.join(gaps)} points.)" if gaps else "")


def _names(labels: list[str]) -> str:
    return labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " and " + labels[-1]


def _evaluation_text(study: Study) -> str:
    """Which of the study's norms evaluate with running statistics, which per image."""
    from normlab.models.norms import norm_spec

    batch, image = [], []
    for line in study.lines:
        norms = line.norm.removesuffix("+ws").split("+")
        label = " + ".join(norm_spec(n).label for n in norms) + (
            " + WS" if line.norm.endswith("+ws") else "")
        group = batch if any(norm_spec(n).batch_stats for n in norms) else image
        if label not in group:
            group.append(label)
    text = "**Evaluation mode.** Every test accuracy here is measured with the model in eval mode"
    if batch:
        one = len(batch) == 1
        text += (f": {_names(batch)} normalise{'s' if one else ''} test images with "
                 f"{'its' if one else 'their'} **running statistics** (the averages of the "
                 "batch statistics seen in training), not with the test batch's own. "
                 f"{'It trains' if one else 'They train'} on each batch's own statistics"
                 + (" (Batch Renormalization corrects them toward the running ones by its r "
                    "and d, within r_max and d_max)" if any(
                        "brn" in line.norm.split("+") for line in study.lines) else "")
                 + ", which small batches estimate poorly; Wu & He attribute BN's small-batch "
                   "error to that inaccurate estimate.")
    else:
        text += "."
    if image:
        text += (f" {_names(image)} normalise{'s' if len(image) == 1 else ''} each image by "
                 "itself, the same computation in training and in evaluation.")
    return text


def batch_size_blocks(study: Study) -> list[Block]:
    """The table and the analysis of a study (the report's section, under TITLE)."""
    trends = {line.label: t for line in study.lines if (t := trend(line)) is not None}
    lrs = {p.batch: p.lr for line in study.lines for p in line.points}
    rows = []
    for b in sorted(study.batches, reverse=True):
        row = [str(b), f"{lrs[b]:g}"]
        for line in study.lines:
            p = line.by_batch().get(b)
            row.append(p.text() if p is not None else "")
        rows.append(row)
    header = ["batch", "lr", *(f"{line.label} error %" for line in study.lines)]
    blocks: list[Block] = [
        Para("Test error (100 − final test accuracy, %) of each norm at each batch size, mean "
             "± sample std over the finished seeds (n/N where not all N finished); "
             f"{study.lr_rule}. The figure draws the same numbers, with the seeds' min–max "
             "as a band."),
        Table(header, rows, "r" * len(header)),
    ]
    headline = _headline(study, trends)
    if headline:
        blocks.append(Para(headline))
    items = [_trend_text(line, trends[line.label]) for line in study.lines
             if line.label in trends]
    if items:
        blocks += [Heading("From the largest to the smallest batch", 3), Bullets(items)]
    blocks += [
        Para("Intervals: Welch's 95% interval of the difference in mean error between the "
             "smallest and the largest batch (runs of different batch sizes see different "
             "batches, so they are not paired)."),
        Para(_evaluation_text(study)),
        Heading("For reference: Wu & He 2018", 3),
        Para("Group Normalization (ECCV 2018), ResNet-50 on ImageNet, validation error % by "
             "images per GPU. BN rises by "
             f"{PAPER['BN'][-1] - PAPER['BN'][0]:.1f} points from 32 to 2 images; GN stays "
             f"within {max(PAPER['GN']) - min(PAPER['GN']):.1f} points. Their model, data and "
             "schedule are far from this 5,760-parameter CNN on 28×28 images: compare the "
             "shapes of the curves, not the numbers."),
        Table(["images per GPU", *(str(b) for b in PAPER_BATCHES)],
              [[name, *(f"{x:.1f}" for x in values)] for name, values in PAPER.items()],
              "l" + "r" * len(PAPER_BATCHES)),
    ]
    return blocks


def batch_size_parts(suite: SuiteResults, figs_dir: str | Path
                     ) -> tuple[list[Block], list[Image]] | None:
    """The report's batch-size section (blocks to render under :data:`TITLE`, and the
    figure, written into ``figs_dir``), or None when ``suite`` is not a batch-size study."""
    study = find_study(suite)
    if study is None:
        return None
    return figure_section(
        batch_size_blocks(study), any(line.measured for line in study.lines),
        lambda: batch_size_figure(study, suite.dataset), Path(figs_dir) / FIGURE,
        "Test error against batch size, one line per norm",
        "Test error (%) against batch size (log₂ axis, the batch shrinking to the right as in "
        "Wu & He's Figure 1): per norm the mean over seeds, with a min–max band over seeds; "
        + study.lr_rule + ".")
