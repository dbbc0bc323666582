"""The notebook API (normlab.run_suite / load_results / train, the tqdm.auto progress) and the
example notebook, executed top to bottom by nbclient on a tiny setting.

The API tests read synthetic suite folders (the helpers of test_reports.py); the interrupt,
single-run and notebook tests train for real on a few hundred MNIST images.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import subprocess
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import matplotlib.pyplot as plt
import pytest
from matplotlib.figure import Figure
from tqdm.std import tqdm

import normlab
import normlab.notebook as nb_api
import normlab.notebook.display as nb_display
from conftest import no_report, require_tool, suite_toml
from normlab.experiments import load_suite
from normlab.reports import build_report
from normlab.reports.figures import png_bytes
from normlab.training.events import EpochFinished, RunFinished, RunStarted, StepsDone
from normlab.training.rundir import TIMING_FIELDS
from test_reports import make_suite, synthetic_images

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "s6.ipynb"
# The example's size in CI: every cell runs, in well under a minute of training.
TINY = {"SUBSET": 300, "EPOCHS": 1}

TWO_VARIANTS = suite_toml(("bn", {"label": "BN", "norm": "bn"}),
                          ("gn", {"label": "GN", "norm": "gn"}), epochs=2,
                          description="BN and GN on 300 images, 2 epochs")


def files_under(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.fixture()
def mixed(tmp_path) -> Path:
    """A suite folder: bn seed 1 finished, bn seed 2 unfinished (2 of 3 epochs), bn_l1 seed 1
    finished, bn_l1 seed 2 missing."""
    return make_suite(tmp_path / "mixed", skip=(("bn_l1", 2),), unfinished=(("bn", 2),))


@pytest.fixture()
def reportless(monkeypatch):
    """The report is checked elsewhere; here it only costs time."""
    no_report(monkeypatch)


# ----------------------------------------------------------------------------- the API


def test_top_level_api_is_the_notebook_module_and_import_stays_light():
    assert normlab.run_suite is nb_api.run_suite
    assert normlab.load_results is nb_api.load_results
    assert normlab.train is nb_api.train
    assert "Results" in dir(normlab)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        normlab.nope  # noqa: B018
    code = "import sys, normlab; print('torch' in sys.modules, 'matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["False", "False"]


def test_load_results_with_finished_unfinished_and_missing_runs(mixed):
    results = normlab.load_results(mixed, images=synthetic_images)
    assert isinstance(results, normlab.Results) and results.name == "synthetic"

    page = results._repr_html_()
    assert "<table>" in page and "2 of 4 runs finished" in page
    assert "99.10" in page  # bn's one finished seed
    assert "unfinished: stopped after epoch 2 of 3" in page
    assert "missing (not started)" in page
    assert page.count(">finished<") == 2
    assert "epochs to 99.0%" in page and "no interval is possible yet" in page

    summary = results.summary
    assert list(summary.index) == ["bn", "bn_l1"]
    assert summary.loc["bn", "seeds_finished"] == 1 and summary.loc["bn", "seeds_total"] == 2
    assert summary.loc["bn", "final_test_acc_mean"] == pytest.approx(99.1)
    assert summary.loc["bn", "epochs_to_99.0_mean"] == 3

    metrics = results.metrics
    assert len(metrics) == 3 + 2 + 3  # the missing run has no epoch
    states = metrics.groupby(["variant", "seed"])["run_state"].first().to_dict()
    assert states == {("bn", 1): "finished", ("bn", 2): "unfinished", ("bn_l1", 1): "finished"}
    assert {"epoch", "test_acc", "test_loss", "train_acc", "lr"} <= set(metrics.columns)

    assert "## Ranking by final test accuracy" in str(results.analysis())
    assert "<h4>Ranking by final test accuracy</h4>" in results.analysis()._repr_html_()


def test_intervals_show_once_two_seeds_finish(tmp_path):
    results = normlab.load_results(make_suite(tmp_path / "full"))
    page = results._repr_html_()
    assert "Paired differences in final test accuracy" in page and "95% interval" in page


def test_a_results_object_rereads_the_folder(mixed):
    results = normlab.load_results(mixed)
    assert "2 of 4 runs finished" in results._repr_html_()
    (mixed / "bn/seed2/predictions.pt").write_bytes((mixed / "bn/seed1/predictions.pt")
                                                    .read_bytes())
    assert "3 of 4 runs finished" in results._repr_html_()


def test_figures_are_returned_not_shown_or_saved(mixed):
    results = normlab.load_results(mixed, images=synthetic_images)
    before = files_under(mixed)
    plt.close("all")
    figures = [results.accuracy(), results.accuracy(without_l1=True), results.loss(),
               results.loss(without_l1=True), results.curves("train_acc"),
               results.gallery("bn"), results.gallery("BN + L1"), results.confusion("bn_l1")]
    for fig in figures:
        assert type(fig) is Figure and fig.axes
    assert plt.get_fignums() == []  # no pyplot figure was opened
    assert files_under(mixed) == before  # and nothing was written
    titles = [fig.get_suptitle() for fig in figures[:4]]
    assert "all models" in titles[0] and "without the L1 models" in titles[1]
    assert titles[2].startswith("Test loss")
    legend = [t.get_text() for t in figures[1].legends[0].texts]
    assert legend == ["BN (2 seeds, 1 unfinished)"]


def test_notebook_figures_are_the_reports_figures(mixed, tmp_path):
    """Same code, same PNG: the notebook's figure rendered as the report renders it is the
    report's file byte for byte."""
    results = normlab.load_results(mixed, images=synthetic_images)
    drawn = {"test_acc_all": results.accuracy(), "test_loss_no_l1": results.loss(without_l1=True),
             "mistakes_bn": results.gallery("bn"), "confusion_bn_l1": results.confusion("bn_l1")}
    build_report(mixed, images=synthetic_images)
    for name, fig in drawn.items():
        assert png_bytes(fig) == (mixed / "figures" / f"{name}.png").read_bytes(), name


