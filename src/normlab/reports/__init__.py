"""normlab.reports: the report of a suite of runs, built from its run directories.

    from normlab.reports import build_report
    build_report("runs/s6")   # -> runs/s6/report.html (+ results.csv, summary.csv,
                              #    analysis.md, figures/*.png, normalizations.xlsx)
"""

from normlab.reports.build import build_report, load_test_images
from normlab.reports.collect import Suite, load_suite
from normlab.reports.normfig import probe_norm

__all__ = ["Suite", "build_report", "load_suite", "load_test_images", "probe_norm"]
