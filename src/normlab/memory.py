"""Where a training process's memory comes from: a speed lever that changes no number.

A training step of a small CNN on a CPU allocates and frees a megabyte-sized activation and
gradient for every layer, and a few hundred small C++ objects. glibc's malloc, with its
defaults, serves the big blocks with mmap and hands them back to the OS when freed (or trims
its heap), so every step page-faults the same memory in again, and it is slow on the small
ones. That costs a fifth to a quarter of an fp32 step on the 2-core machines normlab is
measured on (``benchmarks/allocator.py``, benchmarks/README.md). So normlab:

- tunes glibc in every process that trains (:func:`keep_freed_memory`, called by
  ``train``): blocks up to 32 MB come from the heap, and the heap is trimmed only above 1 GB
  free; the process keeps its peak heap instead of returning it;
- preloads tcmalloc (Debian package ``libtcmalloc-minimal4``), when it is installed, into the
  processes it starts: the ``normlab`` command re-executes itself with it once
  (:func:`reexec_with_tcmalloc`), and suite workers start with it (:func:`workers_preloaded`).
  It is not passed on further (Ray's own processes, say).

``NORMLAB_MALLOC`` chooses: unset for both, ``glibc`` for the tuning alone, ``system`` for
neither. Allocation changes where memory lives, not what is computed: a run's metrics are
the same under each (``tests/test_training.py`` checks it).
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MODES = ("", "glibc", "system")  # NORMLAB_MALLOC's values ("": unset)
PRELOADED = "NORMLAB_TCMALLOC"  # set by the re-exec, so it happens once
# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
KEEP_BLOCKS_UP_TO = 32 << 20  # bytes: glibc's largest mmap threshold on 64-bit systems
KEEP_FREE_UP_TO = 1 << 30  # bytes of free heap top kept before trimming back to the OS
TCMALLOC_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
                "/usr/lib")


def mode() -> str:
    value = os.environ.get("NORMLAB_MALLOC", "")
    if value not in MODES:
        raise ValueError(f"NORMLAB_MALLOC must be unset, glibc or system, got {value!r}")
    return value


_tuned = False


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed blocks for reuse (see the module). False where it does
    nothing: not Linux, another C library, or ``NORMLAB_MALLOC=system``."""
    global _tuned
    if mode() == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        done = bool(libc.mallopt(M_MMAP_THRESHOLD, KEEP_BLOCKS_UP_TO)
                    and libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREE_UP_TO))
    except (OSError, AttributeError):  # musl and the like: leave the allocator alone
        return False
    _tuned = _tuned or done  # allocator() reports it for the rest of the process
    return done


def allocator() -> str:
    """This process's allocator in words, as a run's config.json records it: "tcmalloc",
    "glibc, tuned" or "glibc"."""
    if tcmalloc_loaded():
        return "tcmalloc"
    return "glibc, tuned" if _tuned else "glibc"


def tcmalloc() -> Path | None:
    """The tcmalloc library to preload, or None (not installed, not Linux, or opted out)."""
    if mode() or not sys.platform.startswith("linux"):
        return None
    for folder in LIBRARY_DIRS:
        for name in TCMALLOC_NAMES:
            if (path := Path(folder) / name).is_file():
                return path
    return None


def tcmalloc_loaded() -> bool:
    """Whether this process runs with tcmalloc (it was preloaded)."""
    try:
        return "libtcmalloc" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def reexec_with_tcmalloc(argv: list[str]) -> None:
    """Replace this process by ``python -m normlab *argv`` with tcmalloc preloaded, once,
    when it is installed and not loaded; otherwise return. Call it before anything else
    (nothing is lost: the process has done nothing yet). In the new process the preload is
    taken out of the environment again, so only the processes normlab starts on purpose get
    it (:func:`workers_preloaded`)."""
    if os.environ.pop(PRELOADED, None) is not None:
        os.environ.pop("LD_PRELOAD", None)  # ours; this process already has it
        return
    lib = tcmalloc()
    if lib is None or not sys.executable or os.environ.get("LD_PRELOAD") or tcmalloc_loaded():
        return
    env = {**os.environ, "LD_PRELOAD": str(lib), PRELOADED: "1"}
    os.execve(sys.executable, [sys.executable, "-m", "normlab", *argv], env)


@contextmanager
def workers_preloaded() -> Iterator[None]:
    """While in the block, processes started from this one (spawned suite workers) get
    tcmalloc preloaded, when it is installed."""
    lib = tcmalloc()
    if lib is None or os.environ.get("LD_PRELOAD"):
        yield
        return
    os.environ["LD_PRELOAD"] = str(lib)
    try:
        yield
    finally:
        os.environ.pop("LD_PRELOAD", None)
