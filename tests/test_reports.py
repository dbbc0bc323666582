"""The suite report: synthetic run directories in, every artifact checked for sanity."""

from __future__ import annotations

import csv
import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.image import imread

from normlab.cli import main
from normlab.reports import build as report_build
from normlab.reports import build_report, load_results, probe_norm
from normlab.reports.analysis import analysis_blocks
from normlab.reports.doc import Bullets, Heading, Para, Table, to_html, to_markdown
from normlab.reports.figures import confusion, top_mistakes, zoom_limits
from normlab.reports.stats import paired_difference, sample_std, summarise, t975
from normlab.reports.tables import METRIC_KEYS
from normlab.training.config import RunConfig

N_TEST = 40
# final test accuracy per (variant, seed): BN - L1 = [0.1, 0.3] over seeds 1, 2
FINAL = {("bn", 1): 99.1, ("bn", 2): 99.3, ("bn_l1", 1): 99.0, ("bn_l1", 2): 99.0}


@pytest.fixture(scope="module", autouse=True)
def no_test_batch_section():
    """These run folders are synthetic, without checkpoints: the test-batch section, which
    computes from checkpoints, is left out (tests/test_precise_testbatch.py tests it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report_build, "_test_batch_parts", lambda suite, figs: None)
        yield


def synthetic_images(dataset: str) -> tuple[np.ndarray, tuple[str, ...]]:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(N_TEST, 28, 28), dtype=np.uint8), tuple("0123456789")


def run_config(l1: float = 0.0, epochs: int = 3, norm: str = "bn") -> dict:
    proto = {"epochs": epochs} if epochs != 20 else {}
    cfg = RunConfig.from_dict({"norm": norm, "l1": l1, "protocol": {"name": "seed", **proto}})
    return {k: v for k, v in cfg.to_dict().items() if k != "seed"}


def metrics_line(epoch: int, test_acc: float, status: str = "ok") -> dict:
    record = {
        "epoch": epoch, "lr": 0.1, "train_loss": 0.5 / epoch, "train_acc": 90.0 + epoch,
        "train_l1": 0.0, "first_bad_step": -1, "train_seconds": 10.0, "test_loss": 0.1 / epoch,
        "test_acc": test_acc, "test_seconds": 1.0, "seconds": 11.0 + epoch,
        "images_per_second": 6000.0, "status": status,
    }
    if status == "diverged":
        record["message"] = "diverged: loss became nan/inf at epoch 2"
    return record


def write_run(run_dir: Path, config: dict, seed: int, accs: list[float], finished: bool) -> None:
    run_dir.mkdir(parents=True)
    meta = {"run": {**config, "seed": seed}, "normlab": "0.1.0", "torch": "2", "device": "cpu",
            "threads": 2}
    (run_dir / "config.json").write_text(json.dumps(meta))
    lines = [json.dumps(metrics_line(i + 1, a)) for i, a in enumerate(accs)]
    (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    if finished:
        gen = torch.Generator().manual_seed(seed)
        target = torch.randint(0, 10, (N_TEST,), generator=gen)
        pred = target.clone()
        pred[:12] = (target[:12] + 1) % 10  # 12 mistakes
        confidence = torch.rand(N_TEST, generator=gen)
        confidence[3] = confidence[5] = 0.99  # a tie, broken by index
        torch.save({"pred": pred, "target": target, "confidence": confidence},
                   run_dir / "predictions.pt")


def make_suite(root: Path, skip: tuple = (), unfinished: tuple = (), epochs: int = 3) -> Path:
    variants = [("bn", "BN", run_config(0.0, epochs)),
                ("bn_l1", "BN + L1", run_config(1e-3, epochs))]
    runs = []
    for name, _, config in variants:
        for seed in (1, 2):
            entry = {"variant": name, "seed": seed, "dir": f"{name}/seed{seed}"}
            runs.append(entry)
            if (name, seed) in skip:
                continue
            final = FINAL[(name, seed)]
            accs = [final - 0.8, final - 0.35, final][:epochs] if epochs == 3 else (
                [97.0 + 2 * i / epochs for i in range(epochs - 1)] + [final])
            partial = (name, seed) in unfinished
            write_run(root / entry["dir"], config, seed, accs[:2] if partial else accs,
                      finished=not partial)
    manifest = {"name": "synthetic", "description": "two variants, two seeds", "source": "tests",
                "dataset": "mnist", "seeds": [1, 2],
                "variants": [{"name": n, "label": label, "config": c} for n, label, c in variants],
                "runs": runs}
    (root / "suite.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = make_suite(tmp_path_factory.mktemp("suite"))
    build_report(root, images=synthetic_images)
    return root


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_results_csv_has_every_epoch_and_metric(built):
    rows = read_csv(built / "results.csv")
    assert len(rows) == 2 * 2 * 3
    assert set(METRIC_KEYS) <= set(rows[0])
    assert {(r["variant"], r["seed"], r["epoch"]) for r in rows} == {
        (v, str(s), str(e)) for v in ("bn", "bn_l1") for s in (1, 2) for e in (1, 2, 3)}
    last = next(r for r in rows if r["variant"] == "bn" and r["seed"] == "2" and r["epoch"] == "3")
    assert float(last["test_acc"]) == pytest.approx(99.3)


def test_summary_csv_is_mean_and_sample_std(built):
    rows = {r["variant"]: r for r in read_csv(built / "summary.csv")}
    bn = rows["bn"]
    assert float(bn["final_test_acc_mean"]) == pytest.approx(99.2, abs=1e-6)
    assert float(bn["final_test_acc_std"]) == pytest.approx(math.sqrt(0.02), abs=1e-6)
    assert float(bn["best_test_acc_mean"]) == pytest.approx(99.2, abs=1e-6)
    assert float(rows["bn_l1"]["final_test_acc_std"]) == pytest.approx(0.0, abs=1e-6)
    assert int(bn["parameters"]) == 5760
    assert bn["seeds_finished"] == "2"
    # 99.0 reached at epoch 3 by both seeds; 99.4 never
    assert float(bn["epochs_to_99.0_mean"]) == 3.0 and bn["seeds_reaching_99.0"] == "2"
    assert bn["epochs_to_99.4_mean"] == "" and bn["seeds_reaching_99.4"] == "0"
    assert float(bn["seconds_per_epoch"]) == pytest.approx(13.0)


def test_analysis_ranks_and_gives_the_paired_interval(built):
    text = (built / "analysis.md").read_text()
    assert "| 1 | BN | 99.20 ± 0.14 |" in text
    assert "| 2 | BN + L1 | 99.00 ± 0.00 |" in text
    # differences [0.1, 0.3]: mean 0.2, half width t(0.975, 1) * sd / sqrt(2)
    half = 12.7062 * sample_std([0.1, 0.3]) / math.sqrt(2)
    interval = f"[{0.2 - half:+.2f}, {0.2 + half:+.2f}]"
    assert interval == "[-1.07, +1.47]"
    assert f"| BN − BN + L1 | 2 | +0.20 | {interval} | not resolved (Holm p = " in text
    assert "identical data order and augmentation for the same seed" in text
    assert "BN + L1 (λ=0.001) vs BN" in text
    assert "No run diverged" in text
    assert "4 of 4 runs finished" in text
    assert "seed study" not in text  # a 3-epoch protocol is not the seed's


def test_pngs_open_with_sane_shapes(built):
    names = {p.name for p in (built / "figures").glob("*.png")}
    expected = {"test_acc_all.png", "test_acc_no_l1.png", "test_loss_all.png",
                "test_loss_no_l1.png", "train_acc_all.png", "train_loss_all.png",
                "mistakes_bn.png", "mistakes_bn_l1.png", "confusion_bn.png",
                "confusion_bn_l1.png", "norm_groups.png"}
    assert expected <= names
    for name in expected:
        image = imread(built / "figures" / name)
        assert image.ndim == 3 and image.shape[2] in (3, 4), name
        assert 300 <= image.shape[0] <= 2000 and 400 <= image.shape[1] <= 2000, name
        assert image[..., :3].std() > 0.01, f"{name} is blank"


def test_html_is_self_contained(built):
    page = (built / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I)
    assert "http://" not in page and "https://" not in page
    assert page.count("data:image/png;base64,") == 11
    assert "<script" not in page.lower()
    assert "@media print" in page and "max-width: 1100px" in page
    for link in ("results.csv", "summary.csv", "analysis.md"):
        assert f'href="{link}"' in page
    assert (built / "normalizations.xlsx").stat().st_size > 1000
    assert 'href="normalizations.xlsx"' in page
    assert "live formulas" in page


def test_a_workbook_that_cannot_be_written_fails_the_report(tmp_path, monkeypatch):
    import normlab.workbook

    def broken(path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(normlab.workbook, "write_workbook", broken)
    root = make_suite(tmp_path)
    with pytest.raises(ValueError, match=r"could not write the workbook .*No space left"):
        build_report(root, images=synthetic_images)


def test_missing_and_unfinished_runs_are_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(report_build, "load_test_images", synthetic_images)
    root = make_suite(tmp_path, skip=(("bn_l1", 2),), unfinished=(("bn", 2),))
    report = build_report(root)
    analysis = (root / "analysis.md").read_text()
    assert "BN + L1 seed 2: **missing**" in analysis
    assert "BN seed 2: **unfinished** (stopped after epoch 2 of 3, last written 0 min" in analysis
    assert "2 of 4 runs finished" in analysis
    # one seed per variant finished: a single observation, no interval
    assert "a single observation (one seed), no interval possible" in analysis
    assert "| 1 | BN | 99.10 |" in analysis  # one seed: no ±
    page = report.read_text()
    assert "bn_l1/seed2" in page and "bn/seed2 (stopped after epoch 2 of 3, last" in page
    assert len(read_csv(root / "results.csv")) == 3 + 2 + 3


def analysis_md(root: Path) -> str:
    """analysis.md's text without drawing the figures (faster than build_report)."""
    suite = load_results(root)
    return to_markdown(analysis_blocks(suite, [summarise(v) for v in suite.variants]))


