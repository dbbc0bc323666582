"""Unpickle numpy arrays, and nothing else.

A pickle can call any importable function while it loads (``os.system`` included), so a
downloaded pickle is code, not data. The PyPI copy of MNIST is a pickle; its SHA-256 is
checked first, and it is then read with an unpickler that resolves only the few globals
that rebuilding an ndarray needs. Any other global raises ``pickle.UnpicklingError``
before it is looked up, so a payload never runs.

What loads: numpy arrays pickled by Python 2 (as the MNIST pickle was) or by Python 3 at
protocol 3 or 4. Not admitted, on purpose: Python 3's protocol 2, which spells bytes as
``_codecs.encode(...)``, and numpy's protocol-5 helper ``_frombuffer``.
"""

from __future__ import annotations

import io
import pickle

import numpy as np

try:  # numpy >= 2 moved the internals; ``numpy.core`` is a deprecated alias there
    from numpy._core import multiarray as _multiarray
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray

# (module, name) as written in the pickle -> the object it may resolve to
ALLOWED: dict[tuple[str, str], object] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _multiarray._reconstruct,
    ("numpy.core.multiarray", "scalar"): _multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): _multiarray.scalar,
}


class RestrictedUnpickler(pickle.Unpickler):
    """A ``pickle.Unpickler`` whose ``find_class`` admits only :data:`ALLOWED`."""

    def find_class(self, module: str, name: str) -> object:
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only numpy arrays are allowed"
            ) from None


def loads(data: bytes) -> object:
    """Unpickle ``data`` with :class:`RestrictedUnpickler`.

    ``encoding="latin1"`` is what numpy needs for pickles written by Python 2, as the
    MNIST pickle was; it changes nothing for Python 3 pickles.
    """
    return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