def test_figure_errors_name_what_is_wrong(mixed, tmp_path):
    results = normlab.load_results(mixed, images=synthetic_images)
    with pytest.raises(ValueError, match="no variant 'ln'; the variants are bn, bn_l1"):
        results.gallery("ln")
    with pytest.raises(ValueError, match="name a variant: bn, bn_l1"):
        results.confusion()
    with pytest.raises(ValueError, match="unknown metric 'acc'; choose one of test_acc"):
        results.curves("acc")
    with pytest.raises(ValueError, match=r"holds no suite\.json and no run directories"):
        normlab.load_results(tmp_path)
    (tmp_path / "empty").mkdir()
    empty = make_suite(tmp_path / "empty", skip=(("bn", 1), ("bn", 2), ("bn_l1", 1),
                                                 ("bn_l1", 2)))
    nothing = normlab.load_results(empty)
    with pytest.raises(ValueError, match="no run has finished an epoch yet"):
        nothing.accuracy()
    with pytest.raises(ValueError, match="bn has no finished run yet"):
        nothing.gallery("bn")
    assert "0 of 4 runs finished" in nothing._repr_html_()


def test_dataframes_without_pandas_say_how_to_install(mixed, monkeypatch):
    results = normlab.load_results(mixed)
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match=r"pip install 'normlab\[notebook\]'"):
        results.summary  # noqa: B018
    assert "<table>" in results._repr_html_()  # the display needs no pandas


def test_figures_display_inline_in_ipython(monkeypatch):
    """Figures never touch pyplot, so the inline backend may not be loaded: the report's PNG
    formatter is registered for Figure when nothing else is."""
    formatters = pytest.importorskip("IPython.core.formatters")
    display = formatters.DisplayFormatter()
    monkeypatch.setattr(nb_display, "_ipython", lambda: SimpleNamespace(display_formatter=display))
    fig = Figure()
    fig.subplots().plot([1, 2])
    assert "image/png" not in display.format(fig)[0]
    nb_display._figures_display_inline()
    assert display.format(fig)[0]["image/png"] == png_bytes(fig)
    mine = display.formatters["image/png"].lookup_by_type(Figure)
    nb_display._figures_display_inline()  # once registered (by us or the inline backend), kept
    assert display.formatters["image/png"].lookup_by_type(Figure) is mine