def test_a_run_whose_lock_is_held_is_training(tmp_path):
    root = make_suite(tmp_path, unfinished=(("bn", 2),))
    (root / "bn" / "seed2" / ".lock").write_text(str(os.getpid()))
    assert "BN seed 2: **training** (training now, 2 of 3 epochs done)" in analysis_md(root)
    (root / "bn" / "seed2" / ".lock").write_text("999999999")  # a process that is gone
    assert "BN seed 2: **unfinished** (stopped after epoch 2 of 3, last" in analysis_md(root)


def test_variant_with_no_finished_run_and_a_diverged_run(tmp_path):
    root = make_suite(tmp_path, skip=(("bn", 1), ("bn", 2)))
    metrics = root / "bn_l1" / "seed1" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    diverged = metrics_line(3, 9.8, "diverged")
    diverged["train_loss"] = diverged["test_loss"] = float("nan")
    lines[-1] = json.dumps(diverged)
    metrics.write_text("\n".join(lines) + "\n{\"epoch\": 4, \"lr")  # a half-written line
    build_report(root, images=synthetic_images)
    analysis = (root / "analysis.md").read_text()
    assert "BN + L1 seed 1 **diverged**" in analysis
    assert "No run diverged" not in analysis
    summary = {r["variant"]: r for r in read_csv(root / "summary.csv")}
    assert summary["bn"]["seeds_finished"] == "0" and summary["bn"]["final_test_acc_mean"] == ""


