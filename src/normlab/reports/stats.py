"""Statistics of a suite: mean ± sample std over seeds, paired Student-t intervals (scipy),
per-variant summaries.

scipy.stats (about half a second to import) is imported by the two functions that use it,
on first call: a suite's runner and its worker processes use only :func:`fmt_mean_std`."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from normlab.reports.collect import RunResults, VariantResults

ALPHA = 0.05  # the family-wise error rate a study's verdict holds
POWER = 0.8  # the power at which :attr:`Comparison.resolvable` is stated

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
    p: float | None = None  # the paired t test's two-sided p (None: one seed)
    p_holm: float | None = None  # set by holm() over the study's family
    family: int = 1

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
        """True if the difference is not resolved: its Holm-adjusted p (once :func:`holm`
        has seen its family; before, its own p, which is its 95% interval including 0) is
        0.05 or more. None when there is no interval."""
        if self.interval is None:
            return None
        p = self.p_holm if self.p_holm is not None else self.p
        return p is None or p >= ALPHA

    @property
    def direction(self) -> str:
        """'up', 'down' (resolved, by the sign of the mean), 'none' or 'untested'."""
        if self.within_noise is None:
            return "untested"
        return "none" if self.within_noise else "up" if self.mean > 0 else "down"

    @property
    def resolvable(self) -> float | None:
        """The smallest true difference these seeds find with 80% power at Holm's
        strictest level (``ALPHA / family``), as :attr:`Comparison.resolvable`; None with
        one seed."""
        if self.half_width is None:
            return None
        df = self.n - 1
        return resolvable(self.half_width / t975(df), df, ALPHA / self.family)


def paired_difference(a: dict[int, float], b: dict[int, float]) -> Paired | None:
    """Pair two {seed: value} maps by seed; None if they share no seed."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    half = p = None
    if len(diffs) > 1:  # scipy's paired t-test: its 95% interval of the mean difference
        half, p = 0.0, (1.0 if mean(diffs) == 0 else 0.0)
        if sample_std(diffs):  # (identical differences have no spread: a zero-width interval)
            import scipy.stats

            result = scipy.stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds])
            low, high = result.confidence_interval(0.95)
            half, p = float(high - low) / 2, float(result.pvalue)
    return Paired(seeds, diffs, mean(diffs), half, p)


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


# ----------------------------------------------------------------- a family of comparisons



@dataclass
class Comparison:
    """One test of a study's family: an estimated difference with its 95% interval, its
    two-sided p-value, and, once :func:`holm` has seen the family, its Holm-adjusted
    p-value. ``resolvable`` is the smallest true difference these seeds would find with
    80% power at Holm's strictest level (``ALPHA / m``, m the family's size): an effect
    smaller than that can be there and still not show."""

    name: str
    estimate: float
    interval: tuple[float, float] | None  # None: fewer than two seeds, no test
    p: float | None
    seeds: int  # the seeds the estimate rests on (the fewer of two groups)
    se: float | None = None  # the estimate's standard error
    df: float | None = None
    p_holm: float | None = None
    family: int = 1  # m, set by holm()

    @property
    def tested(self) -> bool:
        return self.p is not None

    @property
    def significant(self) -> bool:
        """Whether the difference is not 0 with the family-wise error held at ALPHA."""
        return self.p_holm is not None and self.p_holm < ALPHA

    @property
    def direction(self) -> str:
        """'up', 'down' (significant, by the estimate's sign), 'none' or 'untested'."""
        if not self.tested:
            return "untested"
        if not self.significant:
            return "none"
        return "up" if self.estimate > 0 else "down"

    @property
    def resolvable(self) -> float | None:
        if self.se is None or self.df is None:
            return None
        if self.se == 0:
            return 0.0
        return resolvable(self.se, self.df, ALPHA / self.family)


    def seeds_for(self, effect: float, most: int = 1000) -> int | None:
        """About how many seeds would resolve a true difference of ``effect`` with 80%
        power at this family's strictest level: the standard error shrinks as 1/sqrt(n),
        the degrees of freedom grow as n does. None beyond ``most``."""
        if self.se is None or self.df is None or self.seeds < 2 or not effect:
            return None
        for n in range(self.seeds, most + 1):
            se = self.se * math.sqrt(self.seeds / n)
            df = self.df * (n - 1) / (self.seeds - 1)
            if resolvable(se, df, ALPHA / self.family) <= abs(effect):
                return n
        return None


def holm_text(c: Comparison) -> str:
    """``Holm p = 0.012`` (or ``< 0.001``) of a tested comparison."""
    return "Holm p < 0.001" if c.p_holm < 0.001 else f"Holm p = {c.p_holm:.3f}"


def claim_text(c: Comparison, yes: str, opposite: str,
               value: Callable[[float], str] = lambda x: f"{x:+.2f}", note: str = "") -> str:
    """A paper's claim tested: ``c``'s estimate over its seeds with its 95% interval and
    Holm p, then **yes** (resolved up), **opposite** (resolved down) or **not resolved**
    with the smallest difference its seeds resolve; each number written by ``value``,
    ``note`` (``"; ..."``) closing the parenthesis."""
    if not c.tested:
        return f"{c.name}: {value(c.estimate)} on one seed, not tested (--seeds 3 or more)."
    lo, hi = c.interval
    head = (f"{c.name}: {value(c.estimate)} over {c.seeds} seeds (95% interval "
            f"[{value(lo)}, {value(hi)}], {holm_text(c)}")
    if c.direction == "up":
        return head + f"{note}): **{yes}**."
    if c.direction == "down":
        return head + f"{note}): **{opposite}**."
    r = c.resolvable
    size = f"; these seeds resolve {value(r).lstrip('+')} or more" if r is not None else ""
    return head + f"{size}{note}): **not resolved**."


