"""The report's figures: training curves, misclassified galleries and confusion matrices.

Each figure has a ``plot_*`` function that builds and returns a ``matplotlib.figure.Figure``
(no pyplot state, no GUI backend, nothing saved), and a ``*_figure(path, ...)`` function that
writes it as the report's PNG through :func:`save`. The report and the notebook API
(:mod:`normlab.notebook`) draw with the same ``plot_*`` functions, so a figure in a notebook
is the one the HTML report embeds. One helper, :func:`draw_curves`, draws a metric's mean
over seeds with a min-max band for any set of variants; every curve figure goes through it.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MultipleLocator, NullFormatter

from normlab.reports.collect import RunResults, VariantResults
from normlab.reports.doc import Block, Para
from normlab.reports.page import Image
from normlab.reports.stats import THRESHOLDS

DPI = 110
ZOOM_SPAN = 1.0  # accuracy points below the best model's late accuracy that the zoom keeps
MIN_SPAN = 1.0  # the zoom shows at least this many accuracy points (early in training too)
LABELS = {
    "test_acc": ("Test accuracy", "accuracy %"),
    "train_acc": ("Train accuracy", "accuracy %"),
    "test_loss": ("Test loss", "NLL loss (log scale)"),
    "train_loss": ("Train loss", "NLL loss (log scale)"),
}


PLAIN = FuncFormatter(lambda y, _: f"{y:g}")

# The norms in the order the study figures and tables list them (batch-statistics norms
# first, then per-image norms, then none), and one colour each, shared by every study
# figure. A model with weight standardization is keyed "<norm>+ws".
NORM_ORDER = ("bn", "noisy-bn", "brn", "gbn", "evo-b0", "gn", "gn+ws", "ln", "in", "frn",
              "evo-s0", "rms", "none")
NORM_COLOURS = {
    "bn": "#1f77b4", "noisy-bn": "#aec7e8", "brn": "#17becf", "gbn": "#6baed6", "evo-b0": "#393b79",
    "gn": "#d62728", "gn+ws": "#ff9896", "ln": "#2ca02c", "in": "#9467bd",
    "frn": "#ff7f0e", "evo-s0": "#8c564b", "rms": "#e377c2", "none": "#7f7f7f",
}
EXTRA_COLOURS = ("#bcbd22", "#9edae5", "#ffbb78", "#98df8a", "#c5b0d5", "#c49c94")


def norm_key(model) -> str:
    """A model's norm for ordering and colours: ``"gn"``, ``"gn+ws"`` with weight
    standardization, ``"bn+ln"`` when stacked."""
    return model.norm + ("+ws" if getattr(model, "weight_std", False) else "")


def norm_rank(key: str) -> int:
    """Position of a norm key in :data:`NORM_ORDER` (unknown norms after the known ones)."""
    return NORM_ORDER.index(key) if key in NORM_ORDER else len(NORM_ORDER)


def norm_colours(keys: list[str]) -> dict[str, str]:
    """A colour per norm key: the fixed one where it has one, else the next spare colour."""
    spare = iter(EXTRA_COLOURS)
    return {k: NORM_COLOURS[k] if k in NORM_COLOURS else next(spare, "0.3") for k in keys}


def model_label(model) -> str:
    """A model's norm in a few characters, as suites label it: ``BN``, ``GN (2 groups) +
    WS``, ``BN (momentum=0.01)`` (``normlab.experiments.suite.norm_label``)."""
    from normlab.experiments.suite import norm_label

    return norm_label(model)


def _minor_log_labels(decades: float) -> FuncFormatter:
    """Label a log axis's minor ticks: all of them within one decade, the 2s, 3s and 5s
    within three (so a loss of 0.02 can be read off), none beyond."""
    keep = set(range(2, 10)) if decades < 1 else {2, 3, 5} if decades < 3 else set()

    def label(y, _):
        mantissa = round(y / 10 ** np.floor(np.log10(y)))
        return f"{y:g}" if mantissa in keep else ""

    return FuncFormatter(label)


def _decades(ax) -> float:
    low, high = ax.get_ylim()
    return float(np.log10(high / low))


def palette(variants: list[VariantResults]) -> dict[str, tuple]:
    """One colour per variant, fixed by suite order, shared by every figure."""
    cmap = colormaps["tab10" if len(variants) <= 10 else "tab20"]
    return {v.name: cmap(i % cmap.N) for i, v in enumerate(variants)}


def mean_band(variant: VariantResults, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                       np.ndarray, np.ndarray]:
    """(epochs, mean, min, max, count) over the seeds that reached each epoch so far."""
    series = [r.series(metric) for r in variant.with_metrics]
    length = max((len(s) for s in series), default=0)
    grid = np.full((len(series), length), np.nan)
    for i, s in enumerate(series):
        grid[i, : len(s)] = s
    count = np.sum(~np.isnan(grid), axis=0)
    with warnings.catch_warnings():  # an all-NaN epoch (a diverged loss) is a gap, not news
        warnings.simplefilter("ignore", RuntimeWarning)
        return (np.arange(1, length + 1), np.nanmean(grid, axis=0), np.nanmin(grid, axis=0),
                np.nanmax(grid, axis=0), count)


def draw_curves(ax, variants: list[VariantResults], metric: str, colours: dict[str, tuple]) -> None:
    """Mean over seeds per variant, with a shaded min-max band where >1 seed has the epoch."""
    last = 1
    for v in variants:
        epochs, m, lo, hi, count = mean_band(v, metric)
        if not len(epochs):
            continue
        last = max(last, len(epochs))
        n, done = len(v.with_metrics), len(v.finished)
        note = f"{n} seed{'s' if n > 1 else ''}" + (f", {n - done} unfinished" if done < n else "")
        ax.plot(epochs, m, color=colours[v.name], marker="o", markersize=3, linewidth=1.6,
                label=f"{v.label} ({note})")
        several = count > 1
        if several.any():
            ax.fill_between(epochs, lo, hi, where=several, color=colours[v.name], alpha=0.18,
                            linewidth=0)
    ax.set_xlabel("epoch")
    ax.set_xlim(0.5, last + 0.5)
    ax.xaxis.set_major_locator(MultipleLocator(max(1, math.ceil(last / 10))))  # whole epochs
    ax.grid(True, alpha=0.3)


def zoom_limits(variants: list[VariantResults], metric: str) -> tuple[tuple[float, float], bool]:
    """Accuracy y-limits that keep the high-accuracy region legible.

    Each variant's "late" accuracy is the lowest mean over its last half of epochs; the zoom
    starts just under the lowest late accuracy within ZOOM_SPAN points of the best one. The
    flag says whether any curve leaves the zoom anywhere (early epochs too): then a full-range
    panel is drawn beside it, so no part of a curve is hidden.
    """
    late, peak, lowest = [], [], []
    for v in variants:
        _, m, _, hi, _ = mean_band(v, metric)
        if len(m):
            late.append(float(np.min(m[len(m) // 2 :])))
            peak.append(float(np.nanmax(hi)))
            lowest.append(float(np.nanmin(m)))
    if not late:
        return (0.0, 100.0), False
    best = max(late)
    low = min(x for x in late if x >= best - ZOOM_SPAN)
    top = max(peak)
    pad = max(0.12 * (top - low), 0.05)
    bottom = low - pad
    for y in THRESHOLDS:  # a reference line just below the zoom is worth showing
        if y < bottom < y + 0.3:
            bottom = y - pad / 2
    top = min(100.0, top + pad)
    limits = (min(bottom, top - MIN_SPAN), top)
    return limits, any(x < limits[0] for x in lowest)


def _overview_bottom(variants: list[VariantResults], metric: str) -> float:
    """0 when some curve sits far down (chance level, say); else a multiple of 5 just under
    the lowest value, so a dip to 93% is not squashed against a 0-100 axis."""
    lows = [float(np.nanmin(mean_band(v, metric)[2])) for v in variants if v.with_metrics]
    lowest = min(lows, default=0.0)
    return 0.0 if lowest < 50 else 5.0 * math.floor((lowest - 1) / 5)


def curve_sets(variants: list[VariantResults]) -> list[tuple[str, str, list[VariantResults]]]:
    """The sets of variants the report plots, as (file key, words, variants): every variant
    with metrics ("all models"), then, when some but not all have L1, those without it."""
    shown = [v for v in variants if v.with_metrics]
    no_l1 = [v for v in shown if v.l1 == 0]
    sets = [("all", "all models", shown)]
    if no_l1 and len(no_l1) < len(shown):
        sets.append(("no_l1", "without the L1 models", no_l1))
    return sets


def curves_figure(path: Path, variants: list[VariantResults], metric: str,
                  colours: dict[str, tuple], subtitle: str) -> Path:
    """The PNG of :func:`plot_curves`."""
    return save(plot_curves(variants, metric, colours, subtitle), path)


def plot_curves(variants: list[VariantResults], metric: str, colours: dict[str, tuple],
                subtitle: str) -> Figure:
    """``metric`` per epoch for ``variants`` (mean over seeds, min-max band); accuracies get a
    zoom on the high-accuracy region (and a full-range panel when a curve leaves it)."""
    title, ylabel = LABELS[metric]
    is_acc = metric.endswith("_acc")
    limits, full_panel = zoom_limits(variants, metric) if is_acc else (None, False)
    fig = Figure(figsize=(10, 5.2), layout="constrained")
    if full_panel:
        full, ax = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 2.3]})
        draw_curves(full, variants, metric, colours)
        full.set_ylim(_overview_bottom(variants, metric), 100.5)
        full.axhspan(*limits, color="0.5", alpha=0.12, linewidth=0)
        full.set_ylabel(ylabel)
        full.set_title("every value (grey: zoomed area)", fontsize=10)
    else:
        ax = fig.subplots()
    draw_curves(ax, variants, metric, colours)
    ax.set_ylabel(ylabel)
    if is_acc:
        ax.set_ylim(*limits)
        for y in THRESHOLDS:
            if limits[0] < y < limits[1]:
                ax.axhline(y, color="0.35", linestyle=":", linewidth=1)
                ax.annotate(f"{y:g}%", (1, y), xycoords=("axes fraction", "data"),
                            xytext=(3, 0), textcoords="offset points", va="center",
                            fontsize=8, color="0.35")
        if full_panel:
            ax.set_title("zoom on the high-accuracy region", fontsize=10)
    else:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(PLAIN)
        ax.yaxis.set_minor_formatter(_minor_log_labels(_decades(ax)))
    fig.suptitle(f"{title}: {subtitle} (line: mean over seeds; band: min–max)", fontsize=12)
    handles, labels = ax.get_legend_handles_labels()
    if handles:  # below the axes: never over the data, and long labels have room
        fig.legend(handles, labels, loc="outside lower center", fontsize=9.5, frameon=False,
                   ncols=min(len(handles), 3))
    return fig


# How every figure becomes a PNG: the report's files and a notebook's inline images alike.
PNG_OPTIONS = {"dpi": DPI, "facecolor": "white", "bbox_inches": "tight", "pad_inches": 0.12}


def save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, **PNG_OPTIONS)
    return path


def figure_section(blocks: list[Block], measured: bool, draw: Callable[[], Figure],
                   path: Path, title: str, caption: str,
                   waiting: str = "No finished run yet: the figure comes with the first "
                                  "results.") -> tuple[list[Block], list[Image]]:
    """A study's report section: its blocks and the figure ``draw()`` gives, saved at
    ``path``; before anything is ``measured``, the blocks under ``waiting`` and no figure."""
    if not measured:
        return [Para(waiting), *blocks], []
    return blocks, [Image(save(draw(), path), title, caption)]


def png_bytes(fig: Figure) -> bytes:
    """``fig`` as the PNG :func:`save` would write, in memory."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", **PNG_OPTIONS)
    return buffer.getvalue()


