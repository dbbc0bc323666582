"""Suites: TOML loading and its error messages, the bundled s6 suites, running a small
suite end to end (suite.json, run directories, report), resuming after a kill, common
random numbers across variants. Real MNIST, 300 training images, one epoch per run."""

import contextlib
import dataclasses
import io
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import normlab.training.engine as engine
from conftest import no_report, suite_toml
from normlab import memory
from normlab.accel import kernels
from normlab.cli import main
from normlab.experiments import comparable_metrics, load_suite, manifest, run_suite
from normlab.experiments.progress import ConsoleProgress
from normlab.experiments.suite import default_label
from normlab.training import RunConfig, RunDir, resolve_protocol
from normlab.training.events import (
    EpochFinished,
    RunFailed,
    RunFinished,
    RunStarted,
    StepsDone,
)

SMALL = "# a two-variant, two-seed suite for the tests\n" + suite_toml(
    ("bn", {"label": "BN", "norm": "bn"}), ("gn-l1", {"norm": "gn", "groups": 2, "l1": 1e-4}),
    seeds="[1, 2]", description="BN against GN on 300 images")


def write(tmp_path, text, name="study.toml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture(scope="module")
def small_suite(tmp_path_factory):
    return load_suite(write(tmp_path_factory.mktemp("suite"), SMALL))


@pytest.fixture(scope="module")
def done(mnist, small_suite, tmp_path_factory):
    """The small suite run once, uninterrupted, recording each run's training batches
    (the uint8 images and the rotation angles that reach ``to_input``, or the C kernel's
    ``rotate_normalize`` with augment = "normlab")."""
    out = tmp_path_factory.mktemp("done") / "small"
    batches: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    events: list = []
    log: list[str] = []
    real_to_input, real_rotate = engine.to_input, kernels.rotate_normalize

    def record(images, degrees):
        current = next(e.run for e in reversed(events) if isinstance(e, RunStarted))
        batches.setdefault(current, []).append((images.clone(), degrees.clone()))

    def to_input(images, mean, std, degrees=None, **kw):
        if degrees is not None:  # training batches only (evaluation is not augmented)
            record(images, degrees)
        return real_to_input(images, mean, std, degrees, **kw)

    def rotate_normalize(images, idx, degrees, mean, std):
        record(images[idx], degrees)
        return real_rotate(images, idx, degrees, mean, std)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine, "to_input", to_input)
        mp.setattr(kernels, "rotate_normalize", rotate_normalize)
        report = run_suite(small_suite, out, jobs=1, listener=events.append, log=log.append)
    return out, report, batches, log, events


def test_suite_writes_manifest_runs_and_report(done, small_suite):
    out, report, _, log, events = done
    manifest = json.loads((out / "suite.json").read_text())
    assert manifest["name"] == "study" and manifest["dataset"] == "mnist"
    assert manifest["description"] == "BN against GN on 300 images"
    assert manifest["source"] == str(small_suite.source) and manifest["seeds"] == [1, 2]
    assert [v["name"] for v in manifest["variants"]] == ["bn", "gn-l1"]
    assert [v["label"] for v in manifest["variants"]] == ["BN", "GN (2 groups) + L1 (λ=0.0001)"]
    for v in manifest["variants"]:
        assert "seed" not in v["config"]
        config = RunConfig.from_dict({**v["config"], "seed": 1})
        assert config == small_suite.variant(v["name"]).config
    # variant-major within each seed: every variant for seed 1, then seed 2
    assert manifest["runs"] == [
        {"variant": "bn", "seed": 1, "dir": "bn/seed1"},
        {"variant": "gn-l1", "seed": 1, "dir": "gn-l1/seed1"},
        {"variant": "bn", "seed": 2, "dir": "bn/seed2"},
        {"variant": "gn-l1", "seed": 2, "dir": "gn-l1/seed2"},
    ]
    for run in manifest["runs"]:
        run_dir = out / run["dir"]
        assert (run_dir / "predictions.pt").exists()
        saved = json.loads((run_dir / "config.json").read_text())["run"]
        assert saved["seed"] == run["seed"] and saved["subset"] == 300
        assert len(comparable_metrics(run_dir)) == 1
    assert report == out / "report.html" and report.exists()
    # one event stream: each run starts, finishes its one epoch, and finishes, in plan order
    kinds = [(type(e).__name__, e.run) for e in events if not isinstance(e, StepsDone)]
    assert kinds == [(kind, run) for run in ("bn/seed1", "gn-l1/seed1", "bn/seed2", "gn-l1/seed2")
                     for kind in ("RunStarted", "EpochFinished", "RunFinished")]
    finished = [e for e in events if isinstance(e, EpochFinished)]
    assert [e.record for e in finished] == [
        json.loads((out / e.run / "metrics.jsonl").read_text()) for e in finished]
    assert "suite study: 4 runs (4 trained, 0 already finished)" in "\n".join(log)
    assert log[-1] == f"report: {report}"


