"""Every accelerated path's tests on every host: this CPU runs them as other CPUs would.

A fast path's tests assert its contract (its numbers are the reference's bit for bit where
it is taken, the reference's path where it is refused), so they must pass whichever path a
CPU takes. Which path that is depends on three dispatches, and each can be forced down to
what a smaller CPU gets:

- ATen's kernels: ``ATEN_CPU_CAPABILITY`` (default, avx2, avx512), read when torch loads;
- oneDNN's convolutions (torch's and :mod:`normlab.accel.onednn`'s):
  ``ONEDNN_MAX_CPU_ISA`` (SSE41, AVX2, AVX512_CORE, AVX512_CORE_BF16, ...), read when the
  first primitive is made; without native bf16 torch computes bf16 convolutions another
  way, and onednn refuses them;
- normlab's C kernels: ``NORMLAB_MARCH`` (the ``-march`` kernels.c is built for: its
  generic, AVX2 and AVX-512 branches).

Each host kind of :data:`HOSTS` runs the contract tests (:data:`TESTS`) in a subprocess
under its settings, after a probe that says what the process actually got (ATen's
capability, oneDNN's ISA from its verbose log, the kernels' branches, and the paths a
step of the seed's network takes: :func:`normlab.accel.prepare`'s record). A setting the
CPU cannot honour is capped at what it has (a CPU feature is not a tool: nothing here
skips or fails for one). oneDNN caps ``ONEDNN_MAX_CPU_ISA`` itself; ATen does not (torch
2.13 takes ``ATEN_CPU_CAPABILITY=avx512`` on an AVX2-only Zen 3 and dies of an illegal
instruction in its first AVX-512 kernel), nor does ``-march`` (code for a missing
instruction set dies), so a capability this CPU lacks is forced as the best it has, and a
level it lacks is built as ``native``. And
every build of kernels.c this CPU can run is compared with the others bit for bit
(:func:`test_every_build_of_the_kernels_computes_the_same_numbers`).

``python tests/test_dispatch.py`` runs the whole matrix, this CPU's own dispatch included,
and prints it as a Markdown table (``--out FILE`` writes it too).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import require_tool
from normlab.accel import kernels

ROOT = Path(__file__).resolve().parents[1]
FORCING = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "NORMLAB_MARCH")
# The accelerated paths' contract tests: the kernels against float64 and torch's ops, the
# fused norm + dropout modules, the convolutions on oneDNN and the step by hand against
# autograd bit for bit, the test pass in chunks against whole batches, the compiled step
# against autograd to rounding (inductor's code follows the forced vector ISA), and one run
# that must learn on every path.
TESTS = ("tests/test_kernels.py", "tests/test_normdrop.py", "tests/test_onednn.py",
         "tests/test_handstep.py",
         "tests/test_accel.py::test_the_test_pass_in_chunks_is_the_whole_batchs_bitwise",
         "tests/test_compiled.py::test_the_compiled_step_is_autograds_to_rounding_and_says_so"
         "[mlp-bn]",
         "tests/test_training.py::test_same_seed_same_metrics_other_seed_differs")


@dataclass(frozen=True)
class Host:
    """A kind of host, as the three dispatches it gets (None: not forced)."""

    name: str
    aten: str | None
    onednn: str | None
    march: str | None
    examples: str


HOSTS = (
    Host("avx512-bf16", "avx512", "AVX512_CORE_BF16", "native",
         "native bf16 without AMX: Cooper Lake, Zen 4"),
    Host("avx512", "avx512", "AVX512_CORE", "x86-64-v4",
         "AVX-512 without bf16: Skylake-SP to Ice Lake"),
    Host("avx2", "avx2", "AVX2", "x86-64-v3", "AVX2: Haswell to Zen 3 (issue 20's host)"),
    Host("generic", "default", "SSE41", "x86-64", "any x86-64: ATen's scalar kernels"),
)
NATIVE = Host("native", None, None, None, "this CPU's own dispatch (the suite's)")

# What this CPU needs (/proc/cpuinfo's flags) to honour each setting.
ATEN = {"default": ("DEFAULT", set()),
        "avx2": ("AVX2", {"avx2", "fma"}),
        "avx512": ("AVX512", {"avx512f", "avx512bw", "avx512vl", "avx512dq", "fma"})}
# oneDNN's ISAs in order: the words its verbose ISA line has for each.
ONEDNN = {"SSE41": ("SSE4.1", {"sse4_1"}),
          "AVX2": ("AVX2", {"avx2", "fma"}),
          "AVX512_CORE": ("AVX-512", {"avx512f", "avx512bw", "avx512vl", "avx512dq"}),
          "AVX512_CORE_BF16": ("bfloat16", {"avx512f", "avx512bw", "avx512vl", "avx512dq",
                                            "avx512_vnni", "avx512_bf16"}),
          "AVX512_CORE_AMX": ("AMX", {"amx_tile", "amx_bf16", "amx_int8", "avx512_bf16"})}
MARCH = kernels.NEEDS  # the x86-64 psABI's levels: what each needs of the CPU
BRANCHES = ("__AVX__", "__AVX2__", "__AVX512F__", "__AVX512BF16__")  # what kernels.c tests


def x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


cpu_flags = kernels.cpu_flags  # this CPU's flags (the Zen 3 test replaces it)


def has(needs: set[str]) -> bool:
    return needs <= cpu_flags()


def march_here(march: str | None) -> str | None:
    """``march``, or ``native`` where this CPU lacks the level's instructions."""
    return march if march in (None, "native") or has(MARCH[march]) else "native"


