"""What every source is checked against: the dataset names (``check_name``), their four IDX
files, the pinned SHA-256 of each file (``sha256`` computes one) and MD5 of the official .gz
downloads, and :class:`SourceError`, which a source raises when it cannot supply them.
"""

from __future__ import annotations

import hashlib

DATASETS = ("mnist", "fashion-mnist")

# The four files of each dataset -> the number of dimensions its IDX magic must declare.
FILES = {
    "train-images-idx3-ubyte": 3,
    "train-labels-idx1-ubyte": 1,
    "t10k-images-idx3-ubyte": 3,
    "t10k-labels-idx1-ubyte": 1,
}

# SHA-256 of the uncompressed IDX files: the one check every source must pass.
SHA256 = {  # in the order of FILES: train images, train labels, test images, test labels
    "mnist": dict(zip(FILES, (
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    ), strict=True)),
    "fashion-mnist": dict(zip(FILES, (
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    ), strict=True)),
}

# MD5 of the official .gz downloads (as torchvision lists them): checked on the mirror
# path only, before decompressing; other copies (e.g. Debian's) were recompressed.
GZ_MD5 = {
    "mnist": {
        "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}


class SourceError(Exception):
    """One source could not supply the files; the message says why."""


def check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")


def sha256(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()
