"""Internal covariate shift and smoothness: Santurkar, Tsipras, Ilyas & Madry (NeurIPS 2018),
"How Does Batch Normalization Help Optimization?", Figures 2 and 4.

A suite is this study when it has variants with BN and without a norm (and, for Figure 2,
with noisy BN), alike but for the norm, whose runs recorded ``landscape`` probes (and, for
Figure 2, ``activations``). Per seed (the variants of a seed see the same batches: paired):

- Figure 2: noisy BN's final test accuracy against BN's (the paper: as good), and how much
  its layers' inputs move between probes against BN's (the paper: far more), in mean and
  in spread: the mean, over consecutive probes, of |change of the input's median| over its
  15-85 percentile width, and of |change of the log of its standard deviation|; each
  averaged over the norm layers after the first (the first one's input is the image's
  convolution, which no noise reaches).
- Figure 4: without a norm against BN, the loss's range along the gradient direction, the
  largest change of the gradient along it ("gradient predictiveness") and the largest
  gradient change per distance moved ("effective beta-smoothness"), each the median over
  the probes of the second half of training (when both have left the first steps), compared
  as log10(none / BN): the paper finds all three larger without BN.

All comparisons are one Holm-adjusted family.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from normlab import probes
from normlab.reports.collect import SuiteResults, VariantResults
from normlab.reports.doc import Block, Bullets, Heading, Para, Table
from normlab.reports.figures import NORM_COLOURS, figure_section
from normlab.reports.page import Image
from normlab.reports.stats import ALPHA, POWER, Comparison, claim_text, holm, one_sample

TITLE = "Internal covariate shift and smoothness (Santurkar et al.)"
FIGURE = "ics.png"
NORMS = ("none", "bn", "noisy-bn")
QUANTITIES = (("loss_range", "loss range along the gradient"),
              ("grad_change", "largest gradient change along it"),
              ("beta", "effective β-smoothness"))
PAPER = ("Santurkar, Tsipras, Ilyas & Madry 2018, on VGG and CIFAR-10. Figure 2: BN "
         "followed by random per-channel scale and shift noise, drawn anew at every step "
         "(\"noisy BN\"), makes each layer's input distribution move far more than without "
         "BN, and yet trains as well as BN: the stability of those distributions (\"internal "
         "covariate shift\") is not why BN helps. Figure 4: what BN does is make the loss "
         "smoother: along the gradient direction the loss varies less, the gradient changes "
         "less (it stays predictive), and the gradient's change per distance moved (the "
         "\"effective β-smoothness\") is smaller.")


@dataclass
class Arm:
    """One variant: per seed, its epochs' metrics and its probe records."""

    variant: VariantResults
    norm: str
    metrics: dict[int, list[dict]]
    records: dict[int, list[dict]]

    @property
    def label(self) -> str:
        return self.variant.label

    def final(self) -> dict[int, float]:
        return {s: m[-1]["test_acc"] for s, m in self.metrics.items()}

    def landscape(self, key: str) -> dict[int, float]:
        """Per seed, the median of ``key`` (:func:`normlab.probes.smoothness`) over the
        probes of the second half of training; the seeds that trained every epoch only (a
        diverged run's probes end where it stopped)."""
        out = {}
        whole = set(_whole(self))
        for seed, records in self.records.items():
            if seed not in whole:
                continue
            late = [r for r in records if r.get("landscape")]
            if not late:
                continue
            half = late[-1]["step"] / 2
            values = [probes.smoothness(r)[key] for r in late if r["step"] >= half]
            out[seed] = float(np.median(values))
        return out

    def movement(self, kind: str = "median") -> dict[int, float]:
        """Per seed, :func:`movement` of its activation records."""
        out = {}
        for seed, records in self.records.items():
            got = movement(records, kind)
            if got is not None:
                out[seed] = got
        return out


def movement(records: list[dict], kind: str = "median") -> float | None:
    """How much the norm layers' inputs move between probes, per layer after the first,
    averaged over consecutive probes then over layers: ``"median"``, |median change| over
    the earlier probe's 15-85 width; ``"spread"``, |log(std / earlier std)|. None without
    two activation records or a second layer."""
    acts = [r["activations"] for r in records if r.get("activations")]
    if len(acts) < 2:
        return None

    def change(a: dict, b: dict) -> float | None:
        if kind == "spread":
            return abs(math.log(b["std"] / a["std"])) if a["std"] > 0 < b["std"] else None
        width = a["p85"] - a["p15"]
        return abs(b["p50"] - a["p50"]) / width if width > 0 else None

    per_layer = []
    for layer in list(acts[0])[1:]:
        steps = [c for a, b in itertools.pairwise(acts) if layer in a and layer in b
                 and (c := change(a[layer], b[layer])) is not None]
        if steps:
            per_layer.append(float(np.mean(steps)))
    return float(np.mean(per_layer)) if per_layer else None


