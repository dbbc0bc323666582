"""The notebook API's entry points: :func:`run_suite` (train a suite, with :func:`resize` to
shrink it), :func:`train` (one run) and :func:`load_results` (a suite or run trained
earlier). Training goes through :func:`normlab.experiments.run_suite` and
:func:`normlab.training.train`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from normlab.experiments.suite import Suite
from normlab.notebook.progress import NotebookProgress, _watching
from normlab.notebook.results import Results, Run
from normlab.reports.build import ImageLoader
from normlab.training.config import RunConfig
from normlab.training.events import Listener
from normlab.training.rundir import RunDir


def resize(suite: Suite, subset: int | None = None, epochs: int | None = None) -> Suite:
    """``suite`` on the first ``subset`` training images and/or for ``epochs`` epochs, under
    a name that says so (``s6-2000img-1ep``, so its default folder is its own)."""
    suffix = []
    if subset is not None and subset != suite.subset:
        suffix.append(f"{subset}img")
    if epochs is not None and any(v.config.protocol.epochs != epochs for v in suite.variants):
        suffix.append(f"{epochs}ep")
    if not suffix:
        return suite

    def sized(config: RunConfig) -> RunConfig:
        protocol = config.protocol
        if epochs is not None:
            protocol = dataclasses.replace(protocol, epochs=epochs)
        return dataclasses.replace(config, protocol=protocol,
                                   subset=subset if subset is not None else config.subset)

    words = ", ".join(w for w in (
        f"the first {subset:,} training images" if subset is not None else "",
        f"{epochs} epoch{'s' if epochs != 1 else ''}" if epochs is not None else "") if w)
    return dataclasses.replace(
        suite.map_configs(sized),
        name=f"{suite.name}-{'-'.join(suffix)}",
        description=(f"{suite.description} Resized to {words}.").strip(),
        protocol=sized(RunConfig(protocol=suite.protocol)).protocol,
        subset=subset if subset is not None else suite.subset,
    )


def run_suite(suite: str | Path | Suite, out: str | Path | None = None,
              seeds: int | list[int] | None = None, *, subset: int | None = None,
              epochs: int | None = None, jobs: int = 1, device: str = "auto",
              threads: int | None = None, progress: bool | Listener = True, executor=None,
              images: ImageLoader | None = None,
              track: str | list[str] | None = None) -> Results:
    """Train every unfinished run of ``suite`` (a bundled name such as ``"s6"``, a .toml
    path, or a :class:`~normlab.experiments.Suite`) into ``out`` (default runs/<name>), build
    its report, and return its :class:`Results`.

    ``seeds``: a count K (seeds 1..K) or a list, instead of the suite's. ``subset`` and
    ``epochs`` resize every variant (see :func:`resize`). ``jobs`` runs train at once in
    worker processes. ``progress``: tqdm.auto bars (True), nothing (False) or your listener.
    ``track``: "wandb", "mlflow" and/or "tensorboard" (a name or a list) also log every run
    there (:mod:`normlab.tracking`; W&B offline unless WANDB_MODE says otherwise).

    Interrupting the kernel stops it cleanly: every completed epoch is kept, and running the
    cell again continues where it stopped (finished runs are not retrained).
    """
    from normlab.experiments import load_suite
    from normlab.experiments import run_suite as run
    from normlab.experiments.plan import default_out, plan
    from normlab.experiments.runner import what_is_kept

    if not isinstance(suite, Suite):
        suite = load_suite(suite)
    suite = resize(suite, subset, epochs)
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ValueError(f"seeds as a count must be >= 1, got {seeds}")
        seeds = list(range(1, seeds + 1))
    out = Path(out) if out is not None else default_out(suite)
    planned = plan(suite, out, seeds)
    heads = {r.rel: f"[{i}/{len(planned)}] {r.head}" for i, r in enumerate(planned, 1)}
    log: list[str] = []

    def say(text: str) -> None:
        log.append(text)
        if "keeps seeds" in text:
            print(text)

    with _watching(progress,
                   lambda: NotebookProgress(heads, len(planned),
                                            sum(not r.to_train for r in planned)),
                   lambda: f"{what_is_kept(planned)} in {out}") as listener:
        run(suite, out, seeds, executor=executor, device=device, threads=threads, jobs=jobs,
            listener=listener, log=say, track=track)
    for line in log:
        if line.startswith(("W&B:", "MLflow:", "TensorBoard:")):
            print(line)  # where the tracked runs are
    results = Results(out, images=images)
    results.log = log
    return results


def load_results(folder: str | Path, *, images: ImageLoader | None = None) -> Results | Run:
    """The results in ``folder``: a suite's (:class:`Results`), trained earlier or still
    training, or one run directory's (:class:`Run`). ``images`` replaces the loader of the
    test images that galleries show (the dataset by default)."""
    folder = Path(folder)
    if RunDir(folder).exists() and not (folder / "suite.json").exists():
        return Run(folder, images=images)
    return Results(folder, images=images)


def train(out: str | Path | None = None, *, protocol: str = "seed",
          config: RunConfig | None = None, device: str = "auto", threads: int | None = None,
          progress: bool | Listener = True, images: ImageLoader | None = None,
          track: str | list[str] | None = None, **options: Any) -> Run:
    """Train one run into ``out`` and return it as a :class:`Run`.

    The ``options`` are ``normlab train``'s: ``net`` (seed, mlp, plain, resnet, or an import
    path ``"package.module:Attr"``) and ``net_options`` (``{"depth": 20}``: see
    :mod:`normlab.models.nets`), ``norm`` (a registered norm: bn, gn, ln, in,
    none, brn, gbn, frn, evo-s0, evo-b0, rms or one of yours from
    :func:`normlab.models.register_norm`; or an import path ``"package.module:Attr"``),
    ``norm_options`` (a dict passed to every norm layer, e.g. ``{"momentum": 0.01}``),
    ``weight_std``, ``groups``, ``dropout``, ``dropout_draw``, ``kernels``, ``eval_kernels``,
    ``l1``, ``l1_scope``, ``weight_decay``, ``seed``, ``subset``, ``dataset``, ``precision``,
    ``augment``, ``precise_bn``, ``compile``, and any field of the named ``protocol``
    (``epochs=5``, ``lr=0.05``, ...); unset ones keep the defaults (the seed's BN model and
    protocol). Or pass a whole ``config``. A norm registered in this session trains here (not in
    :func:`run_suite`'s worker processes with ``jobs`` > 1: name it by import path there).
    ``out`` defaults to runs/train/<norm>-seed<k>-<a hash of the config>, so running the
    same cell again resumes (or finds finished) the same run, and another config gets its
    own folder. Interrupting the kernel keeps every completed epoch. ``track``: as for
    :func:`run_suite`.
    """
    from normlab.tracking import Tracking, check_trackers
    from normlab.training.run import train as train_run

    given = [k for k, v in options.items() if v is not None]  # None: not given
    if config is None:
        config = RunConfig.from_options(protocol, **options)
    elif given or protocol != "seed":
        raise ValueError("pass either config= or options (norm=, epochs=, ...), not both; "
                         f"got config and {', '.join(given) or 'protocol=' + protocol}")
    if out is None:
        digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
        norm = re.sub(r"[^A-Za-z0-9_.+-]+", "_", config.norm)  # an import path's ':'
        if config.model.net != "seed":
            norm = re.sub(r"[^A-Za-z0-9_.+-]+", "_", config.model.net) + "-" + norm
        out = Path("runs") / "train" / f"{norm}-seed{config.seed}-{digest.hexdigest()[:8]}"
    from normlab.experiments.suite import default_label

    name = str(out)
    head = f"{default_label(config)}, seed {config.seed}"
    check_trackers(track)
    with _watching(progress, lambda: NotebookProgress({name: head}),
                   lambda: f"{len(RunDir(out).metrics())} epochs are kept in {out}") as listener:
        tracking = Tracking(track, listener) if track else None
        try:
            train_run(config, out, device=device, threads=threads,
                      listener=tracking or listener, name=name)
        finally:
            for line in tracking.close() if tracking else []:
                print(line)
    return Run(out, images=images)
