"""Small statistics without scipy: mean ± sample std, Student-t intervals, per-variant summaries."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from normlab.reports.collect import Run, Variant

THRESHOLDS = (99.0, 99.4)  # test accuracy (%) whose first epoch the summary reports

# t_{0.975, df} for df = 1..30 (two-sided 95%); checked against t_cdf in the tests.
T975 = (
    12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
    2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
    2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423,
)


def mean(values: list[float]) -> float:
    return math.fsum(values) / len(values)


def sample_std(values: list[float]) -> float | None:
    """Sample standard deviation (n - 1); None for fewer than two values."""
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


def t_pdf(x: float, df: int) -> float:
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_c - (df + 1) / 2 * math.log1p(x * x / df))


def t_cdf(x: float, df: int, steps: int = 4000) -> float:
    """P(T <= x) by Simpson's rule on [0, |x|] (accurate to ~1e-9 for |x| < 50)."""
    a = abs(x)
    h = a / steps
    area = t_pdf(0, df) + t_pdf(a, df)
    area += sum((4 if i % 2 else 2) * t_pdf(i * h, df) for i in range(1, steps))
    half = area * h / 3
    return 0.5 + half if x >= 0 else 0.5 - half


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    lo, hi = 1.9, 2.05  # df > 30: bisection on the cdf
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df, 400) < 0.975 else (lo, mid)
    return (lo + hi) / 2


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
    std = sample_std(diffs)
    half = None if std is None else t975(len(diffs) - 1) * std / math.sqrt(len(diffs))
    return Paired(seeds, diffs, mean(diffs), half)


def epochs_to(run: Run, threshold: float) -> int | None:
    """The first epoch whose test accuracy is >= threshold, or None."""
    return next((m["epoch"] for m in run.metrics if m["test_acc"] >= threshold), None)


@dataclass
class Summary:
    """One variant's numbers over the runs they rest on."""

    variant: Variant
    runs: list[Run]  # finished runs, or (partial=True) unfinished ones when none finished
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


def summarise(variant: Variant) -> Summary:
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