def test_chance_level_run_is_flagged(tmp_path):
    root = make_suite(tmp_path)
    metrics = root / "bn_l1" / "seed2" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines[-1] = json.dumps(metrics_line(3, 11.35))
    metrics.write_text("\n".join(lines) + "\n")
    analysis = analysis_md(root)
    assert "BN + L1 seed 2 **sits at chance**: final test accuracy 11.35%" in analysis


@pytest.mark.parametrize("computed", [{}, {"kernels": "aten", "dropout_draw": "bernoulli",
                                             "precision": "bf16", "augment": "aten"}])
def test_seed_protocol_is_compared_with_the_seed_study(tmp_path, computed):
    """Also for runs that computed the same model another way (an older normlab's folder:
    torch's norms and rotation, nn.Dropout's masks; or bf16)."""
    root = make_suite(tmp_path, epochs=20)
    manifest = json.loads((root / "suite.json").read_text())
    run_keys = ("precision", "augment")
    for v in manifest["variants"]:
        v["config"].update({k: w for k, w in computed.items() if k in run_keys})
        v["config"]["model"].update({k: w for k, w in computed.items() if k not in run_keys})
    (root / "suite.json").write_text(json.dumps(manifest))
    analysis = analysis_md(root)
    assert "## Compared with the seed study" in analysis
    if computed:
        assert ("Computed in bf16 autocast with torch's ReLU and norms, the training images "
                "rotated by torch's ops.") in analysis
    assert "| BN only | 99.36 | BN | 99.20 ± 0.14 | 2 | -0.16 |" in analysis
    assert "| BN + L1 λ=0.001 (buggy L1) | 92.70 | BN + L1 | 99.00 ± 0.00 | 2 | +6.30 |" in analysis
    assert "lead of 0.00 points over BN" in analysis


