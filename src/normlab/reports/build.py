"""build_report(root): every artifact of a suite's report, written into the suite folder.

ROOT/results.csv, summary.csv, analysis.md, report.html, figures/*.png and
normalizations.xlsx.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from normlab import __version__
from normlab.files import write_text
from normlab.reports.analysis import COMMON_RANDOM_NUMBERS, analysis_blocks
from normlab.reports.collect import (
    FAILED,
    MISSING,
    UNFINISHED,
    SuiteResults,
    load_results,
)
from normlab.reports.doc import Block, Heading, Para, to_markdown
from normlab.reports.figures import (
    curve_sets,
    first_predictions,
    palette,
    plot_curves,
    save,
    variant_confusion,
    variant_mistakes,
)
from normlab.reports.normfig import norm_groups_figure
from normlab.reports.page import Image, Section, blocks_html, figure_html, page_html
from normlab.reports.stats import summarise
from normlab.reports.tables import results_csv, summary_csv, summary_table
from normlab.studies import (
    batchsize,
    bnpaper,
    depth,
    ghost,
    ics,
    inside,
    lrrange,
    running,
    testbatch,
    weightdecay,
)

ImageLoader = Callable[[str], tuple[np.ndarray, tuple[str, ...]]]
WORKBOOK = "normalizations.xlsx"
Parts = tuple[list[Block], list[Image]]


def _test_batch_parts(suite: SuiteResults, figs: Path) -> Parts | None:
    """The test-batch section (a name of its own: tests of other sections replace it, as it
    computes from the runs' checkpoints)."""
    return testbatch.test_batch_parts(suite, figs)


def study_parts(suite: SuiteResults, figs: Path) -> list[tuple[str, str, Parts]]:
    """The report's study sections that apply to ``suite``, as (anchor, title, (blocks,
    figures)): the batch-size, learning-rate range, ghost-batch and running-statistics
    studies when the suite is one, and the test-batch dependence of any suite with a
    finished run. Each study module decides from the suite's configs and runs."""
    studies = [
        ("batch-size", batchsize.TITLE, batchsize.batch_size_parts),
        ("lr-range", lrrange.TITLE, lrrange.lr_range_parts),
        ("ghost-batch", ghost.TITLE, ghost.ghost_batch_parts),
        ("running-stats", running.TITLE, running.running_stats_parts),
        ("bn-paper", bnpaper.TITLE, bnpaper.bn_paper_parts),
        ("weight-decay", weightdecay.TITLE, weightdecay.weight_decay_parts),
        ("ics", ics.TITLE, ics.ics_parts),
        ("depth", depth.TITLE, depth.depth_parts),
        ("inside", inside.TITLE, inside.inside_parts),
        ("test-batch", testbatch.TITLE, _test_batch_parts),
    ]
    found = []
    for anchor, title, parts in studies:
        got = parts(suite, figs)
        if got is not None:
            found.append((anchor, title, got))
    return found


def load_test_images(dataset: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """The test images (uint8 (N, 28, 28)) and class names of ``dataset``.

    Tests replace this (``images=`` or monkeypatching this name) with synthetic images.
    """
    from normlab.data import load_dataset

    ds = load_dataset(dataset)
    return ds.test_images.numpy(), tuple(ds.classes)


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


CURVES_UP_TO = 16  # variants in one curves figure; more make a legend taller than the plot


def _curve_images(suite: SuiteResults, figs: Path, colours: dict) -> list[Image]:
    sets = curve_sets(suite.variants)
    plan = [("test_acc", s) for s in sets] + [("test_loss", s) for s in sets]
    plan += [("train_acc", sets[0]), ("train_loss", sets[0])]
    images = []
    for metric, (key, words, variants) in plan:
        if not variants or len(variants) > CURVES_UP_TO:
            continue
        path = save(plot_curves(variants, metric, colours, words), figs / f"{metric}_{key}.png")
        what = metric.replace("_acc", " accuracy").replace("_loss", " loss").capitalize()
        images.append(Image(path, f"{what}, {words}", f"{what} per epoch, {words}."))
    return images


def _curves_note(suite: SuiteResults, curves: list[Image]) -> list[Block]:
    """Why a curves figure is missing: too many variants for one legend."""
    shown = sum(1 for v in suite.variants if v.with_metrics)
    if shown <= CURVES_UP_TO:
        return []
    return [Para(f"{shown} variants: the curves of all of them in one figure are drawn only "
                 f"for suites of up to {CURVES_UP_TO} variants. results.csv holds every "
                 "epoch of every run" + (", and the figures below the variant sets that fit."
                                         if curves else "."))]


class DatasetImages:
    """A dataset's test images and class names, loaded on first use (at most once)."""

    def __init__(self, loader: ImageLoader, dataset: str, notes: list[str]) -> None:
        self.loader, self.dataset, self.notes = loader, dataset, notes
        self.images: np.ndarray | None = None
        self.classes = tuple(str(i) for i in range(10))
        self.tried = False

    def load(self) -> np.ndarray | None:
        if not self.tried:
            self.tried = True
            try:
                images, self.classes = self.loader(self.dataset)
                self.images = np.asarray(images)
            except (ValueError, OSError, ImportError) as err:  # no data here: say so, go on
                self.notes.append(f"Test images unavailable ({err}): galleries skipped.")
        return self.images


def _prediction_parts(suite: SuiteResults, figs: Path, loader: ImageLoader,
                      notes: list[str]) -> list[str]:
    parts, test = [], DatasetImages(loader, suite.dataset, notes)
    for v in suite.variants:
        run, preds = first_predictions(v)
        if preds is None:
            parts.append(f"<h3>{html.escape(v.label)}</h3><p>No finished run yet.</p>")
            continue
        figures = []
        images, classes = test.load(), test.classes
        if images is not None and len(images) == len(preds["target"]):
            path = save(variant_mistakes(v, run, preds, images, classes),
                        figs / f"mistakes_{slug(v.name)}.png")
            figures.append(Image(path, f"{v.label}: misclassified test images",
                                 "Ties in confidence are broken by the lower test index (#).",
                                 "wide"))
        elif images is not None:
            notes.append(f"{v.label}: {len(preds['target'])} predictions but {len(images)} "
                         "test images: gallery skipped.")
        path = save(variant_confusion(v, run, preds, classes),
                    figs / f"confusion_{slug(v.name)}.png")
        figures.append(Image(path, f"{v.label}: confusion matrix",
                             "Rows: true class; columns: predicted class.", "narrow"))
        parts.append(f"<h3>{html.escape(v.label)}</h3><div class=\"pair\">"
                     + "".join(figure_html(f) for f in figures) + "</div>")
    return parts


def _workbook(root: Path) -> Path:
    """normalizations.xlsx; a workbook that cannot be written fails the report, saying why."""
    from normlab.workbook import write_workbook

    try:
        return Path(write_workbook(root / WORKBOOK))
    except OSError as err:
        raise ValueError(f"report: could not write the workbook {root / WORKBOOK}: {err}") from err


def _status_notes(suite: SuiteResults) -> list[str]:
    notes = []
    epochs = {v.name: v.epochs for v in suite.variants}
    unfinished = [f"{r.variant}/seed{r.seed} ({r.progress(epochs[r.variant])})"
                  for r in suite.by_state(UNFINISHED)]
    missing = [f"{r.variant}/seed{r.seed}" for r in suite.by_state(MISSING)]
    failed = [f"{r.variant}/seed{r.seed} ({r.run.failure()})" for r in suite.by_state(FAILED)]
    if failed:
        notes.append("**Failed** (the last attempt raised an error; plotted so far, left out of "
                     f"the comparisons; rerun the suite to retry): {', '.join(failed)}.")
    if unfinished:
        notes.append("**Unfinished** (plotted so far, left out of the comparisons): "
                     f"{', '.join(unfinished)}.")
    if missing:
        notes.append(f"**Missing** (not started): {', '.join(missing)}.")
    return notes


def _files_html(workbook: Path) -> str:
    links = [("results.csv", "every metric of every epoch of every run"),
             ("summary.csv", "the summary table, mean and std in separate columns"),
             ("analysis.md", "the analysis above, as Markdown"),
             ("figures/", "the figures as PNG files"),
             (workbook.name, "the workbook that computes BN/LN/GN/IN with live formulas")]
    items = "".join(f'<li><a href="{name}">{name}</a>: {text}</li>' for name, text in links)
    return f"<p>Beside this page, in the suite folder:</p><ul>{items}</ul>"


def build_report(root: str | Path, *, images: ImageLoader | None = None) -> Path:
    """Build the report of the suite at ``root`` from whatever runs exist; return report.html.

    ``images`` loads a dataset's test images and class names (default: ``load_test_images``).
    """
    root = Path(root)
    suite = load_results(root)
    summaries = [summarise(v) for v in suite.variants]
    write_text(root / "results.csv", results_csv(suite))
    write_text(root / "summary.csv", summary_csv(summaries))
    blocks = analysis_blocks(suite, summaries)
    figs = root / "figures"
    studies = study_parts(suite, figs)
    write_text(root / "analysis.md", to_markdown(
        blocks + [b for _, title, (parts, _) in studies for b in (Heading(title), *parts)]))
    colours = palette(suite.variants)
    notes = _status_notes(suite)
    curves = _curve_images(suite, figs, colours)
    galleries = _prediction_parts(suite, figs, images or load_test_images, notes)
    norm = Image(norm_groups_figure(figs / "norm_groups.png"), "BN, LN, IN and GN groups",
                 "Measured, not drawn from a description: each norm layer of normlab.models, "
                 "in train mode, gets a random input; one element is perturbed and the outputs "
                 "that change are shaded. They are exactly the values that share that element's "
                 "mean and variance (cf. Wu & He, Group Normalization, 2018, Fig. 2).")
    workbook = _workbook(root)

    finished = sum(len(v.finished) for v in suite.variants)
    header = [Para(f"{finished} of {len(suite.runs)} runs finished. Built by normlab "
                   f"{__version__} from the run directories in this folder.")]
    if suite.description:
        header.insert(0, Para(suite.description))
    if suite.source:
        header.append(Para(f"Source: {suite.source}"))
    sections = [
        Section("summary", "Summary", blocks_html([
            summary_table(summaries),
            Para("Accuracies are test accuracies in %, mean ± sample std over finished seeds "
                 "(the single value when one seed finished). Epochs to X%: the first epoch "
                 "whose test accuracy reaches X, averaged over the seeds that reached it. "
                 "s / epoch: the median over epochs of training plus test time. "
                 + COMMON_RANDOM_NUMBERS)])),
        *(Section(anchor, title, "".join(map(figure_html, images)) + blocks_html(parts))
          for anchor, title, (parts, images) in studies),
        Section("curves", "Training curves", blocks_html(_curves_note(suite, curves)),
                [figure_html(i) for i in curves]),
        Section("analysis", "Analysis",
                blocks_html(analysis_blocks(suite, summaries, standalone=False))),
        Section("mistakes", "Misclassified test images and confusion matrices", blocks_html([
            Para("Per variant, its first finished seed: the ten mistakes made with the highest "
                 "confidence, and the confusion matrix of all test images.")]), galleries),
        Section("norms", "What BN, LN, IN and GN average over", parts=[figure_html(norm)]),
        Section("files", "Files", _files_html(workbook)),
    ]
    page = page_html(f"normlab report: {suite.name}", header, notes, sections)
    return write_text(root / "report.html", page)