def test_resize_renames_and_resizes_every_variant():
    suite = load_suite("s6")
    small = nb_api.resize(suite, subset=300, epochs=1)
    assert small.name == "s6-300img-1ep" and small.subset == 300
    assert small.protocol.epochs == 1
    assert [v.name for v in small.variants] == [v.name for v in suite.variants]
    for v, original in zip(small.variants, suite.variants, strict=True):
        assert v.config.subset == 300 and v.config.protocol.epochs == 1
        assert dataclasses.replace(v.config, subset=None, protocol=original.config.protocol) \
            == original.config
    assert nb_api.resize(suite) is suite
    quick = load_suite("s6-quick")
    assert nb_api.resize(quick, subset=2000, epochs=2) is quick  # already that size
    assert nb_api.resize(quick, epochs=1).name == "s6-quick-1ep"


def test_progress_bars_follow_the_events():
    bar = partial(tqdm, file=io.StringIO())
    progress = nb_api.NotebookProgress({"bn/seed1": "[1/2] bn seed 1"}, runs=2, done=1, bar=bar)
    assert progress.runs_bar.n == 1 and progress.runs_bar.total == 2
    progress(RunStarted("bn/seed1", 1, 3))
    epochs = progress.epoch_bars["bn/seed1"]
    assert (epochs.n, epochs.total, epochs.desc) == (1, 3, "[1/2] bn seed 1")
    progress(StepsDone("bn/seed1", 2, 128, 300))
    assert "epoch 2: 128 of 300 images" in epochs.postfix
    record = {"epoch": 2, "test_acc": 97.5, "test_loss": 0.08}
    progress(EpochFinished("bn/seed1", record, 3))
    assert epochs.n == 2 and "test acc 97.50%" in epochs.postfix
    progress(RunFinished("bn/seed1", "ok", ()))
    assert progress.epoch_bars == {} and progress.runs_bar.n == 2
    progress.close()
    assert progress.runs_bar is None


# ----------------------------------------------------------------------------- training