def test_console_lines_for_a_log_file(done):
    """Not a terminal: a line per finished epoch with the suite's time left, no bar."""
    events, stream = done[4], io.StringIO()
    heads = {"bn/seed1": "[1/4] bn seed 1", "gn-l1/seed1": "[2/4] gn-l1 seed 1",
             "bn/seed2": "[3/4] bn seed 2", "gn-l1/seed2": "[4/4] gn-l1 seed 2"}
    console = ConsoleProgress(heads, epochs_left=4, out=stream, stream=stream)
    for event in events:
        console(event)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "[1/4] bn seed 1: started  (estimating time left)"
    assert re.fullmatch(r"\[1/4\] bn seed 1  epoch 1/1  test acc \d+\.\d\d%  loss \d\.\d{4}  "
                        r"\d+\.\d s  \(suite: about \d+ s left\)", lines[1]), lines[1]
    assert re.fullmatch(r"\[1/4\] bn seed 1: done, final test accuracy \d+\.\d\d%", lines[2])
    assert len(lines) == 12 and "\r" not in stream.getvalue()


def test_time_left_spreads_whole_runs_over_the_slots():
    """Five runs of 4 epochs, two at a time, 10 s per epoch of a run: three waves, not the
    epochs left times the suite's wall time per epoch; and the last run alone is not
    counted as sharing the machine."""
    console = ConsoleProgress({f"r{i}": f"[{i}/5]" for i in range(5)}, epochs_left=20,
                              out=io.StringIO(), stream=io.StringIO())

    def epoch(run, k):
        console(EpochFinished(run, {"epoch": k, "seconds": 10.0, "test_acc": 99.0,
                                    "test_loss": 0.02}, 4))

    assert console.time_left() == "estimating time left"
    console(RunStarted("r0", 0, 4))
    console(RunStarted("r1", 0, 4))
    epoch("r0", 1)  # left: r0 3, r1 4, three queued runs of 4 -> slots at 11 and 8 epochs
    assert console.time_left() == "about 1 min 50 s left"
    for run in ("r0", "r1", "r2", "r3"):
        if run in ("r2", "r3"):
            console(RunStarted(run, 0, 4))
        for k in range(2 if run == "r0" else 1, 5):
            epoch(run, k)
        console(RunFinished(run, "ok", ()))
    console(RunStarted("r4", 0, 4))
    for k in (1, 2, 3):
        epoch("r4", k)  # one run left, one epoch: one run's epoch, however many slots
    assert console.time_left() == "about 10 s left"


def test_variants_see_the_same_batches_for_a_seed(done):
    """Common random numbers: data order and augmentation depend on (seed, epoch) alone."""
    batches = done[2]
    assert set(batches) == {"bn/seed1", "gn-l1/seed1", "bn/seed2", "gn-l1/seed2"}
    for seed in (1, 2):
        a, b = batches[f"bn/seed{seed}"], batches[f"gn-l1/seed{seed}"]
        assert len(a) == len(b) == 5  # 300 images in batches of 64
        for (images_a, angles_a), (images_b, angles_b) in zip(a, b, strict=True):
            assert torch.equal(images_a, images_b) and torch.equal(angles_a, angles_b)
    assert not torch.equal(batches["bn/seed1"][0][1], batches["bn/seed2"][0][1])


