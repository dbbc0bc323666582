"""The notebook face of normlab: train a suite or one run from a Jupyter or Colab cell, watch
it with progress bars, and look at its results as tables and figures inline.

    import normlab
    results = normlab.run_suite("s6-quick", out="runs/s6q")   # bars while it trains
    results                          # the summary table and the run states (HTML)
    results.summary, results.metrics # pandas DataFrames (pip install 'normlab[notebook]')
    results.accuracy()               # matplotlib Figures: the report's own figures
    results.loss(without_l1=True)
    results.gallery("ln"), results.confusion("ln")
    results.analysis()               # the generated analysis
    results = normlab.load_results("runs/s6")   # a suite trained earlier, or still training
    run = normlab.train(norm="gn", groups=2, epochs=3, subset=2000)   # one run
    run.history                      # one row per epoch

Nothing here trains, reads or draws anything of its own: training goes through
:func:`normlab.experiments.run_suite` and :func:`normlab.training.train` (so interrupting
the kernel keeps every completed epoch, and running the cell again continues), the numbers
and tables come from :mod:`normlab.reports`, and the figures are drawn by the ``plot_*``
functions of :mod:`normlab.reports.figures` that also draw the HTML report's PNGs. Figures
are returned, never shown or saved; Jupyter displays a returned figure.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from normlab.experiments.suite import Suite
from normlab.reports.build import ImageLoader, load_test_images
from normlab.reports.collect import (
    FINISHED,
    MISSING,
    UNFINISHED,
    RunResults,
    VariantResults,
)
from normlab.reports.doc import Block, Heading, Para, Table, to_html, to_markdown
from normlab.reports.figures import LABELS, curve_sets, first_predictions, palette, plot_curves
from normlab.training.config import RunConfig
from normlab.training.events import (
    EpochFinished,
    Event,
    Listener,
    Notice,
    RunFailed,
    RunFinished,
    RunStarted,
    StepsDone,
    ignore,
)
from normlab.training.rundir import RunDir

__all__ = ["NotebookProgress", "Results", "Run", "load_results", "resize", "run_suite", "train"]

PANDAS_HINT = "pip install 'normlab[notebook]' (or just pandas)"


def _pandas():
    """pandas, imported when a DataFrame is asked for (it is the optional ``notebook`` extra)."""
    try:
        import pandas
    except ImportError as err:
        raise ImportError(f"DataFrames need pandas, which is not installed: {PANDAS_HINT}") \
            from err
    return pandas


def _ipython():
    """The running IPython shell, or None (a plain script)."""
    module = sys.modules.get("IPython")
    return module.get_ipython() if module is not None else None


def _figures_display_inline() -> None:
    """Let Jupyter show a returned ``Figure`` as the report's PNG. Figures here never touch
    pyplot, so the inline backend may not be loaded; if nothing (the inline backend, the
    user) has registered a PNG formatter for Figure yet, register the report's."""
    shell = _ipython()
    if shell is None or not hasattr(shell, "display_formatter"):
        return
    formatter = shell.display_formatter.formatters.get("image/png")
    if formatter is None:
        return
    try:
        formatter.lookup_by_type(Figure)
    except KeyError:
        from normlab.reports.figures import png_bytes

        formatter.for_type(Figure, png_bytes)


class Doc:
    """Report blocks (headings, paragraphs, bullets, tables) that display as HTML in a
    notebook and print as Markdown."""

    def __init__(self, blocks: list[Block]) -> None:
        self.blocks = blocks

    def _repr_html_(self) -> str:
        return to_html(self.blocks, top_level=3)

    def _repr_markdown_(self) -> str:
        return to_markdown(self.blocks)

    def __str__(self) -> str:
        return to_markdown(self.blocks)

    __repr__ = __str__


# ----------------------------------------------------------------------------- figures


