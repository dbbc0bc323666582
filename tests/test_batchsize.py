"""The batch-size study's report part: synthetic run folders in (config.json, metrics.jsonl,
predictions.pt), the lines, table, figure and generated sentences checked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from normlab.experiments import load_suite
from normlab.reports import load_results
from normlab.reports.doc import Para, Table, to_html, to_markdown
from normlab.studies.batchsize import (
    FIGURE,
    batch_size_figure,
    batch_size_parts,
    find_study,
    trend,
)
from normlab.training.config import RunConfig

BATCHES = (2, 8, 64)
SEEDS = (1, 2, 3)
NOISE = {1: -0.1, 2: 0.0, 3: 0.1}  # per-seed offsets: sample std 0.1 at every point
# Each point's offsets in one direction or the other, so that BN's per-seed interactions
# with GN (2 x the offset) and LN (4 x) have a spread (identical offsets would cancel).
SIGN = {("bn", 64): -1, ("ln", 2): -1}
# test error % (mean over seeds) by norm and batch: BN rises as the batch shrinks, GN and
# LN stay flat
ERROR = {
    "bn": {2: 4.0, 8: 1.5, 64: 1.0},
    "gn": {2: 1.2, 8: 1.2, 64: 1.2},
    "ln": {2: 1.3, 8: 1.35, 64: 1.3},
}


def config(norm: str, batch: int, lr_scaled: bool = True) -> dict:
    lr = 0.1 * batch / 64 if lr_scaled else 0.05
    cfg = RunConfig.from_dict({"norm": norm, "subset": 1000, "protocol": {
        "name": "seed", "epochs": 2, "batch_size": batch, "lr": lr}})
    return {k: v for k, v in cfg.to_dict().items() if k != "seed"}


def write_run(run_dir: Path, cfg: dict, seed: int, error: float | None) -> None:
    """A finished run whose final test error is ``error`` (None: started, unfinished)."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps(
        {"run": {**cfg, "seed": seed}, "normlab": "0.2.0", "device": "cpu", "threads": 1}))
    final = 100.0 - (error if error is not None else 5.0)
    records = [{"epoch": e, "lr": cfg["protocol"]["lr"], "train_loss": 0.1, "train_acc": 97.0,
                "train_l1": 0.0, "first_bad_step": -1, "train_seconds": 1.0, "test_loss": 0.05,
                "test_acc": acc, "test_seconds": 0.5, "seconds": 1.5,
                "images_per_second": 1000.0, "status": "ok"}
               for e, acc in ((1, final - 1.0), (2, final))]
    if error is None:
        records = records[:1]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if error is not None:
        target = torch.zeros(10, dtype=torch.long)
        torch.save({"pred": target, "target": target, "confidence": torch.ones(10)},
                   run_dir / "predictions.pt")


