"""Statistics of a suite: mean ± sample std over seeds, paired Student-t intervals (scipy),
per-variant summaries.

scipy.stats (about half a second to import) is imported by the two functions that use it,
on first call: a suite's runner and its worker processes use only :func:`fmt_mean_std`."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from normlab.reports.collect import RunResults, VariantResults

# Test accuracies (%) whose first epoch the summary reports; the curves draw them as lines.
THRESHOLDS = (99.0, 99.4)



def mean(values: list[float]) -> float:
    return math.fsum(values) / len(values)


def sample_std(values: list[float]) -> float | None:
    """Sample standard deviation (n - 1); None for fewer than two values. (A diverged run's
    nan loss makes it nan, where statistics.stdev would raise.)"""
    if len(values) < 2:
        return None
    m = mean(values)
    return math.sqrt(math.fsum((v - m) ** 2 for v in values) / (len(values) - 1))


def fmt_mean_std(values: list[float], digits: int = 2) -> str:
    """"99.36 ± 0.05" over seeds; the bare value for one seed; "—" for none."""
    if not values:
        return "—"
    std = sample_std(values)
    text = f"{mean(values):.{digits}f}"
    return text if std is None else f"{text} ± {std:.{digits}f}"


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    import scipy.stats

    return float(scipy.stats.t.ppf(0.975, df))


@dataclass
class Paired:
    """The paired difference a - b over the seeds both finished."""

    seeds: list[int]
    diffs: list[float]
    mean: float
    half_width: float | None  # None with one seed: no interval is possible

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def interval(self) -> tuple[float, float] | None:
        if self.half_width is None:
            return None
        return self.mean - self.half_width, self.mean + self.half_width

    @property
    def within_noise(self) -> bool | None:
        """True if the 95% interval includes 0; None when there is no interval."""
        iv = self.interval
        return None if iv is None else iv[0] <= 0 <= iv[1]


def paired_difference(a: dict[int, float], b: dict[int, float]) -> Paired | None:
    """Pair two {seed: value} maps by seed; None if they share no seed."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    half = None
    if len(diffs) > 1:  # scipy's paired t-test: its 95% interval of the mean difference
        half = 0.0
        if sample_std(diffs):  # (identical differences have no spread: a zero-width interval)
            import scipy.stats

            low, high = scipy.stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]
                                              ).confidence_interval(0.95)
            half = float(high - low) / 2
    return Paired(seeds, diffs, mean(diffs), half)


def epochs_to(run: RunResults, threshold: float) -> int | None:
    """The first epoch whose test accuracy is >= threshold, or None."""
    return next((m["epoch"] for m in run.metrics if m["test_acc"] >= threshold), None)


@dataclass
class Summary:
    """One variant's numbers over the runs they rest on."""

    variant: VariantResults
    runs: list[RunResults]  # finished runs, or (partial=True) unfinished ones when none finished
    partial: bool
    best_acc: list[float] = field(default_factory=list)
    final_acc: list[float] = field(default_factory=list)
    final_loss: list[float] = field(default_factory=list)
    reach: dict[float, list[int | None]] = field(default_factory=dict)
    seconds_per_epoch: float | None = None

    @property
    def final_by_seed(self) -> dict[int, float]:
        return {r.seed: r.final["test_acc"] for r in self.runs}

    def reach_text(self, threshold: float) -> str:
        got = [e for e in self.reach[threshold] if e is not None]
        if not got:
            return "—"
        text = f"{mean(got):.1f}"
        return text if len(got) == len(self.runs) else f"{text} ({len(got)}/{len(self.runs)} seeds)"


def summarise(variant: VariantResults) -> Summary:
    runs = [r for r in variant.finished if r.metrics]
    partial = not runs
    if partial:
        runs = variant.with_metrics
    s = Summary(variant, runs, partial)
    for r in runs:
        s.best_acc.append(max(m["test_acc"] for m in r.metrics))
        s.final_acc.append(r.final["test_acc"])
        s.final_loss.append(r.final["test_loss"])
    s.reach = {t: [epochs_to(r, t) for r in runs] for t in THRESHOLDS}
    seconds = [m["seconds"] for r in runs for m in r.metrics if "seconds" in m]
    # the median: one epoch slowed by other work on the machine should not move it
    s.seconds_per_epoch = statistics.median(seconds) if seconds else None
    return s
