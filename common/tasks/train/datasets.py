"""Datasets for training jobs: ``digits`` (scikit-learn's bundled 8x8 digits, seeded 80/20
split), ``synthetic`` (seeded Gaussian blobs), or a user's ``.npz`` (X, y, optional
X_test, y_test). Everything becomes float32 features and int64 labels, checked here.
"""

from __future__ import annotations

import hashlib
import io
import math
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from ...errors import ConfigError, NotFound, ValidationError

MAX_CLASSES = 10_000


@dataclass
class Dataset:
    name: str
    x_train: np.ndarray  # float32 (n, *features)
    y_train: np.ndarray  # int64 (n,)
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def content_hash(self) -> str:
        return content_hash((self.x_train, self.y_train, self.x_test, self.y_test))


def content_hash(arrays: Sequence[np.ndarray]) -> str:
    """32 hex digits naming a dataset by its content (dtype, shape and bytes of each array, in order)."""
    h = hashlib.sha256()
    for arr in arrays:
        h.update(str((arr.dtype.str, arr.shape)).encode())
        h.update(np.ascontiguousarray(arr).data)
    return h.hexdigest()[:32]


def load(name: str, seed: int = 0, size: int = 2000, features: int = 20, classes: int = 4,
         path: str | Path | None = None) -> Dataset:
    if name == "digits":
        return digits(seed)
    if name == "synthetic":
        return synthetic(seed, size, features, classes)
    if name == "file":
        if path is None:
            raise ValidationError("dataset 'file' needs a path")
        return from_npz(Path(path).read_bytes(), str(path))
    raise NotFound(f"unknown dataset {name!r}; known: digits, synthetic, or a .npz file")


def digits(seed: int = 0) -> Dataset:
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise ConfigError("the digits dataset needs scikit-learn: pip install 'dcf[train]'") from None

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    return Dataset("digits", xtr, ytr.astype(np.int64), xte, yte.astype(np.int64), 10)


def synthetic(seed: int, size: int, features: int, classes: int) -> Dataset:
    if not (10 <= size <= 10_000_000 and 1 <= features <= 100_000 and 2 <= classes <= MAX_CLASSES):
        raise ValidationError("synthetic: size 10..1e7, features 1..1e5, classes 2..10000")
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((classes, features)).astype(np.float32) * 2.0
    y = rng.integers(0, classes, size=size)
    x = (centers[y] + rng.standard_normal((size, features)).astype(np.float32)).astype(np.float32)
    cut = int(size * 0.8)
    return Dataset("synthetic", x[:cut], y[:cut].astype(np.int64), x[cut:], y[cut:].astype(np.int64), classes)


#: the most bytes the arrays of one .npz may hold once uncompressed (a zip bomb is refused
#: before anything is inflated)
MAX_NPZ_BYTES = 2 * 1024**3
#: past this many uncompressed bytes, a .npz may inflate at most ``MAX_NPZ_RATIO`` times its
#: compressed size (real features compress a few times; a zip bomb thousands of times)
RATIO_FROM_BYTES = 64 * 1024**2
MAX_NPZ_RATIO = 200
#: the most arrays one .npz may hold
MAX_NPZ_MEMBERS = 16


def from_npz(data: bytes, name: str = "npz", max_bytes: int = MAX_NPZ_BYTES) -> Dataset:
    """A user's .npz: ``X`` and ``y``, optionally ``X_test`` and ``y_test`` (else a seeded 80/20 split).

    Every problem with the file (not a zip, a member too large, a damaged or pickled array, arrays
    that do not fit together) is one ``ValidationError`` naming the file."""
    arrays = _read_npz(data, name, max_bytes)
    try:
        return _dataset(arrays, name)
    except ValidationError as exc:  # named after the file, as every other problem with it
        if exc.message.startswith(f"{name}:"):
            raise
        raise ValidationError(f"{name}: {exc.message}") from None
    except Exception as exc:  # e.g. a 0-d X: one line, not a traceback
        raise ValidationError(f"{name}: unusable arrays ({type(exc).__name__}: {str(exc)[:200]})") from None