class _Figures:
    """The figure methods shared by a suite's results and one run: each returns a new
    matplotlib Figure drawn by the report's code (no pyplot, nothing saved)."""

    def __init__(self, images: ImageLoader | None = None) -> None:
        self._image_loader = images or load_test_images
        self._images: tuple | None = None

    # subclasses give the variants (read from disk now) and the dataset
    def _variant_list(self) -> list[VariantResults]:
        raise NotImplementedError

    def _dataset(self) -> str:
        raise NotImplementedError

    def curves(self, metric: str = "test_acc", *, without_l1: bool = False) -> Figure:
        """``metric`` per epoch (test_acc, test_loss, train_acc or train_loss), mean over seeds
        with a min-max band: the report's curve figure. ``without_l1`` leaves out the
        variants that have an L1 term (the seed's "3 models" graphs)."""
        if metric not in LABELS:
            raise ValueError(f"unknown metric {metric!r}; choose one of {', '.join(LABELS)}")
        _figures_display_inline()
        variants = self._variant_list()
        sets = {key: (words, chosen) for key, words, chosen in curve_sets(variants)}
        words, chosen = sets["all"]
        if without_l1:
            if "no_l1" in sets:
                words, chosen = sets["no_l1"]
            elif any(v.l1 > 0 for v in chosen):
                raise ValueError("every variant with metrics has an L1 term: nothing to plot "
                                 "without L1")
        if not chosen:
            raise ValueError(f"{self._where()}: no run has finished an epoch yet, so there is "
                             "nothing to plot")
        return plot_curves(chosen, metric, palette(variants), self._subtitle(words))

    def _subtitle(self, words: str) -> str:
        return words

    def accuracy(self, *, without_l1: bool = False) -> Figure:
        """Test accuracy per epoch (all models, or ``without_l1``)."""
        return self.curves("test_acc", without_l1=without_l1)

    def loss(self, *, without_l1: bool = False) -> Figure:
        """Test loss per epoch, log scale (all models, or ``without_l1``)."""
        return self.curves("test_loss", without_l1=without_l1)

    def gallery(self, variant: str | VariantResults | None = None) -> Figure:
        """The ten most confident mistakes of ``variant``'s first finished run: the report's
        gallery. ``variant`` is a name or label (optional when there is one variant)."""
        from normlab.reports.figures import variant_mistakes

        v, run, preds = self._predictions(variant)
        images, classes = self._test_images()
        if len(images) != len(preds["target"]):
            raise ValueError(f"{run.dir}: {len(preds['target'])} predictions but the "
                             f"{self._dataset()} test set has {len(images)} images")
        return variant_mistakes(v, run, preds, images, classes)

    def confusion(self, variant: str | VariantResults | None = None) -> Figure:
        """The confusion matrix of ``variant``'s first finished run: the report's figure."""
        from normlab.reports.figures import variant_confusion

        v, run, preds = self._predictions(variant)
        return variant_confusion(v, run, preds, self._classes())

    def variant(self, name: str | VariantResults | None = None) -> VariantResults:
        """A variant by name or label (the only one when ``name`` is None)."""
        variants = self._variant_list()
        if isinstance(name, VariantResults):
            name = name.name
        if name is None:
            if len(variants) == 1:
                return variants[0]
            raise ValueError("name a variant: " + ", ".join(v.name for v in variants))
        for v in variants:
            if name in (v.name, v.label):
                return v
        raise ValueError(f"no variant {name!r}; the variants are "
                         + ", ".join(v.name for v in variants))

    def _predictions(self, name) -> tuple[VariantResults, RunResults, dict]:
        _figures_display_inline()
        v = self.variant(name)
        run, preds = first_predictions(v)
        if preds is None:
            raise ValueError(f"{v.name} has no finished run yet (a gallery and a confusion "
                             "matrix need the predictions of a finished run)")
        return v, run, preds

    def _test_images(self) -> tuple:
        if self._images is None:
            import numpy as np

            images, classes = self._image_loader(self._dataset())
            self._images = (np.asarray(images), tuple(classes))
        return self._images

    def _classes(self) -> tuple[str, ...]:
        """The class names, without loading the images when the dataset is a known one."""
        from normlab.data.dataset import CLASSES

        if self._images is None and self._dataset() in CLASSES:
            return CLASSES[self._dataset()]
        return self._test_images()[1]

    def _where(self) -> str:
        raise NotImplementedError


