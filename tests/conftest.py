"""Shared fixtures. The real MNIST comes through normlab.data (offline: the PyPI copy),
cached under $NORMLAB_DATA (CI sets it to a fresh folder) or ~/.cache/normlab."""

import os
import secrets
import textwrap
from pathlib import Path

import pytest
import torch

# One thread: the tests train tiny models, where a second OpenMP thread buys little and
# oversubscribes a 2-core machine that also runs anything else.
torch.set_num_threads(1)

IN_CI = os.environ.get("CI", "").lower() == "true"

# Autograd, not torch.compile, for the steps the hand step does not take: the tests train
# hundreds of tiny runs, and compiling each norm and network would cost 5-20 s apiece (a
# config records which it was). The compiled path has its own tests (test_compiled.py),
# which ask for it; worker processes and subprocesses inherit this.
os.environ.setdefault("NORMLAB_COMPILE", "off")


# One Ray token for the whole test session: Ray keeps the token it first read in the
# process, so a second local Ray started with another token fails to authenticate
# ("InvalidAuthToken"; test_norm_registry's Ray test before test_ray's had done that).
RAY_TOKEN = secrets.token_hex(32)


def set_ray_environment(setenv) -> None:
    """The environment every Ray the tests start runs in (``setenv``: a MonkeyPatch's):
    loopback only, token authentication (Ray's default) with :data:`RAY_TOKEN`, without
    reading or writing ~/.ray/auth_token, and no usage reporting."""
    from normlab.experiments.ray_executor import LOOPBACK_ENV

    for key, value in {**LOOPBACK_ENV, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": RAY_TOKEN,
                       "RAY_USAGE_STATS_ENABLED": "0"}.items():
        setenv(key, value)


def no_report(patch: pytest.MonkeyPatch) -> None:
    """Suites run by the test (under ``patch``: the monkeypatch fixture or a
    ``MonkeyPatch.context()``) write no report: the report has tests of its own, and its
    test-batch section alone evaluates every checkpoint."""
    import normlab.reports

    patch.setattr(normlab.reports, "build_report", lambda root: Path(root) / "report.html")


def require_tool(available: bool, what: str) -> None:
    """Skip when a test's tool is missing, except under CI, where that is a failure:
    a skipped browser or spreadsheet test is a check that cannot fail."""
    if not available:
        if IN_CI:
            pytest.fail(f"{what} is required under CI=true but is missing")
        pytest.skip(f"{what} is not installed")


def suite_toml(*variants: tuple[str, dict], epochs: int = 1, seeds: str = "[1]",
               subset: int = 300, description: str = "") -> str:
    """A tiny suite's TOML text: the seed protocol for ``epochs`` on the first ``subset``
    MNIST images, and one [[variant]] per (name, options); line numbers as a person writes
    it (the suite loader's error messages name them)."""
    head = f'description = "{description}"\n' if description else ""
    text = (f'{head}dataset = "mnist"\nseeds = {seeds}\nsubset = {subset}\n\n'
            f'[protocol]\nname = "seed"\n\n[protocol.overrides]\nepochs = {epochs}\n')
    for name, options in variants:
        text += f'\n[[variant]]\nname = "{name}"\n'
        text += "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in options.items())
    return text


@pytest.fixture(scope="session")
def mnist():
    from normlab.data import load_dataset

    return load_dataset("mnist")


@pytest.fixture(scope="module")
def user_module(request, tmp_path_factory) -> Path:
    """The folder holding the test module's user module (its ``USER_MODULE`` name and
    ``USER_SOURCE`` text: a norm or network a person wrote), not on sys.path until a test
    puts it there."""
    folder = tmp_path_factory.mktemp(request.module.USER_MODULE)
    path = folder / f"{request.module.USER_MODULE}.py"
    path.write_text(textwrap.dedent(request.module.USER_SOURCE))
    return folder


@pytest.fixture
def importable(user_module, monkeypatch) -> Path:
    """:func:`user_module`'s folder, on sys.path for the test."""
    monkeypatch.syspath_prepend(str(user_module))
    return user_module
