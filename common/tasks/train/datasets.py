"""Datasets for training jobs: ``digits`` (scikit-learn's bundled 8x8 digits, seeded 80/20
split), ``synthetic`` (seeded Gaussian blobs), or a user's ``.npz`` (X, y, optional
X_test, y_test). Everything becomes float32 features and int64 labels, checked here.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

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


def from_npz(data: bytes, name: str = "npz") -> Dataset:
    """A user's .npz: ``X`` and ``y``, optionally ``X_test`` and ``y_test`` (else a seeded 80/20 split)."""
    try:
        npz = np.load(io.BytesIO(data), allow_pickle=False)
        arrays = {k: npz[k] for k in npz.files}
    except Exception as exc:
        raise ValidationError(f"{name}: not a readable .npz without pickles ({type(exc).__name__}: {exc})") from None
    if "X" not in arrays or "y" not in arrays:
        raise ValidationError(f"{name}: the .npz must hold arrays 'X' and 'y' (has {sorted(arrays)})")
    x, y = arrays["X"], arrays["y"]
    if "X_test" in arrays and "y_test" in arrays:
        xte, yte = arrays["X_test"], arrays["y_test"]
    else:
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