def _key(v: VariantResults) -> str:
    d = v.config.to_dict()
    d.pop("seed", None)
    d["model"] = {k: x for k, x in d["model"].items() if k != "norm"}
    return json.dumps(d, sort_keys=True)


def find_study(suite: SuiteResults) -> dict[str, Arm] | None:
    """The arms by norm (none, bn and, where there is one, noisy-bn) of variants alike but
    for the norm, with landscape probes; None when the suite is not this study."""
    found = [v for v in suite.variants if v.config is not None
             and v.config.model.norms in tuple((n,) for n in NORMS)
             and "landscape" in v.config.probe]
    groups: dict[str, dict[str, VariantResults]] = {}
    for v in found:
        groups.setdefault(_key(v), {}).setdefault(v.config.model.norms[0], v)
    for members in groups.values():
        if {"none", "bn"} <= set(members):
            arms = {}
            for norm in NORMS:
                if norm not in members:
                    continue
                v = members[norm]
                done = [r for r in v.finished if r.metrics]
                arms[norm] = Arm(v, norm, {r.seed: r.metrics for r in done},
                                 {r.seed: got for r in done if (got := probes.read(r.dir))})
            return arms
    return None


# ----------------------------------------------------------------------------- the tests


def _paired(name: str, a: dict[int, float], b: dict[int, float], log: bool = False
            ) -> Comparison:
    """a − b over the seeds both have (log10(a / b) with ``log``; seeds where either is not
    finite and positive are left out)."""
    seeds = sorted(set(a) & set(b))
    if log:
        diffs = [math.log10(a[s] / b[s]) for s in seeds
                 if 0 < a[s] < math.inf and 0 < b[s] < math.inf]
    else:
        diffs = [a[s] - b[s] for s in seeds]
    return one_sample(name, diffs)


@dataclass
class Family:
    noisy_acc: Comparison | None  # noisy-bn − BN, final test accuracy (points)
    noisy_moves: Comparison | None  # noisy-bn − BN, movement of the median
    noisy_spread: Comparison | None  # noisy-bn − BN, movement of the spread
    bn_acc: Comparison  # BN − none, final test accuracy
    smooth: list[Comparison]  # log10(none / BN) of each of QUANTITIES

    def members(self) -> list[Comparison]:
        return [c for c in (self.noisy_acc, self.noisy_moves, self.noisy_spread, self.bn_acc,
                            *self.smooth) if c is not None]


def comparisons(arms: dict[str, Arm]) -> Family:
    bn, none, noisy = arms["bn"], arms["none"], arms.get("noisy-bn")
    family = Family(
        _paired("final test accuracy, noisy BN − BN (points)", noisy.final(), bn.final())
        if noisy else None,
        _paired("layer inputs' median change between probes, noisy BN − BN (15-85 widths)",
                noisy.movement(), bn.movement()) if noisy and noisy.movement() else None,
        _paired("layer inputs' spread change between probes, noisy BN − BN (|Δ ln std|)",
                noisy.movement("spread"), bn.movement("spread"))
        if noisy and noisy.movement("spread") else None,
        _paired("final test accuracy, BN − none (points)", bn.final(), none.final()),
        [_paired(f"{text}, log10(none / BN)", none.landscape(key), bn.landscape(key),
                 log=True) for key, text in QUANTITIES])
    holm(family.members())
    return family


def _claim(c: Comparison | None, yes: str, opposite: str, digits: int = 2,
           ratio: bool = False) -> str | None:
    """``c``'s claim_text (None where ``c`` was not measured: no noisy BN variant)."""
    if c is None:
        return None
    return claim_text(c, yes, opposite, (lambda x: f"×{10 ** x:.2f}") if ratio
                      else (lambda x: f"{x:+.{digits}f}"))