def make_study(root: Path, errors: dict = ERROR, seeds: tuple = SEEDS, unfinished=(),
               lr_scaled: bool = True) -> Path:
    variants, runs = [], []
    for batch in BATCHES:
        for norm in errors:
            name = f"{norm}-b{batch}"
            variants.append({"name": name, "label": f"{norm.upper()}, batch {batch}",
                             "config": config(norm, batch, lr_scaled)})
            for seed in seeds:
                entry = {"variant": name, "seed": seed, "dir": f"{name}/seed{seed}"}
                runs.append(entry)
                noise = NOISE[seed] * SIGN.get((norm, batch), 1)
                err = None if (name, seed) in unfinished else errors[norm][batch] + noise
                write_run(root / entry["dir"], variants[-1]["config"], seed, err)
    manifest = {"name": "bs", "description": "synthetic batch-size study", "source": "tests",
                "dataset": "mnist", "seeds": list(seeds), "variants": variants, "runs": runs}
    (root / "suite.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def study_root(tmp_path_factory) -> Path:
    return make_study(tmp_path_factory.mktemp("bs"))


def text_of(blocks) -> str:
    return to_markdown(blocks)


def test_a_batch_size_study_is_found_one_line_per_norm(study_root):
    study = find_study(load_results(study_root))
    assert [line.label for line in study.lines] == ["BN", "GN (2 groups)", "LN"]
    assert study.batches == [2, 8, 64]
    assert study.seeds == 3
    assert study.lr_rule == ("the learning rate scaled linearly with the batch size, "
                             "lr = 0.1 × B / 64")
    bn = study.lines[0].by_batch()
    assert bn[2].mean == pytest.approx(4.0) and bn[2].std == pytest.approx(0.1)
    assert bn[64].text() == "1.00 ± 0.10"
    t = trend(study.lines[0])
    assert t.rise == pytest.approx(3.0) and t.verdict == "rises"
    assert trend(study.lines[1]).verdict == "flat"
    assert [line.by_batch()[2].by_seed for line in study.lines[:1]] == [
        {1: pytest.approx(3.9), 2: 4.0, 3: pytest.approx(4.1)}]


def test_the_table_and_the_analysis_say_what_the_numbers_say(study_root, tmp_path):
    blocks, images = batch_size_parts(load_results(study_root), tmp_path / "figures")
    table = next(b for b in blocks if isinstance(b, Table))
    assert table.header == ["batch", "lr", "BN error %", "GN (2 groups) error %", "LN error %"]
    assert table.rows[0] == ["64", "0.1", "1.00 ± 0.10", "1.20 ± 0.10", "1.30 ± 0.10"]
    assert table.rows[-1] == ["2", "0.003125", "4.00 ± 0.10", "1.20 ± 0.10", "1.30 ± 0.10"]
    text = text_of(blocks)
    assert ("**Yes**: as the batch shrinks from 64 to 2, BN's error rises more than GN (2 "
            "groups)'s and LN's (BN − GN (2 groups) +3.00 (Holm p = 0.006); BN − LN +3.00 "
            "(Holm p = 0.018) points): the pattern of Wu & He's Figure 1. BN's own error "
            "rises by 3.00 points from batch 64 to 2.") in text
    # the family: 3 trends and 2 interactions, Holm, the seeds and what they resolve
    assert "**Statistics.** 5 comparisons in one family" in text
    assert "Holm's step-down method" in text
    assert "Seeds per comparison (the finished ones): 3" in text
    assert "at Holm's strictest level (0.05/5): BN" in text
    assert ("BN's change from batch 64 to 2 minus GN (2 groups)'s: +3.00 points over 3 seeds "
            "(95% interval [+2.50, +3.50], Holm p = 0.006): BN's error **rises more** as "
            "the batch shrinks; the gap BN − GN (2 groups) is +2.80 points at batch 2 and "
            "-0.20 at 64.") in text
    assert "BN: 1.00% at batch 64 → 4.00% at batch 2 (+3.00 points" in text
    assert "GN (2 groups): 1.20% at batch 64 → 1.20% at batch 2 (0.00 points" in text
    assert "Holm p = 1.000): **not resolved**" in text
    assert "eval mode" in text and "running statistics" in text
    for number in ("23.6", "23.7", "24.8", "27.3", "34.7", "24.1", "24.2", "24.0"):
        assert number in text
    assert "11.1 points from 32 to 2" in text
    assert "<table>" in to_html(blocks)
    assert [i.path.name for i in images] == [FIGURE]
    png = imread(images[0].path)
    assert png.shape[0] > 300 and png.shape[1] > 500
    assert np.ptp(png[..., :3]) > 0.5  # not blank


def test_the_figure_has_a_log2_batch_axis_shrinking_to_the_right(study_root):
    study = find_study(load_results(study_root))
    ax = batch_size_figure(study, "mnist").axes[0]
    assert ax.get_xscale() == "log"
    left, right = ax.get_xlim()
    assert left > 64 > 2 > right
    assert [t.get_text() for t in ax.get_xticklabels()] == ["2", "8", "64"]
    assert [line.get_label() for line in ax.get_lines()] == ["BN", "GN (2 groups)", "LN"]
    assert len(ax.collections) == 3  # one min–max band per norm


def test_when_bn_stays_flat_the_analysis_says_no_and_how_many_seeds_would_tell(tmp_path):
    flat = {**ERROR, "bn": {2: 1.05, 8: 1.0, 64: 1.0}}
    blocks, _ = batch_size_parts(load_results(make_study(tmp_path / "s", flat)), tmp_path)
    text = text_of(blocks)
    assert ("**No**: no difference between BN's change with the batch and GN (2 groups)'s "
            "and LN's is resolved here") in text
    assert "BN's own error changes by +0.05 points, not resolved" in text
    # the seeds a 0.05-point effect would need, and how to get them
    assert "To resolve the unresolved differences" in text and "--seeds N" in text


def test_when_gn_moves_as_much_as_bn_the_analysis_says_partly(tmp_path):
    moving = {**ERROR, "gn": {2: 3.9, 8: 1.5, 64: 1.2}}  # GN rises 2.7, BN 3.0
    blocks, _ = batch_size_parts(load_results(make_study(tmp_path / "s", moving)), tmp_path)
    text = text_of(blocks)
    assert "**Partly**: BN's error rises more than LN's as the batch shrinks" in text
    assert "GN (2 groups): 1.20% at batch 64 → 3.90% at batch 2 (+2.70 points" in text


def test_when_bn_rises_less_the_analysis_says_the_opposite(tmp_path):
    less = {**ERROR, "gn": {2: 6.0, 8: 1.5, 64: 1.2}, "ln": {2: 7.0, 8: 1.5, 64: 1.3}}
    blocks, _ = batch_size_parts(load_results(make_study(tmp_path / "s", less)), tmp_path)
    assert "**No**, the opposite: BN's error rises less than GN (2 groups)'s and LN's" in (
        text_of(blocks))


def test_the_verdict_holds_the_family_wise_error_a_single_test_would_not(tmp_path):
    """An effect whose own p is below 0.05 but not below Holm's threshold is not called."""
    from normlab.studies.batchsize import tests

    # BN − GN at 3 seeds: per-seed interactions 0.6 + 2 x offset = 0.4, 0.6, 0.8 (p 0.035
    # alone, ranked 4th of 5 in the family: Holm multiplies it by 2); BN − LN 0.3 + 4 x offset
    near = {**ERROR, "gn": {2: 3.6, 8: 1.5, 64: 1.2}, "ln": {2: 4.0, 8: 1.3, 64: 1.3}}
    found = tests(find_study(load_results(make_study(tmp_path / "s", near))))
    bn_gn = found.interactions[0].test
    assert bn_gn.p < 0.05 and bn_gn.p_holm > 0.05 and not bn_gn.significant
    assert bn_gn.family == 5


def test_one_seed_gives_no_verdict(tmp_path):
    blocks, _ = batch_size_parts(load_results(make_study(tmp_path / "s", seeds=(2,))), tmp_path)
    text = text_of(blocks)
    assert "cannot say whether BN's error rises" in text
    assert "one seed at an end, so no interval" in text


def test_unfinished_runs_are_counted_and_left_out(tmp_path):
    root = make_study(tmp_path / "s", unfinished=(("bn-b2", 3),))
    study = find_study(load_results(root))
    point = study.lines[0].by_batch()[2]
    assert point.errors == pytest.approx([3.9, 4.0]) and point.text() == "3.95 ± 0.07 (2/3)"


def test_nothing_finished_yet_gives_a_note_and_no_figure(tmp_path):
    root = make_study(tmp_path / "s", unfinished=[
        (f"{n}-b{b}", s) for n in ERROR for b in BATCHES for s in SEEDS])
    blocks, images = batch_size_parts(load_results(root), tmp_path / "figures")
    assert images == [] and not (tmp_path / "figures" / FIGURE).exists()
    assert isinstance(blocks[0], Para) and "No finished run yet" in blocks[0].text


def test_a_constant_learning_rate_is_named(tmp_path):
    study = find_study(load_results(make_study(tmp_path / "s", lr_scaled=False)))
    assert study.lr_rule == "the same learning rate, 0.05, at every batch size"


def test_other_suites_are_not_batch_size_studies(tmp_path):
    root = tmp_path / "s6"
    root.mkdir()
    variants = [{"name": n, "label": n, "config": config(n, 64)} for n in ("bn", "gn")]
    (root / "suite.json").write_text(json.dumps({
        "name": "s6", "dataset": "mnist", "seeds": [1], "variants": variants,
        "runs": [{"variant": n, "seed": 1, "dir": f"{n}/seed1"} for n in ("bn", "gn")]}))
    assert find_study(load_results(root)) is None
    assert batch_size_parts(load_results(root), tmp_path) is None


@pytest.mark.parametrize("name", ["batch-sizes", "batch-sizes-fashion"])
def test_the_bundled_studies(name):
    suite = load_suite(name)
    assert suite.dataset == ("mnist" if name == "batch-sizes" else "fashion-mnist")
    assert suite.seeds == (1, 2, 3, 4, 5, 6)  # 3 flipped on disjoint seeds (issue 29)
    got = {(v.config.norm + ("+ws" if v.config.model.weight_std else ""),
            v.config.protocol.batch_size): v.config for v in suite.variants}
    norms = ("bn", "gn", "ln", "in")
    assert set(got) == {(n, b) for n in norms for b in (2, 4, 8, 16, 32, 64)}
    assert len(suite.variants) == len(got)
    for (norm, batch), cfg in got.items():
        assert cfg.protocol.lr == pytest.approx(0.1 * batch / 64)  # the linear rule
        assert cfg.protocol.epochs == suite.protocol.epochs
        assert cfg.model.groups == 2 or not norm.startswith("gn")
        assert not cfg.model.norm_options  # every norm with its defaults
    assert [v.config.protocol.batch_size for v in suite.variants] == sorted(
        v.config.protocol.batch_size for v in suite.variants)  # longest runs first
    other = load_suite("batch-sizes-fashion" if name == "batch-sizes" else "batch-sizes")
    assert [(v.name, v.label, v.config.model, v.config.protocol) for v in suite.variants] == [
        (v.name, v.label, v.config.model, v.config.protocol) for v in other.variants]
