"""The written analysis, generated from the numbers (never hand-written), as doc blocks."""

from __future__ import annotations

import dataclasses
from itertools import combinations, pairwise

from normlab.models import ModelConfig, norm_spec
from normlab.reports.collect import (
    FAILED,
    FINISHED,
    MISSING,
    UNFINISHED,
    SuiteResults,
    VariantResults,
)
from normlab.reports.doc import Block, Bullets, Heading, Para, Table
from normlab.reports.stats import Paired, Summary, fmt_mean_std, holm, paired_difference
from normlab.training.config import RunConfig
from normlab.training.rundir import CHANCE_ACC

# The seed study's published numbers (REFERENCE.md): one run each, MNIST, seed protocol.
# (title, the config it corresponds to, best, final). Its L1 runs carried the L1 bug.
SEED_RESULTS = (
    ("BN only", RunConfig(), 99.38, 99.36),
    ("GN only (2 groups)", RunConfig(model=ModelConfig(norms=("gn",), groups=2)), 99.22, 99.21),
    ("LN only", RunConfig(model=ModelConfig(norms=("ln",))), 99.36, 99.36),
    ("BN + L1 λ=0.01 (buggy L1)", RunConfig(l1=0.01), 11.35, 9.80),
    ("BN + L1 λ=0.001 (buggy L1)", RunConfig(l1=0.001), 92.70, 92.70),
)
COMMON_RANDOM_NUMBERS = (
    "Variants of one suite see **identical data order and augmentation for the same seed** "
    "(common random numbers): seed k shuffles and rotates the training images the same way "
    "for every variant, so comparisons are paired by seed and the pairing is fair."
)


def signed(x: float) -> str:
    """+0.12 / -0.12, and 0.00 (never -0.00) for what rounds to zero."""
    text = f"{x:+.2f}"
    return "0.00" if text in ("+0.00", "-0.00") else text


def describe_pair(p: Paired, first: str, second: str) -> tuple[str, str]:
    """(interval text, verdict) for the paired difference first - second, in points: a
    verdict only where the Holm-adjusted p (over the section's pairs) is below 0.05."""
    if p.half_width is None:
        return "—", "a single observation (one seed), no interval possible"
    lo, hi = p.interval
    adjusted = p.p_holm if p.p_holm is not None else p.p
    holm_p = "Holm p < 0.001" if adjusted < 0.001 else f"Holm p = {adjusted:.3f}"
    verdict = f"not resolved ({holm_p})" if p.within_noise else (
        f"{first if p.mean > 0 else second} is better ({holm_p})")
    return f"[{signed(lo)}, {signed(hi)}]", verdict


def _runs_section(suite: SuiteResults) -> list[Block]:
    done = suite.by_state(FINISHED)
    items = [f"{len(done)} of {len(suite.runs)} runs finished."]
    for r in suite.by_state(FAILED):
        v = _variant(suite, r.variant)
        items.append(f"{v.label} seed {r.seed}: **failed** ({r.run.failure()}); rerunning the "
                     "suite retries it.")
    for r in suite.by_state(UNFINISHED):
        v = _variant(suite, r.variant)
        state = "**training**" if r.training else "**unfinished**"
        items.append(f"{v.label} seed {r.seed}: {state} ({r.progress(v.epochs)}); its curves "
                     "are shown so far, it is left out of the comparisons.")
    for r in suite.by_state(MISSING):
        v = _variant(suite, r.variant)
        items.append(f"{v.label} seed {r.seed}: **missing** (not started).")
    return [Heading("Runs"), Bullets(items)]


def _variant(suite: SuiteResults, name: str) -> VariantResults:
    return next(v for v in suite.variants if v.name == name)


def ranked(summaries: list[Summary]) -> list[Summary]:
    done = [s for s in summaries if s.runs and not s.partial]
    return sorted(done, key=lambda s: -sum(s.final_acc) / len(s.final_acc))


def _ranking_section(summaries: list[Summary]) -> list[Block]:
    order = ranked(summaries)
    blocks: list[Block] = [Heading("Ranking by final test accuracy")]
    if not order:
        return [*blocks, Para("No variant has a finished run yet.")]
    rows = [[str(i + 1), s.variant.label, fmt_mean_std(s.final_acc), fmt_mean_std(s.best_acc),
             str(len(s.runs))] for i, s in enumerate(order)]
    blocks.append(Table(["rank", "variant", "final test acc %", "best test acc %", "seeds"],
                        rows, align="rlrrr"))
    pending = [s.variant.label for s in summaries if s not in order]
    if pending:
        blocks.append(Para(f"Not ranked (no finished run yet): {', '.join(pending)}."))
    return blocks


ALL_PAIRS_UP_TO = 12  # variants; a larger suite compares neighbours in the ranking


