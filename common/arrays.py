"""What the kernel knows of an array without holding it: its dtype and shape."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

_NAMES: dict[np.dtype[Any], str] = {}


def dtype_name(dtype: np.dtype[Any]) -> str:
    """numpy's name of a dtype ("float32"), remembered: ``dtype.name`` is a Python property that builds it
    anew each time (~2 µs), and the head asks for it a few times per job."""
    name = _NAMES.get(dtype)
    if name is None:
        name = _NAMES[dtype] = dtype.name
    return name


@dataclass(frozen=True)
class ArrayMeta:
    dtype: str  # numpy name: "float32", "float64"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = np.dtype(self.dtype).itemsize
        for d in self.shape:
            n *= d
        return n

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def of(cls, arr: np.ndarray) -> ArrayMeta:
        return cls(dtype_name(arr.dtype), arr.shape)  # numpy's shape is a tuple of Python ints


def from_bytes(meta: dict[str, Any], data: bytes) -> np.ndarray:
    """The array ``{"dtype", "shape"}`` whose raw bytes (C order, little-endian) are ``data``: a read-only
    view of them, no copy. ValueError when their length does not fit."""
    return np.frombuffer(data, dtype=np.dtype(meta["dtype"]).newbyteorder("<")).reshape(meta["shape"])
