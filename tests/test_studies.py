"""The study suites and their report sections: every bundled study suite loads with the
design its header describes; the quick lr-range suite runs end to end (a diverging
learning rate included) into a report with the heat map and the verdict; and each study's
section, fed synthetic run folders, says what the numbers say and is absent for other
suites."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path

import numpy as np
import torch
from matplotlib.image import imread

from normlab.experiments import load_suite, run_suite
from normlab.reports import build as report_build
from normlab.reports import load_results
from normlab.reports.build import study_parts
from normlab.reports.doc import Table, to_markdown
from normlab.studies import ghost, lrrange, running
from normlab.studies.lrrange import Range, usable_range
from normlab.training.config import RunConfig

ZOO = ("bn", "ln", "gn", "in", "brn", "gbn", "frn", "evo-s0", "evo-b0", "rms")


# ----------------------------------------------------------------------------- synthetic runs


def config(norm: str = "bn", lr: float = 0.1, *, epochs: int = 1, options: dict | None = None,
           weight_std: bool = False, precise: bool = False) -> dict:
    data = {"norm": norm, "dropout": 0.0, "subset": 19200, "protocol": {
        "name": "seed", "epochs": epochs, "lr": lr, "scheduler": "none"}}
    if options:
        data["norm_options"] = options
    if weight_std:
        data["weight_std"] = True
    if precise:
        data["precise_bn"] = True
    return {k: v for k, v in RunConfig.from_dict(data).to_dict().items() if k != "seed"}


def record(epoch: int, acc: float, loss: float = 0.3, blown: bool = False, **extra) -> dict:
    """One metrics.jsonl line; ``blown``: the loss became nan at step 40."""
    return {"epoch": epoch, "lr": 0.1, "train_loss": math.nan if blown else loss,
            "train_acc": acc, "train_l1": 0.0, "first_bad_step": 40 if blown else -1,
            "train_seconds": 1.0, "test_loss": math.nan if blown else loss, "test_acc": acc,
            "test_seconds": 0.2, "seconds": 1.2, "images_per_second": 1e4,
            "status": "diverged" if blown or acc < 15 else "ok", **extra}


def write_suite(root: Path, variants: list[tuple[str, dict, dict[int, list[dict]]]]) -> Path:
    """A suite folder: suite.json and, per (variant, seed), config.json, metrics.jsonl and
    predictions.pt (a finished run)."""
    runs, seeds = [], set()
    for name, cfg, by_seed in variants:
        for seed, records in by_seed.items():
            seeds.add(seed)
            rel = f"{name}/seed{seed}"
            runs.append({"variant": name, "seed": seed, "dir": rel})
            run_dir = root / rel
            run_dir.mkdir(parents=True)
            (run_dir / "config.json").write_text(json.dumps(
                {"run": {**cfg, "seed": seed}, "normlab": "0.9.0", "device": "cpu",
                 "threads": 1}))
            (run_dir / "metrics.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in records))
            target = torch.zeros(10, dtype=torch.long)
            torch.save({"pred": target, "target": target, "confidence": torch.ones(10)},
                       run_dir / "predictions.pt")
    (root / "suite.json").write_text(json.dumps({
        "name": root.name, "dataset": "mnist", "seeds": sorted(seeds), "runs": runs,
        "variants": [{"name": n, "label": n, "config": c} for n, c, _ in variants]}))
    return root


NOISE = {1: -0.1, 2: 0.0, 3: 0.1}
LRS = (0.001, 0.01, 0.1, 1.0, 10.0)
CHANCE, BLOWN = "chance", "blown"
# final test accuracy by norm and lr (the mean over seeds 1-3; NOISE per seed); CHANCE: at
# chance with a finite loss, BLOWN: the loss became nan/inf
GRID = {
    "bn": {0.001: 80.0, 0.01: 96.0, 0.1: 97.0, 1.0: 96.0, 10.0: BLOWN},
    "gn": {0.001: 85.0, 0.01: 95.5, 0.1: 96.0, 1.0: 90.0, 10.0: BLOWN},
    "none": {0.001: CHANCE, 0.01: CHANCE, 0.1: 90.0, 1.0: CHANCE, 10.0: BLOWN},
}


def lr_suite(root: Path, grid: dict = GRID, seeds=(1, 2, 3), override: dict | None = None
             ) -> Path:
    """``override``: {(norm, lr, seed): accuracy} replaces single runs."""
    variants = []
    for norm, row in grid.items():
        for lr, value in row.items():
            by_seed = {}
            for s in seeds:
                value_s = (override or {}).get((norm, lr, s), value)
                if value_s == BLOWN:
                    by_seed[s] = [record(1, 9.8, blown=True)]
                elif value_s == CHANCE:
                    by_seed[s] = [record(1, 9.8 + s / 10, loss=2.3)]
                else:
                    by_seed[s] = [record(1, value_s + NOISE[s])]
            variants.append((f"{norm}-lr{lr:g}", config(norm, lr), by_seed))
    return write_suite(root, variants)


# ----------------------------------------------------------------------------- lr range


def test_usable_range_is_contiguous_around_the_best_and_needs_training():
    grid = [0.01, 0.1, 1.0, 10.0]
    values = {0.01: 95.0, 0.1: 97.0, 1.0: 96.0, 10.0: 96.5}
    trains = {0.01: True, 0.1: True, 1.0: True, 10.0: False}
    rng = usable_range(grid, values, trains, margin=1.5)
    assert rng.lrs == [0.1, 1.0] and rng.best_lr == 0.1 and rng.width == 2
    assert rng.text() == "0.1 – 1 (10×)"
    gap = usable_range(grid, {**values, 1.0: 90.0, 10.0: 97.0}, {lr: True for lr in grid})
    assert gap.lrs == [0.01, 0.1]  # a tie goes to the smaller lr; the dip at 1 ends the range
    assert usable_range(grid, values, dict.fromkeys(grid, False)) == Range([])


def test_the_lr_range_heat_map_table_and_verdict(tmp_path):
    # BN usable over 0.01-1 on seeds 1-2, over 0.01-0.1 on seed 3 (94.0 < 97.1 - 2 at lr 1)
    root = lr_suite(tmp_path / "lr", override={("bn", 1.0, 3): 94.0})
    parts = lrrange.lr_range_parts(load_results(root), tmp_path / "figs")
    assert parts is not None
    blocks, images = parts
    text = to_markdown(blocks)
    grid_table, range_table = [b for b in blocks if isinstance(b, Table)]
    assert grid_table.header == ["norm", *(f"lr {lr:g}" for lr in LRS)]
    assert [row[0] for row in grid_table.rows] == ["BN", "GN (2 groups)", "no norm"]
    assert grid_table.rows[0][1:] == ["80.00 ± 0.10", "96.00 ± 0.10", "97.00 ± 0.10",
                                      "95.33 ± 1.07",
                                      "diverged (3/3)"]
    assert grid_table.rows[2][1] == "at chance (10.0)"
    assert range_table.rows[0][:5] == ["BN", "97.00 at 0.1", "0.01 – 1 (100×)", "3", "2–3"]
    assert range_table.rows[2][:5] == ["no norm", "90.00 at 0.1", "0.1", "1", "1"]
    # BN: widths 3, 3, 2 against none's 1, 1, 1: +1.67, interval excludes 0
    assert range_table.rows[0][5].startswith("+1.67 [+0.23, +3.10]")
    assert range_table.rows[1][5] == "+1.00 [+1.00, +1.00]"  # GN: 0.01-0.1 on every seed
    assert ("**Yes**: each of the 2 normalized variants has a wider usable range than the "
            "network without normalization, which has 1 learning rate (0.1, best 90.00%)") in text
    assert ("At learning rates 0.001, 0.01 and 1 the network without normalization stays "
            "**at chance** on every finished seed (final test accuracy 9.9–10.1%), while 2 of "
            "2 normalized variants train at one or more of them (BN, GN (2 groups))") in text
    assert "the smallest gain over none among them: BN at lr 0.001, +70.00 points" in text
    assert ("At learning rate 10 the network without normalization **diverges** (loss "
            "nan/inf) on every finished seed (final test accuracy 9.8%), and no normalized "
            "variant trains there either.") in text
    assert "- BN: best 97.00% at lr 0.1; usable 0.01 – 1 (100×), 3 of 5 learning rates" in text
    # BN's p 0.038 alone; GN's 0 (the same +1 on every seed): Holm keeps BN's at 0.038
    assert "[+0.23, +3.10], Holm p = 0.038 of 2): **wider** than none's" in text
    assert "**Statistics.** 2 comparisons in one family" in text
    assert [i.path.name for i in images] == [lrrange.FIGURE]
    png = imread(images[0].path)
    assert png.shape[0] > 200 and png.shape[1] > 500 and np.ptp(png[..., :3]) > 0.5


def test_lr_range_says_no_and_partly_when_the_widths_say_so(tmp_path):
    same = {**GRID, "gn": {0.001: CHANCE, 0.01: CHANCE, 0.1: 96.0, 1.0: 80.0, 10.0: BLOWN}}
    text = to_markdown(lrrange.lr_range_parts(
        load_results(lr_suite(tmp_path / "a", same)), tmp_path / "f")[0])
    assert "**Partly**: 1 of 2 normalized variants have a wider usable range" in text
    assert "not wider: GN (2 groups) not distinguishable" in text
    assert "**not distinguishable** from none's" in text
    narrow = {"gn": same["gn"], "none": GRID["none"]}
    text = to_markdown(lrrange.lr_range_parts(
        load_results(lr_suite(tmp_path / "b", narrow)), tmp_path / "f")[0])
    assert text.count("**No**: no normalized variant's usable range is wider") == 1


def test_lr_range_with_one_seed_gives_no_verdict(tmp_path):
    text = to_markdown(lrrange.lr_range_parts(
        load_results(lr_suite(tmp_path / "s", seeds=(2,))), tmp_path / "f")[0])
    assert "cannot say whether normalization widens the usable range" in text
    assert "one seed: no interval" in text


def test_lr_range_mixed_cells_count_the_seeds_that_diverged(tmp_path):
    root = lr_suite(tmp_path / "m", override={("gn", 1.0, 2): BLOWN})
    blocks, _ = lrrange.lr_range_parts(load_results(root), tmp_path / "f")
    table = next(b for b in blocks if isinstance(b, Table))
    assert table.rows[1][4].endswith("[1/3 diverged]")


def test_a_weight_standardized_variant_is_its_own_row(tmp_path):
    variants = [(f"{name}-lr{lr:g}", config("gn", lr, weight_std=ws),
                 {1: [record(1, 90.0 + lr)], 2: [record(1, 90.5 + lr)]})
                for name, ws in (("gn", False), ("gnws", True)) for lr in (0.01, 0.1, 1.0)]
    study = lrrange.find_study(load_results(write_suite(tmp_path / "ws", variants)))
    assert [row.label for row in study.rows] == ["GN (2 groups)", "GN (2 groups) + WS"]
    assert [row.key for row in study.rows] == ["gn", "gn+ws"]


# ----------------------------------------------------------------------------- ghost batch


def ghost_suite(root: Path, accs: dict[int, float], losses: dict[int, float]) -> Path:
    variants = [(f"gbn-v{vb}", config("gbn", 0.1, epochs=2, options={"virtual_batch": vb}),
                 {s: [record(1, accs[vb] - 1, losses[vb] * 2),
                      record(2, accs[vb] + NOISE[s] * (1 + (s + vb) % 3),
                             losses[vb] + NOISE[s] * (1 + (s * vb) % 4) / 100)]
                  for s in (1, 2, 3)})
                for vb in sorted(accs)]
    return write_suite(root, variants)


def test_the_ghost_batch_study_compares_each_virtual_batch_with_the_whole_batch(tmp_path):
    root = ghost_suite(tmp_path / "g", {2: 97.0, 8: 98.9, 64: 99.0}, {2: 0.20, 8: 0.10, 64: 0.09})
    blocks, images = ghost.ghost_batch_parts(load_results(root), tmp_path / "figs")
    text = to_markdown(blocks)
    table = next(b for b in blocks if isinstance(b, Table))
    assert [row[0] for row in table.rows] == ["2", "8", "64 (whole batch)"]
    assert table.rows[0][2] == "-1.90 [-2.15, -1.65]"
    assert table.rows[2][2] == "—"
    assert ("**Yes** for GBN: at a fixed SGD batch of 64, normalising over 2 images instead of "
            "64 lowers the test accuracy by 1.90 points (95% interval [-2.15, -1.65], Holm p "
            "= 0.002)") in text
    assert ("Final training loss at virtual batch 2 minus at 64: +0.1100 (95% interval "
            "[+0.1050, +0.1150], Holm p < 0.001)") in text
    assert "**Statistics.** 3 comparisons in one family" in text
    assert "**higher** (the noisier statistics fit the training data less closely)" in text
    assert [i.path.name for i in images] == [ghost.FIGURE]


def test_the_ghost_batch_study_says_when_nothing_moves(tmp_path):
    root = ghost_suite(tmp_path / "g", {2: 99.0, 8: 99.05, 64: 99.0},
                       {2: 0.09, 8: 0.09, 64: 0.09})
    text = to_markdown(ghost.ghost_batch_parts(load_results(root), tmp_path / "f")[0])
    assert "**No effect shown** for GBN: at a fixed SGD batch of 64" in text
    assert "not resolved" in text
    assert "No virtual batch's test accuracy differs resolvably from 64's (Holm-adjusted)." in text


# ----------------------------------------------------------------------------- running stats


def running_suite(root: Path, gaps: dict[float, float]) -> Path:
    """BN at each momentum, 3 epochs, PreciseBN ``gaps[m]`` points above the running
    statistics (plus per-seed noise)."""
    variants = []
    for m, gap in gaps.items():
        by_seed = {s: [record(e, 97.0 + e, test_acc_precise=97.0 + e + gap + NOISE[s] * e,
                              test_loss_precise=0.1) for e in (1, 2, 3)] for s in (1, 2, 3)}
        variants.append((f"bn-m{m:g}", config("bn", 0.1, epochs=3, options={"momentum": m},
                                              precise=True), by_seed))
    return write_suite(root, variants)


def test_the_running_stats_study_gives_the_gap_per_epoch_and_momentum(tmp_path):
    root = running_suite(tmp_path / "r", {0.01: 1.5, 0.1: 0.0})
    blocks, images = running.running_stats_parts(load_results(root), tmp_path / "figs")
    text = to_markdown(blocks)
    table = next(b for b in blocks if isinstance(b, Table))
    assert table.rows[0][:4] == ["BN (momentum=0.01)", "1", "98.00 ± 0.00", "99.50 ± 0.10"]
    assert table.rows[2][4].startswith("+1.50 [")
    assert table.rows[3][0] == "BN (momentum=0.1)"
    assert ("**Yes**, the running statistics and the recalibrated ones give different test "
            "accuracies, resolved with the family-wise error held by Holm: for BN "
            "(momentum=0.01) PreciseBN raises the test accuracy by 1.50 points on average") in text
    assert "No difference resolved for BN (momentum=0.1)." in text
    assert "**Statistics.** 8 comparisons in one family" in text  # 2 x (3 epochs + mean)
    assert [i.path.name for i in images] == [running.FIGURE]


def test_the_running_stats_study_says_no_lag_when_there_is_none(tmp_path):
    root = running_suite(tmp_path / "r", {0.1: 0.0})
    text = to_markdown(running.running_stats_parts(load_results(root), tmp_path / "f")[0])
    assert "**No lag shown**: for BN (momentum=0.1)" in text


# ----------------------------------------------------------------------------- any suite


def test_the_studies_are_absent_from_other_suites(tmp_path, monkeypatch):
    """(The test-batch section, for any suite, needs checkpoints: left out here.)"""
    root = write_suite(tmp_path / "s6", [(n, config(n), {1: [record(1, 98.0)]})
                                         for n in ("bn", "gn", "ln")])
    suite = load_results(root)
    for parts in (lrrange.lr_range_parts, ghost.ghost_batch_parts,
                  running.running_stats_parts):
        assert parts(suite, tmp_path / "figs") is None
    monkeypatch.setattr(report_build, "_test_batch_parts", lambda suite, figs: None)
    assert study_parts(suite, tmp_path / "figs") == []


# ----------------------------------------------------------------------------- bundled suites


def test_the_lr_range_suite_is_every_norm_by_a_log_grid_of_lrs():
    suite = load_suite("lr-range")
    assert len(suite.seeds) == 3
    cells = {}
    for v in suite.variants:
        c = v.config
        key = c.norm + ("+ws" if c.model.weight_std else "")
        cells.setdefault(key, []).append(c.protocol.lr)
        assert c.model.dropout == 0 and c.protocol.scheduler == "none"
        assert c.protocol.epochs == 1
        assert dataclasses.replace(c.protocol, lr=1.0) == dataclasses.replace(
            suite.variants[0].config.protocol, lr=1.0)  # only the learning rate varies
    assert set(cells) == {*ZOO, "gn+ws", "none"}
    lrs = sorted(cells["bn"])
    assert all(sorted(x) == lrs for x in cells.values())
    assert lrs[0] <= 0.001 and lrs[-1] >= 3
    ratios = [b / a for a, b in itertools.pairwise(lrs)]
    assert max(ratios) <= 4.01  # a log grid, no gap wider than a factor 4


def test_the_ghost_batch_suite_fixes_the_sgd_batch():
    suite = load_suite("ghost-batch")
    assert len(suite.seeds) == 3
    assert {v.config.norm for v in suite.variants} == {"gbn"}
    assert sorted(v.config.model.norm_options["virtual_batch"] for v in suite.variants) == [
        2, 4, 8, 16, 32, 64]
    assert {v.config.protocol for v in suite.variants} == {suite.variants[0].config.protocol}
    assert suite.variants[0].config.protocol.batch_size == 64


def test_the_running_stats_suite_evaluates_with_precise_bn():
    suite = load_suite("running-stats")
    assert len(suite.seeds) == 3
    assert all(v.config.precise_bn and v.config.norm == "bn" for v in suite.variants)
    assert sorted(v.config.model.norm_options["momentum"] for v in suite.variants) == [
        0.01, 0.1, 0.5]


# ----------------------------------------------------------------------------- end to end


def test_the_quick_lr_range_suite_runs_into_a_report_with_the_heat_map(mnist, tmp_path,
                                                                       monkeypatch):
    # the test-batch section (any suite; its own tests) would double this test's time
    monkeypatch.setattr(report_build, "_test_batch_parts", lambda suite, figs: None)
    suite = load_suite("lr-range-quick")
    out = tmp_path / "lrq"
    report = run_suite(suite, out, jobs=2, threads=1, quiet=True)
    results = load_results(out)
    assert not results.by_state("failed") and len(results.runs) == len(suite.runs())
    states = {(r.variant, r.seed): r.final["status"] for r in results.runs}
    assert states[("bn-lr10", 1)] == "diverged"  # a diverging learning rate is a result
    page = report.read_text()
    assert 'id="lr-range"' in page and "Heat map of final test accuracy" in page
    assert (out / "figures" / lrrange.FIGURE).exists()
    analysis = (out / "analysis.md").read_text()
    # BN at lr 10: nan on both seeds on the AMX host ("diverged (2/2)"); on an AVX2 Zen 3
    # seed 2 ends at chance instead (20 steps: too few for the at-chance stop), which the
    # cell says as "[1/2 diverged, 1/2 at chance]"
    finals = {r.seed: r.final for r in results.runs if r.variant == "bn-lr10"}
    diverged = sum(f["status"] == "diverged" for f in finals.values())
    chance = sum(f["status"] == "ok" and f["test_acc"] < 15 for f in finals.values())
    flags = [f"{diverged}/2 diverged"] + ([f"{chance}/2 at chance"] if chance else [])
    cell = "diverged (2/2)" if diverged == 2 else f"[{', '.join(flags)}]"
    bn_row = next(line for line in analysis.splitlines() if line.startswith("| BN |"))
    assert "## Learning-rate range" in analysis and bn_row.rstrip(" |").endswith(cell), bn_row
    assert ("**Yes**" in analysis) or ("**Partly**" in analysis) or ("**No**" in analysis)
