"""The learning-rate range study: does normalization widen the range of learning rates
that train?

A suite is an lr-range study when some of its variants differ only in the learning rate
(at least :data:`MIN_LRS` of them): each such family is one row of the heat map (norm ×
learning rate), one line of the range table. Runs whose loss became nan/inf ("diverged")
and runs left at chance are results, drawn and counted as such, never dropped.
:func:`lr_range_parts` gives the report its blocks and figure, or None for any other
suite. Every sentence is generated from the numbers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from normlab.reports.collect import SuiteResults, VariantResults
from normlab.reports.doc import Block, Bullets, Heading, Para, Table
from normlab.reports.figures import figure_section, model_label, norm_key, norm_rank
from normlab.reports.page import Image
from normlab.reports.stats import (
    Paired,
    family_note,
    holm,
    mean,
    paired_difference,
    sample_std,
)
from normlab.training.rundir import CHANCE_ACC

TITLE = "Learning-rate range"
FIGURE = "lr_range_heatmap.png"
MIN_LRS = 3  # a family needs this many learning rates to be a row of the study
# A learning rate is in a norm's usable range when its mean final test accuracy is within
# MARGIN points of that norm's best and every seed trains there (finite loss, above chance).
MARGIN = 2.0


def _pts(x: float) -> str:
    return f"{x:+.2f}".replace("+0.00", "0.00").replace("-0.00", "0.00")


def _lr(x: float) -> str:
    return f"{x:g}"


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _blown(record: dict) -> bool:
    """Whether a run's loss became nan/inf (run.py's divergence, first condition)."""
    return record.get("first_bad_step", -1) >= 0 or not (
        math.isfinite(record["train_loss"]) and math.isfinite(record["test_loss"]))


@dataclass
class Cell:
    """One (norm, learning rate): the final test accuracies of its finished seeds."""

    lr: float
    variant: VariantResults
    acc: dict[int, float] = field(default_factory=dict)  # seed -> final test accuracy %
    blown: set[int] = field(default_factory=set)  # seeds whose loss became nan/inf
    unfinished: int = 0  # runs without a final result yet (missing, training, failed)

    def trains_on(self, seed: int) -> bool:
        return seed in self.acc and seed not in self.blown and self.acc[seed] >= CHANCE_ACC

    @property
    def chance(self) -> set[int]:
        """Seeds with a finite loss left at chance (final test accuracy < CHANCE_ACC)."""
        return {s for s, a in self.acc.items() if s not in self.blown and a < CHANCE_ACC}

    @property
    def trains(self) -> bool:
        """Every finished seed trains (finite loss, above chance); False with none finished."""
        return bool(self.acc) and all(self.trains_on(s) for s in self.acc)

    @property
    def mean(self) -> float | None:
        return mean(list(self.acc.values())) if self.acc else None

    @property
    def std(self) -> float | None:
        return sample_std(list(self.acc.values()))

    @property
    def state(self) -> str:
        """'trains', 'diverged' (every seed nan/inf), 'at chance' (every seed at chance or
        diverged), 'mixed' (some seeds train, some do not) or 'missing' (none finished)."""
        if not self.acc:
            return "missing"
        if self.trains:
            return "trains"
        if len(self.blown) == len(self.acc):
            return "diverged"
        if not any(self.trains_on(s) for s in self.acc):
            return "at chance"
        return "mixed"

    def text(self) -> str:
        if not self.acc:
            return "—"
        n = len(self.acc)
        done = f" ({n}/{n + self.unfinished})" if self.unfinished else ""
        state = self.state
        if state == "diverged":
            return f"diverged ({n}/{n}){done}"
        if state == "at chance" and not self.blown:
            return f"at chance ({self.mean:.1f}){done}"
        std = self.std
        out = f"{self.mean:.2f}" + ("" if std is None else f" ± {std:.2f}")
        flags = []
        if self.blown:
            flags.append(f"{len(self.blown)}/{n} diverged")
        if self.chance:
            flags.append(f"{len(self.chance)}/{n} at chance")
        return out + (f" [{', '.join(flags)}]" if flags else "") + done


@dataclass
class Range:
    """A contiguous run of learning rates (in the study's grid) around the best one."""

    lrs: list[float]
    best_lr: float | None = None
    best: float | None = None

    @property
    def width(self) -> int:
        return len(self.lrs)

    def text(self) -> str:
        if not self.lrs:
            return "none"
        lo, hi = self.lrs[0], self.lrs[-1]
        return _lr(lo) if lo == hi else f"{_lr(lo)} – {_lr(hi)} ({hi / lo:.3g}×)"


def usable_range(grid: list[float], value: dict[float, float], trains: dict[float, bool],
                 margin: float = MARGIN) -> Range:
    """The learning rates of ``grid`` next to the best trained one (highest ``value``)
    whose value is within ``margin`` of the best and which train; empty when none trains."""
    ok = [lr for lr in grid if trains.get(lr) and lr in value]
    if not ok:
        return Range([])
    best_lr = max(ok, key=lambda lr: (value[lr], -lr))  # a tie: the smaller learning rate
    best = value[best_lr]

    def good(lr: float) -> bool:
        return bool(trains.get(lr)) and lr in value and value[lr] >= best - margin

    i = j = grid.index(best_lr)
    while i > 0 and good(grid[i - 1]):
        i -= 1
    while j < len(grid) - 1 and good(grid[j + 1]):
        j += 1
    return Range(grid[i:j + 1], best_lr, best)


@dataclass
class Row:
    """Variants that differ only in the learning rate: one norm's row."""

    label: str
    key: str  # norm_key of the model: ordering, and "none" finds the reference row
    cells: dict[float, Cell]  # by learning rate

    def range(self, grid: list[float]) -> Range:
        return usable_range(grid, {lr: c.mean for lr, c in self.cells.items() if c.acc},
                            {lr: c.trains for lr, c in self.cells.items()})

    def seeds(self) -> list[int]:
        """Seeds finished in every cell of the row (a per-seed range needs them all)."""
        sets = [set(c.acc) for c in self.cells.values()]
        return sorted(set.intersection(*sets)) if sets else []

    def seed_ranges(self, grid: list[float]) -> dict[int, Range]:
        return {s: usable_range(grid, {lr: c.acc[s] for lr, c in self.cells.items()},
                                {lr: c.trains_on(s) for lr, c in self.cells.items()})
                for s in self.seeds()}


@dataclass
class Study:
    rows: list[Row]
    lrs: list[float]  # every learning rate of the study, ascending
    setting: str  # the protocol in words
    seeds: int  # the most finished seeds of any cell
    family: dict | None = None  # the verdict's comparisons, Holm-adjusted (on first use)

    @property
    def none(self) -> Row | None:
        return next((r for r in self.rows if r.key == "none"), None)

    @property
    def normalized(self) -> list[Row]:
        return [r for r in self.rows if r.key != "none"]


def _family_key(v: VariantResults) -> str:
    """The variant's config without seed and learning rate."""
    d = v.config.to_dict()
    d.pop("seed", None)
    d["protocol"] = {k: x for k, x in d["protocol"].items() if k != "lr"}
    return json.dumps(d, sort_keys=True)


def _setting(v: VariantResults) -> str:
    c = v.config
    p = c.protocol
    if c.subset:
        steps = -(-c.subset // p.batch_size) * p.epochs
        data = f"{steps} SGD steps ({p.epochs} epoch{'s' if p.epochs != 1 else ''} of the " \
               f"first {c.subset:,} training images)"
    else:
        data = f"{p.epochs} epoch{'s' if p.epochs != 1 else ''} of the full training set"
    schedule = {"none": "constant learning rate", "step": f"StepLR({p.step_size}, {p.gamma:g})",
                "onecycle": "one-cycle schedule"}[p.scheduler]
    return (f"{data}, batch {p.batch_size}, momentum {p.momentum:g}, {schedule}, dropout "
            f"{c.model.dropout:g}")


def find_study(suite: SuiteResults) -> Study | None:
    """The suite's lr-range rows, or None when no MIN_LRS variants differ only in lr."""
    families: dict[str, list[VariantResults]] = {}
    for v in suite.variants:
        if v.config is not None:
            families.setdefault(_family_key(v), []).append(v)
    rows = []
    for members in families.values():
        by_lr: dict[float, VariantResults] = {}
        for v in members:
            by_lr.setdefault(v.config.protocol.lr, v)
        if len(by_lr) < MIN_LRS:
            continue
        cells = {}
        for lr in sorted(by_lr):
            v = by_lr[lr]
            done = [r for r in v.finished if r.metrics]
            cells[lr] = Cell(lr, v, {r.seed: float(r.final["test_acc"]) for r in done},
                             {r.seed for r in done if _blown(r.final)}, len(v.runs) - len(done))
        model = members[0].config.model
        rows.append(Row(model_label(model), norm_key(model), cells))
    if not rows:
        return None
    rows.sort(key=lambda r: norm_rank(r.key))
    lrs = sorted({lr for r in rows for lr in r.cells})
    first = next(iter(rows[0].cells.values())).variant
    seeds = max((len(c.acc) for r in rows for c in r.cells.values()), default=0)
    return Study(rows, lrs, _setting(first), seeds)


# ----------------------------------------------------------------------------- figure


def lr_range_figure(study: Study) -> Figure:
    """A heat map of the mean final test accuracy, norm × learning rate: cells that
    diverged or stayed at chance in grey with their word, the usable range outlined."""
    rows, lrs = study.rows, study.lrs
    grid = np.full((len(rows), len(lrs)), np.nan)
    for i, row in enumerate(rows):
        for j, lr in enumerate(lrs):
            cell = row.cells.get(lr)
            if cell is not None and cell.acc and cell.state not in ("diverged", "at chance"):
                grid[i, j] = cell.mean
    fig = Figure(figsize=(2.6 + 0.95 * len(lrs), 1.5 + 0.48 * len(rows)), layout="constrained")
    ax = fig.subplots()
    # coloured by the error on a log scale, so 96% and 93% differ as much as 60% and 20%
    cmap = colormaps["viridis_r"].with_extremes(bad="#d9d9d9")
    error = np.ma.masked_invalid(np.clip(100.0 - grid, 0.5, None))
    image = ax.imshow(error, cmap=cmap, norm=LogNorm(vmin=0.5, vmax=100 - CHANCE_ACC),
                      aspect="auto")
    bar = fig.colorbar(image, ax=ax, shrink=0.9)
    bar.set_label("test error % (colour), log scale", fontsize=9)
    bar.set_ticks([t for t in (0.5, 1, 2, 5, 10, 20, 50, 85)], labels=[
        f"{t:g}" for t in (0.5, 1, 2, 5, 10, 20, 50, 85)])
    for i, row in enumerate(rows):
        rng = row.range(lrs)
        for j, lr in enumerate(lrs):
            cell = row.cells.get(lr)
            if cell is None or not cell.acc:
                ax.text(j, i, "—", ha="center", va="center", fontsize=8, color="0.4")
                continue
            state, n = cell.state, len(cell.acc)
            if state == "diverged":
                text, colour = "diverged", "#a50f15"
            elif state == "at chance":
                text, colour = ("at chance" if not cell.blown
                                else f"chance/\n{len(cell.blown)}/{n} div."), "0.25"
            else:
                text = f"{cell.mean:.1f}"
                if cell.blown or cell.chance:
                    text += f"\n{n - len(cell.blown) - len(cell.chance)}/{n} train"
                colour = "black" if cell.mean > 92 else "white"  # dark cells: error > 8%
            ax.text(j, i, text, ha="center", va="center", fontsize=7.5, color=colour)
        if rng.lrs:
            j0, j1 = lrs.index(rng.lrs[0]), lrs.index(rng.lrs[-1])
            ax.add_patch(Rectangle((j0 - 0.47, i - 0.45), j1 - j0 + 0.94, 0.9, fill=False,
                                   edgecolor="#e6550d", linewidth=2.0))
    ax.set_xticks(range(len(lrs)), [_lr(x) for x in lrs])
    ax.set_yticks(range(len(rows)), [r.label for r in rows])
    ax.set_xlabel("learning rate (log grid)")
    seeds = f"{study.seeds} seed{'s' if study.seeds != 1 else ''}"
    fig.suptitle(f"Final test accuracy % by norm and learning rate, mean over {seeds}\n"
                 f"orange box: the usable range (within {MARGIN:g} points of the row's best); "
                 "grey: diverged or at chance", fontsize=10.5)
    return fig


# ----------------------------------------------------------------------------- numbers


def _family(study: Study) -> dict[str, Paired | None]:
    """Each normalized row's usable-range width minus none's, paired by seed (in grid
    learning rates), Holm-adjusted as one family (the verdict's comparisons), by label."""
    none = study.none
    if none is None:
        return {}
    b = {s: r.width for s, r in none.seed_ranges(study.lrs).items()}
    found = {row.label: paired_difference(
        {s: r.width for s, r in row.seed_ranges(study.lrs).items()}, b)
        for row in study.normalized}
    holm(list(found.values()))
    return found


def _compare(study: Study, row: Row) -> Paired | None:
    """The row's width minus none's, adjusted with the rest of the family (see
    :func:`_family`; None for none itself)."""
    if study.none is None or row is study.none:
        return None
    if study.family is None:
        study.family = _family(study)
    return study.family.get(row.label)


def _verdict(p: Paired | None) -> str:
    """'wider', 'narrower' (resolved with the family-wise error held by Holm), 'same' (not
    resolved) or 'unknown' (one seed: no test)."""
    if p is None:
        return "unknown"
    return {"up": "wider", "down": "narrower", "none": "same", "untested": "unknown"}[
        p.direction]


def _interval(p: Paired, unit: str = "") -> str:
    lo, hi = p.interval
    if lo == hi:
        return f"the same on each of the {p.n} seeds"
    return f"95% interval [{_pts(lo)}, {_pts(hi)}]{unit}"


def _range_rows(study: Study) -> list[list[str]]:
    rows = []
    for row in study.rows:
        rng, per_seed = row.range(study.lrs), row.seed_ranges(study.lrs)
        best = "—" if rng.best is None else f"{rng.best:.2f} at {_lr(rng.best_lr)}"
        widths = [r.width for r in per_seed.values()]
        spread = "—" if not widths else (f"{min(widths)}–{max(widths)}" if min(widths) !=
                                         max(widths) else str(widths[0]))
        p = _compare(study, row)
        vs = "" if row is study.none else "—"
        if p is not None:
            vs = f"{_pts(p.mean)}" + ("" if p.interval is None else
                                      f" [{_pts(p.interval[0])}, {_pts(p.interval[1])}]")
        rows.append([row.label, best, rng.text(), str(rng.width), spread, vs])
    return rows


def _headline(study: Study) -> str:
    none = study.none
    if none is None:
        return ("This suite has no run without normalization, so the ranges are not compared "
                "with none's.")
    normed = study.normalized
    verdicts = {row.label: _verdict(_compare(study, row)) for row in normed}
    if all(v == "unknown" for v in verdicts.values()):
        return ("With fewer than two seeds finished in every cell, these numbers cannot say "
                "whether normalization widens the usable range: that needs at least two "
                "finished seeds per cell (--seeds 3).")
    none_rng = none.range(study.lrs)
    none_text = ("no learning rate at which it trains" if not none_rng.lrs else
                 f"{none_rng.width} learning rate{'s' if none_rng.width != 1 else ''} "
                 f"({none_rng.text()}, best {none_rng.best:.2f}%)")
    wider = [label for label, v in verdicts.items() if v == "wider"]
    words = {"same": "not distinguishable", "narrower": "narrower"}
    other = [f"{label} {words[v]}" for label, v in verdicts.items() if v != "wider"]
    n = len(normed)
    if len(wider) == n:
        who = f"{wider[0]} has" if n == 1 else f"each of the {n} normalized variants has"
        head = (f"**Yes**: {who} a wider usable range than the network without "
                f"normalization, which has {none_text}.")
    elif wider:
        head = (f"**Partly**: {len(wider)} of {n} normalized variants have a wider usable range "
                f"than the network without normalization ({none_text}): {', '.join(wider)}; "
                f"not wider: {'; '.join(other)}.")
    else:
        head = (f"**No**: no normalized variant's usable range is wider than that of the "
                f"network without normalization ({none_text}) beyond seed noise "
                f"({'; '.join(other)}).")
    return head


def _row_text(study: Study, row: Row) -> str:
    rng = row.range(study.lrs)
    if not rng.lrs:
        what = f"{row.label}: trains at no learning rate of the grid"
    else:
        what = (f"{row.label}: best {rng.best:.2f}% at lr {_lr(rng.best_lr)}; usable "
                f"{rng.text()}, {rng.width} of {len(study.lrs)} learning rates")
    p = _compare(study, row)
    if p is None:
        return what + "."
    if p.interval is None:
        return what + f"; {_pts(p.mean)} learning rates against none, one seed: no interval."
    words = {"wider": "**wider** than none's",
             "narrower": "**narrower** than none's",
             "same": "**not distinguishable** from none's"}[_verdict(p)]
    return what + f"; width minus none's {_pts(p.mean)} ({_interval(p)}, {_holm(p)}): {words}."


def _holm(p: Paired) -> str:
    return ("Holm p < 0.001" if p.p_holm < 0.001 else f"Holm p = {p.p_holm:.3f}") + (
        f" of {p.family}")


def _chance_text(study: Study) -> str:
    """At which learning rates none sits at chance (or diverges) while normalized nets
    train, with the smallest paired gain in accuracy there."""
    none = study.none
    if none is None or not study.normalized:
        return ""
    parts = []
    for state, words in (("at chance", "stays **at chance**"),
                         ("diverged", "**diverges** (loss nan/inf)")):
        lrs = [lr for lr, c in none.cells.items() if c.state == state]
        if not lrs:
            continue
        gains = []
        trained: set[str] = set()
        for lr in lrs:
            for row in study.normalized:
                cell = row.cells.get(lr)
                if cell is None or not cell.trains:
                    continue
                trained.add(row.label)
                p = paired_difference(cell.acc, none.cells[lr].acc)
                if p is not None:
                    gains.append((p.interval[0] if p.interval else p.mean, p, row, lr))
        where = _and([_lr(lr) for lr in lrs])
        accs = [a for lr in lrs for a in none.cells[lr].acc.values()]
        span = (f"{min(accs):.1f}%" if min(accs) == max(accs)
                else f"{min(accs):.1f}–{max(accs):.1f}%")
        text = (f"At learning rate{'s' if len(lrs) > 1 else ''} {where} the network without "
                f"normalization {words} on every finished seed (final test accuracy {span})")
        if not trained:
            parts.append(text + ", and no normalized variant trains there either.")
            continue
        names = [r.label for r in study.normalized if r.label in trained]
        text += (f", while {len(names)} of {len(study.normalized)} normalized variants train "
                 f"at {'one or more of them' if len(lrs) > 1 else 'it'} ({', '.join(names)})")
        low = min(gains, key=lambda g: g[0])
        _, p, row, lr = low
        gain = (f"{_pts(p.mean)} points" + (f", {_interval(p)}" if p.interval else
                                            ", one seed: no interval"))
        parts.append(text + f"; the smallest gain over none among them: {row.label} at lr "
                            f"{_lr(lr)}, {gain}.")
    return " ".join(parts)


def lr_range_blocks(study: Study) -> list[Block]:
    """The tables and the analysis of a study (the report's section, under TITLE)."""
    header = ["norm", *(f"lr {_lr(lr)}" for lr in study.lrs)]
    rows = [[row.label, *((row.cells[lr].text() if lr in row.cells else "") for lr in study.lrs)]
            for row in study.rows]
    blocks: list[Block] = [
        Para(f"Final test accuracy (%) after {study.setting}: mean ± sample std over the "
             "finished seeds (n/N where not all N finished). **diverged**: the training loss "
             f"became nan/inf; **at chance**: final test accuracy below {CHANCE_ACC:g}% with a "
             "finite loss. Both are results of the learning rate, not failures of the suite. "
             "The heat map draws the same means."),
        Table(header, rows, "l" + "r" * len(study.lrs)),
        Heading("Usable range", 3),
        Para(f"A norm's **usable range**: the learning rates of the grid next to its best one "
             f"whose mean accuracy is within {MARGIN:g} points of that best, every seed training "
             "there (finite loss, above chance). Per seed: the same on that seed's accuracies "
             "alone; the comparison with no normalization pairs the widths by seed (the runs of "
             "a seed see the same batches) and gives the mean difference in grid learning rates "
             "with its 95% paired t interval."),
        Table(["norm", "best % at lr", "usable range", "lrs in range", "per seed",
               "width − none's [95%]"], _range_rows(study), "lrrrrr"),
    ]
    headline = _headline(study)
    if headline:
        blocks.append(Para(headline))
    chance = _chance_text(study)
    if chance:
        blocks.append(Para(chance))
    blocks += [Heading("Per norm", 3), Bullets([_row_text(study, row) for row in study.rows])]
    note = family_note(list((study.family or {}).values()),
                       "each normalized variant's usable-range width minus none's, a paired t "
                       "over the seeds", "learning rates of the grid")
    if note:
        blocks.append(Para(note))
    return blocks


def lr_range_parts(suite: SuiteResults, figs_dir: str | Path
                   ) -> tuple[list[Block], list[Image]] | None:
    """The report's lr-range section (blocks to render under :data:`TITLE`, and the heat
    map, written into ``figs_dir``), or None when ``suite`` is not an lr-range study."""
    study = find_study(suite)
    if study is None:
        return None
    return figure_section(
        lr_range_blocks(study), any(c.acc for row in study.rows for c in row.cells.values()),
        lambda: lr_range_figure(study), Path(figs_dir) / FIGURE,
        "Heat map of final test accuracy by norm and learning rate",
        "Final test accuracy (%) by norm (rows) and learning rate (columns), mean over seeds: "
        "grey cells diverged (loss nan/inf) or stayed at chance on every seed; the orange box "
        f"is the usable range (within {MARGIN:g} points of the row's best); {study.setting}.",
        waiting="No finished run yet: the heat map comes with the first results.")
