"""The depth study (normlab.studies.depth) on the bundled suite at a test's size: 2 depths,
width 2, 2 steps, 2 seeds, BN and no norm (GN, LN and FRN left out: the lines are the same
code), end to end through its report section."""

import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from conftest import no_report
from normlab.experiments import load_suite, run_suite
from normlab.reports import load_results
from normlab.reports.doc import to_markdown
from normlab.studies import depth


def final_loss(out: Path, variant: str, seed: int) -> float:
    lines = (out / variant / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])["train_loss"]


def load_suite_text(text: str, tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "depth.toml"
    path.write_text(text)
    return load_suite(path)


@pytest.fixture(scope="module")
def depth_quick(tmp_path_factory) -> Path:
    source = Path(load_suite("depth").source).read_text()
    text = (source.replace("axes.net_options.depth = [8, 26]",
                           "axes.net_options.depth = [8, 14]")
            .replace("epochs = 3", "epochs = 1")
            .replace("seeds = 6", "seeds = 2").replace("subset = 3200", "subset = 64")
            .replace("net_options = { width = 8 }", "net_options = { width = 2 }")
            .replace('axes.norm = ["bn", "gn", "ln", "frn", "none"]', 'axes.norm = ["bn", "none"]'))
    text = re.sub(r'\{ (arch = "\w+", )?norm = "(gn|ln|frn)"(, lr = 0\.01)? \},? ?', "", text)
    assert "[8, 14]" in text and "subset = 64" in text and "width = 2 }" in text
    assert "epochs = 1" in text and "seeds = 2" in text
    assert '"gn"' not in text and len(load_suite_text(text, tmp_path_factory).variants) == 18
    folder = tmp_path_factory.mktemp("depth")
    (folder / "depth.toml").write_text(text)
    out = folder / "out"
    with pytest.MonkeyPatch.context() as patch:  # the runs alone, not the whole report (its
        # test-batch section evaluates every checkpoint): the section is built below
        no_report(patch)
        run_suite(load_suite(folder / "depth.toml"), out, threads=1, device="cpu",
                  quiet=True, log=lambda _: None)
    return out


def test_the_depth_section_tests_degradation_and_the_normalizer_free_nets(depth_quick,
                                                                          tmp_path):
    out = depth_quick
    suite = load_results(out)
    study = depth.find_study(suite)
    assert study.depths == [8, 14]
    labels = [x.label for x in study.lines]
    assert labels == ["plain, BN, lr 0.1", "plain, no norm, lr 0.01", "ResNet, BN, lr 0.1",
                      "ResNet, no norm, lr 0.1", "ResNet, no norm, lr 0.01",
                      "ResNet + SkipInit, lr 0.1", "ResNet + SkipInit, lr 0.01",
                      "ResNet + Fixup, lr 0.1", "ResNet + Fixup, lr 0.01"]
    # the arms: the network each line's variants built
    skip = study.line("skipinit", "none", 0.01).points[14].variant.config.model
    assert skip.net == "resnet" and skip.net_options["residual_init"] == "skipinit"
    assert study.line("plain", "bn").points[8].variant.name == "plain8-bn-lr0.1"

    found = depth.tests(study)
    # 2 plain lines + 3 ResNet lines from depth 8 to 14; the ResNet without a norm at two
    # lrs, SkipInit and Fixup at two each, against ResNet + BN
    assert len(found.degradation) == 5 and len(found.normfree) == 6
    tested = [c for c in found.family if c.tested]
    assert {c.family for c in tested} == {len(tested)}
    # the plain BN line's degradation, by hand from metrics.jsonl
    bn = next(t for t in found.degradation if t.line.label == "plain, BN, lr 0.1")
    by_hand = [final_loss(out, "plain14-bn-lr0.1", s) - final_loss(out, "plain8-bn-lr0.1", s)
               for s in (1, 2)]
    if all(math.isfinite(x) for x in by_hand):
        assert bn.comparison.estimate == pytest.approx(np.mean(by_hand))
        assert bn.comparison.seeds == 2
    # Fixup at lr 0.01 against ResNet + BN at the deepest depth, by hand
    fix = next(t for t in found.normfree if t.line.label == "ResNet + Fixup, lr 0.01")
    assert fix.reference.label == "ResNet, BN, lr 0.1" and fix.low == fix.high == 14
    by_hand = [final_loss(out, "fixup14-none-lr0.01", s) - final_loss(out, "resnet14-bn-lr0.1", s)
               for s in (1, 2)]
    if all(math.isfinite(x) for x in by_hand):
        assert fix.comparison.estimate == pytest.approx(np.mean(by_hand))

    blocks, images = depth.depth_parts(suite, tmp_path / "figs")
    md = to_markdown(blocks)
    assert f"**Statistics.** {len(tested)} comparisons in one family" in md
    assert "Seeds per comparison: 2" in md
    # the table: the plain BN line at depth 8, mean over the two seeds as the table writes it
    losses = [final_loss(out, "plain8-bn-lr0.1", s) for s in (1, 2)]
    assert re.search(rf"\| plain, BN, lr 0\.1 \| {np.mean(losses):.2f} ± "
                     rf"{np.std(losses, ddof=1):.2f} \(\d/2\)", md)
    # He et al.'s verdict word follows from the comparisons
    plain = {(t.line.norm, t.line.lr): t.comparison for t in found.degradation
             if t.line.arch == "plain" and t.comparison is not None and t.comparison.tested}
    res = {(t.line.norm, t.line.lr): t.comparison for t in found.degradation
           if t.line.arch == "resnet" and t.comparison is not None and t.comparison.tested}
    keys = [k for k in plain if k in res]
    shows = [k for k in keys if plain[k].direction == "up" and res[k].direction != "up"]
    word = ("**Yes**" if len(shows) == len(keys) else "**Partly**" if shows else "**No**")
    assert f"{word} (He et al.'s degradation, shown with {len(shows)} of {len(keys)} norms)" \
        in md
    # De & Smith's word follows from which lines train at the deepest depth (2 steps: none)
    inits = [x for x in study.lines if x.arch in ("skipinit", "fixup")]
    trains = [x for x in inits if x.trainable_depth() == 14]
    assert (("**No** (De & Smith)" in md) == (not trains))
    assert "trainable to" in md and "**Trainable depth**" in md
    # lines that do not train even at the shallowest depth are named: the budget, not depth
    short = [x.label for x in study.lines
             if not all(x.points[min(x.points)].trains().values())]
    assert (f"**The budget is too short for {len(short)} of {len(study.lines)} lines:**"
            in md) == bool(short)
    if short:
        assert "; ".join(short) in md
    assert images and images[0].path.name == depth.FIGURE and images[0].path.stat().st_size


def test_not_this_study_without_both_nets(depth_quick):
    suite = load_results(depth_quick)
    plain_only = dataclasses.replace(suite, variants=[v for v in suite.variants
                                                      if v.config.model.net == "plain"])
    assert depth.find_study(plain_only) is None
    assert depth.depth_parts(plain_only, depth_quick / "figs") is None
    no_bn = dataclasses.replace(suite, variants=[v for v in suite.variants
                                                 if v.config.model.norms != ("bn",)])
    assert depth.find_study(no_bn) is None
