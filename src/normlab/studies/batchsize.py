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
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullLocator

from normlab.reports.collect import SuiteResults, VariantResults
from normlab.reports.doc import Block, Bullets, Heading, Para, Table
from normlab.reports.figures import figure_section, norm_colours, norm_key, norm_rank
from normlab.reports.page import Image
from normlab.reports.stats import (
    ALPHA,
    POWER,
    Comparison,
    holm,
    mean,
    one_sample,
    sample_std,
    welch,
)

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
    by_seed: dict[int, float] = field(default_factory=dict)  # seed -> error %
    unfinished: int = 0  # runs without a final result yet (missing, training, failed)

    @property
    def errors(self) -> list[float]:
        return list(self.by_seed.values())

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
                                {r.seed: 100.0 - r.final["test_acc"] for r in done},
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


# The norms whose change with the batch BN's is compared with (Wu & He: GN; LN and IN
# normalise each image alone too). An interaction is BN's change from the largest to the
# smallest batch minus theirs, per seed: at the same batch size and seed every norm sees the
# same batches, so the difference is paired by seed.
REFERENCES = ("gn", "ln")


@dataclass
class Trend:
    """Error at the smallest batch minus error at the largest (Welch's t: runs of different
    batch sizes see different batches, so they are not paired)."""

    small: Point
    large: Point
    test: Comparison

    @property
    def rise(self) -> float:
        return self.test.estimate

    @property
    def interval(self) -> tuple[float, float] | None:
        return self.test.interval

    @property
    def verdict(self) -> str:
        """'rises', 'falls' (Holm-significant), 'flat' (not resolved) or 'unknown' (no
        test: one seed at an end)."""
        return {"up": "rises", "down": "falls", "none": "flat",
                "untested": "unknown"}[self.test.direction]


@dataclass
class Interaction:
    """BN's rise (smallest batch minus largest) minus a reference norm's, per seed."""

    bn: Line
    reference: Line
    small: int
    large: int
    test: Comparison


@dataclass
class Tests:
    """The study's family of comparisons, Holm-adjusted together."""

    trends: dict[str, Trend]  # by line label
    interactions: list[Interaction]

    @property
    def family(self) -> list[Comparison]:
        return [t.test for t in self.trends.values()] + [i.test for i in self.interactions]


def trend(line: Line) -> Trend | None:
    """The line's trend, tested alone (a family of one; :func:`tests` adjusts it with the
    study's other comparisons)."""
    pts = line.measured
    if len(pts) < 2:
        return None
    small, large = pts[0], pts[-1]
    return Trend(small, large, holm([welch(line.label, small.errors, large.errors)])[0])


def interaction(bn: Line, ref: Line) -> Interaction | None:
    """BN's rise minus ``ref``'s over the seeds finished at both ends of both lines, at the
    smallest and largest batch both lines measured."""
    common = sorted({p.batch for p in bn.measured} & {p.batch for p in ref.measured})
    if len(common) < 2:
        return None
    small, large = common[0], common[-1]
    a, b = bn.by_batch(), ref.by_batch()
    points = (a[small], a[large], b[small], b[large])
    seeds = sorted(set.intersection(*(set(p.by_seed) for p in points)))
    if not seeds:
        return None
    values = [(a[small].by_seed[s] - a[large].by_seed[s])
              - (b[small].by_seed[s] - b[large].by_seed[s]) for s in seeds]
    return Interaction(bn, ref, small, large, one_sample(f"BN − {ref.label}", values))


def tests(study: Study) -> Tests:
    """Every line's trend and BN's interaction with each reference norm, Holm-adjusted as
    one family."""
    trends = {line.label: t for line in study.lines if (t := trend(line)) is not None}
    bn = next((line for line in study.lines if line.norm == "bn"), None)
    found = []
    if bn is not None:
        for ref in study.lines:
            if ref.norm in REFERENCES and (i := interaction(bn, ref)) is not None:
                found.append(i)
    result = Tests(trends, found)
    holm(result.family)
    return result


def _pts(x: float) -> str:
    return f"{x:+.2f}".replace("+0.00", "0.00").replace("-0.00", "0.00")


def _p(c: Comparison) -> str:
    """"Holm p = 0.012" (or < 0.001)."""
    return "Holm p < 0.001" if c.p_holm < 0.001 else f"Holm p = {c.p_holm:.3f}"


def _trend_text(line: Line, t: Trend) -> str:
    what = (f"{line.label}: {t.large.mean:.2f}% at batch {t.large.batch} → "
            f"{t.small.mean:.2f}% at batch {t.small.batch} ({_pts(t.rise)} points")
    if t.interval is None:
        return what + "; one seed at an end, so no interval: not evidence either way)."
    lo, hi = t.interval
    words = {"rises": "the error **rises** as the batch shrinks",
             "falls": "the error **falls** as the batch shrinks",
             "flat": "**not resolved**: no change these seeds can tell from noise"}[t.verdict]
    return what + f", 95% interval [{_pts(lo)}, {_pts(hi)}], {_p(t.test)}): {words}."


def _interaction_text(i: Interaction) -> str:
    c = i.test
    head = (f"BN's change from batch {i.large} to {i.small} minus {i.reference.label}'s: "
            f"{_pts(c.estimate)} points over {c.seeds} seed{'s' if c.seeds != 1 else ''}")
    if not c.tested:
        return head + "; one seed, so no interval: not evidence either way."
    lo, hi = c.interval
    gaps = []
    for b in (i.small, i.large):
        p, q = i.bn.by_batch()[b], i.reference.by_batch()[b]
        gaps.append(f"{_pts(p.mean - q.mean)} points at batch {b}" if not gaps else
                    f"{_pts(p.mean - q.mean)} at {b}")
    gap = f"; the gap BN − {i.reference.label} is {' and '.join(gaps)}"
    words = {"up": "BN's error **rises more** as the batch shrinks",
             "down": f"BN's error **rises less** than {i.reference.label}'s",
             "none": "**not resolved**"}[c.direction]
    return head + f" (95% interval [{_pts(lo)}, {_pts(hi)}], {_p(c)}): {words}{gap}."


