"""Where a training step of normlab's engine goes, on this host or as a host of another kind
would run it (``--isa``, see ``isa.py``): one process training epochs through
``train_one_epoch`` exactly as ``normlab train`` sets it up (the config's defaults, the
hand step where it applies), profiled in its steady state only (after a warm-up epoch, so
imports, kernel builds and oneDNN's primitive creation are not in it).

``--tool perf``: ``perf record`` (cpu-clock samples) attached to the process; the samples
by shared object, grouped into components (the interpreter, oneDNN's generated code,
normlab's C kernels, libtorch_cpu, libc, the OS kernel, ...), and the interpreter's own top
symbols (where the cyclic collector shows as ``gc_collect_main``, ``visit_decref``...).
``--tool py-spy``: ``py-spy record --native`` attached likewise; the share of samples under
each Python line of the step (inclusive) and by leaf (self), so the Python cost of the loop
is visible line by line. ``--tool torch``: torch.profiler over the same steps, top ops by
self CPU time.

    python benchmarks/profile_engine.py --isa avx2 --norm bn --tool perf
    python benchmarks/profile_engine.py --isa avx2 --norm gn --tool py-spy --seconds 20
    python benchmarks/profile_engine.py --isa native --tool perf     # this host as it is

Each measuring run prints ms/step of the profiled epochs (a profiler attached costs a few
per cent) and the unprofiled ms/step just before, and ``--out`` writes the summary as
Markdown.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import isa


def prepared(config, threads: int, steps: int, data=None):
    """What ``normlab train`` makes for ``config`` (see ``normlab.training.run``): the model
    in its layout, the step :func:`normlab.accel.prepare` gives it, the optimizer, the
    first ``steps`` batches of the training set (or ``data``) and the keyword arguments of
    ``train_one_epoch`` (L1, augmentation, precision, the step)."""
    import torch

    from normlab import accel
    from normlab.data import load_dataset
    from normlab.memory import keep_freed_memory
    from normlab.training import TensorData
    from normlab.training.engine import l1_parameters, memory_format
    from normlab.training.run import make_optimizer

    keep_freed_memory()
    torch.set_num_threads(threads)
    if data is None:
        ds = load_dataset(config.dataset)
        n = steps * config.protocol.batch_size
        data = TensorData(ds.train_images[:n], ds.train_labels[:n], ds.mean, ds.std)
    torch.manual_seed(config.seed)
    model = config.make_model().to(
        memory_format=memory_format(torch.device("cpu"), threads, config.model))
    step = accel.prepare(model, config.model, config.precision,
                         enabled=getattr(config, "accel", "on") == "on")
    opt, _, _ = make_optimizer(model, config, steps)
    p = config.protocol
    kwargs = {"seed": config.seed, "batch_size": p.batch_size, "rotation": p.rotation,
              "precision": config.precision, "augment": config.augment, "step": step}
    if config.l1:
        kwargs.update(l1=config.l1, l1_params=l1_parameters(model, config.l1_scope))
    return model, opt, data, kwargs


def setup(norm: str, precision: str | None, threads: int, steps: int, hook: str | None):
    """A run set up as ``normlab train`` sets it up, and ``epoch()`` that trains ``steps``
    steps through ``train_one_epoch`` and returns its seconds."""
    from normlab.training import RunConfig, train_one_epoch

    config = RunConfig.from_options(norm=norm, precision=precision)
    model, opt, data, kwargs = prepared(config, threads, steps)
    train = train_one_epoch
    if hook:  # a lever to profile: "module:function" wrapping train_one_epoch
        module, _, name = hook.partition(":")
        train = getattr(__import__(module, fromlist=[name]), name)(train_one_epoch)
    counter = iter(range(1, 10**9))

    def epoch() -> float:
        return train(model, data, opt, epoch=next(counter), **kwargs)["train_seconds"]

    return config, epoch


# perf's shared objects -> the components of a step
COMPONENTS = (
    (r"libpython|^python", "Python interpreter (libpython)"),
    (r"^kernels-", "normlab C kernels"),
    (r"^onednn-", "normlab oneDNN glue (onednn.c)"),
    (r"libtorch_cpu", "libtorch_cpu (ATen, dispatcher, oneDNN's C++)"),
    (r"libtorch_python|^_C\.", "torch's Python bindings"),
    (r"libc\.so|libm\.so|libc-|ld-linux", "libc / libm (malloc, memcpy)"),
    (r"libgomp|libiomp", "OpenMP runtime"),
    (r"_ctypes|libffi", "ctypes / libffi"),
    (r"kernel\.kallsyms|\[kernel", "OS kernel"),
    (r"\[unknown\]|\[anon|//anon|perf-\d+\.map|\[JIT\]", "oneDNN generated code (JIT)"),
)


def component(dso: str) -> str:
    for pattern, name in COMPONENTS:
        if re.search(pattern, dso):
            return name
    return f"other ({dso})"


def perf_summary(data: Path) -> tuple[list[tuple[str, float]], list[tuple[str, float]],
                                      list[tuple[str, float]], list[tuple[str, float]]]:
    """(components, shared objects, symbols, interpreter symbols) with their shares in % of
    all samples, from ``perf report``."""
    def report(*sort: str) -> list[tuple[float, list[str]]]:
        text = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children",
                               "-g", "none", "--percent-limit", "0.05", "--sort", ",".join(sort)],
                              capture_output=True, text=True, check=True).stdout
        rows = []
        for line in text.splitlines():
            m = re.match(r"\s*([\d.]+)%\s+(.*)$", line)
            if m:
                rows.append((float(m.group(1)), m.group(2).split()))
        return rows

    by_dso = [(" ".join(f), share) for share, f in report("dso")]
    comps: dict[str, float] = collections.defaultdict(float)
    for dso, share in by_dso:
        comps[component(dso)] += share
    syms = [(f"{f[0]}: {' '.join(f[2:])}" if len(f) > 2 else " ".join(f), share)
            for share, f in report("dso", "sym") if f]
    py = [(sym.split(": ", 1)[-1], share) for sym, share in syms
          if component(sym.split(":")[0]).startswith("Python")]
    return sorted(comps.items(), key=lambda kv: -kv[1]), by_dso, syms, py


def pyspy_summary(raw: Path, top: int) -> tuple[list, list, int]:
    """(lines of the step by inclusive share, leaves by self share, samples) from py-spy's
    collapsed stacks (``frame;frame;... count``)."""
    inclusive: dict[str, int] = collections.Counter()
    leaves: dict[str, int] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = stack.split(";")
        total += n
        seen = set()
        for frame in frames:
            name = _frame(frame)
            if name not in seen:
                inclusive[name] += n
                seen.add(name)
        leaves[_leaf(frames)] += n
    share = lambda c: [(k, 100 * v / max(total, 1)) for k, v in c.most_common(top)]  # noqa: E731
    return share(inclusive), share(leaves), total


def pyspy_groups(raw: Path) -> list[tuple[str, float]]:
    """Samples by what their innermost frame is: Python code (the interpreter running a
    line of Python: the per-step cost of the loop itself), or native code by component."""
    counts: dict[str, int] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        leaf = stack.split(";")[-1]
        m = re.match(r".* \((.*?)(?::\d+)?\)$", leaf)
        where = m.group(1) if m else leaf
        if where.endswith(".py"):
            group = "Python code (interpreter)"
        elif re.search(r"\.c$|\.h$", where):  # CPython or an extension built with symbols
            group = f"C source with symbols ({Path(where).name})"
        else:
            group = component(Path(where).name)
        counts[group] += int(count)
    total = sum(counts.values()) or 1
    return [(k, 100 * v / total) for k, v in counts.most_common()]


def _frame(frame: str) -> str:
    """``function (file:line)`` with the file shortened to its package path."""
    m = re.match(r"(.*) \((.*?):(\d+)\)$", frame)
    if not m:
        return frame
    fn, path, line = m.groups()
    path = re.sub(r".*/(normlab|torch|benchmarks)/", r"\1/", path)
    return f"{fn} ({path}:{line})"


def _leaf(frames: list[str]) -> str:
    """The innermost frame, and for a native one the Python line it was called from."""
    leaf = _frame(frames[-1])
    if not re.search(r"\.py:\d+\)$", leaf):
        caller = next((_frame(f) for f in reversed(frames) if re.search(r"\.py:\d+\)$", f)), "")
        native = leaf.split(" (")[0]
        return f"[native {native[:60]}] <- {caller}"
    return leaf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    isa.add_arguments(parser)
    parser.add_argument("--norm", default="bn")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=200, help="steps per epoch")
    parser.add_argument("--seconds", type=float, default=15, help="profiled seconds")
    parser.add_argument("--tool", default="perf", choices=("perf", "py-spy", "torch"))
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--hook", default=None,
                        help="module:function that wraps train_one_epoch (a lever to profile)")
    parser.add_argument("--out", type=Path, default=None, help="append the summary here (.md)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="copy the profiler's raw output here (perf.data or stacks)")
    args = parser.parse_args()
    config, epoch = setup(args.norm, isa.apply(args), args.threads, args.steps, args.hook)
    got = isa.dispatch(kernels=True)
    epoch()  # warm-up: kernels built, primitives created and checked
    quiet = [epoch() for _ in range(2)]
    ms = lambda s: 1000 * s / args.steps  # noqa: E731
    lines = [f"# {args.tool}: {config.norm}, {config.precision}, {args.threads} thread(s), "
             f"forced {args.isa or 'none'}",
             "",
             f"- dispatch: {got}",
             f"- torch {__import__('torch').__version__}, Python {sys.version.split()[0]}, "
             f"load before: {os.getloadavg()[0]:.2f}",
             f"- unprofiled: {', '.join(f'{ms(s):.2f}' for s in quiet)} ms/step"]
    work = Path(tempfile.mkdtemp(prefix="profile-engine-"))
    if args.tool == "torch":
        from torch.profiler import ProfilerActivity, profile

        steps = 0
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            while time.perf_counter() - start < args.seconds:
                epoch()
                steps += args.steps
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        lines += [f"- profiled {steps} steps, self-CPU total {total / steps / 1e3:.2f} ms/step",
                  "", "| op (self CPU) | ms/step | share | calls/step |", "|---|---:|---:|---:|"]
        for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: args.top]:
            lines.append(f"| {e.key[:60]} | {e.self_cpu_time_total / steps / 1e3:.3f} | "
                         f"{100 * e.self_cpu_time_total / total:.1f}% | {e.count / steps:.1f} |")
    else:
        venv = str(Path(sys.executable).parent)  # py-spy installed into the venv
        tool = shutil.which(args.tool) or shutil.which(args.tool, path=venv)
        if tool is None:
            raise SystemExit(f"{args.tool} is not installed")
        out = work / ("perf.data" if args.tool == "perf" else "stacks.txt")
        pid = str(os.getpid())
        if args.tool == "perf":
            cmd = [tool, "record", "-e", "cpu-clock", "-F", "999", "-p", pid, "-o", str(out),
                   "--", "sleep", str(args.seconds)]
        else:
            cmd = [tool, "record", "--pid", pid, "--native", "--rate", "250", "--format", "raw",
                   "--duration", str(int(args.seconds)), "-o", str(out)]
        profiler = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1)  # attached
        profiled = []
        while profiler.poll() is None:
            profiled.append(epoch())
        err = profiler.stderr.read().decode()
        if profiler.returncode:
            raise SystemExit(f"{args.tool} failed: {err}")
        lines.append(f"- profiled: {len(profiled)} epochs of {args.steps} steps, "
                     f"{', '.join(f'{ms(s):.2f}' for s in profiled)} ms/step")
        if args.tool == "perf":
            comps, by_dso, syms, py = perf_summary(out)
            lines += ["", "| component | share of samples |", "|---|---:|"]
            lines += [f"| {name} | {share:.1f}% |" for name, share in comps]
            lines += ["", "| shared object | share |", "|---|---:|"]
            lines += [f"| {dso} | {share:.1f}% |" for dso, share in by_dso[: args.top]]
            lines += ["", "| symbol | share |", "|---|---:|"]
            lines += [f"| {sym[:100]} | {share:.2f}% |" for sym, share in syms[: args.top]]
            lines += ["", "| interpreter symbol | share of all samples |", "|---|---:|"]
            lines += [f"| {sym} | {share:.2f}% |" for sym, share in py[: args.top]]
        else:
            incl, leaves, total = pyspy_summary(out, args.top)
            groups = pyspy_groups(out)
            lines += [f"- {total} samples (py-spy --native)", "",
                      "| where the innermost frame is | share |", "|---|---:|"]
            lines += [f"| {k} | {v:.1f}% |" for k, v in groups]
            lines += ["",
                      "| frame (inclusive) | share |", "|---|---:|"]
            lines += [f"| {k} | {v:.1f}% |" for k, v in incl]
            lines += ["", "| leaf (self) | share |", "|---|---:|"]
            lines += [f"| {k} | {v:.1f}% |" for k, v in leaves]
    lines.append(f"- load after: {os.getloadavg()[0]:.2f}")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.write(text + "\n")
    if args.keep and args.tool != "torch":
        shutil.copy(out, args.keep)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
