"""``eager``: ``torch.compiler.disable`` without importing TorchDynamo up front.

normlab's dropout positions and C kernels must stay out of compiled graphs (data-dependent
sizes, host reads, raw pointers), but ``torch.compiler.disable`` imports ``torch._dynamo``
when it decorates: about a second of the start of every process that imports the models,
``normlab report``, ``--dry-run`` and ``--help`` included. (A process that trains pays it
anyway, later: torch.optim's optimizers import Dynamo when first built.) Nothing can be
compiling in a process that has not imported ``torch._dynamo``, so :func:`eager` calls the
function directly until then, and its disabled form once Dynamo is loaded.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)


def eager(fn: F) -> F:
    """``fn``, never traced by ``torch.compile`` (see the module)."""
    disabled = None

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        nonlocal disabled
        if "torch._dynamo" not in sys.modules:  # nothing compiles in this process
            return fn(*args, **kwargs)
        if disabled is None:
            import torch

            disabled = torch.compiler.disable(fn)
        return disabled(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