def _read_npz(data: bytes, name: str, max_bytes: int) -> dict[str, np.ndarray]:
    """The arrays of a .npz, each member's declared size checked against ``max_bytes`` (all of them
    together) before it is inflated, and read with numpy's .npy reader without pickles."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            infos = [i for i in zf.infolist() if not i.is_dir()]
            if len(infos) > MAX_NPZ_MEMBERS:
                raise ValidationError(f"{name}: {len(infos)} arrays in the .npz; at most {MAX_NPZ_MEMBERS}")
            declared = sum(i.file_size for i in infos)
            packed = sum(i.compress_size for i in infos)
            if declared > max_bytes:
                raise ValidationError(f"{name}: the .npz inflates to {declared} bytes; the limit is {max_bytes}")
            if declared > RATIO_FROM_BYTES and declared > MAX_NPZ_RATIO * packed:
                raise ValidationError(f"{name}: the .npz inflates {declared // max(packed, 1)} times "
                                      f"({packed} to {declared} bytes): refused as a zip bomb")
            arrays: dict[str, np.ndarray] = {}
            for info in infos:
                key = info.filename.removesuffix(".npy")
                with zf.open(info) as member:
                    arrays[key] = _read_member(member, info.file_size, f"{name}: array {key!r}")
            return arrays
    except ValidationError:
        raise
    except Exception as exc:  # not a zip, a damaged member (CRC, truncated), a bad header
        raise ValidationError(f"{name}: not a readable .npz without pickles "
                              f"({type(exc).__name__}: {str(exc)[:200]})") from None


def _read_member(member: IO[bytes], size: int, what: str) -> np.ndarray:
    """One .npy member: numpy's header reader, no object dtypes, the data exactly as long as the
    header says (and no longer than the member declared), read into a buffer of that size."""
    fmt = np.lib.format
    version = fmt.read_magic(member)
    if version == (1, 0):
        shape, fortran, dtype = fmt.read_array_header_1_0(member)
    elif version in ((2, 0), (3, 0)):
        shape, fortran, dtype = fmt.read_array_header_2_0(member)
    else:
        raise ValidationError(f"{what}: unsupported .npy version {version}")
    if dtype.hasobject:
        raise ValidationError(f"{what}: object arrays (pickles) are not accepted")
    if any(d < 0 for d in shape):
        raise ValidationError(f"{what}: negative shape {list(shape)}")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > size:
        raise ValidationError(f"{what}: its header declares {nbytes} bytes, the member holds at most {size}")
    raw = member.read(nbytes)
    if len(raw) != nbytes:
        raise ValidationError(f"{what}: truncated ({len(raw)} of {nbytes} bytes)")
    arr = np.frombuffer(raw, dtype=dtype)
    return arr.reshape(shape[::-1]).transpose() if fortran else arr.reshape(shape)


def _dataset(arrays: dict[str, np.ndarray], name: str) -> Dataset:
    if "X" not in arrays or "y" not in arrays:
        raise ValidationError(f"{name}: the .npz must hold arrays 'X' and 'y' (has {sorted(arrays)})")
    x, y = arrays["X"], arrays["y"]
    if "X_test" in arrays and "y_test" in arrays:
        xte, yte = arrays["X_test"], arrays["y_test"]
    else:
        if x.ndim == 0:
            raise ValidationError(f"{name}: X must be an array of samples, got a scalar")
        order = np.random.default_rng(0).permutation(len(x))
        cut = max(1, int(len(x) * 0.8))
        x, y, xte, yte = x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]
    xtr, ytr = _features(x, "X"), _labels(y, "y")
    xte, yte = _features(xte, "X_test"), _labels(yte, "y_test")
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise ValidationError(f"{name}: X and y lengths differ ({len(xtr)} vs {len(ytr)}, test "
                              f"{len(xte)} vs {len(yte)})")
    if xtr.shape[1:] != xte.shape[1:]:
        raise ValidationError(f"{name}: X_test has feature shape {xte.shape[1:]}, X has {xtr.shape[1:]}")
    n_classes = int(max(ytr.max(), yte.max() if len(yte) else 0)) + 1
    return Dataset(name, xtr, ytr, xte, yte, n_classes)


def _features(x: np.ndarray, what: str) -> np.ndarray:
    if x.dtype.kind not in "fiub" or x.ndim < 2 or x.shape[0] == 0 or 0 in x.shape:
        raise ValidationError(f"{what}: need a non-empty numeric array of shape (samples, features...), "
                              f"got {x.dtype} {list(x.shape)}")
    x = x.astype(np.float32)
    if not np.isfinite(x).all():
        raise ValidationError(f"{what}: contains NaN or Inf")
    return np.ascontiguousarray(x)


def _labels(y: np.ndarray, what: str) -> np.ndarray:
    if y.ndim != 1 or y.dtype.kind not in "iub" or len(y) == 0:
        raise ValidationError(f"{what}: labels must be a non-empty 1-D integer array, got {y.dtype} {list(y.shape)}")
    if y.min() < 0 or y.max() >= MAX_CLASSES:
        raise ValidationError(f"{what}: labels out of range (must be 0..{MAX_CLASSES - 1}, got {y.min()}..{y.max()})")
    return y.astype(np.int64)