def test_a_suite_with_no_run_yet_still_reports(tmp_path):
    root = make_suite(tmp_path, skip=(("bn", 1), ("bn", 2), ("bn_l1", 1), ("bn_l1", 2)))
    page = build_report(root, images=synthetic_images).read_text()
    assert "0 of 4 runs finished" in page and "No variant has a finished run yet" in page
    assert "bn/seed1" in page  # listed as missing
    assert len(read_csv(root / "results.csv")) == 0


def test_unavailable_test_images_skip_only_the_galleries(tmp_path):
    def no_data(dataset: str):
        raise ValueError(f"{dataset} is not here")

    page = build_report(make_suite(tmp_path), images=no_data).read_text()
    assert "Test images unavailable (mnist is not here): galleries skipped." in page
    assert page.count("data:image/png;base64,") == 9  # no galleries, everything else
    assert not list((tmp_path / "figures").glob("mistakes_*.png"))


def test_suite_without_manifest_is_discovered(tmp_path):
    make_suite(tmp_path, skip=(("bn_l1", 2),))
    (tmp_path / "suite.json").unlink()
    suite = load_results(tmp_path)
    assert [v.name for v in suite.variants] == ["bn", "bn_l1"]
    assert suite.seeds == [1, 2]
    assert [r.state for r in suite.variants[1].runs] == ["finished", "missing"]