def top_mistakes(pred: np.ndarray, target: np.ndarray, confidence: np.ndarray,
                 k: int = 10) -> np.ndarray:
    """Indices of the k most confident mistakes, ties broken by the lower index."""
    wrong = np.flatnonzero(pred != target)
    order = np.lexsort((wrong, -confidence[wrong].astype(np.float64)))
    return wrong[order[:k]]


def mistakes_figure(path: Path, images: np.ndarray, classes: tuple[str, ...], preds: dict,
                    title: str) -> Path:
    """The PNG of :func:`plot_mistakes`."""
    return save(plot_mistakes(images, classes, preds, title), path)


def plot_mistakes(images: np.ndarray, classes: tuple[str, ...], preds: dict,
                  title: str) -> Figure:
    """A 2x5 grid of the most confident mistakes, each titled with truth, guess and p."""
    idx = top_mistakes(preds["pred"], preds["target"], preds["confidence"])
    fig = Figure(figsize=(10, 5.2), layout="constrained")
    axes = fig.subplots(2, 5).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, i in zip(axes, idx, strict=False):
        ax.imshow(images[i], cmap="gray_r", vmin=0, vmax=255, interpolation="nearest")
        text = (f"true: {classes[preds['target'][i]]}  pred: {classes[preds['pred'][i]]}"
                f" (p={preds['confidence'][i]:.2f})")
        if len(text) > 30:
            text = text.replace("  pred", "\npred")
        ax.set_title(text, fontsize=9.5)
        ax.text(0.5, -0.03, f"test image #{i}", transform=ax.transAxes, fontsize=7.5,
                color="0.4", ha="center", va="top")
    if not len(idx):
        axes[0].text(0, 0.5, "no mistakes", fontsize=14)
    fig.suptitle(title, fontsize=12)
    return fig


