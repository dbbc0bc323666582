"""results.csv (every metric of every epoch) and summary.csv / the summary table."""

from __future__ import annotations

import csv
import io

from normlab.reports.collect import SuiteResults
from normlab.reports.doc import Table
from normlab.reports.stats import THRESHOLDS, Summary, fmt_mean_std, mean, sample_std

METRIC_KEYS = (
    "epoch", "lr", "train_loss", "train_acc", "train_l1", "first_bad_step", "train_seconds",
    "test_loss", "test_acc", "test_seconds", "seconds", "images_per_second", "status", "message",
)


def csv_text(header: list[str], rows: list[list]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return out.getvalue()


def results_csv(suite: SuiteResults) -> str:
    """One row per variant x seed x epoch, with every metric the runs wrote."""
    extra = sorted({k for r in suite.runs for m in r.metrics for k in m} - set(METRIC_KEYS))
    keys = [*METRIC_KEYS, *extra]
    rows = [
        [v.name, v.label, r.seed, r.state, *(m.get(k, "") for k in keys)]
        for v in suite.variants for r in v.runs for m in r.metrics
    ]
    return csv_text(["variant", "label", "seed", "run_state", *keys], rows)


def _num(x: float | None, digits: int = 4) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def _network(config) -> str:
    """The variant's network as labels write it (``seed CNN``, ``ResNet-20 + Fixup``)."""
    from normlab.models import net_label

    return "" if config is None else net_label(config.model)


def summary_csv(summaries: list[Summary]) -> str:
    header = ["variant", "label", "parameters", "seeds_finished", "seeds_total", "partial"]
    for key in ("best_test_acc", "final_test_acc", "final_test_loss"):
        header += [f"{key}_mean", f"{key}_std"]
    for t in THRESHOLDS:
        header += [f"epochs_to_{t:.1f}_mean", f"seeds_reaching_{t:.1f}"]
    header += ["seconds_per_epoch", "network"]
    rows = []
    for s in summaries:
        v = s.variant
        row = [v.name, v.label, v.parameters if v.parameters is not None else "",
               len(v.finished), len(v.runs), int(s.partial)]
        for values in (s.best_acc, s.final_acc, s.final_loss):
            row += [_num(mean(values) if values else None, 6), _num(sample_std(values), 6)]
        for t in THRESHOLDS:
            got = [e for e in s.reach[t] if e is not None]
            row += [_num(mean(got) if got else None, 2), len(got)]
        row += [_num(s.seconds_per_epoch, 2), _network(v.config)]
        rows.append(row)
    return csv_text(header, rows)


def summary_table(summaries: list[Summary]) -> Table:
    header = ["variant", "parameters", "best test acc %", "final test acc %", "final test loss",
              *(f"epochs to {t:.1f}%" for t in THRESHOLDS), "s / epoch (median)", "seeds finished"]
    rows = []
    for s in summaries:
        v = s.variant
        label = v.label
        if s.partial and s.runs:
            label += f" (unfinished: epoch {max(len(r.metrics) for r in s.runs)} of {v.epochs})"
        rows.append([
            label,
            f"{v.parameters:,}" if v.parameters is not None else "—",
            fmt_mean_std(s.best_acc),
            fmt_mean_std(s.final_acc),
            fmt_mean_std(s.final_loss, 4),
            *(s.reach_text(t) for t in THRESHOLDS),
            f"{s.seconds_per_epoch:.1f}" if s.seconds_per_epoch is not None else "—",
            f"{len(v.finished)} of {len(v.runs)}",
        ])
    return Table(header, rows)
