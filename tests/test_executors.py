"""The process executor's plan (McNaughton's wrap-around rule: runs split at epoch
boundaries so that the workers finish together) and a split run trained in two workers to
the same numbers as in one process. Real MNIST, 300 training images."""

import io
import itertools
import random
import textwrap

from conftest import no_report, suite_toml
from normlab.experiments import comparable_metrics, load_suite, run_suite
from normlab.experiments.executors import split_plan
from normlab.experiments.progress import ConsoleProgress
from normlab.training.events import EpochFinished, RunFinished, RunPaused, RunStarted


def slot_loads(chunks):
    loads: dict[int, int] = {}
    for c in chunks:
        loads[c.slot] = max(loads.get(c.slot, 0), c.start + c.until - c.first + 1)
    return loads


def test_five_runs_on_two_slots_split_one_run_and_finish_together():
    chunks = split_plan([(f"r{i}", 0, 20) for i in range(1, 6)], 2)
    assert [(c.rel, c.first, c.until, c.start, c.slot) for c in chunks] == [
        ("r1", 1, 20, 0, 0),
        ("r3", 1, 10, 0, 1),  # r3's first half opens slot 1 ...
        ("r4", 1, 20, 10, 1),
        ("r2", 1, 20, 20, 0),
        ("r5", 1, 20, 30, 1),
        ("r3", 11, 20, 40, 0),  # ... and its second half closes slot 0, after the first
    ]
    assert slot_loads(chunks) == {0: 50, 1: 50}  # 2.5 runs each, not 3 on one slot


def test_plans_cover_every_epoch_once_in_order_within_the_bound():
    for trial in range(300):
        check_random_plan(random.Random(trial))


def check_random_plan(rng):
    slots = rng.randint(1, 5)
    left = []
    for i in range(rng.randint(1, 12)):
        total = rng.randint(1, 25)
        left.append((f"r{i}", rng.randint(0, total), total))
    chunks = split_plan(left, slots)
    todo = [(total - done) for _, done, total in left if done < total]
    span = max(-(-sum(todo) // slots), max(todo)) if todo else 0
    assert all(load <= span for load in slot_loads(chunks).values())
    assert all(c.slot < slots for c in chunks)
    starts = [c.start for c in chunks]
    assert starts == sorted(starts)  # handed out in planned order
    split = 0
    for rel, done, total in left:
        mine = [c for c in chunks if c.rel == rel]
        if done >= total:  # nothing left: one empty chunk, for the outcome
            assert [(c.first, c.until) for c in mine] == [(total + 1, total)]
            continue
        epochs = [e for c in mine for e in range(c.first, c.until + 1)]
        assert epochs == list(range(done + 1, total + 1))  # each epoch once, in order
        for a, b in itertools.pairwise(mine):  # earlier epochs end before later ones start
            assert a.start + a.until - a.first + 1 <= b.start
        assert len(mine) <= 2
        split += len(mine) - 1
    assert split <= slots - 1


def test_time_left_when_the_executor_splits_runs():
    """Five runs of 4 epochs on two slots that finish together: 10 epochs per slot."""
    console = ConsoleProgress({f"r{i}": f"[{i}/5]" for i in range(5)}, epochs_left=20,
                              out=io.StringIO(), stream=io.StringIO(), splits_runs=True)
    console(RunStarted("r0", 0, 4))
    console(RunStarted("r2", 0, 4))
    console(EpochFinished("r2", {"epoch": 1, "seconds": 10.0, "test_acc": 99.0,
                                 "test_loss": 0.02}, 4))
    assert console.time_left() == "about 1 min 35 s left"  # 19 epochs / 2 slots
    console(EpochFinished("r2", {"epoch": 2, "seconds": 10.0, "test_acc": 99.0,
                                 "test_loss": 0.02}, 4))
    console(RunPaused("r2", 2, 4))
    assert "[2/5]: paused after epoch 2/4" in console.out.getvalue()


SPLIT = suite_toml(("bn", {"norm": "bn"}), ("gn", {"norm": "gn", "groups": 2}),
                   ("ln", {"norm": "ln"}), epochs=2)


def test_a_run_split_between_workers_equals_the_serial_run(mnist, tmp_path, monkeypatch):
    """Three runs of two epochs on two workers: gn is split (epoch 1 first in one worker,
    epoch 2 last in the other), and every run's metrics equal the serial suite's."""
    no_report(monkeypatch)
    path = tmp_path / "split.toml"
    path.write_text(textwrap.dedent(SPLIT))
    suite = load_suite(path)
    run_suite(suite, tmp_path / "serial", jobs=1, threads=1, quiet=True, log=lambda _: None)
    events: list = []
    run_suite(suite, tmp_path / "split", jobs=2, threads=1, listener=events.append,
              log=lambda _: None)
    for run in ("bn/seed1", "gn/seed1", "ln/seed1"):
        assert (comparable_metrics(tmp_path / "split" / run)
                == comparable_metrics(tmp_path / "serial" / run)), run
    gn = [e for e in events if e.run == "gn/seed1"]
    assert [type(e).__name__ for e in gn] == [
        "RunStarted", "EpochFinished", "RunPaused", "RunStarted", "EpochFinished",
        "RunFinished"]
    assert gn[2] == RunPaused("gn/seed1", 1, 2) and gn[3] == RunStarted("gn/seed1", 1, 2)
    for run in ("bn/seed1", "ln/seed1"):  # not split
        kinds = [type(e) for e in events if e.run == run]
        assert kinds == [RunStarted, EpochFinished, EpochFinished, RunFinished], run