def confusion(pred: np.ndarray, target: np.ndarray, n: int) -> np.ndarray:
    """Counts with rows = true class and columns = predicted class."""
    return np.bincount(target * n + pred, minlength=n * n).reshape(n, n)


def confusion_figure(path: Path, pred: np.ndarray, target: np.ndarray,
                     classes: tuple[str, ...], title: str) -> Path:
    """The PNG of :func:`plot_confusion`."""
    return save(plot_confusion(pred, target, classes, title), path)


def plot_confusion(pred: np.ndarray, target: np.ndarray, classes: tuple[str, ...],
                   title: str) -> Figure:
    """The confusion matrix (rows: true class), counts written in, log colour scale."""
    n = len(classes)
    cm = confusion(pred, target, n)
    fig = Figure(figsize=(6.2, 5.6), layout="constrained")
    ax = fig.subplots()
    # log colour scale: the off-diagonal counts (tens) stay visible beside the diagonal (~1000)
    image = ax.imshow(np.ma.masked_equal(cm, 0), cmap="Blues",
                      norm=LogNorm(vmin=0.6, vmax=max(int(cm.max()), 2)))  # 1 stays visible
    bar = fig.colorbar(image, ax=ax, shrink=0.8, label="count (log scale)")
    bar.ax.yaxis.set_major_formatter(PLAIN)
    bar.ax.yaxis.set_minor_formatter(NullFormatter())
    threshold = np.sqrt(max(int(cm.max()), 2)) * 4
    for t in range(n):
        for p in range(n):
            value = int(cm[t, p])
            colour = "white" if value > threshold else ("0.6" if value == 0 else "black")
            ax.text(p, t, str(value), ha="center", va="center", fontsize=7.5, color=colour)
    ax.set_xticks(range(n), classes, rotation=45 if max(map(len, classes)) > 2 else 0,
                  ha="right" if max(map(len, classes)) > 2 else "center")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=10.5)
    return fig