def aten_here(aten: str | None) -> str | None:
    """``aten``, or the best capability below it that this CPU has (ATen does not cap it)."""
    if aten is None:
        return None
    names = list(ATEN)
    return next(name for name in reversed(names[:names.index(aten) + 1])
                if has(ATEN[name][1]))


def environment(host: Host, **extra: str) -> dict[str, str]:
    """This process's environment with ``host``'s dispatch in place of any forced one."""
    env = {k: v for k, v in os.environ.items() if k not in FORCING and k != "ONEDNN_VERBOSE"}
    for key, value in zip(FORCING, (aten_here(host.aten), host.onednn,
                                    march_here(host.march)), strict=True):
        if value is not None:
            env[key] = value
    return {**env, **extra}


# -- the probe: runs in the forced process ----------------------------------------------

def probe() -> dict:
    """What this process got: ATen's capability, the kernels' build, and the paths one
    training step of the seed's network (batch 64) takes in fp32 and in bf16."""
    import torch

    from normlab.accel import kernels, prepare
    from normlab.models import ModelConfig, Net

    torch.set_num_threads(1)
    seen: dict = {"aten": torch.backends.cpu.get_cpu_capability(), "march": kernels.march(),
                  "onednn": torch.backends.mkldnn.is_available()}
    try:
        kernels.library()
        seen["kernels"] = "normlab"
        seen["branches"] = kernel_branches(kernels.march())
    except kernels.KernelUnavailable as err:
        seen["kernels"] = f"torch's ({str(err).splitlines()[0]})"
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        config = ModelConfig(norms=("bn",), dropout=0.05)
        model = Net.from_config(config).to(memory_format=torch.channels_last)
        step = prepare(model, config, precision)
        x = torch.randn(64, 1, 28, 28).contiguous(memory_format=torch.channels_last)
        step(x, torch.randint(0, 10, (64,)))
        paths = step.paths()
        layers = step.hand._layers.get(x.shape, []) if step.hand is not None else []
        paths["impls"] = sorted({layer.impl()[0] for layer in layers if layer is not None})
        seen[precision] = paths
    return seen


def kernel_branches(march: str) -> list[str]:
    """Which of kernels.c's instruction-set branches a build for ``march`` compiles."""
    from normlab.accel import kernels

    done = subprocess.run([kernels.compiler(), f"-march={march}", "-dM", "-E", "-x", "c",
                           os.devnull], capture_output=True, text=True, check=True)
    defined = set(re.findall(r"#define (\w+) ", done.stdout))
    return [b.strip("_") for b in BRANCHES if b in defined] or ["generic"]


def probe_under(host: Host, folder: Path) -> dict:
    """:func:`probe` in a process under ``host``'s dispatch, with oneDNN's verbose log: its
    ISA line and the convolution implementations each dtype ran on (torch's and ours)."""
    out = folder / f"probe-{host.name}.json"
    done = subprocess.run([sys.executable, __file__, "--probe", str(out)], cwd=ROOT,
                          timeout=600, env=environment(host, ONEDNN_VERBOSE="1"),
                          capture_output=True, text=True)
    assert done.returncode == 0, f"the probe failed:\n{done.stderr[-3000:]}"
    seen = json.loads(out.read_text())
    isa = re.search(r"onednn_verbose,(?:v1,)?info,cpu,isa:(.*)", done.stdout)
    seen["onednn_isa"] = isa.group(1).strip() if isa else None
    convs: dict[str, set[str]] = {"f32": set(), "bf16": set()}
    for impl, dtype in re.findall(r"primitive,exec,cpu,convolution,([^,]+),[^,]*,"
                                  r"(?:diff_)?src:(\w+)", done.stdout):
        convs.setdefault(dtype, set()).add(impl)
    seen["onednn_convs_ran"] = {k: sorted(v) for k, v in convs.items()}
    return seen