def test_killed_suite_resumes_skips_finished_and_matches(done, small_suite, tmp_path, monkeypatch):
    reference = done[0]
    out = tmp_path / "killed"

    def ctrl_c_in_the_second_run(event):
        if isinstance(event, StepsDone) and event.run == "gn-l1/seed1":
            raise KeyboardInterrupt

    no_report(monkeypatch)
    log: list[str] = []
    with pytest.raises(KeyboardInterrupt):  # one seed: two runs, killed in the second
        run_suite(small_suite, out, seeds=[1], jobs=1, listener=ctrl_c_in_the_second_run,
                  log=log.append)
    assert log[-1].startswith("stopped: 1 of 2 runs are finished; completed epochs kept: 1;")
    assert not (out / "gn-l1/seed1/predictions.pt").exists()
    assert not (out / "gn-l1/seed1/.lock").exists()
    first = out / "bn/seed1/metrics.jsonl"
    assert first.exists() and (out / "suite.json").exists()
    stamp = first.stat().st_mtime_ns

    log.clear()
    run_suite(small_suite, out, seeds=[1], quiet=True, log=log.append)
    assert log[0] == "[1/2] bn seed 1: skipped (finished)"
    assert first.stat().st_mtime_ns == stamp
    assert "suite study: 2 runs (1 trained, 1 already finished)" in "\n".join(log)
    for run in ("bn/seed1", "gn-l1/seed1"):  # equal to the uninterrupted suite's runs
        assert comparable_metrics(out / run) == comparable_metrics(reference / run), run
    assert json.loads((out / "suite.json").read_text()) == manifest(small_suite, [1])


def test_parallel_jobs_give_the_same_runs(done, small_suite, tmp_path, monkeypatch):
    """--jobs 2: two worker processes, each run's metrics equal to the serial suite's (same
    thread count: 1, as in the serial runs here), though the workers run with tcmalloc
    (installed under CI) and this process with glibc's malloc."""
    no_report(monkeypatch)
    out, log, events = tmp_path / "parallel", [], []
    run_suite(small_suite, out, seeds=[1], jobs=2, threads=1, log=log.append,
              listener=events.append)
    assert "LD_PRELOAD" not in os.environ  # only the workers got it
    for run in ("bn/seed1", "gn-l1/seed1"):
        malloc = json.loads((out / run / "config.json").read_text())["malloc"]
        assert malloc == ("tcmalloc" if memory.tcmalloc() else "glibc, tuned"), malloc
        assert comparable_metrics(out / run) == comparable_metrics(done[0] / run), run
        # the workers' epochs reach the parent's event stream, read from metrics.jsonl
        kinds = [type(e).__name__ for e in events if e.run == run]
        assert kinds == ["RunStarted", "EpochFinished", "RunFinished"], kinds
    assert "suite study: 2 runs (2 trained, 0 already finished)" in "\n".join(log)
    with pytest.raises(ValueError, match="jobs must be >= 1"):
        run_suite(small_suite, out, seeds=[1], jobs=0)


def test_a_failing_run_is_reported_and_the_others_train(done, small_suite, tmp_path,
                                                       monkeypatch):
    """A run that raises is marked failed (in its folder, the summary and the report); the
    others still train; rerunning the suite retries it."""
    out, log, events = tmp_path / "failing", [], []

    def broken_listener(event):
        events.append(event)
        if isinstance(event, StepsDone) and event.run == "bn/seed1":
            raise RuntimeError("disk on fire")

    with pytest.raises(ValueError, match=r"1 of 2 runs failed \(bn/seed1\)"):
        run_suite(small_suite, out, seeds=[1], jobs=1, listener=broken_listener,
                  log=log.append)
    assert [e.run for e in events if isinstance(e, RunFailed)] == ["bn/seed1"]
    assert RunDir(out / "bn/seed1").state() == "failed"
    assert RunDir(out / "gn-l1/seed1").state() == "finished"
    assert "1 FAILED" in "\n".join(log) and "seed 1    failed" in "\n".join(log)
    assert "**failed** (RuntimeError: disk on fire)" in (out / "analysis.md").read_text()
    assert "<strong>Failed</strong>" in (out / "report.html").read_text()
    run_suite(small_suite, out, seeds=[1], quiet=True, log=log.append)  # retried
    assert RunDir(out / "bn/seed1").state() == "finished"
    assert comparable_metrics(out / "bn/seed1") == comparable_metrics(done[0] / "bn/seed1")