def _pairs_section(summaries: list[Summary]) -> list[Block]:
    order = ranked(summaries)
    if len(order) < 2:
        return []
    rows, lead = [], None
    every = len(order) <= ALL_PAIRS_UP_TO
    pairs = combinations(order, 2) if every else pairwise(order)
    found = [(a, b, paired_difference(a.final_by_seed, b.final_by_seed)) for a, b in pairs]
    holm([p for _, _, p in found])  # every pair of the table, one family
    for a, b, p in found:
        if p is None:
            rows.append([f"{a.variant.label} − {b.variant.label}", "0", "—", "—", "no common seed"])
            continue
        interval, verdict = describe_pair(p, a.variant.label, b.variant.label)
        rows.append([f"{a.variant.label} − {b.variant.label}", str(p.n), signed(p.mean),
                     interval, verdict])
        if lead is None:
            lead = (a, b, p)
    blocks: list[Block] = [
        Heading("Paired differences in final test accuracy"),
        Para("Each difference is first minus second, in accuracy points, paired by seed; the "
             "interval is the 95% Student-t interval of the mean paired difference "
             "(mean ± t(0.975, n−1) · sd / √n); same seed = same data order and augmentation. "
             "A pair is called only where its Holm-adjusted p, over every pair of the table "
             "as one family, is below 0.05: that holds the chance of any false call at 5%."),
        Table(["pair", "seeds", "mean difference", "95% interval", "verdict"], rows, "lrrrl"),
    ]
    if not every:
        n = len(order)
        blocks.insert(2, Para(f"{n} ranked variants make {n * (n - 1) // 2} pairs: over "
                              f"{ALL_PAIRS_UP_TO} variants, each is compared with the next in "
                              "the ranking only."))
    if lead is not None:
        a, b, p = lead
        head = f"{a.variant.label} ranks first, {signed(p.mean)} points ahead of {b.variant.label}"
        if p.half_width is None:
            text = (f"{head}, but on one seed this is a single observation: no interval is "
                    "possible and the ranking is not evidence that one is better.")
        elif p.within_noise:
            text = (f"{head}; with the family-wise error held by Holm this lead is not "
                    "resolved: it can be seed-to-seed noise.")
        else:
            text = f"{head}, resolved with the family-wise error held by Holm."
        blocks.append(Para(text))
    return blocks


def _health_section(suite: SuiteResults) -> list[Block]:
    items = []
    for r in suite.runs:
        label = f"{_variant(suite, r.variant).label} seed {r.seed}"
        if r.diverged:
            msg = next(m.get("message", "") for m in r.metrics if m.get("status") == "diverged")
            items.append(f"{label} **diverged**: {msg}")
        elif r.final and r.final["test_acc"] < CHANCE_ACC:
            items.append(f"{label} **sits at chance**: final test accuracy "
                         f"{r.final['test_acc']:.2f}% after epoch {r.final['epoch']}.")
    if not items:
        items = ["No run diverged and none sits at chance "
                 f"(final test accuracy < {CHANCE_ACC:g}%)."]
    return [Heading("Divergence and chance-level runs"), Bullets(items)]


def _same_but_l1(a: RunConfig | None, b: RunConfig | None) -> bool:
    if a is None or b is None:
        return False
    return dataclasses.replace(a, l1=0.0, l1_scope="all") == dataclasses.replace(
        b, l1=0.0, l1_scope="all")


def _l1_section(suite: SuiteResults, by_name: dict[str, Summary]) -> list[Block]:
    l1_variants = [v for v in suite.variants if v.l1 > 0]
    if not l1_variants:
        return []
    items, compared = [], []
    for v in l1_variants:
        base = next((b for b in suite.variants if b.l1 == 0 and _same_but_l1(b.config, v.config)),
                    None)
        if base is None:
            items.append(f"{v.label}: no variant without L1 and otherwise the same options.")
            continue
        s, sb = by_name[v.name], by_name[base.name]
        if s.partial or sb.partial or not s.runs or not sb.runs:
            items.append(f"{v.label} vs {base.label}: waiting for finished runs of both.")
            continue
        p = paired_difference(s.final_by_seed, sb.final_by_seed)
        if p is None:
            items.append(f"{v.label} vs {base.label}: no seed finished for both.")
            continue
        compared.append((v, base, s, sb, p))
    holm([c[-1] for c in compared])  # the L1 comparisons, one family
    for v, base, s, sb, p in compared:
        interval, verdict = describe_pair(p, v.label, base.label)
        where = f" over {p.n} seeds, 95% interval {interval}" if p.n > 1 else ""
        name = v.label if "λ" in v.label or f"{v.l1:g}" in v.label else f"{v.label} (λ={v.l1:g})"
        items.append(
            f"{name} vs {base.label}: final {fmt_mean_std(s.final_acc)}% vs "
            f"{fmt_mean_std(sb.final_acc)}%, paired difference {signed(p.mean)} points"
            f"{where}: {verdict}.")
    return [Heading("L1 compared with the same model without L1"), Bullets(items)]