# ----------------------------------------------------------------------------- a suite


class Results(_Figures):
    """A suite's folder, read from disk each time it is looked at: while a suite trains
    (here or in another process), displaying it again shows how far it has got.

    Displays as the summary table and the run states; ``summary`` and ``metrics`` are
    DataFrames; ``accuracy()``, ``loss()``, ``curves()``, ``gallery()`` and ``confusion()``
    return the report's figures; ``analysis()`` the generated analysis.
    """

    def __init__(self, folder: str | Path, *, images: ImageLoader | None = None) -> None:
        super().__init__(images)
        self.folder = Path(folder)
        self.log: list[str] = []  # what run_suite said (its summary lines, the report's path)
        self.name = self.data.name  # and a folder that holds no suite fails here, naming it

    def __repr__(self) -> str:
        return f"normlab.Results({str(self.folder)!r})"

    @property
    def data(self):
        """The suite as :func:`normlab.reports.load_results` reads it now (SuiteResults)."""
        from normlab.reports import load_results as read

        return read(self.folder)

    @property
    def variants(self) -> list[VariantResults]:
        return self.data.variants

    def _variant_list(self) -> list[VariantResults]:
        return self.data.variants

    def _dataset(self) -> str:
        return self.data.dataset

    def _where(self) -> str:
        return str(self.folder)

    def _summaries(self, suite=None):
        from normlab.reports.stats import summarise

        suite = suite or self.data
        return suite, [summarise(v) for v in suite.variants]

    @property
    def summary(self):
        """One row per variant (indexed by its name): parameters, seeds finished, best and
        final test accuracy and final loss (mean and sample std over seeds), epochs to 99% and
        99.4%, seconds per epoch. The report's summary.csv."""
        from normlab.reports.tables import summary_csv

        _, summaries = self._summaries()
        return _pandas().read_csv(io.StringIO(summary_csv(summaries))).set_index("variant")

    @property
    def metrics(self):
        """One row per variant x seed x epoch, every metric the runs wrote (results.csv)."""
        from normlab.reports.tables import results_csv

        return _pandas().read_csv(io.StringIO(results_csv(self.data)))

    def analysis(self) -> Doc:
        """The report's analysis: ranking, paired differences with 95% intervals, divergence,
        L1 against the same model without it, and the seed study's numbers."""
        from normlab.reports.analysis import analysis_blocks

        suite, summaries = self._summaries()
        return Doc(analysis_blocks(suite, summaries))

    @property
    def report(self) -> Path:
        """report.html (written by run_suite or :meth:`build_report`; it may not exist yet)."""
        return self.folder / "report.html"

    @property
    def workbook(self) -> Path:
        """normalizations.xlsx, the BN/LN/GN/IN workbook written beside the report."""
        from normlab.reports.build import WORKBOOK

        return self.folder / WORKBOOK

    def build_report(self) -> Path:
        """(Re)build report.html and its files from the runs as they are now."""
        from normlab.reports import build_report

        return build_report(self.folder, images=self._image_loader)

    def _repr_html_(self) -> str:
        from normlab.reports.analysis import _pairs_section, ranked
        from normlab.reports.stats import THRESHOLDS
        from normlab.reports.tables import summary_table

        suite, summaries = self._summaries()
        finished = sum(len(v.finished) for v in suite.variants)
        head = [Heading(f"normlab suite {suite.name}: {finished} of {len(suite.runs)} runs "
                        "finished", 1),
                Para(f"Folder `{self.folder}`"
                     + (f"; report `{self.report}`" if self.report.exists() else "") + ".")]
        note = Para(
            "Test accuracies in %, mean ± sample std over finished seeds (the single value for "
            f"one seed). Epochs to {THRESHOLDS[0]:g}%: the first epoch whose test accuracy "
            "reaches it, averaged over the seeds that did.")
        # the paired 95% intervals (the report's), once two seeds make an interval possible
        if any(len(s.runs) > 1 for s in ranked(summaries)):
            pairs = _pairs_section(summaries)
        else:
            pairs = [Para("One finished seed per variant: no interval is possible yet. Train "
                          "more seeds (`seeds=3`) for paired 95% intervals of the differences; "
                          "`analysis()` has the rest.")]
        blocks = [*head, summary_table(summaries), note, *pairs, Heading("Runs"),
                  runs_table(suite)]
        return to_html(blocks, top_level=3)


