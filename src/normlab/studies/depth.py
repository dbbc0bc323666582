"""Depth: which norms let a deep network train, He et al.'s degradation, and residual nets
without a norm.

He, Zhang, Ren & Sun (CVPR 2016, "Deep Residual Learning for Image Recognition", Figures 1
and 6): a deeper plain stack trains to a *higher* training loss than a shallower one (the
degradation problem, not overfitting), and the ResNet of the same depth does not. De &
Smith (NeurIPS 2020, "Batch Normalization Biases Residual Blocks Towards the Identity
Function in Deep Networks"): a residual net trains without any norm once every block starts
as the identity (SkipInit; Fixup, Zhang, Dauphin & Ma 2019, likewise), at smaller learning
rates than BN allows.

A suite is this study when it has the ``plain`` and ``resnet`` nets at two depths or more,
with BN and without a norm, otherwise alike (but for the norm, the learning rate, the depth
and the ResNet's ``residual_init``). A *line* is one net (plain, ResNet, ResNet + SkipInit,
ResNet + Fixup) with one norm at one learning rate, over depths. Each run's number is its
last epoch's mean training loss. A run *trains* when it finished without diverging and that
loss is at least 0.5 below chance's ln 10 (a short budget's mean loss includes its first
steps, near chance even for a net that trains well: the margin says it learnt); a line's
*trainable depth* is the deepest depth at which every seed trains, every shallower depth
training too.

The family, Holm-adjusted as one: per line of the plain net and of the ResNet, the deepest
depth's loss minus the shallowest's (He et al.: up for plain, not up for the ResNet); per
normalizer-free residual line, its loss at the deepest depth minus the ResNet with BN's at
BN's learning rate. Each is a one-sample t on the per-seed differences (the runs of a seed
see the same batches in the same order).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from normlab.reports.collect import SuiteResults, VariantResults
from normlab.reports.doc import Block, Bullets, Heading, Para, Table
from normlab.reports.figures import EXTRA_COLOURS, NORM_COLOURS, NORM_ORDER, figure_section
from normlab.reports.page import Image
from normlab.reports.stats import Comparison, claim_text, family_note, holm, one_sample

TITLE = "Depth: how deep each norm trains"
FIGURE = "depth.png"
CHANCE = math.log(10)  # the training loss of a network that has learnt nothing
TRAINS_BELOW = CHANCE - 0.5  # a run trains when its last epoch's training loss is below this
HE = ("He et al. 2016 (Figures 1 and 6, CIFAR-10): the plain net's training error rises "
      "from 20 to 56 layers (the degradation problem: deeper is worse on the training set, "
      "not only on the test set); the ResNet's falls as it gets deeper.")
DE_SMITH = ("De & Smith 2020: a residual network without normalization trains once each "
            "residual branch starts at zero, so that every block is the identity (SkipInit; "
            "Fixup likewise), but at smaller learning rates than BN allows.")
CLAIM = f"{HE} {DE_SMITH}"
ARCHS = ("plain", "resnet", "skipinit", "fixup")
ARCH_LABELS = {"plain": "plain", "resnet": "ResNet", "skipinit": "ResNet + SkipInit",
               "fixup": "ResNet + Fixup"}
INIT_COLOURS = {"skipinit": EXTRA_COLOURS[0], "fixup": "#8c564b"}


def _norm_label(norm: str) -> str:
    from normlab.models.norms import norm_spec

    return norm_spec(norm).label


@dataclass
class Point:
    """One line at one depth: per seed, the last epoch's mean training loss and whether the
    run diverged."""

    variant: VariantResults
    depth: int
    loss: dict[int, float]
    diverged: set[int]

    def trains(self) -> dict[int, bool]:
        return {s: s not in self.diverged and math.isfinite(x) and x < TRAINS_BELOW
                for s, x in self.loss.items()}

    def finite(self) -> dict[int, float]:
        return {s: x for s, x in self.loss.items() if math.isfinite(x)}

    def text(self) -> str:
        finite = list(self.finite().values())
        if not self.loss:
            return "—"
        trains = sum(self.trains().values())
        head = (f"{np.mean(finite):.2f}" + (f" ± {np.std(finite, ddof=1):.2f}"
                                            if len(finite) > 1 else "")) if finite else "nan"
        return f"{head} ({trains}/{len(self.loss)})"


@dataclass
class Line:
    """One net with one norm at one learning rate, over depths."""

    arch: str
    norm: str
    lr: float
    points: dict[int, Point] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if self.arch in ("skipinit", "fixup"):
            return f"{ARCH_LABELS[self.arch]}, lr {self.lr:g}"
        return f"{ARCH_LABELS[self.arch]}, {_norm_label(self.norm)}, lr {self.lr:g}"

    @property
    def depths(self) -> list[int]:
        return sorted(d for d, p in self.points.items() if p.loss)

    def trainable_depth(self) -> int | None:
        """The deepest depth at which every seed trains, every shallower depth too (None:
        not the shallowest)."""
        best = None
        for d in self.depths:
            if not all(self.points[d].trains().values()):
                break
            best = d
        return best


@dataclass
class Study:
    lines: list[Line]
    depths: list[int]
    variant: VariantResults  # one of them, for the setup

    def line(self, arch: str, norm: str, lr: float | None = None) -> Line | None:
        return next((x for x in self.lines if x.arch == arch and x.norm == norm
                     and (lr is None or x.lr == lr)), None)


def _arch(v: VariantResults) -> str | None:
    m = v.config.model
    if m.net == "plain":
        return "plain"
    if m.net == "resnet":
        init = m.net_options.get("residual_init", "standard")
        return "resnet" if init == "standard" else init if init in ARCHS else None
    return None


def _depth(v: VariantResults) -> int:
    from normlab.models.nets import net_spec

    return int(net_spec(v.config.model.net).options(v.config.model.net_options)["depth"])


def _key(v: VariantResults) -> str:
    d = v.config.to_dict()
    d.pop("seed", None)
    d["protocol"].pop("lr", None)
    model = {k: x for k, x in d["model"].items() if k not in ("norm", "net")}
    model["net_options"] = {k: x for k, x in model.get("net_options", {}).items()
                            if k not in ("depth", "residual_init")}
    d["model"] = model
    return json.dumps(d, sort_keys=True)


def _point(v: VariantResults, depth: int) -> Point:
    done = [r for r in v.finished if r.metrics]
    return Point(v, depth, {r.seed: float(r.final["train_loss"]) for r in done},
                 {r.seed for r in done if r.diverged})


def find_study(suite: SuiteResults) -> Study | None:
    """The plain and ResNet lines over depths, with BN and without a norm; else None."""
    candidates = [v for v in suite.variants if v.config is not None
                  and len(v.config.model.norms) == 1 and _arch(v) is not None]
    groups: dict[str, list[VariantResults]] = {}
    for v in candidates:
        groups.setdefault(_key(v), []).append(v)
    best = None
    for members in groups.values():
        lines: dict[tuple, Line] = {}
        for v in members:
            arch, norm, lr = _arch(v), v.config.model.norms[0], v.config.protocol.lr
            depth = _depth(v)
            lines.setdefault((arch, norm, lr), Line(arch, norm, lr)).points[depth] = _point(
                v, depth)
        deep = {k for k, x in lines.items() if len(x.points) >= 2}
        if not all(any(k[0] == arch and k[1] == norm for k in deep)
                   for arch in ("plain", "resnet") for norm in ("bn", "none")):
            continue
        if best is None or len(lines) > len(best[0]):
            best = (lines, members)
    if best is None:
        return None
    lines, members = best
    order = {n: i for i, n in enumerate(NORM_ORDER)}
    ordered = sorted((x for x in lines.values() if len(x.points) >= 2),
                     key=lambda x: (ARCHS.index(x.arch), order.get(x.norm, 99), -x.lr))
    depths = sorted({d for x in ordered for d in x.points})
    return Study(ordered, depths, members[0])


# ----------------------------------------------------------------------------- tests


@dataclass
class Test:
    """One comparison of the family: ``line`` from its shallowest to its deepest depth
    (``reference`` None), or ``line`` against ``reference`` at one depth."""

    line: Line
    reference: Line | None
    low: int
    high: int
    comparison: Comparison | None  # None: no seed with a finite loss at both ends
    dropped: int  # seeds left out: a loss that is nan or inf (a diverged run)


def _paired(name: str, a: Point, b: Point) -> tuple[Comparison | None, int]:
    fa, fb = a.finite(), b.finite()
    seeds = sorted(set(a.loss) & set(b.loss))
    both = [s for s in seeds if s in fa and s in fb]
    values = [fa[s] - fb[s] for s in both]
    return (one_sample(name, values) if values else None), len(seeds) - len(both)


def degradation(line: Line) -> Test | None:
    depths = line.depths
    if len(depths) < 2:
        return None
    low, high = depths[0], depths[-1]
    c, dropped = _paired(f"{line.label}: depth {high} − {low}", line.points[high],
                         line.points[low])
    return Test(line, None, low, high, c, dropped)


def against_bn(line: Line, bn: Line) -> Test | None:
    common = sorted(set(line.depths) & set(bn.depths))
    if not common:
        return None
    d = common[-1]
    c, dropped = _paired(f"{line.label} − ResNet, BN, lr {bn.lr:g} at depth {d}",
                         line.points[d], bn.points[d])
    return Test(line, bn, d, d, c, dropped)


@dataclass
class Tests:
    degradation: list[Test]
    normfree: list[Test]

    @property
    def family(self) -> list[Comparison]:
        return [t.comparison for t in self.degradation + self.normfree
                if t.comparison is not None]


def tests(study: Study) -> Tests:
    """The family (see the module), Holm-adjusted together."""
    deg = [t for x in study.lines if x.arch in ("plain", "resnet")
           and (t := degradation(x)) is not None]
    bn = max((x for x in study.lines if x.arch == "resnet" and x.norm == "bn"),
             key=lambda x: x.lr, default=None)
    free = []
    if bn is not None:
        free = [t for x in study.lines if x.norm == "none" and x.arch != "plain"
                and (t := against_bn(x, bn)) is not None]
    found = Tests(deg, free)
    holm(found.family)
    return found


# ----------------------------------------------------------------------------- words


def _pts(x: float) -> str:
    return f"{x:+.2f}"


def _names(items: list[str]) -> str:
    if not items:
        return "none"
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _test_text(t: Test, up: str, down: str) -> str:
    c = t.comparison
    dropped = (f"; {t.dropped} seed{'s' if t.dropped != 1 else ''} left out, "
               "its loss nan/inf" if t.dropped else "")
    if c is None:
        return f"{t.line.label}: not tested, every run's loss at an end is nan/inf (diverged)."
    if not c.tested:
        return f"{c.name}: {_pts(c.estimate)} on one seed{dropped}: no interval, not tested."
    return claim_text(c, up, down, _pts, dropped)


def _norm_of(t: Test) -> str:
    x = t.line
    return _norm_label(x.norm) + (f" (lr {x.lr:g})" if x.norm == "none" else "")


def he_verdict(found: Tests) -> str:
    """He et al.'s claim, per norm: the plain net's loss rises with depth, the ResNet's does
    not."""
    plain = {(t.line.norm, t.line.lr): t for t in found.degradation
             if t.line.arch == "plain" and t.comparison is not None and t.comparison.tested}
    res = {(t.line.norm, t.line.lr): t for t in found.degradation
           if t.line.arch == "resnet" and t.comparison is not None and t.comparison.tested}
    keys = [k for k in plain if k in res]
    if not keys:
        return ""
    shows = [k for k in keys if plain[k].comparison.direction == "up"
             and res[k].comparison.direction != "up"]
    word = "**Yes**" if len(shows) == len(keys) else "**Partly**" if shows else "**No**"
    t0 = plain[keys[0]]
    rises = [_norm_of(plain[k]) for k in keys if plain[k].comparison.direction == "up"]
    flat = [_norm_of(plain[k]) for k in keys if plain[k].comparison.direction == "none"]
    falls = [_norm_of(plain[k]) for k in keys if plain[k].comparison.direction == "down"]
    r_up = [_norm_of(res[k]) for k in keys if res[k].comparison.direction == "up"]
    r_down = [_norm_of(res[k]) for k in keys if res[k].comparison.direction == "down"]
    r_flat = [_norm_of(res[k]) for k in keys if res[k].comparison.direction == "none"]
    parts = [f"rises resolvably with {_names(rises)}"] if rises else []
    if flat:
        parts.append(f"does not change resolvably with {_names(flat)}")
    if falls:
        parts.append(f"falls with {_names(falls)}")
    res_parts = []
    if r_down:
        res_parts.append(f"falls with {_names(r_down)}")
    if r_flat:
        res_parts.append(f"does not change resolvably with {_names(r_flat)}")
    if r_up:
        res_parts.append(f"rises with {_names(r_up)}, against the claim")
    return (f"{word} (He et al.'s degradation, shown with {len(shows)} of {len(keys)} norms): "
            + f"from depth {t0.low} to {t0.high} the plain net's training loss "
            + "; it ".join(parts) + ". The ResNet's " + "; it ".join(res_parts) + ".")


def de_smith_verdict(study: Study, found: Tests) -> str:
    """Whether SkipInit and Fixup train at the deepest depth, and at which learning rates,
    against BN at its own."""
    deepest = study.depths[-1]
    bn = max((x for x in study.lines if x.arch == "resnet" and x.norm == "bn"),
             key=lambda x: x.lr, default=None)
    inits = [x for x in study.lines if x.arch in ("skipinit", "fixup")]
    if bn is None or not inits:
        return ""
    by_arch: dict[str, dict[float, bool]] = {}  # arch -> lr -> trains at the deepest depth
    for x in inits:
        by_arch.setdefault(x.arch, {})[x.lr] = x.trainable_depth() == deepest
    small = [a for a, got in by_arch.items() if any(ok for lr, ok in got.items() if lr < bn.lr)]
    at_bn = [a for a, got in by_arch.items() if got.get(bn.lr)]
    bn_trains = bn.trainable_depth() == deepest
    shown = [a for a in small if a not in at_bn and bn_trains]
    trains_any = [a for a, got in by_arch.items() if any(got.values())]
    word = ("**Yes**" if len(shown) == len(by_arch) else "**Partly**" if trains_any
            else "**No**")
    names = {a: ARCH_LABELS[a] for a in by_arch}
    text = (f"{word} (De & Smith): at depth {deepest}, "
            + ("; ".join(f"{names[a]} trains at lr "
                         + _names([f"{lr:g}" for lr, ok in sorted(got.items()) if ok])
                         if any(got.values()) else f"{names[a]} trains at no lr measured"
                         for a, got in by_arch.items()))
            + f"; BN {'trains' if bn_trains else 'does not train'} at lr {bn.lr:g}.")
    also = [names[a] for a in at_bn]
    if also:
        text += (f" {_names(also)} also train{'s' if len(also) == 1 else ''} at BN's lr "
                 f"{bn.lr:g}: that BN allows larger rates does not show on this grid, which "
                 f"goes no higher than {bn.lr:g}.")
    plain = study.line("resnet", "none")
    if plain is not None:
        got = [x for x in study.lines if x.arch == "resnet" and x.norm == "none"]
        ok = [f"{x.lr:g}" for x in got if x.trainable_depth() == deepest]
        text += (" The ResNet with no norm and the standard init trains at depth "
                 f"{deepest} at lr {_names(ok)}." if ok else
                 " The ResNet with no norm and the standard init trains at depth "
                 f"{deepest} at no lr measured.")
    return text


def _trainable_text(study: Study) -> str:
    parts = []
    for x in study.lines:
        d = x.trainable_depth()
        parts.append(f"{x.label} {d if d is not None else 'none'}")
    text = ("**Trainable depth** (the deepest at which every seed's last-epoch training loss "
            f"is below {TRAINS_BELOW:.2f}, 0.5 under chance's ln 10, without diverging, every "
            "shallower depth too): " + "; ".join(parts) + ".")
    short = [x.label for x in study.lines if x.points and not all(
        x.points[min(x.points)].trains().values())]
    if short:
        text += (f" **The budget is too short for {len(short)} of {len(study.lines)} lines:** "
                 f"{'; '.join(short)} do not train on every seed even at the shallowest "
                 "depth, "
                 "so what their deeper runs show is the budget, not depth. Train longer "
                 "(a copy of the suite file with more epochs or a larger subset) before "
                 "reading their verdicts.")
    return text


def _statistics_text(found: Tests) -> str:
    family = [c for c in found.family if c.tested]
    note = family_note(family, "per line, the deepest depth's training loss minus the "
                               "shallowest's; per normalizer-free residual line, its loss "
                               "minus the ResNet with BN's at the deepest depth; each a "
                               "one-sample t on the per-seed differences")
    if note is None:
        return ""
    needs = []  # (family_note states the smallest differences these seeds resolve)
    for c in family:
        if not c.significant and c.resolvable:
            n = c.seeds_for(c.estimate)
            if n is not None and n > c.seeds:
                needs.append(f"{c.name} ({_pts(c.estimate)}): about {n}")
    if needs:
        note += (" Seeds that would resolve the unresolved differences at their measured "
                 "size: " + "; ".join(needs) + ".")
    return note


# ----------------------------------------------------------------------------- figure


def _style(x: Line) -> tuple[str, str, str]:
    """Colour, line style and marker of a line: the norm's colour (SkipInit's and Fixup's
    their own), dashed at the smaller learning rate."""
    colour = INIT_COLOURS.get(x.arch) or NORM_COLOURS.get(x.norm, "#e377c2")
    return colour, "-" if x.lr >= 0.1 else "--", "o"


def depth_figure(study: Study) -> Figure:
    fig = Figure(figsize=(13, 5.6), layout="constrained")
    axes = dict(zip(("plain", "resnet"), fig.subplots(1, 2, sharey=True), strict=True))
    top = CHANCE * 1.12
    for x in study.lines:
        ax = axes["plain" if x.arch == "plain" else "resnet"]
        colour, style, marker = _style(x)
        depths, means, lows, highs, bad = [], [], [], [], []
        for d in x.depths:
            p = x.points[d]
            finite = list(p.finite().values())
            if len(finite) < len(p.loss):  # a diverged seed: a cross at the top
                bad.append(d)
            if finite:
                depths.append(d)
                means.append(min(np.mean(finite), top))
                lows.append(min(min(finite), top))
                highs.append(min(max(finite), top))
        label = x.label if x.arch != "plain" else x.label.removeprefix("plain, ")
        if x.arch == "resnet":
            label = label.removeprefix("ResNet, ")
        elif x.arch in ("skipinit", "fixup"):
            label = label.removeprefix("ResNet + ")
        ax.plot(depths, means, color=colour, linestyle=style, marker=marker, markersize=4,
                label=label)
        if len(depths) > 0:
            ax.fill_between(depths, lows, highs, color=colour, alpha=0.12, linewidth=0)
        if bad:
            ax.plot(bad, [top] * len(bad), linestyle="none", marker="x", color=colour,
                    markersize=8, clip_on=False)
    for name, ax in axes.items():
        ax.axhline(CHANCE, color="black", linewidth=0.8, linestyle=":")
        ax.axhline(TRAINS_BELOW, color="black", linewidth=0.6, linestyle="-.", alpha=0.6)
        ax.set_xscale("log")
        ax.set_xticks(study.depths, [str(d) for d in study.depths])
        ax.minorticks_off()
        ax.set_xlabel("depth (weighted layers)")
        ax.set_ylim(0, top * 1.02)
        ax.grid(True, alpha=0.3)
        ax.set_title({"plain": "plain net", "resnet": "ResNet"}[name], fontsize=10.5)
        ax.legend(fontsize=8, frameon=False, loc="upper center", ncol=3,
                  bbox_to_anchor=(0.5, -0.16))  # under the axes: lines run everywhere
    axes["plain"].set_ylabel("training loss, last epoch (mean over its steps)")
    axes["plain"].annotate("ln 10: chance", (study.depths[-1], CHANCE), fontsize=8,
                           ha="right", va="bottom")
    axes["plain"].annotate("trains below", (study.depths[-1], TRAINS_BELOW), fontsize=8,
                           ha="right", va="bottom")
    fig.suptitle("Training loss against depth, mean over seeds (min-max band); solid at lr "
                 "0.1, dashed at the smaller lr; × a seed that diverged (nan)", fontsize=11)
    return fig


# ----------------------------------------------------------------------------- section


def depth_blocks(study: Study) -> list[Block]:
    found = tests(study)
    config = study.variant.config
    p = config.protocol
    steps = -(-(config.subset or 60000) // p.batch_size) * p.epochs
    width = study.variant.config.model.net_options.get("width", 16)
    rows = []
    for x in study.lines:
        d = x.trainable_depth()
        rows.append([x.label, *(x.points[dd].text() if dd in x.points else "—"
                                for dd in study.depths),
                     str(d) if d is not None else "none"])
    blocks: list[Block] = [
        Para(f"**The papers.** {HE} {DE_SMITH}"),
        Para(f"**Here.** He et al.'s CIFAR layout at width {width} on MNIST: the plain net and "
             f"the ResNet at depths {', '.join(map(str, study.depths))}, {steps:,} SGD steps "
             f"at batch {p.batch_size} (momentum {p.momentum:g}, {p.epochs} epoch"
             f"{'s' if p.epochs != 1 else ''} of the first {config.subset or 60000:,} "
             "training images, constant lr), far shorter than the papers' 64,000: what is "
             "measured is how far each network gets in that budget. The number is the mean "
             "training loss over the last epoch's steps" + (
                 " (here the whole run's, its first steps included)." if p.epochs == 1
                 else ".")),
        Table(["line", *(f"depth {d}" for d in study.depths), "trainable to"], rows,
              "l" + "r" * (len(study.depths) + 1)),
        Para("Each cell: training loss, mean ± std over seeds, and (k/n) how many of the n "
             "seeds trained."),
    ]
    for head in (he_verdict(found), de_smith_verdict(study, found)):
        if head:
            blocks.append(Para(head))
    blocks.append(Para(_trainable_text(study)))
    if found.degradation:
        items = [_test_text(t, "rises with depth", "falls with depth")
                 for t in found.degradation]
        blocks += [Heading("Deepest against shallowest, per line (He et al.: the plain net "
                           "rises, the ResNet does not)", 3), Bullets(items)]
    if found.normfree:
        items = [_test_text(t, "higher than BN's", "lower than BN's") for t in found.normfree]
        blocks += [Heading("Residual nets without a norm against BN", 3), Bullets(items)]
    note = _statistics_text(found)
    if note:
        blocks.append(Para(note))
    return blocks


def depth_parts(suite: SuiteResults, figs_dir: str | Path
                ) -> tuple[list[Block], list[Image]] | None:
    study = find_study(suite)
    if study is None:
        return None
    measured = any(p.loss for x in study.lines for p in x.points.values())
    return figure_section(
        depth_blocks(study) if measured else [], measured, lambda: depth_figure(study),
        Path(figs_dir) / FIGURE, "Training loss against depth, per norm",
        "The last epoch's mean training loss of the plain net (left) and the ResNet (right) "
        "at each depth, per norm, mean over seeds with a min-max band; SkipInit and Fixup "
        "are ResNets without a norm. Dotted: chance (ln 10); dash-dot: the level below "
        "which a run counts as trained.")
