"""normlab.reports: the results of a suite of runs, and its report, built from its run
directories.

    from normlab.reports import build_report, load_results
    results = load_results("runs/s6")   # SuiteResults: variants, runs, metrics, states
    build_report("runs/s6")   # -> runs/s6/report.html (+ results.csv, summary.csv,
                              #    analysis.md, figures/*.png, normalizations.xlsx)

Its names load on first use (PEP 562): ``import normlab.reports.stats`` (or any one
submodule) does not pull in the report builder and its matplotlib and scipy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from normlab.reports.build import build_report, load_test_images
    from normlab.reports.collect import RunResults, SuiteResults, VariantResults, load_results
    from normlab.reports.normfig import probe_norm

# public name -> the submodule that defines it
_HOMES = {
    "RunResults": "collect",
    "SuiteResults": "collect",
    "VariantResults": "collect",
    "build_report": "build",
    "load_results": "collect",
    "load_test_images": "build",
    "probe_norm": "normfig",
}

__all__ = [
    "RunResults",
    "SuiteResults",
    "VariantResults",
    "build_report",
    "load_results",
    "load_test_images",
    "probe_norm",
]


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