def runs_table(suite) -> Table:
    """Each run's state: finished, unfinished (training now or stopped), failed or missing."""
    epochs = {v.name: v.epochs for v in suite.variants}
    labels = {v.name: v.label for v in suite.variants}
    rows = []
    for r in suite.runs:
        state = {
            FINISHED: "finished" + (" (diverged)" if r.diverged else ""),
            UNFINISHED: f"unfinished: {r.progress(epochs[r.variant])}",
            MISSING: "missing (not started)",
        }.get(r.state) or f"failed: {r.run.failure()}"
        final = f"{r.final['test_acc']:.2f}" if r.final else "—"
        rows.append([labels[r.variant], str(r.seed), state,
                     f"{len(r.metrics)} of {epochs[r.variant] or '?'}", final])
    return Table(["variant", "seed", "state", "epochs", "last test acc %"], rows, "lrlrr")


# ----------------------------------------------------------------------------- one run


class Run(_Figures):
    """One run directory (from :func:`train`, or any run of a suite), read from disk each
    time it is looked at. ``history`` is its metrics, one row per epoch; the figure methods
    are a suite's, for this one run."""

    def __init__(self, folder: str | Path, *, images: ImageLoader | None = None) -> None:
        super().__init__(images)
        self.folder = Path(folder)
        self.dir = RunDir(self.folder)
        if self.dir.config() is None:
            raise ValueError(f"{self.folder} holds no run (no config.json)")

    def __repr__(self) -> str:
        return f"normlab.Run({str(self.folder)!r})"

    @property
    def config(self) -> RunConfig:
        return self.dir.config()

    @property
    def label(self) -> str:
        from normlab.experiments.suite import default_label

        return default_label(self.config)

    @property
    def state(self) -> str:
        """new, partial, finished, diverged or failed."""
        return self.dir.state()

    @property
    def history(self):
        """One row per finished epoch: every metric of metrics.jsonl."""
        return _pandas().DataFrame(self.dir.metrics())

    def _as_variant(self) -> VariantResults:
        config = self.config
        run = RunResults(self.folder.name, config.seed, self.dir, config, self.dir.metrics())
        return VariantResults(self.folder.name, self.label, config, [run])

    def _variant_list(self) -> list[VariantResults]:
        return [self._as_variant()]

    def _dataset(self) -> str:
        return self.config.dataset

    def _subtitle(self, words: str) -> str:
        return f"{self.label}, seed {self.config.seed}"

    def _where(self) -> str:
        return str(self.folder)

    def _repr_html_(self) -> str:
        from normlab.reports.stats import summarise
        from normlab.reports.tables import summary_table

        v = self._as_variant()
        run = v.runs[0]
        epochs = self.config.protocol.epochs
        state = self.state if run.state != UNFINISHED else f"unfinished: {run.progress(epochs)}"
        blocks = [Heading(f"normlab run {self.label}, seed {self.config.seed}: {state}", 1),
                  Para(f"Folder `{self.folder}`; {len(run.metrics)} of {epochs} epochs."),
                  summary_table([summarise(v)])]
        return to_html(blocks, top_level=3)


# ----------------------------------------------------------------------------- progress


