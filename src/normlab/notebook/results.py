"""The results the notebook API returns, read from disk each time they are looked at:
:class:`Results` (a suite's folder: summary and metrics DataFrames, the report's figures and
analysis, an HTML display of the summary and the run states, see :func:`runs_table`) and
:class:`Run` (one run directory: its history, figures and state).
"""

from __future__ import annotations

import io
from pathlib import Path

from normlab.notebook.display import Doc, _pandas
from normlab.notebook.figures import _Figures
from normlab.reports.build import ImageLoader
from normlab.reports.collect import (
    FINISHED,
    MISSING,
    UNFINISHED,
    RunResults,
    VariantResults,
)
from normlab.reports.doc import Heading, Para, Table, to_html
from normlab.training.config import RunConfig
from normlab.training.rundir import RunDir


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
