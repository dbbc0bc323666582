"""Start-up imports: a suite's worker process and ``normlab <command>`` import only what
they use (scipy, matplotlib and the report builder cost about a second per process)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from normlab.cli import COMMANDS, main

HEAVY = ("scipy", "matplotlib", "normlab.reports.build")


def loaded_after(code: str) -> list[str]:
    """Which of HEAVY and the command modules a fresh interpreter holds after ``code``."""
    watched = [*HEAVY, *(module for module, _ in COMMANDS.values())]
    script = (f"import json, sys\n{code}\n"
              f"print(json.dumps([m for m in {watched!r} if m in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_suite_worker_imports_neither_scipy_nor_matplotlib_nor_the_report_builder():
    # What a spawned ProcessExecutor worker does to unpickle its function: import the module.
    code = ("import pickle, normlab.experiments.executors\n"
            "from normlab.experiments.executors import train_job\n"
            "assert pickle.loads(pickle.dumps(train_job)) is train_job")
    assert [m for m in loaded_after(code) if m in HEAVY] == []


def test_the_reports_package_loads_its_names_on_use():
    code = ("import normlab.reports, normlab.reports.stats\n"
            "assert normlab.reports.stats.fmt_mean_std([1.0, 3.0]) == '2.00 ± 1.41'")
    assert loaded_after(code) == []
    code = ("import normlab.reports as r\n"
            "from normlab.reports import build_report, load_results\n"
            "assert set(r.__all__) <= set(dir(r))\n"
            "assert all(getattr(r, name).__module__.startswith('normlab.reports.')\n"
            "           for name in r.__all__)")
    assert "normlab.reports.build" in loaded_after(code)


def test_parsing_a_command_imports_only_that_commands_module():
    code = ("from normlab.cli import build_parser\n"
            "args = build_parser().parse_args(['train', '--out', 'x', '--epochs', '1'])\n"
            "assert args.p_epochs == 1 and callable(args._run)")
    loaded = loaded_after(code)
    # normlab.training.cli takes the model options from normlab.models.cli
    assert sorted(loaded) == ["normlab.models.cli", "normlab.training.cli"]


def test_help_lists_every_command_with_its_line(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--help"])
    assert stop.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps long lines
    for verb, (_, help_text) in COMMANDS.items():
        assert f"{verb} {' '.join(help_text.split())}" in out


@pytest.mark.parametrize("verb", list(COMMANDS))
def test_each_command_has_its_own_help(verb, capsys):
    with pytest.raises(SystemExit) as stop:
        main([verb, "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: normlab {verb}")
    module = __import__(COMMANDS[verb][0], fromlist=["run"])
    assert module.__doc__.strip().splitlines()[0] in out  # the module's docstring


def test_an_unknown_command_is_argparses_error(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["nosuch"])
    assert stop.value.code == 2
    assert "invalid choice: 'nosuch'" in capsys.readouterr().err