class NotebookProgress:
    """A listener that draws the event stream as ``tqdm.auto`` bars: widgets in Jupyter and
    Colab, text bars elsewhere; nothing needs a terminal.

    With ``runs`` (a suite) one bar counts the suite's runs (``done`` of them finished
    before); each run that trains gets a bar of its epochs, whose note says how far the
    current epoch is and the last epoch's test accuracy. ``heads`` names the runs.
    Warnings and failures are printed. ``bar`` is the tqdm class (default ``tqdm.auto``).
    """

    def __init__(self, heads: dict[str, str] | None = None, runs: int = 0, done: int = 0, *,
                 bar=None, leave: bool = True) -> None:
        if bar is None:
            from tqdm.auto import tqdm as bar
        self.bar, self.heads, self.leave = bar, heads or {}, leave
        self.failed = 0
        self.epoch_bars: dict[str, Any] = {}
        self.runs_bar = (bar(total=runs, initial=done, desc="runs", unit="run")
                         if runs else None)
        self._note_runs()

    def __call__(self, event: Event) -> None:
        handler = getattr(self, f"_on_{type(event).__name__}", None)
        if handler is not None:
            handler(event)

    def _note_runs(self) -> None:
        if self.runs_bar is not None:
            running = len(self.epoch_bars)
            parts = [f"{running} training"] if running else []
            if self.failed:
                parts.append(f"{self.failed} failed")
            self.runs_bar.set_postfix_str(", ".join(parts), refresh=True)

    def _on_RunStarted(self, e: RunStarted) -> None:
        bar = self.bar(total=e.epochs, initial=e.epochs_done, desc=self.heads.get(e.run, e.run),
                       unit="epoch", leave=self.leave)
        if e.epochs_done:
            bar.set_postfix_str(f"resumed after epoch {e.epochs_done}", refresh=True)
        self.epoch_bars[e.run] = bar
        self._note_runs()

    def _on_StepsDone(self, e: StepsDone) -> None:
        bar = self.epoch_bars.get(e.run)
        if bar is not None:
            bar.set_postfix_str(f"epoch {e.epoch}: {e.images:,} of {e.total:,} images",
                                refresh=True)

    def _on_EpochFinished(self, e: EpochFinished) -> None:
        bar = self.epoch_bars.get(e.run)
        if bar is not None:
            r = e.record
            bar.set_postfix_str(f"test acc {r['test_acc']:.2f}%, loss {r['test_loss']:.4f}",
                                refresh=False)
            bar.update(1)

    def _end_run(self, run: str) -> None:
        bar = self.epoch_bars.pop(run, None)
        if bar is not None:
            bar.close()
        if self.runs_bar is not None:
            self.runs_bar.update(1)
        self._note_runs()

    def _on_RunFinished(self, e: RunFinished) -> None:
        self._end_run(e.run)
        if e.message:
            self._say(f"{self.heads.get(e.run, e.run)}: {e.message}", error=True)
        elif e.skipped:
            self._say(f"{self.heads.get(e.run, e.run)}: already finished "
                      f"({len(e.history)} epochs); nothing to train")

    def _on_RunFailed(self, e: RunFailed) -> None:
        self.failed += 1
        self._end_run(e.run)
        self._say(f"{self.heads.get(e.run, e.run)}: FAILED: {e.error}", error=True)

    def _on_Notice(self, e: Notice) -> None:
        self._say(f"{self.heads.get(e.run, e.run)}: warning: {e.message}", error=True)

    def _say(self, text: str, *, error: bool = False) -> None:
        print(text, file=sys.stderr if error else sys.stdout, flush=True)

    def close(self) -> None:
        """Close every bar (an unfinished one stays, marked as stopped)."""
        for run in list(self.epoch_bars):
            self.epoch_bars.pop(run).close()
        if self.runs_bar is not None:
            self.runs_bar.close()
            self.runs_bar = None


def _listener(progress: bool | Listener, make: Callable[[], NotebookProgress]):
    """(listener, the bars to close or None) for a ``progress`` argument."""
    if progress is True:
        bars = make()
        return bars, bars
    if progress is False or progress is None:
        return ignore, None
    if callable(progress):
        return progress, None
    raise ValueError(f"progress must be True, False or a listener (a callable taking an "
                     f"event), got {progress!r}")


