"""(Re)build the report of a suite folder from whatever runs it holds so far.

Reads ROOT/suite.json (or, without it, ROOT/<variant>/seed<k>/ run folders) and writes,
into ROOT: results.csv (every metric of every epoch), summary.csv, analysis.md, report.html
(one self-contained page, figures embedded), figures/*.png and normalizations.xlsx (the
workbook that computes BN/LN/GN/IN with live formulas). Missing and unfinished runs
are reported as such; rerun the command while a suite trains to see it so far.

example:
  normlab report runs/s6
"""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("root", type=Path, metavar="ROOT",
                        help="the suite folder (holding suite.json)")


def run(args: argparse.Namespace) -> int:
    from normlab.reports import build_report

    path = build_report(args.root)
    print(path)
    return 0