def verdict(family: Family) -> list[str]:
    """One sentence per figure of the paper."""
    out = []
    if family.noisy_acc is not None:
        moved = [c for c in (family.noisy_moves, family.noisy_spread)
                 if c is not None and c.direction == "up"]
        moves = bool(moved)
        how = " and ".join("in median" if c is family.noisy_moves else "in spread"
                           for c in moved)
        as_good = family.noisy_acc.direction in ("none", "up")
        beats = family.bn_acc.direction == "up"
        word = ("**Yes**" if moves and as_good else "**Partly**" if moves or as_good
                else "**No**")
        r = family.noisy_acc.resolvable
        within = (f" (these seeds would see a difference of {r:.2f} points)"
                  if r and family.noisy_acc.direction == "none" else "")
        accuracy = {"none": "does not differ resolvably from", "up": "is above",
                    "down": "is below"}.get(family.noisy_acc.direction, "is untested against")
        motion = (f"move more than BN's {how}" if moves
                  else "do not resolvably move more than BN's")
        out.append(
            f"Figure 2, {word}: noisy BN's layer inputs {motion} between probes, and its "
            f"final test accuracy {accuracy} BN's{within}; BN "
            f"{'beats' if beats else 'does not resolvably beat'} no norm.")
    shown = [c.direction == "up" for c in family.smooth]
    word = "**Yes**" if all(shown) else "**Partly**" if any(shown) else "**No**"
    names = [text for (_, text), up in zip(QUANTITIES, shown, strict=True) if up]
    out.append(f"Figure 4, {word}: without BN, "
               + (f"{', '.join(names)} {'is' if len(names) == 1 else 'are'} larger"
                  if names else "none of the three quantities is resolvably larger")
               + (" (all three, as the paper finds)." if all(shown) else "; the others do "
                  "not differ resolvably." if any(shown) else "."))
    return out


# ----------------------------------------------------------------------------- figure


def _whole(arm: Arm) -> list[int]:
    """The seeds whose runs trained every epoch (a diverged run stops early)."""
    longest = max((len(m) for m in arm.metrics.values()), default=0)
    return sorted(s for s, m in arm.metrics.items() if len(m) == longest)


def _by_step(arm: Arm, key: str) -> tuple[list[int], list[float]]:
    """Probe steps every seed that trained every epoch has, and the geometric mean over
    those seeds of ``key`` there."""
    seeds = [s for s in _whole(arm) if any(r.get("landscape") for r in arm.records.get(s, []))]
    if not seeds:
        return [], []
    tables = [{r["step"]: probes.smoothness(r)[key] for r in arm.records[s]
               if r.get("landscape")} for s in seeds]
    steps = sorted(set.intersection(*(set(t) for t in tables)))
    values = []
    for step in steps:
        got = [t[step] for t in tables if 0 < t[step] < math.inf]
        values.append(float(np.exp(np.mean(np.log(got)))) if got else np.nan)
    return steps, values


def ics_figure(arms: dict[str, Arm]) -> Figure:
    fig = Figure(figsize=(15, 4.2), layout="constrained")
    axes = fig.subplots(1, 4)
    for norm, arm in arms.items():
        colour = NORM_COLOURS.get(norm, "#e377c2")
        seeds = _whole(arm)
        if seeds:
            epochs = len(arm.metrics[seeds[0]])
            acc = [np.mean([arm.metrics[s][e]["test_acc"] for s in seeds])
                   for e in range(epochs)]
            left = len(arm.metrics) - len(seeds)
            label = arm.label + (f" ({left} diverged, left out)" if left else "")
            axes[0].plot(range(1, epochs + 1), acc, color=colour, marker="o", markersize=3,
                         label=label)
        for ax, (key, _) in zip(axes[1:], QUANTITIES, strict=True):
            steps, values = _by_step(arm, key)
            ax.plot(steps, values, color=colour, linewidth=1.2, label=arm.label)
    axes[0].set_title("test accuracy % (mean over the seeds that trained)", fontsize=10)
    axes[0].set_xlabel("epoch")
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(fontsize=8, frameon=False, loc="lower right")
    titles = ("loss range along -g", "max ||g(w - ηg) - g||", "max ||Δg|| / ||ηg|| (β)")
    for ax, title in zip(axes[1:], titles, strict=True):
        ax.set_title(title + " (geometric mean)", fontsize=10)
        ax.set_xlabel("training step")
        ax.set_yscale("log")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    fig.suptitle("Santurkar et al.'s Figures 2 and 4 on the seed's network: accuracy, and the "
                 "loss and gradient along the gradient direction at η = 0.5-4 × lr",
                 fontsize=11)
    return fig