def _headline(study: Study, found: Tests) -> str:
    bn = next((line for line in study.lines if line.norm == "bn"), None)
    if bn is None or bn.label not in found.trends:
        return ""
    t = found.trends[bn.label]
    if t.verdict == "unknown":
        return ("With one finished seed at an end of the range, these numbers cannot say "
                "whether BN's error rises as the batch shrinks: that needs at least two "
                "finished seeds at the smallest and the largest batch (--seeds 3).")
    bn_alone = {"rises": f"BN's own error rises by {t.rise:.2f} points",
                "falls": f"BN's own error falls by {-t.rise:.2f} points",
                "flat": f"BN's own error changes by {_pts(t.rise)} points, not resolved"}[
        t.verdict] + f" from batch {t.large.batch} to {t.small.batch}"
    inter = [i for i in found.interactions if i.test.tested]
    if not inter:  # no reference norm to compare with: BN alone
        word = {"rises": "**Yes**", "falls": "**No**", "flat": "**No**"}[t.verdict]
        return f"{word}: {bn_alone} ({_p(t.test)})."
    up = [i for i in inter if i.test.direction == "up"]
    down = [i for i in inter if i.test.direction == "down"]
    names = _whose(inter)
    values = "; ".join(f"BN − {i.reference.label} {_pts(i.test.estimate)} ({_p(i.test)})"
                       for i in inter)
    if len(up) == len(inter):
        head = (f"**Yes**: as the batch shrinks from {t.large.batch} to {t.small.batch}, "
                f"BN's error rises more than {names} ({values} points): the pattern of Wu & "
                f"He's Figure 1. {bn_alone}.")
    elif up:
        head = (f"**Partly**: BN's error rises more than "
                f"{_whose(up)} as the batch shrinks, but not "
                f"resolvably more than every batch-independent norm's ({values} points). "
                f"{bn_alone}.")
    elif down:
        head = (f"**No**, the opposite: BN's error rises less than "
                f"{_whose(down)} as the batch shrinks "
                f"({values} points). {bn_alone}.")
    else:
        head = (f"**No**: no difference between BN's change with the batch and {names} is "
                f"resolved here ({values} points); Wu & He's degradation of BN does not show "
                f"at this scale and these seeds. {bn_alone}.")
    return head


def _statistics_text(found: Tests) -> str:
    """How the verdict was reached: the tests, their number, Holm, the seeds and the
    smallest effects they resolve; where an effect was not resolved, the seeds it needs."""
    family = [c for c in found.family if c.tested]
    if not family:
        return ""
    m = len(family)
    seeds = sorted({c.seeds for c in family})
    tests_used = ("each norm's change from the largest to the smallest batch (Welch's t, "
                  "unpaired: runs of different batch sizes see different batches)")
    if found.interactions:
        refs = _whose(found.interactions)
        tests_used += (f", and BN's change minus {refs} (a one-sample t on the per-seed "
                       "differences: at a batch size and seed every norm sees the same "
                       "batches, so they pair by seed)")
    low, high = seeds[0], seeds[-1]
    text = (f"**Statistics.** {m} comparison{'s' if m != 1 else ''} in one family: "
            f"{tests_used}. The family-wise error is held at {ALPHA:.0%} by Holm's "
            "step-down method; each interval is its test's own 95%. Seeds per comparison "
            f"(the finished ones): {low if low == high else f'{low} to {high}'}.")
    smallest = [(c.name, c.resolvable) for c in found.family if c.resolvable is not None]
    if smallest:
        text += (f" The smallest true difference these seeds find with {POWER:.0%} power at "
                 f"Holm's strictest level ({ALPHA:g}/{m}): "
                 + "; ".join(f"{name} {r:.2f}" for name, r in smallest) + " points.")
    needs = []
    for c in found.family:
        r = c.resolvable
        if c.tested and not c.significant and r:
            n = c.seeds_for(c.estimate)
            if n is not None and n > c.seeds:
                needs.append(f"{c.name} ({_pts(c.estimate)}): about {n} seeds")
    if needs:
        text += (" To resolve the unresolved differences at the size measured here would "
                 "take: " + "; ".join(needs) + ". More seeds: `normlab suite NAME --seeds N` "
                 "(finished runs are kept), on a cluster with `--executor ray`.")
    return text


def _names(labels: list[str]) -> str:
    return labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " and " + labels[-1]


def _whose(interactions: list[Interaction]) -> str:
    """"GN (2 groups)'s and LN's": the reference norms, possessive."""
    return _names([f"{i.reference.label}'s" for i in interactions])


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
    found = tests(study)
    trends = found.trends
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
    headline = _headline(study, found)
    if headline:
        blocks.append(Para(headline))
    items = [_trend_text(line, trends[line.label]) for line in study.lines
             if line.label in trends]
    if items:
        blocks += [Heading("From the largest to the smallest batch", 3), Bullets(items)]
    if found.interactions:
        blocks += [Heading("BN against the batch-independent norms", 3),
                   Bullets([_interaction_text(i) for i in found.interactions])]
    statistics = _statistics_text(found)
    if statistics:
        blocks.append(Para(statistics))
    blocks += [
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
