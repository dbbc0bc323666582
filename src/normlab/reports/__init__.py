"""normlab.reports: the results of a suite of runs, and its report, built from its run
directories.

    from normlab.reports import build_report, load_results
    results = load_results("runs/s6")   # SuiteResults: variants, runs, metrics, states
    build_report("runs/s6")   # -> runs/s6/report.html (+ results.csv, summary.csv,
                              #    analysis.md, figures/*.png, normalizations.xlsx)
"""

from normlab.reports.build import build_report, load_test_images
from normlab.reports.collect import RunResults, SuiteResults, VariantResults, load_results
from normlab.reports.normfig import probe_norm

__all__ = [
    "RunResults",
    "SuiteResults",
    "VariantResults",
    "build_report",
    "load_results",
    "load_test_images",
    "probe_norm",
]