def resolvable(se: float, df: float, level: float, power: float = POWER) -> float:
    """The true difference a two-sided t test at ``level`` (standard error ``se``, ``df``
    degrees of freedom) finds with ``power``: solved on the noncentral t's power, exact at
    any df (the normal shortcut, (t_crit + t_power) x se, is 10% low at 2 df)."""
    import scipy.optimize
    import scipy.stats

    crit = float(scipy.stats.t.ppf(1 - level / 2, df))

    def shortfall(delta: float) -> float:
        low = scipy.stats.nct.cdf(-crit, df, delta)  # the other tail: nan where negligible
        return float(scipy.stats.nct.sf(crit, df, delta)) + (
            0.0 if math.isnan(low) else float(low)) - power

    delta = scipy.optimize.brentq(shortfall, 0.0, 10 * crit + 10)
    return delta * se


def welch(name: str, a: list[float], b: list[float]) -> Comparison:
    """mean(a) − mean(b), unpaired (Welch's t: unequal variances)."""
    estimate = mean(a) - mean(b)
    if len(a) < 2 or len(b) < 2:
        return Comparison(name, estimate, None, None, min(len(a), len(b)))
    va, vb = sample_std(a) ** 2 / len(a), sample_std(b) ** 2 / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return Comparison(name, estimate, (estimate, estimate), 0.0 if estimate else 1.0,
                          min(len(a), len(b)), 0.0, float(len(a) + len(b) - 2))
    import scipy.stats

    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    result = scipy.stats.ttest_ind(a, b, equal_var=False)
    ci = result.confidence_interval(0.95)
    return Comparison(name, estimate, (float(ci.low), float(ci.high)), float(result.pvalue),
                      min(len(a), len(b)), se, df)


def one_sample(name: str, values: list[float]) -> Comparison:
    """mean(values) against 0 (Student's t): a paired difference, one value per seed."""
    estimate = mean(values)
    if len(values) < 2:
        return Comparison(name, estimate, None, None, len(values))
    std = sample_std(values)
    df = float(len(values) - 1)
    if std == 0:
        return Comparison(name, estimate, (estimate, estimate), 0.0 if estimate else 1.0,
                          len(values), 0.0, df)
    import scipy.stats

    result = scipy.stats.ttest_1samp(values, 0.0)
    ci = result.confidence_interval(0.95)
    return Comparison(name, estimate, (float(ci.low), float(ci.high)), float(result.pvalue),
                      len(values), std / math.sqrt(len(values)), df)


def holm(family: list) -> list:
    """Holm's step-down adjustment over the tested comparisons of ``family`` (in place;
    returned): sorted by p, the i-th smallest (from 0) is multiplied by m − i, and the
    adjusted values are made non-decreasing. Rejecting where the adjusted p < ALPHA holds
    the probability of any false finding in the family at ALPHA (Holm 1979). Members are
    :class:`Comparison` or :class:`Paired` (None, and one-seed members, are left out)."""
    tested = sorted((c for c in family if c is not None and c.p is not None),
                    key=lambda c: c.p)
    m = len(tested)
    running = 0.0
    for i, c in enumerate(tested):
        running = max(running, min(1.0, (m - i) * c.p))
        c.p_holm = running
        c.family = m
    return family


def family_note(family: list, what: str, unit: str | Callable[[Any], str] = "") -> str | None:
    """The "**Statistics.**" sentence of a study whose verdict rests on ``family`` (Holm-
    adjusted :class:`Paired` or :class:`Comparison` members; untested ones not counted),
    ``what`` saying what each comparison is, and the smallest difference its seeds resolve
    (the range over the comparisons, in ``unit``: a word, or a function giving each
    comparison's, for a family of several kinds); None when nothing was tested."""
    tested = [c for c in family if c is not None and c.p is not None]
    if not tested:
        return None
    seeds = sorted({getattr(c, "n", None) or c.seeds for c in tested})
    counts = str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}–{seeds[-1]}"
    sizes: dict[str, list[float]] = {}
    for c in tested:
        if c.resolvable is not None:
            sizes.setdefault(unit(c) if callable(unit) else unit, []).append(c.resolvable)
    resolve = "; ".join(
        (f"{min(v):.3g}" if min(v) == max(v) else f"{min(v):.3g} to {max(v):.3g}")
        + (f" {u}" if u else "") for u, v in sizes.items())
    return (f"**Statistics.** {len(tested)} comparisons in one family ({what}), "
            f"Holm-adjusted: a difference is called only where its adjusted p is below "
            f"{ALPHA:g}, which holds the chance of any false call in the family at 5%. Seeds "
            f"per comparison: {counts}"
            + (f"; the smallest difference they resolve with {POWER:.0%} power at Holm's "
               f"strictest level: {resolve}" if resolve else "")
            + "; more seeds (`--seeds N`, or Ray) resolve smaller differences.")
