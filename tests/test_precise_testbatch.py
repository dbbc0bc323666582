"""PreciseBN (RunConfig.precise_bn, normlab.studies.precise) and the test-batch study
(normlab.studies.testbatch): the run's own numbers unchanged, resume exact, recalibration
equal to the population statistics computed directly, the modes (batch-statistics norms
move, the others do not), the cache, the report's section. Subsets of the real MNIST
(2,000 training and 2,000 test images), one or two epochs."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from conftest import suite_toml
from normlab import accel
from normlab.accel.normdrop import BatchNormDropout
from normlab.models import ModelConfig, Net
from normlab.reports.collect import load_results
from normlab.reports.doc import to_markdown
from normlab.studies import precise
from normlab.studies import testbatch as tb
from normlab.training import RunConfig, RunDir, TensorData, read_metrics, resolve_protocol, train
from normlab.training.augment import to_input
from normlab.training.events import EpochFinished
from normlab.training.rundir import TIMING_FIELDS

N = 2000


@pytest.fixture(scope="module")
def small(mnist):
    return (TensorData(mnist.train_images[:N], mnist.train_labels[:N], mnist.mean, mnist.std),
            TensorData(mnist.test_images[:N], mnist.test_labels[:N], mnist.mean, mnist.std))


def config(**kw):
    proto = resolve_protocol("seed", {"epochs": kw.pop("epochs", 2), "batch_size": 64})
    return RunConfig.from_dict({"protocol": proto, "subset": N, "precision": "fp32", **kw})


def ordinary(history):
    """The metrics a run without precise_bn writes (timings left out)."""
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS and "precise" not in k}
            for r in history]


def without_timing(history):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in history]


# ----------------------------------------------------------------------------- config


def test_precise_bn_is_written_only_when_on_and_old_configs_read_as_off():
    off, on = config(), config(precise_bn=True)
    assert "precise_bn" not in off.to_dict()  # a 0.9 config.json compares equal
    assert on.to_dict()["precise_bn"] is True
    assert RunConfig.from_dict(on.to_dict()) == on
    assert RunConfig.from_dict(off.to_dict()).precise_bn is False
    assert RunConfig.from_options(precise_bn=True).precise_bn is True
    with pytest.raises(ValueError, match="precise_bn must be true or false"):
        config(precise_bn="yes")


# ----------------------------------------------------------------------------- PreciseBN runs


@pytest.mark.parametrize("accel_on", ["on", "off"])
def test_precise_bn_adds_its_metrics_and_changes_nothing_else(small, tmp_path, accel_on):
    plain = train(config(accel=accel_on), tmp_path / "plain", data=small)
    both = train(config(accel=accel_on, precise_bn=True), tmp_path / "both", data=small)
    assert ordinary(both.history) == ordinary(plain.history)  # bitwise: floats compared ==
    a = torch.load(tmp_path / "plain/checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "both/checkpoint.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    for r in both.history:
        assert 0 < r["test_acc_precise"] <= 100 and r["test_loss_precise"] > 0
        assert r["precise_seconds"] > 0
    # after 31 steps at momentum 0.1 the running averages still remember the first weights:
    # recalibrated statistics are far better (82% against 42-50% seen)
    first = both.history[0]
    assert first["test_acc_precise"] > first["test_acc"] + 10
    saved = json.loads((tmp_path / "both/config.json").read_text())["run"]
    assert saved["precise_bn"] is True
    assert "precise_bn" not in json.loads((tmp_path / "plain/config.json").read_text())["run"]


def test_precise_bn_without_batch_statistics_is_the_ordinary_test_pass(small, tmp_path):
    run = train(config(norm="gn", epochs=1, precise_bn=True), tmp_path / "gn", data=small)
    (r,) = run.history
    assert r["test_acc_precise"] == r["test_acc"] and r["test_loss_precise"] == r["test_loss"]


def test_precise_bn_resumes_to_an_uninterrupted_runs_numbers(small, tmp_path):
    cfg = config(precise_bn=True, dropout=0.1)

    def kill_after_epoch_1(event):
        if isinstance(event, EpochFinished) and event.record["epoch"] == 1:
            raise KeyboardInterrupt

    whole = train(cfg, tmp_path / "whole", data=small)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", data=small, listener=kill_after_epoch_1)
    resumed = train(cfg, tmp_path / "cut", data=small)
    assert without_timing(resumed.history) == without_timing(whole.history)
    assert without_timing(read_metrics(tmp_path / "cut")) == without_timing(whole.history)


# ----------------------------------------------------------------------------- recalibration


def batches_of(data, size=64, count=6):
    idx = precise.recalibration_images(len(data), size, seed=1, batches=count)
    return [to_input(data.images[i], data.mean, data.std) for i in idx.split(size)]


def test_recalibration_equals_the_population_statistics(small):
    torch.manual_seed(0)
    # no dropout: update_bn's training forward would drop units, the recalibration does not
    model = Net.from_config(ModelConfig(norms=("bn",), kernels="aten", dropout=0.0))
    inputs = batches_of(small[0])
    direct = precise.population_statistics(model, inputs)  # float64, from forward hooks
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clone = copy.deepcopy(model).eval()
    assert precise.recalibrate(clone, inputs) == len(inputs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    got = clone.state_dict()
    assert len(direct) == 10  # 5 BNs x (mean, var)
    for key, value in direct.items():
        torch.testing.assert_close(got[key].double(), value, rtol=1e-5, atol=1e-6)
        assert not torch.equal(got[key], before[key])
    reference = copy.deepcopy(model)  # torch's own PreciseBN recipe gives the same
    update_bn(inputs, reference)
    for key in direct:
        torch.testing.assert_close(got[key], reference.state_dict()[key], rtol=1e-5, atol=1e-6)
    assert [m.momentum for m in precise.stat_modules(clone)] == [0.1] * 5  # restored
    assert not any(m.training for m in clone.modules())  # the modes too


def test_recalibration_reaches_the_accelerators_fused_modules(small):
    torch.manual_seed(0)
    cfg = ModelConfig(norms=("bn",), dropout=0.1)
    model = Net.from_config(cfg).to(memory_format=torch.channels_last)
    accel.prepare(model, cfg, "fp32")  # BatchNorm2d swapped for BatchNormDropout
    fused = [m for m in model.modules() if isinstance(m, BatchNormDropout)]
    assert fused and precise.stat_modules(model) == fused
    inputs = [x.contiguous(memory_format=torch.channels_last) for x in batches_of(small[0])]
    direct = precise.population_statistics(model, inputs)  # after the folded-in ReLU
    rng = torch.get_rng_state()
    clone = precise.recalibrated(model, small[0], 64, seed=1, batches=6)
    assert torch.equal(torch.get_rng_state(), rng)  # dropout off, generators restored
    assert [m.p for m in clone.modules() if isinstance(m, BatchNormDropout)] == [0.1] * 5
    for key, value in direct.items():
        torch.testing.assert_close(clone.state_dict()[key].double(), value,
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm", ["bn", "brn", "gbn", "evo-b0"])
def test_recalibration_of_every_batch_statistics_norm(small, norm):
    """Each norm after a convolution: its running statistics become the mean over the
    recalibration batches of the batch mean and unbiased variance of its input (Ghost BN:
    over its virtual batches of 4, every one of them, not the last of each batch)."""
    from normlab.models import zoo

    make = {"bn": lambda: nn.BatchNorm2d(4), "brn": lambda: zoo.BatchRenorm2d(4),
            "gbn": lambda: zoo.GhostBatchNorm2d(4, virtual_batch=4),
            "evo-b0": lambda: zoo.EvoNormB0(4)}[norm]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), make()).eval()
    assert precise.stat_modules(model) == [model[1]]
    size = precise.batch_size_for(model, 16)
    assert size == (4 if norm == "gbn" else 16)
    clone = precise.recalibrated(model, small[0], 16, seed=3, batches=5)
    idx = precise.recalibration_images(len(small[0]), 16, seed=3, batches=5)
    means, variances = [], []
    with torch.no_grad():
        for part in idx.split(size):
            h = model[0](to_input(small[0].images[part], small[0].mean, small[0].std)).double()
            means.append(h.mean(dim=(0, 2, 3)))
            variances.append(h.var(dim=(0, 2, 3), unbiased=True))
    assert len(means) == 5 * 16 // size
    if hasattr(clone[1], "running_mean"):
        torch.testing.assert_close(clone[1].running_mean.double(), torch.stack(means).mean(0),
                                   rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(clone[1].running_var.double(), torch.stack(variances).mean(0),
                               rtol=1e-5, atol=1e-6)
    assert clone[1].momentum == 0.1 and torch.equal(model[1].running_var, torch.ones(4))


def test_recalibration_images_are_their_own_draw():
    a = precise.recalibration_images(2000, 64, seed=1)
    assert len(a) == 31 * 64 and len(set(a.tolist())) == len(a)  # full batches, no repeats
    assert torch.equal(a, precise.recalibration_images(2000, 64, seed=1))
    assert not torch.equal(a, precise.recalibration_images(2000, 64, seed=2))
    assert len(precise.recalibration_images(60000, 64, seed=1)) == precise.BATCHES * 64
    assert len(precise.recalibration_images(10, 64, seed=1)) == 10


# ----------------------------------------------------------------------------- test-batch modes


@pytest.fixture(scope="module")
def suite_dir(small, tmp_path_factory):
    """A suite folder of finished runs (bn seeds 1, 2; gn and ln seed 1), 2 epochs on
    2,000 images, in the layout normlab.reports reads without a suite.json."""
    root = tmp_path_factory.mktemp("suite")
    for norm, seeds in (("bn", (1, 2)), ("gn", (1,)), ("ln", (1,))):
        for seed in seeds:
            train(config(norm=norm, seed=seed), root / norm / f"seed{seed}", data=small)
    return root


def test_batch_statistics_norms_move_and_the_others_do_not(suite_dir, small):
    suite = load_results(suite_dir)
    lines = []
    rows = {r.variant.name: r for r in tb.collect(suite, test=small[1], progress=lines.append)}
    assert len(lines) == 4
    assert rows["bn"].batch_stats and not rows["gn"].batch_stats and not rows["ln"].batch_stats
    for name in ("gn", "ln"):
        (acc,) = rows[name].by_seed.values()
        assert len(set(acc.values())) == 1, acc  # every mode the same accuracy, exactly
    for acc in rows["bn"].by_seed.values():
        assert len(set(acc.values())) == len(acc), acc
        # one class per batch: every image normalised as its class's average, the classes'
        # differences removed: far below any mixed batch (45% against 89% seen)
        assert acc["class"] < acc["mixed1000"] - 25, acc
    # the running mode is the run's own test pass (the plain model: torch's norms)
    for r in suite.by_state("finished"):
        assert abs(rows[r.variant].by_seed[r.seed]["running"] - r.final["test_acc"]) <= 0.1


@pytest.mark.parametrize("norm", ["brn", "gbn", "evo-b0", "in", "frn", "rms", "evo-s0",
                                  "none"])
def test_the_zoo_with_precise_bn_and_the_test_batch_modes(small, tmp_path, norm):
    """One epoch of each other norm with precise_bn: the batch-statistics norms (BRN, GBN,
    EvoNorm-B0) get other numbers recalibrated and (but BRN) move with the test batch; the
    others are the same in every mode, exactly. (EvoNorm-B0 this early sits at 25-35%: its
    accuracies may agree to the 0.2 points 500 images resolve, so its outputs are compared;
    on an AVX2 Zen 3 all five modes gave 26.6%.)"""
    # the batch-statistics norms must learn something to show it (EvoNorm-B0 sits at
    # chance for 10 steps); the others are exactly the same in every mode from the start
    steps = 31 if norm in ("brn", "gbn", "evo-b0") else 10
    data = [TensorData(d.images[:n], d.labels[:n], d.mean, d.std)
            for d, n in zip(small, (64 * steps, 500), strict=True)]
    test = data[1]
    cfg = config(norm=norm, epochs=1, precise_bn=True, subset=64 * steps)
    (r,) = train(cfg, tmp_path / norm, data=data).history
    batch_stats = tb.uses_batch_statistics(cfg)
    assert batch_stats == (norm in ("brn", "gbn", "evo-b0"))
    acc = tb.run_accuracies(RunDir(tmp_path / norm), cfg, test, epoch=1)["accuracy"]
    if norm == "brn":
        # r and d correct the batch's statistics to the running ones: unclipped (a batch of
        # 1000 is far from r_max = 3, d_max = 5) the training forward is the eval forward
        assert r["test_loss_precise"] != r["test_loss"]
        assert acc["mixed1000"] == acc["running"], acc
    elif norm == "evo-b0":
        assert r["test_loss_precise"] != r["test_loss"]
        model = cfg.make_model()
        model.load_state_dict(RunDir(tmp_path / norm).load_checkpoint("cpu")["model"])
        x = to_input(test.images, test.mean, test.std)
        with torch.no_grad():
            alone, among = model.train()(x[:8]), model(x)[:8]  # batch statistics of 8, 500
        assert not torch.allclose(alone, among)
    elif batch_stats:
        assert r["test_loss_precise"] != r["test_loss"]
        assert len(set(acc.values())) > 1, acc
    else:
        assert (r["test_acc_precise"], r["test_loss_precise"]) == (r["test_acc"], r["test_loss"])
        assert len(set(acc.values())) == 1, acc
    assert abs(acc["running"] - r["test_acc"]) <= 0.2  # the run's own test pass


def test_packed_batches_equal_one_forward_per_batch(suite_dir, small):
    # the trained BN network, built without dropout: the reference loop needs none switched off
    model = Net.from_config(ModelConfig(norms=("bn",), kernels="aten", dropout=0.0))
    model.load_state_dict(RunDir(suite_dir / "bn/seed1").load_checkpoint("cpu")["model"])
    state = copy.deepcopy(model.state_dict())
    test = small[1]
    inputs = to_input(test.images, test.mean, test.std)
    batches = tb.mixed_batches(len(test), 8)[:40]
    got = tb.batch_statistics_accuracy(model, inputs, test.labels, batches)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    correct = 0
    with torch.no_grad():
        for idx in batches:
            model.train()
            correct += int((model(inputs[idx]).argmax(1) == test.labels[idx]).sum())
            model.load_state_dict(state)
    assert got == 100.0 * correct / 320 and got > 50


def test_batches():
    assert [len(b) for b in tb.mixed_batches(10, 4)] == [4, 4, 2]
    labels = torch.tensor([0] * 5 + [1] * 12 + [2] * 3)
    parts = tb.class_batches(labels, most=5)
    assert [len(p) for p in parts] == [5, 4, 4, 4, 3]
    assert all(len(set(labels[p].tolist())) == 1 for p in parts)
    packed = tb.packs(parts, most=9)
    assert [sizes for _, sizes in packed] == [[5, 4], [4, 4], [3]]


def test_the_report_section(suite_dir, small, tmp_path):
    suite = load_results(suite_dir)
    blocks, images = tb.test_batch_parts(suite, tmp_path / "figs", test=small[1],
                                         progress=None)
    assert images[0].path.exists() and images[0].path.name == tb.FIGURE
    text = to_markdown(blocks)
    assert "| bn | yes |" in text and "| gn | no |" in text  # labels: the folders' names
    assert "exactly the same accuracy in every mode" in text
    assert "single-class batches" in text and "95% interval" in text
    # with nothing finished there is no section
    unfinished = tmp_path / "unfinished"
    train(config(epochs=2), unfinished / "bn/seed1", data=small, until=1)
    assert tb.test_batch_parts(load_results(unfinished), tmp_path / "f2", test=small[1]) is None


def test_a_suite_that_leaves_the_section_out_gets_a_sentence_and_nothing_computed(
        suite_dir, small, tmp_path):
    """``test_batch = false`` in a suite's file goes into suite.json, and the report's
    section then says how to add it instead of evaluating any checkpoint."""
    import shutil

    from normlab.experiments import load_suite
    from normlab.experiments.plan import manifest

    root = tmp_path / "copy"
    shutil.copytree(suite_dir, root)
    for cache in root.rglob(tb.CACHE):
        cache.unlink()
    text = suite_toml(("bn", {"norm": "bn"}), ("gn", {"norm": "gn"}), ("ln", {"norm": "ln"}),
                      seeds="[1, 2]")
    path = tmp_path / "study.toml"
    for flag, written in (("", None), ("test_batch = true\n", None),
                          ("test_batch = false\n", False)):
        path.write_text(flag + text)
        data = manifest(load_suite(path), [1, 2])
        assert data.get("test_batch") is written
    (root / "suite.json").write_text(json.dumps(data))
    suite = load_results(root)
    assert suite.test_batch is False
    blocks, images = tb.test_batch_parts(suite, tmp_path / "figs", test=small[1],
                                         progress=None)
    assert images == [] and "sets test_batch = false" in to_markdown(blocks)
    assert not list(root.rglob(tb.CACHE)) and not (tmp_path / "figs").exists()
    (root / "suite.json").write_text(json.dumps({**data, "test_batch": True}))
    assert load_results(root).test_batch is True


def test_the_cache_is_used_and_a_changed_run_is_computed_again(suite_dir, small):
    suite = load_results(suite_dir)
    lines = []
    first = tb.collect(suite, test=small[1], progress=lines.append)  # cached by the tests above
    assert not lines and sum(r.cached for r in first) == 4
    cache = RunDir(suite_dir / "gn/seed1").file(tb.CACHE)
    stored = json.loads(cache.read_text())
    stored["key"]["epoch"] = 1  # as if the checkpoint were another epoch's
    stored["accuracy"] = {m: 0.0 for m in tb.MODES}
    cache.write_text(json.dumps(stored))
    again = {r.variant.name: r for r in tb.collect(suite, test=small[1], progress=lines.append)}
    assert lines == ["test-batch study: gn/seed1 (1 of 1 to compute)"]
    assert again["gn"].cached == 0 and again["gn"].by_seed[1]["running"] > 10
    other = TensorData(small[1].images[:1000], small[1].labels[:1000], small[1].mean,
                       small[1].std)
    for r in suite.by_state("finished"):  # other test images: not these numbers
        assert tb._cached(r.run, r.config, 2, small[1]) is not None
        assert tb._cached(r.run, r.config, 2, other) is None
        assert tb._cached(r.run, r.config, 2) is None  # nor the whole test split


def test_importing_the_studies_package_is_light():
    code = ("import sys, normlab.studies; "
            "print(sorted(m for m in ('matplotlib', 'scipy', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_a_model_without_stat_modules_is_not_recalibrated():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4))
    assert precise.stat_modules(model) == []
    assert precise.recalibrate(model, []) == 0


def rows_of(accuracies):
    """Rows of hand-made accuracies: {norm: {seed: (running, mixed 1000, 8, 2, class)}}."""
    from normlab.reports.collect import VariantResults

    rows = []
    for norm, seeds in accuracies.items():
        cfg = config(norm=norm, **({"norm_options": {"virtual_batch": 4}} if norm == "gbn"
                                   else {}))
        row = tb.Row(VariantResults(norm, norm.upper(), cfg), tb.uses_batch_statistics(cfg))
        row.by_seed = {s: dict(zip(tb.MODES, v, strict=True)) for s, v in seeds.items()}
        rows.append(row)
    return rows


def test_the_verdict_is_generated_from_the_numbers():
    flat = {1: (98.0,) * 5, 2: (97.0,) * 5, 3: (98.5,) * 5}
    moving = {1: (98.0, 98.1, 95.0, 80.0, 30.0), 2: (97.5, 97.4, 94.0, 79.0, 35.0),
              3: (98.2, 98.0, 96.0, 82.0, 28.0)}
    text = to_markdown(tb.test_batch_blocks(rows_of({"bn": moving, "gn": flat})))
    assert "**Yes**" in text and "BN over single-class batches" in text
    assert "GN) give exactly the same accuracy in every mode" in text
    assert "| BN | yes | 97.90 ± 0.90 |" in text  # mean ± t(0.975, 2) * s / sqrt(3)
    noise = {1: (98.0, 98.2, 97.8, 98.1, 97.9), 2: (97.5, 97.3, 97.7, 97.4, 97.6),
             3: (98.2, 98.1, 98.3, 98.2, 98.2)}
    assert "**No**" in to_markdown(tb.test_batch_blocks(rows_of({"bn": noise})))
    one = to_markdown(tb.test_batch_blocks(rows_of({"bn": {1: moving[1]}})))
    assert "one finished seed per variant there are no intervals" in one
    assert "one seed: no interval" in one
    broken = {1: (98.0, 98.0, 98.0, 97.0, 98.0)}
    assert "**But** the norms without batch statistics (GN) moved by up to 1.00" in \
        to_markdown(tb.test_batch_blocks(rows_of({"bn": moving, "gn": broken})))
    none = to_markdown(tb.test_batch_blocks(rows_of({"gn": flat})))
    assert "No variant of this suite normalises with batch statistics" in none
    zoo = to_markdown(tb.test_batch_blocks(rows_of({"brn": flat, "gbn": moving})))
    assert "BRN: Batch Renormalization's training forward" in zoo
    assert "GBN: Ghost BatchNorm's training forward splits every batch into virtual " \
           "batches of 4 images" in zoo


def test_a_run_without_its_checkpoint_is_left_out(small, tmp_path):
    """A finished run whose checkpoint is gone (deleted, or a folder copied without it) is
    named as left out; the section is built from the others, or not at all."""
    root = tmp_path / "suite"
    for seed in (1, 2):
        train(config(norm="bn", seed=seed, epochs=1), root / "bn" / f"seed{seed}", data=small)
    RunDir(root / "bn/seed2").file("checkpoint.pt").unlink()
    rows = tb.collect(load_results(root), test=small[1], progress=None)
    assert list(rows[0].by_seed) == [1]
    assert rows[0].left_out == ["seed 2 (no checkpoint of its last epoch)"]
    blocks, _ = tb.test_batch_parts(load_results(root), tmp_path / "figs", test=small[1],
                                    progress=None)
    assert "Left out: bn: seed 2 (no checkpoint of its last epoch)." in to_markdown(blocks)
    RunDir(root / "bn/seed1").file("checkpoint.pt").unlink()
    RunDir(root / "bn/seed1").file(tb.CACHE).unlink()
    assert tb.test_batch_parts(load_results(root), tmp_path / "f2", test=small[1],
                               progress=None) is None


def test_worker_processes_give_the_serial_numbers(suite_dir, mnist, tmp_path):
    """With the dataset's own test split and several runs to compute, collect computes in
    spawned worker processes: the same numbers as one process computing them in turn."""
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(suite_dir, root)
    for cache in root.rglob(tb.CACHE):
        cache.unlink()
    lines = []
    pooled = tb.collect(load_results(root), progress=lines.append, workers=2)
    assert len(lines) == 4 and all("to compute)" in line for line in lines)
    assert sum(r.cached for r in tb.collect(load_results(root), progress=None)) == 4
    test = tb._test_split("mnist")
    serial = tb.collect(load_results(root), test=test, progress=None)  # other key: computed
    assert sum(r.cached for r in serial) == 0
    assert [r.by_seed for r in pooled] == [r.by_seed for r in serial]
