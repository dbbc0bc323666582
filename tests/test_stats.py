"""A study's family of comparisons (normlab.reports.stats): Welch's and one-sample t against
scipy, Holm's adjustment against hand-worked values, and the smallest resolvable effect
against the power scipy's noncentral t gives."""

from __future__ import annotations

import math

import pytest
import scipy.stats

from normlab.reports.stats import ALPHA, POWER, holm, one_sample, welch


def test_holm_adjusts_step_down_and_keeps_the_order():
    family = [one_sample(name, [0.0, 1.0]) for name in "abcd"]  # placeholders: p set below
    for c, p in zip(family, (0.01, 0.04, 0.03, 0.005), strict=True):
        c.p = p
    holm(family)
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 -> max(0.06, 0.04)
    assert [c.p_holm for c in family] == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert [c.significant for c in family] == [True, False, False, True]
    assert {c.family for c in family} == {4}


def test_an_untested_comparison_is_not_counted_in_the_family():
    family = [one_sample("one seed", [1.0]), one_sample("x", [1.0, 1.2, 0.9])]
    holm(family)
    assert family[0].p is None and family[0].p_holm is None and not family[0].significant
    assert family[0].direction == "untested"
    assert family[1].family == 1 and family[1].p_holm == pytest.approx(family[1].p)


def test_welch_and_one_sample_are_scipys():
    a, b = [1.0, 1.4, 0.8, 1.1], [0.2, 0.9, 0.1]
    c = welch("a − b", a, b)
    ref = scipy.stats.ttest_ind(a, b, equal_var=False)
    assert c.p == pytest.approx(ref.pvalue)
    assert c.interval == pytest.approx(tuple(ref.confidence_interval(0.95)))
    assert c.estimate == pytest.approx(sum(a) / 4 - sum(b) / 3) and c.seeds == 3
    d = one_sample("d", [0.3, 0.5, 0.1, 0.4])
    ref = scipy.stats.ttest_1samp([0.3, 0.5, 0.1, 0.4], 0.0)
    assert d.p == pytest.approx(ref.pvalue)
    assert d.interval == pytest.approx(tuple(ref.confidence_interval(0.95)))
    assert d.direction == "none"  # not yet adjusted: no Holm p, so not called


@pytest.mark.parametrize("n, family", [(3, 1), (3, 5), (6, 5), (12, 8)])
def test_the_resolvable_effect_is_found_with_the_stated_power(n, family):
    """At a true difference equal to ``resolvable``, a one-sample t at Holm's strictest level
    rejects with 80% power (scipy's noncentral t, the other tail included)."""
    values = [0.1 * k for k in range(n)]
    c = one_sample("d", values)
    c.family = family
    df = n - 1
    level = ALPHA / family
    crit = scipy.stats.t.ppf(1 - level / 2, df)
    delta = c.resolvable / c.se  # the noncentrality at that true difference
    power = scipy.stats.nct.sf(crit, df, delta) + (
        scipy.stats.nct.cdf(-crit, df, delta) if n > 3 else 0.0)  # (nan where negligible)
    assert power == pytest.approx(POWER, abs=1e-6)
    # more comparisons, a stricter level: a larger effect needed
    wider = one_sample("d", values)
    wider.family = family + 1
    assert wider.resolvable > c.resolvable
    assert c.resolvable > c.se * math.sqrt(2)  # and more than the noise of one seed pair


def test_a_paired_difference_resolves_what_a_one_sample_t_on_its_differences_does():
    """Paired.resolvable is the one-sample t's on the same differences, at the same family
    size; the Statistics sentence states the range over a family, per unit."""
    from normlab.reports.stats import family_note, paired_difference

    a, b = {1: 1.0, 2: 2.5, 3: 0.7, 4: 1.9}, {1: 0.4, 2: 1.1, 3: 0.9, 4: 0.8}
    p = paired_difference(a, b)
    c = one_sample("d", [a[s] - b[s] for s in a])
    holm([p, c])  # a family of two: both at ALPHA / 2 at the strictest
    assert p.family == c.family == 2
    assert p.resolvable == pytest.approx(c.resolvable, rel=1e-9)
    q = paired_difference({1: 5.0, 2: 7.0, 3: 4.0}, {1: 1.0, 2: 2.0, 3: 2.5})
    holm([p, q])
    note = family_note([p, q], "two things", lambda x: "points" if x is p else "loss")
    assert (f"the smallest difference they resolve with 80% power at Holm's strictest "
            f"level: {p.resolvable:.3g} points; {q.resolvable:.3g} loss") in note
    assert "Seeds per comparison: 3–4" in note
    assert paired_difference({1: 1.0}, {1: 0.0}).resolvable is None


def test_the_seeds_an_effect_needs_resolve_it():
    c = one_sample("d", [0.1, 0.5, -0.2, 0.3])  # mean 0.175, not significant at 4 seeds
    holm([c])
    assert not c.significant
    n = c.seeds_for(c.estimate)
    assert n > 4
    # at n seeds of the same spread, the effect is resolvable; at n - 1 it is not yet
    from normlab.reports.stats import resolvable

    sd = c.se * math.sqrt(4)
    assert resolvable(sd / math.sqrt(n), n - 1, ALPHA) <= c.estimate
    assert resolvable(sd / math.sqrt(n - 1), n - 2, ALPHA) > c.estimate
