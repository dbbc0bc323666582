"""The official mirrors: each file as the official .gz, checked against its pinned MD5 before
it is decompressed. ``$NORMLAB_OFFLINE`` skips them.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import urllib.request
import zlib

from normlab.data.pins import FILES, GZ_MD5, SourceError

MIRRORS = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}
# Per socket operation (connect, each read). A host that fails once is not asked for its
# other files, so an offline machine leaves a host within about this many seconds.
MIRROR_TIMEOUT_S = 3.0
OFFLINE_ENV = "NORMLAB_OFFLINE"  # set to 1 to skip the mirrors


def _offline() -> bool:
    return os.environ.get(OFFLINE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def _download_gz(url: str, md5: str) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "normlab"})
    with urllib.request.urlopen(request, timeout=MIRROR_TIMEOUT_S) as response:
        packed = response.read()
    if hashlib.md5(packed, usedforsecurity=False).hexdigest() != md5:
        raise SourceError(f"{url}: MD5 mismatch (not the official .gz)")
    return gzip.decompress(packed)


def _from_mirrors(name: str, bases: tuple[str, ...]) -> tuple[dict[str, bytes], str]:
    """Each file from the first of ``bases`` that serves it; a host that fails once is dropped.

    ``bases`` is the mirror list (``MIRRORS[name]`` as :mod:`normlab.data.sources` sees it).
    """
    if _offline():
        raise SourceError(f"skipped ({OFFLINE_ENV} is set)")
    files: dict[str, bytes] = {}
    errors = []
    for base in bases:
        try:
            for file in FILES:
                if file not in files:
                    files[file] = _download_gz(f"{base}{file}.gz", GZ_MD5[name][file])
        except (SourceError, OSError, EOFError, zlib.error, http.client.HTTPException) as err:
            errors.append(f"{base}: {err}")
            continue
        return files, f"official mirror {base}"
    raise SourceError("; ".join(errors) or "no mirrors configured")
