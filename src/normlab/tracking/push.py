"""Tracking for a suite as it trains, and for a folder trained earlier.

:func:`suite_tracking` is what ``normlab suite --track`` and the notebook's
``run_suite(track=...)`` wrap their listener in; :func:`push_folder` is ``normlab track``:
it replays a suite folder's (or one run directory's) files through the same consumer, so a
folder pushed after the fact looks in the tracker as if it had been tracked while it
trained, and pushing it again adds only what the tracker does not hold yet.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from normlab.tracking.consumer import SuiteRun, Tracking, suite_info
from normlab.training.events import Listener
from normlab.training.rundir import RunDir


def suite_tracking(track: str | Iterable[str] | None, suite, out: str | Path, runs,
                   listener: Listener) -> Tracking | None:
    """The consumer for ``suite``'s planned ``runs`` (``plan()``'s) trained into ``out``,
    passing events on to ``listener``; None when ``track`` names no tracker. Raises a
    ValueError for an unknown tracker or a missing package, before anything trains."""
    if not track:
        return None
    info = suite_info(suite.name, out, suite.dataset,
                      [(r.rel, SuiteRun(r.variant.name, r.variant.label, r.seed,
                                        r.config.to_dict())) for r in runs])
    return Tracking(track, listener, suite=info)


def push_folder(folder: str | Path, to: str | Iterable[str], listener: Listener) -> list[str]:
    """Push a suite folder (suite.json, or <variant>/seed<k>/ run directories) or one run
    directory to the trackers ``to``; return the lines that say where the runs are."""
    folder = Path(folder)
    if RunDir(folder).exists() and not (folder / "suite.json").exists():
        tracking = Tracking(to, listener)
        keys = [str(folder)]
    else:
        from normlab.reports.collect import load_results

        results = load_results(folder)
        runs = [(str(r.dir.relative_to(folder)), SuiteRun(v.name, v.label, r.seed))
                for v in results.variants for r in v.runs]  # configs: from config.json
        tracking = Tracking(to, listener,
                            suite=suite_info(results.name, folder, results.dataset, runs))
        keys = [rel for rel, _ in runs]
    try:
        tracking.sync(keys)
    finally:
        lines = tracking.close()
    return lines
