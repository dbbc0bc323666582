"""The ``normlab`` command: a thin dispatcher over the packages' own command modules.

Each verb lives next to the code it drives (``normlab/<package>/cli.py``) and exposes
``configure(parser)`` and ``run(args) -> int``; this file only wires them together. The
table below is the home of each verb's one-line help; a verb's module is imported, and its
sub-parser configured, only when the command line names that verb (``normlab --help``
imports none of them): a ``normlab train`` does not pay for the report builder's imports.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading

from normlab import __version__

# verb -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "summary": ("normlab.models.cli", "print a torchinfo table of a model and its parameter count"),
    "data": ("normlab.data.cli", "fetch and verify datasets (works offline)"),
    "train": ("normlab.training.cli", "train one model into a resumable run directory"),
    "suite": ("normlab.experiments.cli", "run a suite of variants x seeds, then write its report"),
    "sweep": ("normlab.experiments.sweep", "run a grid given on the command line (a suite)"),
    "report": ("normlab.reports.cli", "(re)build the report of a suite's run directories"),
    "track": ("normlab.tracking.cli", "push a suite's (or a run's) folder to W&B, MLflow or "
                                      "TensorBoard"),
    "sheet": ("normlab.workbook.cli", "write the xlsx workbook that computes BN/LN/GN/IN"),
    "info": ("normlab.accel.cli", "say what each acceleration path would be on this host"),
}


class _LazyVerbs(argparse._SubParsersAction):
    """The verbs' sub-parsers, each configured from its module when its verb is parsed."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.unconfigured = set(COMMANDS)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        verb = values[0]
        if verb in self.unconfigured:  # (an unknown verb never gets here: argparse's error)
            self.unconfigured.discard(verb)
            module_name, help_text = COMMANDS[verb]
            module = importlib.import_module(module_name)
            sub = self.choices[verb]
            sub.description = (module.__doc__ or help_text).strip()
            module.configure(sub)
            sub.set_defaults(_run=module.run)
        super().__call__(parser, namespace, values, option_string)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="normlab",
        description="normlab: normalization and regularization experiments on small CNNs.",
    )
    parser.add_argument("--version", action="version", version=f"normlab {__version__}")
    parser.register("action", "parsers", _LazyVerbs)
    verbs = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for verb, (_, help_text) in COMMANDS.items():
        verbs.add_parser(verb, help=help_text,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    return parser


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM stops a command as Ctrl-C does: finished work kept


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    on_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if on_main else None
    try:
        return int(args._run(args) or 0)
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted: finished work is kept; rerun the same command to continue",
              file=sys.stderr)
        return 130
    except ValueError as err:  # bad input: one clear line, no traceback
        print(f"normlab {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        if on_main:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def entry() -> None:
    """The ``normlab`` command: :func:`main` in a process with tcmalloc when it is installed
    (:mod:`normlab.memory`)."""
    from normlab.memory import reexec_with_tcmalloc

    reexec_with_tcmalloc(sys.argv[1:])
    sys.exit(main())


if __name__ == "__main__":
    entry()