def test_cli_dry_run_shows_finished_runs_and_trains_nothing(done, small_suite, capsys, tmp_path):
    out = done[0]
    assert main(["suite", str(small_suite.source), "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "bn/seed1" in text and "finished (1 epochs" in text and "0 of 4 runs to train" in text
    fresh = tmp_path / "fresh"
    assert main(["suite", str(small_suite.source), "--out", str(fresh), "--dry-run",
                 "--seeds", "3"]) == 0
    text = capsys.readouterr().out
    assert "seeds 1, 2, 3" in text and "[6/6] gn-l1/seed3" in text
    assert "6 of 6 runs to train" in text
    assert not fresh.exists()


def test_fewer_seeds_skip_everything_and_keep_the_earlier_seeds(done, small_suite, monkeypatch):
    no_report(monkeypatch)
    out = done[0]
    before = (out / "suite.json").read_text()
    log: list[str] = []
    run_suite(small_suite, out, seeds=[1], quiet=True, log=log.append)
    assert log[0] == f"{out / 'suite.json'} keeps seeds 2 of an earlier invocation"
    assert log[1:3] == ["[1/2] bn seed 1: skipped (finished)",
                        "[2/2] gn-l1 seed 1: skipped (finished)"]
    assert (out / "suite.json").read_text() == before


def test_a_different_suite_in_the_same_folder_is_refused(done, tmp_path):
    out = done[0]
    changed = load_suite(write(tmp_path, SMALL.replace("l1 = 0.0001", "l1 = 1e-3")))
    with pytest.raises(ValueError, match=r"gn-l1/seed1 \(l1: 0.0001 -> 0.001\)"):
        run_suite(changed, out, quiet=True)
    # the same suite.json check also names added / removed variants
    fewer = load_suite(write(tmp_path, SMALL.split("[[variant]]\nname = \"gn-l1\"")[0]))
    before = (out / "suite.json").read_text()
    with pytest.raises(ValueError, match="variants no longer in the suite: gn-l1"):
        run_suite(fewer, out, quiet=True)
    assert (out / "suite.json").read_text() == before


# ----------------------------------------------------------------------------- bad files

BAD = [
    # (what to change in SMALL, the line the message must name, words it must contain)
    (("label = \"BN\"\n", "label = \"BN\"\nnrom = \"ln\"\n"), 16,
     ["variant 'bn'", "unknown key 'nrom'", "did you mean 'norm'?", "valid keys: name, label"]),
    (("norm = \"gn\"", "norm = \"group\""), 20,
     ["variant 'gn-l1'", "unknown norm 'group'", "choose one of 'bn', 'ln', 'gn', 'in', 'none'"]),
    (("groups = 2", "groups = 3"), 21,
     ["variant 'gn-l1'", "does not divide", "choose a group count that divides"]),
    (("epochs = 1", "epoch = 1"), 11,
     ["unknown protocol field 'epoch'", "did you mean 'epochs'?", "batch_size"]),
    (("epochs = 1", "epochs = 0"), 11, ["'epochs' must be >= 1"]),
    (("[protocol.overrides]\nepochs = 1\n", "epochs = 1\n"), 10,
     ["unknown key 'epochs' in [protocol]", "go in [protocol.overrides]"]),
    (("name = \"seed\"", "name = \"slow\""), 8, ["unknown protocol 'slow'", "seed, fast"]),
    (("dataset = \"mnist\"", "dataset = \"cifar\""), 3, ["unknown dataset 'cifar'", "mnist"]),
    (("seeds = [1, 2]", "seeds = [1, 1]"), 4, ["seeds are repeated: 1"]),
    (("subset = 300", "subst = 300"), 5, ["unknown key 'subst'", "did you mean 'subset'?"]),
    (("l1 = 0.0001", "l1 = -1"), 22, ["l1 must be a number >= 0"]),
    (("name = \"gn-l1\"", "name = \"bn\""), 19, ["duplicate variant name 'bn'"]),
    (("name = \"gn-l1\"", "name = \"gn/l1\""), 19, ["name must be a slug"]),
    (("l1 = 0.0001", "l1 = 0.0001\nl1_scope = \"bias\""), 23,
     ["l1_scope must be one of all, conv"]),
    (("label = \"BN\"", "label = \"BN {lambda}\""), 15, ["bad placeholder", "{l1}"]),
    (("subset = 300", "subset = 300\ntest_batch = \"no\""), 6,
     ["test_batch must be true or false, got 'no'"]),
]


def test_a_suite_sets_stop_at_chance_for_all_or_one_variant(tmp_path):
    text = SMALL.replace("subset = 300\n", "subset = 300\nstop_at_chance = false\n", 1)
    suite = load_suite(write(tmp_path, text))
    assert [v.config.stop_at_chance for v in suite.variants] == [False, False]
    one = SMALL.replace('label = "BN"\n', 'label = "BN"\nstop_at_chance = false\n', 1)
    assert [v.config.stop_at_chance for v in load_suite(write(tmp_path, one)).variants] == [
        False, True]
    with pytest.raises(ValueError, match="stop_at_chance"):
        load_suite(write(tmp_path, SMALL.replace("subset = 300\n",
                                                 'subset = 300\nstop_at_chance = "no"\n', 1)))


@pytest.mark.parametrize(("change", "line", "words"), BAD, ids=[b[0][1][:18] for b in BAD])
def test_bad_suite_files_name_file_line_and_choices(tmp_path, change, line, words):
    old, new = change
    assert old in SMALL
    path = write(tmp_path, SMALL.replace(old, new, 1))
    with pytest.raises(ValueError) as err:
        load_suite(path)
    message = str(err.value)
    assert message.startswith(f"{path}:{line}: "), message
    for word in words:
        assert word in message, message


def test_bad_file_fails_on_the_command_line_before_anything_trains(tmp_path, capsys):
    path = write(tmp_path, SMALL.replace("norm = \"gn\"", "norm = \"gnn\""))
    out = tmp_path / "out"
    assert main(["suite", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"normlab suite: error: {path}:20: variant 'gn-l1': unknown norm 'gnn'")
    assert "\n" not in err and not out.exists()


def test_unknown_bundled_name_lists_the_bundled_suites():
    from normlab.experiments.suite import bundled_suites

    names = bundled_suites()
    assert {"batch-sizes", "batch-sizes-fashion", "l1-sweep", "s6", "s6-quick"} <= set(names)
    with pytest.raises(ValueError, match=re.escape(f"bundled: {', '.join(names)} (")):
        load_suite("s7")


def test_a_variant_may_override_protocol_fields(tmp_path, capsys):
    path = write(tmp_path, SMALL.replace('label = "BN"\n', 'label = "BN"\n'
                                         'protocol = { batch_size = 8, lr = 0.0125 }\n'))
    suite = load_suite(path)
    bn, gn = suite.variant("bn").config.protocol, suite.variant("gn-l1").config.protocol
    assert (bn.batch_size, bn.lr, bn.epochs) == (8, 0.0125, 1)  # the rest: the suite's
    assert gn == suite.protocol
    assert main(["suite", str(path), "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    assert "norm=bn batch_size=8 lr=0.0125" in capsys.readouterr().out
    bad = write(tmp_path, SMALL.replace('label = "BN"\n', 'label = "BN"\n'
                                        'protocol = { batch = 8 }\n'), "bad.toml")
    with pytest.raises(ValueError, match=r"bad.toml:16: variant 'bn': protocol: unknown "
                                         r"protocol field 'batch'"):
        load_suite(bad)


def test_seed_count_labels_and_defaults(tmp_path):
    suite = load_suite(write(tmp_path, """\
        seeds = 3
        [[variant]]
        name = "ln-wd"
        norm = "ln"
        weight_decay = 5e-4
        dropout = 0
        [[variant]]
        name = "in"
        label = "IN, dropout {dropout}, λ={l1}"
        norm = "in"
    """))
    assert suite.seeds == (1, 2, 3) and suite.name == "study" and suite.subset is None
    assert suite.protocol == resolve_protocol("seed")
    assert [v.label for v in suite.variants] == [
        "LN + L2 (wd=0.0005), dropout 0", "IN, dropout 0.01, λ=0"]
    assert suite.variant("ln-wd").config == RunConfig.from_dict(
        {"norm": "ln", "weight_decay": 5e-4, "dropout": 0.0})
    assert [(v.name, s) for v, s in suite.runs()][:3] == [("ln-wd", 1), ("in", 1), ("ln-wd", 2)]


# ----------------------------------------------------------------------------- bundled


S6 = [  # name, label, RunConfig options: long runs train into runs/s6 with exactly these
    ("bn", "BN", {"norm": "bn"}),
    ("gn", "GN (2 groups)", {"norm": "gn", "groups": 2}),
    ("ln", "LN", {"norm": "ln"}),
    ("bn-l1", "BN + L1 (λ=3e-05)", {"norm": "bn", "l1": 3e-5}),  # lambda: from l1-sweep
    ("bn-l1-seed", "BN + L1 (λ=0.001, the seed's)", {"norm": "bn", "l1": 0.001}),
]


@pytest.mark.parametrize("name", ["s6", "s6-quick"])
def test_bundled_s6_suites_resolve_to_the_study_configs(name):
    suite = load_suite(name)
    quick = name == "s6-quick"
    assert suite.name == name and suite.dataset == "mnist" and suite.seeds == (1,)
    assert suite.source.name == f"{name}.toml" and suite.description
    assert suite.subset == (2000 if quick else None)
    protocol = resolve_protocol("seed", {"epochs": 2} if quick else {})
    assert [v.name for v in suite.variants] == [n for n, _, _ in S6]
    for variant, (_, label, options) in zip(suite.variants, S6, strict=True):
        options = dict(options)
        expected = RunConfig.from_dict({"protocol": protocol, "subset": suite.subset, **options})
        assert variant.config == expected
        assert variant.config.to_dict() == expected.to_dict()
        assert variant.label == label
    assert suite.variant("bn-l1-seed").config.l1 == 0.001
    assert suite.variant("bn").config == RunConfig(protocol=protocol, subset=suite.subset)
    assert suite.variant("bn").config.make_model().config.norms == ("bn",)


def test_s6_quick_keeps_the_variants_of_s6():
    s6, quick = load_suite("s6"), load_suite("s6-quick")
    assert [(v.name, v.label) for v in s6.variants] == [(v.name, v.label) for v in quick.variants]
    for a, b in zip(s6.variants, quick.variants, strict=True):
        assert dataclasses.replace(b.config, protocol=a.config.protocol, subset=None) == a.config


def test_default_label_names_the_options():
    assert default_label(RunConfig.from_dict({"norm": "gn", "groups": 1})) == "GN (1 group)"
    assert default_label(RunConfig(l1=1e-4, l1_scope="conv")) == "BN + L1 (λ=0.0001, conv weights)"



def proc_stat(pid: int | str) -> tuple[str, int] | None:
    """(state, parent pid) of a process from Linux's /proc, or None if it is gone."""
    try:
        state, ppid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:2]
    except (OSError, ValueError):
        return None
    return state, int(ppid)


def live_children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` and that are not zombies."""
    return [int(e) for e in os.listdir("/proc") if e.isdigit()
            if (stat := proc_stat(e)) and stat[1] == pid and stat[0] != "Z"]


def is_live(pid: int) -> bool:
    stat = proc_stat(pid)
    return stat is not None and stat[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_suite_takes_its_workers_with_it(mnist, tmp_path, sig):
    """SIGTERM to `normlab suite --jobs 2` stops it as Ctrl-C does (exit 130, finished epochs
    kept) and terminates its worker processes; after SIGKILL, which the parent cannot
    handle, the kernel stops them (no orphan trains on, holding its run's lock)."""
    path = write(tmp_path, suite_toml(("bn", {"norm": "bn"}), ("ln", {"norm": "ln"}),
                                      epochs=200, subset=1000))
    out = tmp_path / "out"
    parent = subprocess.Popen([sys.executable, "-m", "normlab", "suite", str(path), "--out",
                               str(out), "--jobs", "2", "--threads", "1", "--quiet"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not all(RunDir(out / run / "seed1").metrics() for run in ("bn", "ln")):
            assert parent.poll() is None and time.monotonic() < deadline, parent.stdout.read()
            time.sleep(0.2)
        workers = live_children(parent.pid)
        assert len(workers) >= 2
        os.kill(parent.pid, sig)
        code = parent.wait(timeout=60)
        deadline = time.monotonic() + 30
        while any(map(is_live, workers)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(map(is_live, workers)), "a worker outlived its suite"
    finally:
        for pid in {*workers, *live_children(parent.pid), parent.pid}:  # stop what we started
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        parent.wait()
    if sig == signal.SIGTERM:
        assert code == 130 and "finished work is kept" in parent.stdout.read()
    else:
        assert code == -signal.SIGKILL
    for run in ("bn", "ln"):  # every finished epoch kept, the runs resumable
        assert RunDir(out / run / "seed1").state() == "partial"