# ----------------------------------------------------------------------------- entry points


def resize(suite: Suite, subset: int | None = None, epochs: int | None = None) -> Suite:
    """``suite`` on the first ``subset`` training images and/or for ``epochs`` epochs, under
    a name that says so (``s6-2000img-1ep``, so its default folder is its own)."""
    suffix = []
    if subset is not None and subset != suite.subset:
        suffix.append(f"{subset}img")
    if epochs is not None and any(v.config.protocol.epochs != epochs for v in suite.variants):
        suffix.append(f"{epochs}ep")
    if not suffix:
        return suite

    def sized(config: RunConfig) -> RunConfig:
        protocol = config.protocol
        if epochs is not None:
            protocol = dataclasses.replace(protocol, epochs=epochs)
        return dataclasses.replace(config, protocol=protocol,
                                   subset=subset if subset is not None else config.subset)

    words = ", ".join(w for w in (
        f"the first {subset:,} training images" if subset is not None else "",
        f"{epochs} epoch{'s' if epochs != 1 else ''}" if epochs is not None else "") if w)
    return dataclasses.replace(
        suite,
        name=f"{suite.name}-{'-'.join(suffix)}",
        description=(f"{suite.description} Resized to {words}.").strip(),
        protocol=sized(RunConfig(protocol=suite.protocol)).protocol,
        subset=subset if subset is not None else suite.subset,
        variants=tuple(dataclasses.replace(v, config=sized(v.config)) for v in suite.variants),
    )


def run_suite(suite: str | Path | Suite, out: str | Path | None = None,
              seeds: int | list[int] | None = None, *, subset: int | None = None,
              epochs: int | None = None, jobs: int = 1, device: str = "auto",
              threads: int | None = None, progress: bool | Listener = True, executor=None,
              images: ImageLoader | None = None) -> Results:
    """Train every unfinished run of ``suite`` (a bundled name such as ``"s6"``, a .toml
    path, or a :class:`~normlab.experiments.Suite`) into ``out`` (default runs/<name>), build
    its report, and return its :class:`Results`.

    ``seeds``: a count K (seeds 1..K) or a list, instead of the suite's. ``subset`` and
    ``epochs`` resize every variant (see :func:`resize`). ``jobs`` runs train at once in
    worker processes. ``progress``: tqdm.auto bars (True), nothing (False) or your listener.

    Interrupting the kernel stops it cleanly: every completed epoch is kept, and running the
    cell again continues where it stopped (finished runs are not retrained).
    """
    from normlab.experiments import load_suite
    from normlab.experiments import run_suite as run
    from normlab.experiments.plan import default_out, plan

    if not isinstance(suite, Suite):
        suite = load_suite(suite)
    suite = resize(suite, subset, epochs)
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ValueError(f"seeds as a count must be >= 1, got {seeds}")
        seeds = list(range(1, seeds + 1))
    out = Path(out) if out is not None else default_out(suite)
    planned = plan(suite, out, seeds)
    heads = {r.rel: f"[{i}/{len(planned)}] {r.head}" for i, r in enumerate(planned, 1)}
    listener, bars = _listener(progress, lambda: NotebookProgress(
        heads, len(planned), sum(not r.to_train for r in planned)))
    log: list[str] = []

    def say(text: str) -> None:
        log.append(text)
        if "keeps seeds" in text:
            print(text)

    try:
        run(suite, out, seeds, executor=executor, device=device, threads=threads, jobs=jobs,
            listener=listener, log=say)
    except KeyboardInterrupt:
        if bars is not None:
            bars.close()
        print(f"Interrupted. {_kept(out, planned)}; run this cell again to continue.",
              file=sys.stderr, flush=True)
        raise
    finally:
        if bars is not None:
            bars.close()
    results = Results(out, images=images)
    results.log = log
    return results


