"""Probes (RunConfig.probe, normlab.probes): a probed run trains to the unprobed run's numbers
bit for bit on every path (hand step, autograd, dropout drawn, the MLP); the records equal
the quantities computed directly; resume leaves probes.jsonl as an uninterrupted run's; the
config, the CLI and their errors. Subsets of the real MNIST (1,000 training and 1,000 test
images), one or two epochs."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import no_report
from normlab.cli import main
from normlab.fields import ConfigError
from normlab.models import ModelConfig, Net
from normlab.probes import (
    KINDS,
    SAMPLE,
    Prober,
    norm_classes,
    parse_probes,
    probe_points,
    read,
)
from normlab.training import RunConfig, TensorData, resolve_protocol, train
from normlab.training.rundir import TIMING_FIELDS

N = 1000


@pytest.fixture(scope="module")
def small(mnist):
    return (TensorData(mnist.train_images[:N], mnist.train_labels[:N], mnist.mean, mnist.std),
            TensorData(mnist.test_images[:N], mnist.test_labels[:N], mnist.mean, mnist.std))


def config(**kw) -> RunConfig:
    proto = resolve_protocol("seed", {"epochs": kw.pop("epochs", 2), "batch_size": 64,
                                      **kw.pop("protocol", {})})
    return RunConfig.from_dict({"protocol": proto, "subset": N, "precision": "fp32", **kw})


def numbers(out) -> tuple[list[dict], dict]:
    """A run's metrics without timings, and its checkpoint's weights and buffers."""
    metrics = [{k: v for k, v in json.loads(line).items() if k not in TIMING_FIELDS}
               for line in (out / "metrics.jsonl").read_text().splitlines()]
    state = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    return metrics, state


def assert_same_run(a, b) -> None:
    (ma, sa), (mb, sb) = numbers(a), numbers(b)
    assert ma == mb
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------- no change


@pytest.mark.parametrize("model", [
    {"norm": "bn", "dropout": 0.1},                    # the hand step, dropout drawn
    {"norm": "gn", "dropout": 0.0, "accel": "off"},    # autograd with torch's norms
    {"norm": "frn", "dropout": 0.05},                  # the zoo through autograd
    {"norm": "bn", "net": "mlp", "dropout": 0.0},      # the MLP's sigmoids
    {"norm": "bn", "dropout": 0.1, "precision": "bf16"},  # the probes' forwards in bf16 too
], ids=["bn-hand", "gn-off", "frn", "mlp-bn", "bn-bf16"])
def test_a_probed_run_trains_to_the_unprobed_runs_numbers(model, small, tmp_path):
    plain = config(**model)
    probed = config(**model, probe="all", probe_every=3)
    train(plain, tmp_path / "plain", device="cpu", threads=1, data=small)
    train(probed, tmp_path / "probed", device="cpu", threads=1, data=small)
    assert_same_run(tmp_path / "plain", tmp_path / "probed")
    assert not (tmp_path / "plain" / "probes.jsonl").exists()
    records = read(tmp_path / "probed")
    steps = -(-N // 64)  # 16 per epoch
    assert [r["step"] for r in records] == list(range(0, 2 * steps, 3))
    assert [r["epoch"] for r in records] == [1 + s // steps for s in range(0, 2 * steps, 3)]
    first = records[0]
    assert set(first) == {"epoch", "step", *KINDS}
    layers = first["activations"]
    if model.get("net") == "mlp":
        assert list(layers) == ["hidden.2", "hidden.5", "hidden.8"]  # the sigmoids' inputs
    else:
        # the seed's five normalised blocks (the transition and the head have no norm)
        assert list(layers) == [f"convblock{i}.2" for i in (1, 2, 4, 6, 7)]
    for stats in layers.values():
        assert stats["p15"] <= stats["p50"] <= stats["p85"]
        assert stats["unit"]["p15"] <= stats["unit"]["p50"] <= stats["unit"]["p85"]
        assert stats["std"] >= 0
    assert all(w["norm"] > 0 and w["update"] > 0 for w in first["weights"].values())
    assert set(first["gradients"]) == set(first["weights"])


# ----------------------------------------------------------------------------- the numbers


def fused_and_reference(mc: ModelConfig):
    """The seed's network of ``mc`` with normlab's fused modules (seed 0), and the plain
    :class:`Net` with the same weights, both in training mode."""
    from normlab.accel import accelerated_net

    torch.manual_seed(0)
    model = accelerated_net(mc)
    reference = Net.from_config(mc)
    reference.load_state_dict(model.state_dict())
    return model.train(), reference.train()


def test_the_records_are_the_quantities_computed_directly():
    """On the seed's network with BN fused (ReLU folded into the norm): each norm's input
    is the ReLU's output, its percentiles torch.quantile's; the gradient norms are .grad's;
    the relative update is ||w' - w|| / ||w||; the forward changed nothing it touched."""
    mc = ModelConfig(norms=("bn",), dropout=0.1)
    model, reference = fused_and_reference(mc)
    x = torch.randn(16, 1, 28, 28)
    prober = Prober(model, KINDS, 1, probe_points(model, norm_classes(mc), "seed"))
    state = [b.clone() for b in model.buffers()]
    rng = torch.get_rng_state()
    prober.before_step(x, torch.arange(16) % 10, 0, 1, 0.1)
    assert all(torch.equal(a, b) for a, b in zip(state, model.buffers(), strict=True))
    assert torch.equal(rng, torch.get_rng_state())  # the step draws its own dropout again
    # the unfused network's first BN input: conv -> ReLU
    with torch.no_grad():
        h = F.relu(reference.convblock1[0](x))
    levels = torch.tensor([0.15, 0.5, 0.85])
    flat = h.reshape(-1)  # 86,528 values: the percentiles from every 6th (at most 16,384)
    sample = torch.quantile(flat[::-(-flat.numel() // SAMPLE)], levels).tolist()
    got = prober._pending["activations"]["convblock1.2"]
    assert [got["p15"], got["p50"], got["p85"]] == pytest.approx(sample, abs=1e-6)
    # and within a fraction of a percentile point of the whole layer's
    whole = torch.quantile(flat, levels).tolist()
    spread = float(flat.max() - flat.min())
    assert [got["p15"], got["p50"], got["p85"]] == pytest.approx(whole, abs=0.01 * spread)
    assert got["mean"] == pytest.approx(float(h.mean()), abs=1e-6)
    unit = torch.quantile(h[:, 0].reshape(-1), torch.tensor([0.15, 0.5, 0.85])).tolist()
    assert [got["unit"][k] for k in ("p15", "p50", "p85")] == pytest.approx(unit, abs=1e-6)
    # gradients and the update
    out = model(x)
    F.nll_loss(out, torch.arange(16) % 10).backward()
    prober.before_update()
    w0 = model.convblock2[0].weight.detach().clone()
    grads = prober._pending["gradients"]
    assert grads["convblock2.0.weight"] == pytest.approx(float(model.convblock2[0].weight
                                                               .grad.norm()))
    torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.0).step()
    prober.after_update()
    record = prober.take()[0]
    w1 = model.convblock2[0].weight.detach()
    assert record["weights"]["convblock2.0.weight"]["update"] == pytest.approx(
        float((w1 - w0).norm() / w0.norm()))
    assert record["weights"]["convblock2.0.weight"]["norm"] == pytest.approx(float(w0.norm()))
    assert "convblock1.2.weight" not in record["weights"]  # a norm's gain is not a weight
    assert prober.take() == []


def test_the_landscape_is_the_loss_and_gradient_along_the_gradient_computed_directly():
    """On the seed's network with BN fused: the loss and gradient at w and at w - eta g
    equal those of the unfused network computed by hand; Santurkar's three quantities
    follow from them; the weights, gradients, buffers and random state are put back."""
    from normlab.probes import LANDSCAPE_STEPS, landscape, smoothness

    model, reference = fused_and_reference(ModelConfig(norms=("bn",), dropout=0.0))
    x, y = torch.randn(32, 1, 28, 28), torch.arange(32) % 10
    before = [p.detach().clone() for p in model.parameters()]
    state = [b.clone() for b in model.buffers()]
    rng = torch.get_rng_state()
    got = landscape(model, x, y, 0.1)
    assert all(torch.equal(a, p) and p.grad is None
               for a, p in zip(before, model.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(state, model.buffers(), strict=True))
    assert torch.equal(rng, torch.get_rng_state())

    params = list(reference.parameters())

    def at(delta: float, g0=None):
        with torch.no_grad():
            for p, w, g in zip(params, before, g0 or before, strict=True):
                p.copy_(w - delta * g if g0 else w)
        loss = F.nll_loss(reference(x), y)
        return float(loss.detach()), torch.autograd.grad(loss, params)

    loss0, g0 = at(0.0)
    assert got["etas"] == pytest.approx([m * 0.1 for m in LANDSCAPE_STEPS])
    assert got["loss0"] == pytest.approx(loss0, rel=1e-5)
    size = float(torch.cat([g.reshape(-1) for g in g0]).norm())
    assert got["grad0"] == pytest.approx(size, rel=1e-4)
    for eta, loss, change in zip(got["etas"], got["loss"], got["grad_change"], strict=True):
        want_loss, g = at(eta, list(g0))
        assert loss == pytest.approx(want_loss, rel=1e-4)
        want = float(torch.cat([(a - b).reshape(-1) for a, b in zip(g, g0, strict=True)]).norm())
        assert change == pytest.approx(want, rel=1e-3)
    found = smoothness({"landscape": got})
    losses = [got["loss0"], *got["loss"]]
    assert found["loss_range"] == pytest.approx(max(losses) - min(losses))
    assert found["grad_change"] == max(got["grad_change"])
    assert found["beta"] == pytest.approx(max(c / (e * got["grad0"]) for c, e in
                                              zip(got["grad_change"], got["etas"], strict=True)))
    assert smoothness({"epoch": 1}) is None
    blown = {**got, "loss": [*got["loss"][:-1], None]}  # a step too far: nan
    assert smoothness({"landscape": blown})["loss_range"] == float("inf")


# ----------------------------------------------------------------------------- resume


def test_resume_leaves_the_records_of_an_uninterrupted_run(small, tmp_path):
    cfg = config(norm="bn", dropout=0.05, probe="activations,weights", probe_every=5)
    train(cfg, tmp_path / "whole", device="cpu", threads=1, data=small)
    part = tmp_path / "part"
    assert train(cfg, part, device="cpu", threads=1, data=small, until=1).paused
    # a kill after the next epoch's probes were written and before its checkpoint: an
    # epoch-2 record and half a line, which the resumed run must not keep
    with open(part / "probes.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "step": 99, "activations": {}}) + "\n")
        f.write('{"epoch": 2, "st')
    train(cfg, part, device="cpu", threads=1, data=small)
    assert read(part) == read(tmp_path / "whole")
    assert_same_run(tmp_path / "whole", part)


# ----------------------------------------------------------------------------- config, CLI


def test_probes_are_written_only_when_asked_and_named_in_errors():
    assert parse_probes("weights, activations") == ("activations", "weights")
    assert parse_probes("all") == KINDS and parse_probes(None) == ()
    off, on = config(), config(probe="gradients", probe_every=7)
    assert "probe" not in off.to_dict() and "probe_every" not in off.to_dict()  # 0.12's format
    assert on.to_dict()["probe"] == ["gradients"] and on.to_dict()["probe_every"] == 7
    assert RunConfig.from_dict(on.to_dict()) == on
    with pytest.raises(ConfigError, match="unknown probe 'acts'"):
        config(probe="acts")
    with pytest.raises(ConfigError, match="probe_every must be"):
        config(probe="weights", probe_every=0)


def test_a_run_trained_without_probes_is_not_continued_with_them(small, tmp_path):
    train(config(epochs=1), tmp_path, device="cpu", threads=1, data=small)
    with pytest.raises(ValueError, match="trained without probes: leave --probe out"):
        train(config(epochs=1, probe="weights"), tmp_path, device="cpu", threads=1,
              data=small)


def test_the_cli_takes_probes_and_explains_a_bad_one(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--subset", "500", "--epochs", "1", "--threads", "1", "--quiet",
                 "--probe", "weights", "--probe-every", "4", "--out", str(out)]) == 0
    assert [r["step"] for r in read(out)] == [0, 4]  # 8 steps of 64
    assert json.loads((out / "config.json").read_text())["run"]["probe"] == ["weights"]
    assert main(["train", "--probe", "bogus", "--out", str(tmp_path / "bad")]) == 2
    assert "normlab train: error: unknown probe 'bogus'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


# ----------------------------------------------------------------------------- the report


@pytest.fixture(scope="module")
def bn_paper_quick(tmp_path_factory):
    """The bundled bn-paper study at a test's size: 2 seeds, 2 epochs on 3,000 images
    (50 steps each), probes every 10 steps; its report built by the suite command."""
    from normlab.experiments import load_suite

    source = Path(load_suite("bn-paper").source).read_text()
    text = (source.replace("epochs = 20", "epochs = 2").replace("seeds = 10", "seeds = 2\n"
            "subset = 3000").replace("probe_every = 50", "probe_every = 10"))
    assert "seeds = 2" in text and "epochs = 2" in text  # the bundled file's lines, replaced
    folder = tmp_path_factory.mktemp("bn-paper")
    (folder / "bn-paper.toml").write_text(text)
    out = folder / "out"
    assert main(["suite", str(folder / "bn-paper.toml"), "--threads", "1", "--quiet",
                 "--out", str(out)]) in (0, 3)  # 3: a run that diverged (no norm, lr 1)
    return out


def test_the_bn_paper_section_tests_the_papers_claims_on_the_probes(bn_paper_quick):
    from matplotlib.image import imread

    from normlab.reports import load_results
    from normlab.reports.doc import to_markdown
    from normlab.studies import bnpaper

    suite = load_results(bn_paper_quick)
    study = bnpaper.find_study(suite)
    assert study.layer == "hidden.8"  # the last hidden layer's sigmoid
    family = bnpaper.comparisons(study)
    assert [c.seeds for c in family] == [2, 2, 2] and {c.family for c in family} == {3}
    # the drift, by hand from seed 1's probes.jsonl
    records = read(bn_paper_quick / "bn" / "seed1")
    units = [r["activations"]["hidden.8"]["unit"] for r in records]
    width = sum(u["p85"] - u["p15"] for u in units) / len(units)
    assert bnpaper.drift(records, "hidden.8") == pytest.approx(
        abs(units[-1]["p50"] - units[0]["p50"]) / width)
    variants = {v.name: v for v in suite.variants}
    finals = [sum(r.metrics[-1]["test_acc"] for r in variants[name].runs) / 2
              for name in ("bn", "none")]
    blocks, images = bnpaper.bn_paper_parts(suite, bn_paper_quick / "figs")
    text = to_markdown(blocks)
    assert "**The paper.** Ioffe & Szegedy 2015" in text
    assert "**Statistics.** 3 comparisons" in text
    assert "100 steps (2 epochs of 50 steps" in text
    word = ("**Yes**" if all(c.direction == "up" for c in family) else "**Partly**"
            if any(c.direction == "up" for c in family) else "**No**")
    assert text.count(word) >= 1
    assert f"final test accuracy, BN − none (points): {family[0].estimate:+.2f}" in text
    assert family[0].estimate == pytest.approx(finals[0] - finals[1])  # mean of the pairs
    png = imread(images[0].path)
    assert png.shape[1] > 1000 and np.ptp(png[..., :3]) > 0.5
    import html

    page = html.unescape((bn_paper_quick / "report.html").read_text())
    assert bnpaper.TITLE in page and "Inside the network" in page
    assert (bn_paper_quick / "figures" / bnpaper.FIGURE).exists()
    assert (bn_paper_quick / "figures" / "inside_activations.png").exists()


def test_no_probes_no_section(tmp_path, monkeypatch):
    from normlab.reports import load_results
    from normlab.studies import bnpaper, inside

    no_report(monkeypatch)  # the sections are built here from the runs
    out = tmp_path / "s"
    toml = tmp_path / "s.toml"
    toml.write_text('dataset = "mnist"\nseeds = 1\nsubset = 300\n[protocol]\nname = "seed"\n'
                    '[protocol.overrides]\nepochs = 1\n[[variant]]\nname = "{norm}"\n'
                    'net = "mlp"\naxes.norm = ["none", "bn"]\n')
    main(["suite", str(toml), "--threads", "1", "--quiet", "--out", str(out)])
    suite = load_results(out)
    assert inside.inside_parts(suite, tmp_path) is None
    assert bnpaper.bn_paper_parts(suite, tmp_path) is None  # the study needs the probes


def quick_study(tmp_path, name: str, changes: dict[str, str]) -> Path:
    """The bundled suite ``name`` with each line of ``changes`` replaced (each checked to
    be there), its runs trained in this process; not its report (whose test-batch section
    evaluates every checkpoint): the tests build the sections they check."""
    from normlab.experiments import load_suite, run_suite

    text = Path(load_suite(name).source).read_text()
    for old, new in changes.items():
        assert old in text, old  # the bundled file's line
        text = text.replace(old, new)
    (tmp_path / f"{name}.toml").write_text(text)
    out = tmp_path / "out"
    with pytest.MonkeyPatch.context() as patch:
        no_report(patch)
        run_suite(load_suite(tmp_path / f"{name}.toml"), out, threads=1, device="cpu",
                  quiet=True, log=lambda _: None)
    return out


def test_a_diverged_run_is_left_out_of_the_weight_measures_not_the_accuracy():
    """A diverged run stops early with its weights blown up: its last probe is no end of
    training to compare, so the weights' norm and effective step leave it out."""
    from normlab.studies import weightdecay

    def record(epoch: int, norm: float, update: float) -> dict:
        return {"epoch": epoch, "step": epoch * 10, "weights": {
            "conv1.weight": {"norm": norm, "update": update}}}

    arm = weightdecay.Arm(variant=None, norm="none", reg="none", acc={1: 93.0, 2: 9.8},
                          records={1: [record(1, 3.0, 0.02), record(2, 4.0, 0.01)],
                                   2: [record(1, 1750.0, 0.5)]},
                          diverged=frozenset({2}))
    assert arm.norm_at_end() == {1: 4.0}
    assert arm.update_late() == {1: pytest.approx(0.01)}
    assert arm.acc == {1: 93.0, 2: 9.8}
    assert set(weightdecay.Arm(None, "none", "none", {}, arm.records).norm_at_end()) == {1, 2}


def test_the_weight_decay_section_compares_each_regularizer_with_its_norm_alone(tmp_path):
    """The bundled weight-decay study at a test's size (2 seeds, 2 epochs of 10 steps): its
    arms, the weights' norm at the
    last probe by hand from probes.jsonl, the family of 12 comparisons, the verdict's word
    as its comparisons say."""
    from normlab.reports import load_results
    from normlab.reports.doc import to_markdown
    from normlab.studies import weightdecay

    out = quick_study(tmp_path, "weight-decay", {
        "epochs = 6": "epochs = 2", "seeds = 6": "seeds = 2", "subset = 20000": "subset = 640",
        "probe_every = 50": "probe_every = 5"})
    suite = load_results(out)
    arms = weightdecay.find_study(suite)
    assert [(a.norm, a.reg) for a in arms] == [("bn", "none"), ("bn", "L2"), ("bn", "L1"),
                                               ("none", "none"), ("none", "L2"), ("none", "L1")]
    records = read(out / "bn-l2" / "seed1")
    last = records[-1]["weights"]
    assert arms[1].norm_at_end()[1] == pytest.approx(
        sum(w["norm"] ** 2 for w in last.values()) ** 0.5)
    found = weightdecay.effects(arms)
    assert len(found) == 4 and {p.family for e in found
                                for p in (e.weight_norm, e.update, e.accuracy)} == {12}
    blocks, images = weightdecay.weight_decay_parts(suite, tmp_path / "figs")
    md = to_markdown(blocks)
    assert "**Statistics.** 12 comparisons in one family" in md
    bn_l2 = found[0]
    shrinks = bn_l2.weight_norm.direction == "down"
    faster = bn_l2.update.direction == "up"
    word = "**Yes**" if shrinks and faster else "**Partly**" if shrinks or faster else "**No**"
    assert word + ": with BN, L2" in md
    assert images and images[0].path.name == weightdecay.FIGURE


def test_the_ics_section_tests_santurkars_figures_on_the_probes(tmp_path):
    """The bundled ics study at a test's size (2 seeds, 2 epochs of 10 steps, probes every
    5): its arms, a seed's landscape median and input movements by hand from probes.jsonl,
    the family of 7, and each verdict's word as its comparisons say."""
    import math
    import statistics

    from normlab.probes import smoothness
    from normlab.reports import load_results
    from normlab.reports.doc import to_markdown
    from normlab.studies import ics

    out = quick_study(tmp_path, "ics", {
        "epochs = 4": "epochs = 2", "seeds = 10": "seeds = 2", "subset = 20000": "subset = 640",
        "probe_every = 50": "probe_every = 5"})
    suite = load_results(out)
    arms = ics.find_study(suite)
    assert list(arms) == ["none", "bn", "noisy-bn"]
    records = read(out / "bn" / "seed1")
    assert [r["step"] for r in records] == [0, 5, 10, 15]  # 10 steps an epoch
    late = [smoothness(r)["beta"] for r in records if r["step"] >= 15 / 2]
    assert arms["bn"].landscape("beta")[1] == pytest.approx(statistics.median(late))
    layers = list(records[0]["activations"])[1:]  # after the first norm
    by_hand = statistics.mean(statistics.mean(
        abs(b["activations"][k]["p50"] - a["activations"][k]["p50"])
        / (a["activations"][k]["p85"] - a["activations"][k]["p15"])
        for a, b in itertools.pairwise(records)) for k in layers)
    assert arms["bn"].movement()[1] == pytest.approx(by_hand)
    spread = statistics.mean(statistics.mean(
        abs(math.log(b["activations"][k]["std"] / a["activations"][k]["std"]))
        for a, b in itertools.pairwise(records)) for k in layers)
    assert arms["bn"].movement("spread")[1] == pytest.approx(spread)
    family = ics.comparisons(arms)
    assert {c.family for c in family.members()} == {7}
    assert all(c.seeds == 2 for c in family.members())
    blocks, images = ics.ics_parts(suite, tmp_path / "figs")
    md = to_markdown(blocks)
    assert "**Statistics.** 7 comparisons in one family" in md
    shown = [c.direction == "up" for c in family.smooth]
    word = "**Yes**" if all(shown) else "**Partly**" if any(shown) else "**No**"
    assert f"Figure 4, {word}: without BN" in md
    moves = "up" in (family.noisy_moves.direction, family.noisy_spread.direction)
    as_good = family.noisy_acc.direction in ("none", "up")
    word = "**Yes**" if moves and as_good else "**Partly**" if moves or as_good else "**No**"
    assert f"Figure 2, {word}: noisy BN's layer inputs" in md
    assert images and images[0].path.name == ics.FIGURE
