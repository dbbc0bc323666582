"""Experiments: suites of variants x seeds, declared in TOML, planned, and trained by an
executor into one folder.

    from normlab.experiments import load_suite, run_suite
    suite = load_suite("s6-quick")            # a bundled name, or a path to a .toml file
    report = run_suite(suite, "/tmp/s6q")     # trains what is not finished, then the report
"""

from normlab.experiments.executors import Executor, ProcessExecutor, SerialExecutor
from normlab.experiments.plan import Job, format_plan, manifest, plan
from normlab.experiments.runner import comparable_metrics, make_executor, run_suite
from normlab.experiments.suite import Suite, Variant, bundled_suites, load_suite, run_dir

__all__ = [
    "Executor",
    "Job",
    "ProcessExecutor",
    "SerialExecutor",
    "Suite",
    "Variant",
    "bundled_suites",
    "comparable_metrics",
    "format_plan",
    "load_suite",
    "make_executor",
    "manifest",
    "plan",
    "run_dir",
    "run_suite",
]