def _seed_model(v: VariantResults, want: RunConfig) -> bool:
    """Whether ``v`` is the seed study's ``want`` (its protocol, data, dropout), any seed;
    the group count matters only for a grouped norm (GN), and how the same model is computed
    (the dropout draw, the kernels, the precision, what rotates the images) not at all."""
    if v.config is None:
        return False
    model = v.config.model
    grouped = any(norm_spec(n).grouped for n in model.norms)
    groups = model.groups if grouped else want.model.groups
    same_model = dataclasses.replace(model, groups=groups, dropout_draw=want.model.dropout_draw,
                                     kernels=want.model.kernels,
                                     eval_kernels=want.model.eval_kernels)
    mine = dataclasses.replace(v.config, seed=want.seed, precision=want.precision,
                               augment=want.augment, model=same_model)
    return mine == want


def _seed_section(suite: SuiteResults, by_name: dict[str, Summary]) -> list[Block]:
    if suite.dataset != "mnist":
        return []
    rows = []
    for title, want, _best, final in SEED_RESULTS:
        v = next((v for v in suite.variants if _seed_model(v, want)), None)
        s = by_name.get(v.name) if v else None
        if s is None or s.partial or not s.runs:
            continue
        ours = sum(s.final_acc) / len(s.final_acc)
        rows.append([title, f"{final:.2f}", v.label, fmt_mean_std(s.final_acc), str(len(s.runs)),
                     signed(ours - final)])
    if not rows:
        return []
    bn, ln = SEED_RESULTS[0][3], SEED_RESULTS[2][3]
    return [
        Heading("Compared with the seed study"),
        Para("The seed study (MNIST, the same protocol) published one run per model. Its final "
             "test accuracies beside this suite's, for the variants run with the seed's protocol:"),
        Table(["seed model", "seed final %", "this suite", "final % here", "seeds",
               "here − seed"], rows, "lrlrrr"),
        Para(f"The seed concluded that LN was best. That rested on one run per model and a lead "
             f"of {ln - bn:.2f} points over BN ({ln:.2f} vs {bn:.2f}): a single observation with "
             "no interval, not evidence of a difference; see the paired differences above."),
        Para("The seed's L1 runs added the penalty inside the loop over parameters, many times "
             "over, which drove the weights to zero; this suite adds lambda · Σ|w| once per step, "
             "so its L1 numbers are not comparable to the seed's buggy ones."),
    ]


COMPUTED = {"fp32": "in fp32", "bf16": "in bf16 autocast",
            ("normlab", "normlab"): "normlab's ReLU → norm kernels (in training and the test "
                                    "passes)",
            ("normlab", "aten"): "normlab's ReLU → norm kernels in training and torch's ReLU "
                                 "and norms in the test passes",
            ("aten", "aten"): "torch's ReLU and norms"}
ROTATED = {"normlab": "normlab's rotation kernel", "aten": "torch's ops"}


def _computed(suite: SuiteResults) -> str:
    """How the runs computed their models and inputs ("Computed in bf16 autocast with
    normlab's ReLU → norm kernels (in training and the test passes), the training images
    rotated by normlab's rotation kernel. "), per variant where the variants differ; ""
    without configs."""
    ways = {v.label: f"{COMPUTED[v.config.precision]} with "
                     f"{COMPUTED[v.config.model.kernels, v.config.model.eval_kernels]}, "
                     f"the training images rotated by {ROTATED[v.config.augment]}"
            for v in suite.variants if v.config is not None}
    if not ways:
        return ""
    if len(set(ways.values())) == 1:
        return f"Computed {next(iter(ways.values()))}. "
    return "Computed " + "; ".join(f"{label}: {way}" for label, way in ways.items()) + ". "


def analysis_blocks(suite: SuiteResults, summaries: list[Summary], standalone: bool = True,
                    ) -> list[Block]:
    """The analysis; ``standalone=False`` leaves out the title and description (for the
    report page, which has its own)."""
    by_name = {s.variant.name: s for s in summaries}
    protocols = sorted({v.config.protocol.name if v.config else "?" for v in suite.variants})
    intro: list[Block] = []
    if standalone:
        intro.append(Heading(f"Analysis: {suite.name}", 1))
        if suite.description:
            intro.append(Para(suite.description))
    intro.append(Para(
        f"Dataset {suite.dataset}, protocol {', '.join(protocols)}, seeds "
        f"{', '.join(map(str, suite.seeds)) or '—'}. {_computed(suite)}Accuracies are test "
        "accuracies in %, given as mean ± sample standard deviation over seeds (the single "
        "value when one seed finished). " + COMMON_RANDOM_NUMBERS))
    return [
        *intro,
        *_runs_section(suite),
        *_ranking_section(summaries),
        *_pairs_section(summaries),
        *_health_section(suite),
        *_l1_section(suite, by_name),
        *_seed_section(suite, by_name),
    ]