def _kept(out: Path, planned) -> str:
    runs = [RunDir(r.dir) for r in planned]
    finished = sum(r.finished() for r in runs)
    epochs = sum(len(r.metrics()) for r in runs)
    return (f"{finished} of {len(runs)} runs are finished and {epochs} epochs in all are kept "
            f"in {out}")


def load_results(folder: str | Path, *, images: ImageLoader | None = None) -> Results | Run:
    """The results in ``folder``: a suite's (:class:`Results`), trained earlier or still
    training, or one run directory's (:class:`Run`). ``images`` replaces the loader of the
    test images that galleries show (the dataset by default)."""
    folder = Path(folder)
    if RunDir(folder).exists() and not (folder / "suite.json").exists():
        return Run(folder, images=images)
    return Results(folder, images=images)


def train(out: str | Path | None = None, *, norm: str | None = None, groups: int | None = None,
          dropout: float | None = None, l1: float | None = None, l1_scope: str | None = None,
          weight_decay: float | None = None, epochs: int | None = None,
          subset: int | None = None, seed: int | None = None, dataset: str | None = None,
          protocol: str = "seed", config: RunConfig | None = None, device: str = "auto",
          threads: int | None = None, progress: bool | Listener = True,
          images: ImageLoader | None = None, **protocol_fields: Any) -> Run:
    """Train one run into ``out`` and return it as a :class:`Run`.

    The options are ``normlab train``'s: ``norm`` (bn, gn, ln, in, none), ``groups``,
    ``dropout``, ``l1``, ``l1_scope``, ``weight_decay``, ``seed``, ``subset``, ``dataset``,
    the named ``protocol`` and any of its fields (``epochs=5``, ``lr=0.05``, ...); unset ones
    keep the defaults (the seed's BN model and protocol). Or pass a whole ``config``.
    ``out`` defaults to runs/train/<norm>-seed<k>-<a hash of the config>, so running the
    same cell again resumes (or finds finished) the same run, and another config gets its
    own folder. Interrupting the kernel keeps every completed epoch.
    """
    from normlab.models import ModelConfig
    from normlab.training.protocols import resolve_protocol
    from normlab.training.run import train as train_run

    options = {"norm": norm, "groups": groups, "dropout": dropout, "l1": l1,
               "l1_scope": l1_scope, "weight_decay": weight_decay, "seed": seed,
               "subset": subset, "dataset": dataset}
    given = {k: v for k, v in options.items() if v is not None}
    if epochs is not None:
        protocol_fields["epochs"] = epochs
    if config is not None:
        if given or protocol_fields or protocol != "seed":
            raise ValueError("pass either config= or options (norm=, epochs=, ...), not both; "
                             f"got config and {', '.join([*given, *protocol_fields])}")
    else:
        model_defaults = ModelConfig()
        model = ModelConfig(norms=norm or model_defaults.norm,
                            groups=model_defaults.groups if groups is None else groups,
                            dropout=model_defaults.dropout if dropout is None else dropout)
        rest = {k: given[k] for k in ("l1", "l1_scope", "weight_decay", "seed", "subset",
                                      "dataset") if k in given}
        config = RunConfig(model=model, protocol=resolve_protocol(protocol, protocol_fields),
                           **rest)
    if out is None:
        digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
        out = Path("runs") / "train" / f"{config.norm}-seed{config.seed}-{digest.hexdigest()[:8]}"
    from normlab.experiments.suite import default_label

    name = str(out)
    listener, bars = _listener(progress, lambda: NotebookProgress(
        {name: f"{default_label(config)}, seed {config.seed}"}))
    try:
        train_run(config, out, device=device, threads=threads, listener=listener, name=name)
    except KeyboardInterrupt:
        if bars is not None:
            bars.close()
        done = len(RunDir(out).metrics())
        print(f"Interrupted. {done} epochs are kept in {out}; run this cell again to continue.",
              file=sys.stderr, flush=True)
        raise
    finally:
        if bars is not None:
            bars.close()
    return Run(out, images=images)