# ----------------------------------------------------------------------------- a variant's

def first_predictions(variant: VariantResults) -> tuple[RunResults | None, dict | None]:
    """The first finished run of ``variant`` that has predictions, and those predictions
    (the run whose gallery and confusion matrix the report shows), or (None, None)."""
    for run in variant.finished:
        preds = run.predictions()
        if preds is not None:
            return run, preds
    return None, None


def _mistake_count(preds: dict) -> int:
    return int((preds["pred"] != preds["target"]).sum())


def variant_mistakes(variant: VariantResults, run: RunResults, preds: dict, images: np.ndarray,
                     classes: tuple[str, ...]) -> Figure:
    """The report's gallery of ``variant``: the most confident mistakes of ``run``."""
    return plot_mistakes(images, classes, preds,
                         f"{variant.label}, seed {run.seed}: the 10 most confident of "
                         f"{_mistake_count(preds)} mistakes")


def variant_confusion(variant: VariantResults, run: RunResults, preds: dict,
                      classes: tuple[str, ...]) -> Figure:
    """The report's confusion matrix of ``variant`` (from ``run``'s predictions)."""
    return plot_confusion(preds["pred"], preds["target"], classes,
                          f"{variant.label}, seed {run.seed}: {_mistake_count(preds)} errors of "
                          f"{len(preds['target'])}")