def test_cli_builds_and_reports_bad_roots(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(report_build, "load_test_images", synthetic_images)
    root = make_suite(tmp_path / "s")
    assert main(["report", str(root)]) == 0
    assert capsys.readouterr().out.strip().endswith("report.html")
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2


@pytest.mark.parametrize("name", ["bn", "ln", "gn", "in"])
def test_norm_probe_finds_one_normalisation_group(name):
    n, c, h, w = 4, 6, 3, 2
    mask = probe_norm(name, (n, c, h, w), groups=2, index=(1, 4, 2, 0))
    expect = torch.zeros(n, c, h, w, dtype=torch.bool)
    if name == "bn":  # one channel, across every sample and position
        expect[:, 4] = True
    elif name == "ln":  # one sample, every channel and position
        expect[1] = True
    elif name == "gn":  # one sample, the C / groups channels of the group
        expect[1, 3:6] = True
    else:  # one sample, one channel
        expect[1, 4] = True
    assert torch.equal(mask, expect)


def test_t_quantiles_are_the_published_ones():
    # two-sided 95% critical values as printed in t tables
    for df, t in ((1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423),
                  (60, 2.0003), (1000, 1.9623)):
        assert t975(df) == pytest.approx(t, abs=5e-5), df
    with pytest.raises(ValueError, match="degrees of freedom"):
        t975(0)


def test_paired_difference():
    p = paired_difference({1: 99.4, 2: 99.6, 3: 99.0}, {1: 99.3, 2: 99.3})
    assert p.seeds == [1, 2] and p.mean == pytest.approx(0.2)
    assert p.half_width == pytest.approx(12.7062 * math.sqrt(0.02) / math.sqrt(2))
    assert p.within_noise is True
    one = paired_difference({1: 99.4}, {1: 99.3})
    assert one.half_width is None and one.interval is None and one.within_noise is None
    assert paired_difference({1: 1.0}, {2: 1.0}) is None


def test_top_mistakes_are_deterministic():
    pred = np.array([1, 0, 2, 3, 1, 5])
    target = np.array([0, 0, 1, 0, 0, 0])
    conf = np.array([0.5, 0.99, 0.9, 0.9, 0.2, 0.7], dtype=np.float32)
    assert top_mistakes(pred, target, conf, k=4).tolist() == [2, 3, 5, 0]


def test_confusion_rows_are_true_classes():
    cm = confusion(np.array([1, 1, 0]), np.array([0, 1, 0]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 0]]


def test_zoom_keeps_high_region_and_flags_far_models(tmp_path):
    suite = load_results(make_suite(tmp_path))
    limits, far = zoom_limits(suite.variants, "test_acc")
    assert 98.0 < limits[0] < 99.0 and 99.3 < limits[1] <= 100
    lowest = min(m["test_acc"] for v in suite.variants for r in v.runs for m in r.metrics)
    assert far == (lowest < limits[0])  # an early epoch under the zoom gets the full panel too
    for v in suite.variants:  # every point inside the zoom: no full-range panel
        for run in v.runs:
            for m in run.metrics:
                m["test_acc"] = max(m["test_acc"], 99.0)
    limits, far = zoom_limits(suite.variants, "test_acc")
    assert not far and limits[0] < 99.0
    for run in suite.variants[1].runs:
        for m in run.metrics:
            m["test_acc"] = 9.8
    limits, far = zoom_limits(suite.variants, "test_acc")
    assert far and limits[0] > 98.0


def test_doc_renders_markdown_and_escaped_html():
    blocks = [Heading("A & B", 1), Para("**bold** <x> `code`"), Bullets(["one"]),
              Table(["name", "value"], [["a|b", "1.00"]])]
    md = to_markdown(blocks)
    assert md.startswith("# A & B\n\n**bold** <x> `code`")
    assert "| a\\|b | 1.00 |" in md and "| --- | ---: |" in md
    page = to_html(blocks)
    assert "<h2>A &amp; B</h2>" in page
    assert "<strong>bold</strong> &lt;x&gt; <code>code</code>" in page
    assert '<td class="num">1.00</td>' in page


def test_a_large_suite_compares_neighbours_in_the_ranking(tmp_path):
    """Over ALL_PAIRS_UP_TO variants the paired table holds n - 1 neighbours, not n(n-1)/2
    pairs (96 lr-range variants would make 4,560)."""
    from normlab.reports.analysis import ALL_PAIRS_UP_TO

    n = ALL_PAIRS_UP_TO + 2
    variants, runs = [], []
    for i in range(n):
        name = f"v{i}"
        variants.append({"name": name, "label": f"V{i}", "config": run_config(l1=i * 1e-5)})
        for seed in (1, 2):
            runs.append({"variant": name, "seed": seed, "dir": f"{name}/seed{seed}"})
            write_run(tmp_path / name / f"seed{seed}", run_config(l1=i * 1e-5), seed,
                      [90.0, 95.0, 98.0 - i * 0.1 + seed * 0.01], finished=True)
    (tmp_path / "suite.json").write_text(json.dumps({
        "name": "large", "description": "", "source": "tests", "dataset": "mnist",
        "seeds": [1, 2], "variants": variants, "runs": runs}))
    text = analysis_md(tmp_path)
    assert f"{n} ranked variants make {n * (n - 1) // 2} pairs" in text
    rows = [line for line in text.splitlines() if re.match(r"\| V\d+ − V\d+ \|", line)]
    assert [r.split(" | ")[0] for r in rows] == [f"| V{i} − V{i + 1}" for i in range(n - 1)]


def test_curves_of_more_variants_than_fit_a_legend_are_left_out(tmp_path, monkeypatch):
    monkeypatch.setattr(report_build, "CURVES_UP_TO", 1)
    root = make_suite(tmp_path)
    build_report(root, images=synthetic_images)
    assert not (root / "figures" / "test_acc_all.png").exists()
    page = (root / "report.html").read_text()
    assert "2 variants: the curves of all of them in one figure are drawn only for suites " \
           "of up to 1 variants" in page