def ics_blocks(arms: dict[str, Arm]) -> list[Block]:
    family = comparisons(arms)
    rows = []
    for arm in arms.values():
        final = list(arm.final().values())
        moved = list(arm.movement().values())
        spread = list(arm.movement("spread").values())
        late = [arm.landscape(key) for key, _ in QUANTITIES]
        rows.append([arm.label, str(len(final)), f"{np.mean(final):.2f}" if final else "—",
                     f"{np.mean(moved):.3f}" if moved else "—",
                     f"{np.mean(spread):.3f}" if spread else "—",
                     *(f"{np.median(list(v.values())):.3g}" if v else "—" for v in late)])
    config = arms["bn"].variant.config
    members = family.members()
    m = sum(c.tested for c in members)
    smooth = zip(family.smooth, ("larger without BN, as the paper finds",) * 3, strict=True)
    items = [_claim(family.noisy_acc, "noisy BN ends higher", "noisy BN ends lower"),
             _claim(family.noisy_moves, "noisy BN's layer inputs move more, as the paper's "
                    "Figure 2", "they move less than BN's", digits=3),
             _claim(family.noisy_spread, "noisy BN's layer inputs change their spread more, "
                    "as the paper's Figure 2", "they change it less than BN's", digits=3),
             _claim(family.bn_acc, "BN ends higher", "BN ends lower"),
             *(_claim(c, yes, "smaller without BN: the opposite of the paper", ratio=True)
               for c, yes in smooth)]
    return [
        Para(f"**The paper.** {PAPER}"),
        Para(f"**Here.** The seed's network, {config.protocol.epochs} epochs at lr "
             f"{config.protocol.lr:g} (momentum {config.protocol.momentum:g}), probes every "
             f"{config.probe_every} steps; the landscape at η = "
             f"{', '.join(f'{k:g}' for k in probes.LANDSCAPE_STEPS)} × lr along −g on the "
             "step's own batch."),
        Table(["variant", "seeds", "final test acc. %", "inputs' median change",
               "inputs' |Δ ln std|", *(f"{text} (2nd half, median)" for _, text in QUANTITIES)],
              rows, "lrrrrrrr"),
        *(Para(v) for v in verdict(family)),
        Heading("The paper's claims, tested", 3),
        Bullets([i for i in items if i is not None]),
        Para(f"**Statistics.** {m} comparisons in one family, each a one-sample t on the "
             "per-seed differences (the variants of a seed share its batches and initial "
             f"weights; the landscape as log10 ratios); the family-wise error held at "
             f"{ALPHA:.0%} by Holm's method. The smallest difference each resolves with "
             f"{POWER:.0%} power at Holm's strictest level: " + "; ".join(
                 f"{c.name} ×{10 ** c.resolvable:.2f}" if c in family.smooth else
                 f"{c.name} {c.resolvable:.3g}" for c in members if c.resolvable is not None)
             + ". Without BN the network is slower to leave its first steps, so its "
               "landscape is compared over the second half of training." + _diverged(arms)),
    ]


def _diverged(arms: dict[str, Arm]) -> str:
    """Which runs stopped early (normlab's divergence rule), in words; '' when none did."""
    parts = []
    for arm in arms.values():
        early = sorted(set(arm.metrics) - set(_whole(arm)))
        if early:
            parts.append(f"{arm.label} on seed{'s' if len(early) > 1 else ''} "
                         f"{', '.join(map(str, early))}")
    if not parts:
        return ""
    return (f" Diverged (stopped early, at chance or not finite): {'; '.join(parts)}. Their "
            "final accuracy counts in the accuracy comparisons; their landscape, which "
            "ends where they stopped, is left out of the log ratios. A variant without a "
            "norm layer has no norm input to probe (—).")


def ics_parts(suite: SuiteResults, figs_dir: str | Path
              ) -> tuple[list[Block], list[Image]] | None:
    arms = find_study(suite)
    if arms is None:
        return None
    measured = bool(arms["bn"].metrics and arms["none"].metrics)
    return figure_section(
        ics_blocks(arms) if measured else [], measured, lambda: ics_figure(arms),
        Path(figs_dir) / FIGURE, "Santurkar et al.'s Figures 2 and 4",
        "Test accuracy per epoch, and along the gradient direction at each probe: the "
        "loss's range, the largest gradient change and the effective β-smoothness, for no "
        "norm, BN and noisy BN (geometric means over the seeds that trained every epoch, "
        "log scale).")