def dispatch_problems(host: Host, seen: dict) -> list[str]:
    """Where a forced setting this CPU can honour did not take effect."""
    problems = []
    if host.aten is not None:
        name, needs = ATEN[host.aten]
        if has(needs) and seen["aten"] != name:
            problems.append(f"ATEN_CPU_CAPABILITY={host.aten}: torch reports {seen['aten']}")
    if host.onednn is not None and seen["onednn"] and seen["onednn_isa"] is None:
        problems.append("oneDNN's verbose log (ONEDNN_VERBOSE=1) has no ISA line")
    elif host.onednn is not None and seen["onednn"]:
        names = list(ONEDNN)
        word, needs = ONEDNN[host.onednn]
        above = names[names.index(host.onednn) + 1:]
        higher = ONEDNN[above[0]][0] if above else None
        isa = seen["onednn_isa"]
        if has(needs) and (word not in isa or (higher and higher in isa)):
            problems.append(f"ONEDNN_MAX_CPU_ISA={host.onednn}: oneDNN reports {isa!r}")
    march = march_here(host.march)
    if march is not None and seen["march"] != march:
        problems.append(f"NORMLAB_MARCH={march}: the kernels are built for {seen['march']}")
    return problems


# -- the contract tests under a host's dispatch -----------------------------------------

def run_tests(host: Host, basetemp: Path) -> tuple[int, str, float]:
    """(exit status, pytest's summary line and any failures, seconds) of :data:`TESTS` in
    a process under ``host``'s dispatch."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q",
                           "--basetemp", str(basetemp), *TESTS], cwd=ROOT, timeout=900,
                          env=environment(host), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    lines = done.stdout.strip().splitlines()
    failures = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    summary = "\n".join([*failures, lines[-1] if lines else done.stderr[-2000:]])
    if done.returncode:
        summary = f"{summary}\n{done.stdout[-6000:]}"
    return done.returncode, summary, seconds


def probe_and_test(host: Host, folder: Path) -> tuple[dict, tuple[int, str, float]]:
    """:func:`probe_under` then :func:`run_tests` for ``host``, in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    return probe_under(host, folder), run_tests(host, folder / "pytest")


def best_aten() -> str:
    """The capability ATen picks by itself on this CPU (the best it has)."""
    return next(name for name in reversed(ATEN) if has(ATEN[name][1]))


# The flag each of kernels.c's instruction-set branches needs.
BRANCH_FLAGS = {"__AVX__": "avx", "__AVX2__": "avx2", "__AVX512F__": "avx512f",
                "__AVX512BF16__": "avx512_bf16"}


def branches_of(flags: set[str]) -> set[str]:
    """The branches of kernels.c a build for a CPU with ``flags`` compiles."""
    return {b for b, flag in BRANCH_FLAGS.items() if flag in flags}


def same_kernels(march: str | None) -> bool:
    """Whether kernels.c built for ``march`` compiles the branches a native build does
    here: such builds are compared bit for bit on every kernel's inputs by
    :func:`test_every_build_of_the_kernels_computes_the_same_numbers`."""
    return march in (None, "native") or branches_of(MARCH[march]) == branches_of(cpu_flags())


def native_here(host: Host) -> bool:
    """Whether ``host``'s settings, capped at what this CPU has, are this CPU's own dispatch
    in all three: ATen at its best, oneDNN capped at or above the CPU's best ISA, the
    kernels built for a level with native's instruction-set branches (:func:`same_kernels`).
    (On an AVX2-only CPU every kind but the generic one is: capped, they are the suite's
    own run.)"""
    names = list(ONEDNN)
    above = names[names.index(host.onednn) + 1:] if host.onednn else []
    return (aten_here(host.aten) in (None, best_aten())
            and not any(has(ONEDNN[isa][1]) for isa in above)
            and same_kernels(march_here(host.march)))


# What a probe says of a process's dispatch and paths (not the timings of the verbose log).
SAME = ("aten", "march", "kernels", "branches", "onednn", "onednn_isa", "fp32", "bf16")


def probe_only(host: Host, folder: Path) -> tuple[dict, None]:
    folder.mkdir(parents=True, exist_ok=True)
    return probe_under(host, folder), None


