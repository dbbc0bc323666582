"""Experiments: suites of variants x seeds, declared in TOML and run into one folder.

    from normlab.experiments import load_suite, run_suite
    suite = load_suite("s6-quick")            # a bundled name, or a path to a .toml file
    report = run_suite(suite, "/tmp/s6q")     # trains what is not finished, then the report
"""

from normlab.experiments.runner import (
    comparable_metrics,
    format_plan,
    manifest,
    plan,
    run_suite,
)
from normlab.experiments.suite import Suite, Variant, bundled_suites, load_suite, run_dir

__all__ = [
    "Suite",
    "Variant",
    "bundled_suites",
    "comparable_metrics",
    "format_plan",
    "load_suite",
    "manifest",
    "plan",
    "run_dir",
    "run_suite",
]