def test_interrupt_mid_suite_keeps_finished_epochs_and_the_cell_continues(
        mnist, tmp_path, monkeypatch, capsys, reportless):
    """Ctrl-C (a kernel interrupt) in the second run's second epoch: the first run and the
    second run's first epoch are kept; running again trains only what is left."""
    path = tmp_path / "two.toml"
    path.write_text(TWO_VARIANTS)
    out = tmp_path / "suite"
    real = nb_api.NotebookProgress._on_StepsDone

    def interrupt(self, event):
        real(self, event)
        if event.run == "gn/seed1" and event.epoch == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(nb_api.NotebookProgress, "_on_StepsDone", interrupt)
    with pytest.raises(KeyboardInterrupt):
        normlab.run_suite(path, out=out)
    assert ("Interrupted. 1 of 2 runs are finished; completed epochs kept: 3 in "
            in capsys.readouterr().err)
    assert (out / "bn/seed1/predictions.pt").exists()
    gn = out / "gn/seed1"
    assert len((gn / "metrics.jsonl").read_text().splitlines()) == 1
    assert (gn / "checkpoint.pt").exists() and not (gn / "predictions.pt").exists()
    assert not (gn / ".lock").exists()
    states = normlab.load_results(out).metrics.groupby("variant")["run_state"].first()
    assert states.to_dict() == {"bn": "finished", "gn": "unfinished"}
    kept = json.loads((gn / "metrics.jsonl").read_text())
    bn_stamp = (out / "bn/seed1/metrics.jsonl").stat().st_mtime_ns

    monkeypatch.undo()
    events: list = []
    results = normlab.run_suite(path, out=out, progress=events.append)
    started = [e for e in events if isinstance(e, RunStarted)]
    assert [(e.run, e.epochs_done) for e in started] == [("gn/seed1", 1)]  # bn not retrained
    assert (out / "bn/seed1/metrics.jsonl").stat().st_mtime_ns == bn_stamp
    history = [json.loads(line) for line in (gn / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 2

    def untimed(record):
        return {k: v for k, v in record.items() if k not in TIMING_FIELDS}

    assert untimed(history[0]) == untimed(kept)
    assert "2 of 2 runs finished" in results._repr_html_()


def test_train_one_run_with_history_and_figures(mnist, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = normlab.train(norm="gn", dropout=0, epochs=1, subset=300, progress=False)
    folder = run.folder
    assert folder.parent == Path("runs/train") and folder.name.startswith("gn-seed1-")
    assert run.state == "finished" and run.config.model.dropout == 0
    history = run.history
    assert list(history["epoch"]) == [1] and "test_acc" in history.columns
    assert "GN (2 groups), dropout 0, seed 1: finished" in run._repr_html_()
    fig = run.accuracy()
    assert type(fig) is Figure and fig.get_suptitle().startswith(
        "Test accuracy: GN (2 groups), dropout 0, seed 1")
    assert type(run.gallery()) is Figure and type(run.confusion()) is Figure
    assert plt.get_fignums() == []

    stamp = (folder / "metrics.jsonl").stat().st_mtime_ns
    again = normlab.train(norm="gn", dropout=0, epochs=1, subset=300, progress=False)
    assert again.folder == folder and (folder / "metrics.jsonl").stat().st_mtime_ns == stamp
    assert isinstance(normlab.load_results(folder), normlab.Run)
    other = normlab.train(norm="gn", dropout=0, epochs=1, subset=200, progress=False)
    assert other.folder != folder  # another config, another folder

    with pytest.raises(ValueError, match="holds a run with a different config"):
        normlab.train(folder, norm="ln", epochs=1, subset=300, progress=False)
    with pytest.raises(ValueError, match=r"unknown option 'learning_rate'.*precision.*epochs"):
        normlab.train(learning_rate=0.1)
    with pytest.raises(ValueError, match="pass either config= or options"):
        normlab.train(config=run.config, norm="bn")
    same = normlab.train(config=run.config, norm=None, progress=False)  # None: not given
    assert same.folder == folder


# ----------------------------------------------------------------------------- the example


def execute_example(workdir: Path, parameters: dict):
    """examples/s6.ipynb executed by nbclient with ``parameters`` injected after its
    parameters cell (as papermill does); any cell error raises."""
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    notebook = nbformat.read(EXAMPLE, as_version=4)
    tagged = [i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "the example needs exactly one cell tagged 'parameters'"
    source = "\n".join(f"{key} = {value!r}" for key, value in parameters.items())
    cell = nbformat.v4.new_code_cell(source, id="injected-parameters")
    notebook.cells.insert(tagged[0] + 1, cell)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(workdir)}}).execute()
    return notebook


def outputs_of(notebook, cell_id: str) -> list:
    return next(c for c in notebook.cells if c.get("id") == cell_id).outputs


def mimes(outputs) -> list[str]:
    return [mime for o in outputs for mime in o.get("data", {})]


def test_example_defaults_are_the_full_study():
    notebook = json.loads(EXAMPLE.read_text())
    params = next(c for c in notebook["cells"] if "parameters" in c["metadata"].get("tags", []))
    values: dict = {}
    exec("".join(params["source"]), values)  # plain assignments
    assert values["SUITE"] == "s6"
    assert values["SUBSET"] is None and values["EPOCHS"] is None and values["SEEDS"] is None
    assert all(not c.get("outputs") for c in notebook["cells"] if c["cell_type"] == "code")


def test_example_notebook_runs_top_to_bottom(mnist, tmp_path):
    for module in ("nbclient", "nbformat", "ipykernel", "pandas"):
        require_tool(importlib.util.find_spec(module) is not None,
                     f"{module} (pip install -r requirements-test.txt)")
    notebook = execute_example(tmp_path, {**TINY, "OUT": str(tmp_path / "s6")})

    train = outputs_of(notebook, "train")
    page = "".join(o["data"].get("text/html", "") for o in train if "data" in o)
    assert "<table>" in page and "5 of 5 runs finished" in page
    assert "s6-300img-1ep" in page
    bars = [o for o in train if "application/vnd.jupyter.widget-view+json" in o.get("data", {})
            or o.get("name") == "stderr"]
    assert bars, "no progress bar"
    for cell in ("acc-all", "acc-no-l1", "loss-all", "loss-no-l1", "confusion",
                 "single-curves"):
        assert mimes(outputs_of(notebook, cell)).count("image/png") == 1, cell
    assert mimes(outputs_of(notebook, "galleries")).count("image/png") == 5
    assert "Ranking by final test accuracy" in "".join(
        o["data"]["text/html"] for o in outputs_of(notebook, "analysis"))
    assert "text/html" in mimes(outputs_of(notebook, "summary"))
    files = "".join(o.get("text", "") for o in outputs_of(notebook, "files"))
    assert "normalizations.xlsx" in files and (tmp_path / "s6/normalizations.xlsx").exists()
    errors = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert errors == []
