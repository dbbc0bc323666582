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

The package's modules: :mod:`~normlab.notebook.api` (the entry points),
:mod:`~normlab.notebook.results` (:class:`Results` and :class:`Run`),
:mod:`~normlab.notebook.figures` (the figure methods they share),
:mod:`~normlab.notebook.progress` (the tqdm.auto bars) and :mod:`~normlab.notebook.display`
(:class:`Doc`, inline figures, the pandas hint). Everything public is importable from here.
"""

from normlab.notebook.api import load_results, resize, run_suite, train
from normlab.notebook.display import PANDAS_HINT, Doc
from normlab.notebook.progress import NotebookProgress
from normlab.notebook.results import Results, Run, runs_table

__all__ = ["PANDAS_HINT", "Doc", "NotebookProgress", "Results", "Run", "load_results", "resize",
           "run_suite", "runs_table", "train"]