@pytest.fixture(scope="module")
def matrix(tmp_path_factory) -> dict:
    """Every host kind's probe and contract tests, two at a time: each runs one thread (its
    probe and its tests set one), and the machines this runs on have two cores or more. A
    kind that is this CPU's own dispatch once capped (:func:`native_here`) runs its probe
    only, beside a probe of the native process: the suite itself runs the contract tests
    that way, and the test checks that the two probes agree."""
    from concurrent.futures import ThreadPoolExecutor

    if not x86():
        pytest.skip(f"x86-64 hosts' dispatch; this is {platform.machine()}")
    folder = tmp_path_factory.mktemp("dispatch")
    pool = ThreadPoolExecutor(max_workers=2)
    futures = {host.name: pool.submit(probe_only if native_here(host) else probe_and_test,
                                      host, folder / host.name) for host in HOSTS}
    if any(native_here(host) for host in HOSTS):
        futures[NATIVE.name] = pool.submit(probe_only, NATIVE, folder / NATIVE.name)
    yield futures
    pool.shutdown(wait=True)


@pytest.mark.parametrize("host", HOSTS, ids=lambda host: host.name)
def test_the_fast_paths_keep_their_contract_under_another_cpus_dispatch(host, matrix):
    seen, tested = matrix[host.name].result()
    print(json.dumps(seen, indent=1))  # shown with -rP, or when the test fails
    assert not dispatch_problems(host, seen)
    if tested is None:  # this CPU's own dispatch: the suite's run of the tests is its run
        native, _ = matrix[NATIVE.name].result()
        # the same dispatch and paths; the kernels maybe built for a named level, with
        # native's branches (compared bit for bit with the native build by their own test)
        assert {k: seen.get(k) for k in SAME} == {**{k: native.get(k) for k in SAME},
                                                  "march": seen.get("march")}
        assert same_kernels(seen["march"])
        return
    status, summary, _ = tested
    assert status == 0, f"{host.name} ({host.examples}):\n{summary}"


# An AVX2 host's flags (AMD EPYC, Zen 3: issue 20's), the ones the settings look at.
ZEN3 = frozenset({"sse4_1", "sse4_2", "ssse3", "cx16", "lahf_lm", "popcnt", "avx", "avx2",
                  "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"})


def test_a_setting_the_cpu_cannot_honour_is_capped_and_one_it_can_is_checked(monkeypatch):
    """On an AVX2 host the AVX-512 kinds get what it has (ATen forced to AVX2, oneDNN caps
    itself, the kernels are built native) and are not failed for it; a setting the host has
    but the process did not get is reported."""
    monkeypatch.setattr(sys.modules[__name__], "cpu_flags", lambda: ZEN3)
    avx512, avx2 = HOSTS[1], HOSTS[2]
    assert march_here("x86-64-v4") == "native" and march_here("x86-64-v3") == "x86-64-v3"
    assert environment(avx512)["NORMLAB_MARCH"] == "native"
    assert environment(avx512)["ATEN_CPU_CAPABILITY"] == "avx2"
    assert environment(avx2)["ATEN_CPU_CAPABILITY"] == "avx2"
    capped = {"aten": "AVX2", "onednn": True, "onednn_isa": "Intel AVX2", "march": "native"}
    assert dispatch_problems(avx512, capped) == []
    assert dispatch_problems(avx2, {**capped, "march": "x86-64-v3"}) == []
    not_taken = {**capped, "aten": "AVX512", "onednn_isa": "Intel AVX-512 with AVX512BW",
                 "march": "native"}
    assert len(dispatch_problems(avx2, not_taken)) == 3
    assert dispatch_problems(avx2, {**capped, "onednn_isa": None, "march": "x86-64-v3"})
    monkeypatch.setattr(sys.modules[__name__], "cpu_flags", lambda: frozenset({"sse4_1"}))
    assert environment(avx512)["ATEN_CPU_CAPABILITY"] == "default"


