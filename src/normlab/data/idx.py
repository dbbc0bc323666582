"""Read and write IDX files, the format MNIST and Fashion-MNIST ship in.

An IDX file is a 4-byte magic (two zero bytes, a type code, the number of dimensions),
one big-endian uint32 per dimension, then the values in C order. These datasets only use
unsigned bytes (type 0x08): magic 0x0803 for images (N, rows, cols), 0x0801 for labels (N,).

Decoding is a header check plus ``np.frombuffer``: no copy, no per-image loop. The size is
checked against the header, so a truncated file is a clear error, not a short dataset.
"""

from __future__ import annotations

import math
import struct

import numpy as np

UBYTE = 0x08  # the IDX type code for unsigned bytes


class IdxError(ValueError):
    """The bytes are not a well-formed unsigned-byte IDX file."""


def encode(array: np.ndarray) -> bytes:
    """The IDX bytes of a uint8 array (any number of dimensions, at most 255)."""
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8:
        raise IdxError(f"IDX encoding here is for uint8 arrays, got {array.dtype}")
    header = bytes((0, 0, UBYTE, array.ndim)) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def decode(data: bytes | bytearray | memoryview, ndim: int | None = None) -> np.ndarray:
    """The uint8 array held in IDX ``data``: a view on the buffer, not a copy.

    ``ndim`` (3 for images, 1 for labels) is checked against the magic when given.
    """
    size = len(data)
    if size < 4:
        raise IdxError(f"truncated IDX file: {size} bytes, not even a header")
    magic = int.from_bytes(bytes(data[:4]), "big")
    if data[0] or data[1] or data[2] != UBYTE:
        raise IdxError(f"not an unsigned-byte IDX file (magic 0x{magic:08x})")
    dims = data[3]
    if ndim is not None and dims != ndim:
        raise IdxError(f"expected magic 0x08{ndim:02x} ({ndim}-d), got 0x{magic:04x}")
    offset = 4 + 4 * dims
    if size < offset:
        raise IdxError(f"truncated IDX file: {size} bytes, header alone needs {offset}")
    shape = struct.unpack_from(f">{dims}I", data, 4)
    count = math.prod(shape)
    if size != offset + count:
        problem = "truncated IDX file" if size < offset + count else "trailing bytes in IDX file"
        raise IdxError(
            f"{problem}: header says shape {shape} ({offset + count:,} bytes), got {size:,} bytes"
        )
    return np.frombuffer(data, dtype=np.uint8, count=count, offset=offset).reshape(shape)