def test_a_kind_is_run_as_this_cpus_own_only_where_it_is(monkeypatch):
    """On the AVX2-only Zen 3 both AVX-512 kinds, capped, are its own dispatch (their
    contract tests are the suite's own run), and so is the AVX2 kind: its kernels, built
    for x86-64-v3, have native's AVX and AVX2 branches (and the builds are compared bit for
    bit); the generic one is not. On an AMX host none is: each caps something below what
    the CPU has."""
    module = sys.modules[__name__]
    monkeypatch.setattr(module, "cpu_flags", lambda: ZEN3)
    assert [native_here(h) for h in HOSTS] == [True, True, True, False]
    assert same_kernels("x86-64-v3") and not same_kernels("x86-64")
    amx = ZEN3 | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd", "avx512_vnni",
                  "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}
    monkeypatch.setattr(module, "cpu_flags", lambda: amx)
    assert best_aten() == "avx512"
    assert [native_here(h) for h in HOSTS] == [False, False, False, False]
    no_bf16 = ZEN3 | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}  # Skylake-SP
    monkeypatch.setattr(module, "cpu_flags", lambda: no_bf16)
    # avx512-bf16 capped is its own, and avx512: x86-64-v4 has native's AVX-512 branches
    assert [native_here(h) for h in HOSTS] == [True, True, False, False]
    assert not same_kernels("x86-64-v3")  # it lacks the AVX-512 branch native has


def test_every_build_of_the_kernels_computes_the_same_numbers(monkeypatch):
    """kernels.c built for every -march this CPU runs (plain x86-64: the generic branches;
    x86-64-v3: AVX2; x86-64-v4: AVX-512; native: with AVX512-BF16 where the CPU has it)
    gives every kernel's outputs bit for bit the same (NaNs as one): the sums are in a fixed
    order, whatever the vector width (benchmarks/kernels_ab.py's inputs: BatchNorm and
    GroupNorm forward and backward with and without the ReLU and dropout positions, in fp32
    and bf16, BatchNorm in eval mode, the max pooling and the rotation)."""
    from normlab.accel import kernels

    require_tool(kernels.compiler() is not None, "a C compiler (cc)")
    marches = [m for m in kernels.MARCHES if march_here(m) == m] if x86() else ["native"]
    spec = importlib.util.spec_from_file_location("kernels_ab", ROOT / "benchmarks/kernels_ab.py")
    ab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ab)
    outputs = {}
    try:
        for march in marches:
            monkeypatch.setenv("NORMLAB_MARCH", march)
            kernels._function.cache_clear()
            outputs[march] = [t for seed in range(3) for t in ab.outputs(seed)]
    finally:
        kernels._function.cache_clear()
    assert len({kernels.build(arch=m) for m in marches}) == len(marches)  # builds of their own
    differing = {m: ab.differing(outputs["native"], outputs[m]) for m in marches}
    assert not any(differing.values()), differing


# -- the whole matrix as a table ---------------------------------------------------------

def _paths(paths: dict) -> str:
    convs = paths.get("onednn_convs", {}).get("64x1x28x28", "0/7")
    norms = {"normlab kernels": "kernels", "torch": "torch's"}.get(paths["norms"],
                                                                 paths["norms"])
    text = f"{paths['step']}, oneDNN convs {convs}, norms {norms}"
    if paths.get("why_autograd"):
        text += f" ({paths['why_autograd']})"
    return text


def table(rows: list[tuple[Host, dict, tuple[int, str, float]]]) -> str:
    out = ["| host kind | forced | ATen | oneDNN ISA | kernels | fp32 step | bf16 step "
           "| bf16 convs torch ran on oneDNN | tests | seconds |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for host, seen, (status, summary, seconds) in rows:
        env = environment(host)
        forced = " ".join(f"{k}={env[k]}" for k in FORCING if k in env) or "nothing"
        kernels = (f"{seen['march']} ({'+'.join(seen['branches'])})"
                   if seen["kernels"] == "normlab" else seen["kernels"])
        bf16_ran = ", ".join(seen["onednn_convs_ran"].get("bf16", [])) or "none (torch's own)"
        result = summary.splitlines()[-1] if status == 0 else f"FAILED: {summary[:300]}"
        out.append(f"| {host.name}: {host.examples} | {forced} | {seen['aten']} | "
                   f"{seen['onednn_isa']} | {kernels} | {_paths(seen['fp32'])} | "
                   f"{_paths(seen['bf16'])} | {bf16_ran} | {result} | {seconds:.0f} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--probe", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help="also write the table here")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    if args.probe:
        args.probe.write_text(json.dumps(probe()))
        return
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for host in (NATIVE, *HOSTS):
            seen = probe_under(host, Path(tmp))
            problems = dispatch_problems(host, seen)
            result = run_tests(host, Path(tmp) / host.name)
            if problems:
                result = (1, "dispatch not taken: " + "; ".join(problems), result[2])
            rows.append((host, seen, result))
            print(f"{host.name}: {result[1].splitlines()[-1]} ({result[2]:.0f} s)",
                  file=sys.stderr, flush=True)
    text = table(rows)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
