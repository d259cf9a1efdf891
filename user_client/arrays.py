"""Arrays on the client's side: operands checked and cast as they will be sent, and .npy files
read and written safely (never a pickle). numpy is imported here, not by ``client.py``, so that
commands that move no array (``dcf status``, ``dcf jobs``) start without it."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import ProtocolError, ValidationError
from common.npyfmt import ACCEPTED_DTYPES, parse_npy_header

Progress = Callable[[int, int], None]  # (done, total)


def _as_array(arr: Any, name: str) -> np.ndarray:
    try:
        return np.asarray(arr)
    except (TypeError, ValueError) as exc:  # e.g. ragged nested lists
        raise ValidationError(f"{name}: not an array: {exc}") from None


def check_operand(arr: Any, name: str) -> np.ndarray:
    """The array as it will be sent: 2-D, non-empty, C-ordered float32/float64. Ints are cast."""
    arr = _as_array(arr, name)
    if arr.dtype.hasobject or arr.dtype.kind not in "fiub":
        raise ValidationError(f"{name}: dtype {arr.dtype} is not numeric")
    if arr.dtype.kind in "iub" or arr.dtype.name not in ("float32", "float64"):
        arr = arr.astype(np.float64)
    if arr.ndim == 0:
        raise ValidationError(f"{name}: 0-d arrays cannot be multiplied")
    if arr.size == 0:
        raise ValidationError(f"{name}: empty array (shape {list(arr.shape)})")
    return np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"), copy=False))


def matmul_operands(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    """A and B as they will be sent: checked, of one dtype, with shapes that multiply."""
    a = check_operand(a, "a")
    b = check_operand(b, "b")
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValidationError(f"shapes {list(a.shape)} and {list(b.shape)} cannot be multiplied")
    if a.dtype != b.dtype:
        a, b = a.astype(np.result_type(a, b)), b.astype(np.result_type(a, b))
    return a, b


def wire_array(arr: Any) -> np.ndarray:
    """Any array as the head stores it: non-empty, C-ordered, little-endian float32/float64/int64/int32."""
    arr = _as_array(arr, "array")
    if arr.dtype.name not in ACCEPTED_DTYPES:
        raise ValidationError(f"dtype {arr.dtype} cannot be uploaded; use one of {', '.join(ACCEPTED_DTYPES)}")
    if arr.ndim == 0 or arr.size == 0:
        raise ValidationError(f"cannot upload an empty or 0-d array (shape {list(arr.shape)})")
    return np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"), copy=False))


def save_npy(path: str | os.PathLike[str], arr: np.ndarray) -> None:
    """Write ``arr`` in .npy format to exactly ``path`` (``C.txt`` stays ``C.txt``: numpy's
    ``np.save`` of a name would add ``.npy``), no pickles; ValidationError when it cannot be written."""
    try:
        with open(path, "wb") as f:
            np.save(f, arr, allow_pickle=False)
    except OSError as exc:
        raise ValidationError(f"{path}: cannot write: {exc.strerror or exc}") from None


def receive_npy(chunks: Iterator[bytes], total: int, progress: Progress | None) -> np.ndarray:
    head = b""
    arr: np.ndarray | None = None
    view: memoryview | None = None
    pos = 0
    got = 0
    for chunk in chunks:
        got += len(chunk)
        if arr is None:
            head += chunk
            parsed = parse_npy_header(head)
            if parsed is None:
                continue
            meta, hlen = parsed
            arr = np.empty(meta.shape, dtype=meta.dtype)
            view = arr.reshape(-1).data.cast("B")
            chunk = head[hlen:]
        assert view is not None
        end = pos + len(chunk)
        if end > view.nbytes:
            raise ProtocolError("result is longer than its header declares")
        view[pos:end] = chunk
        pos = end
        if progress:
            progress(got, total)
    if arr is None or view is None or pos != view.nbytes:
        raise ProtocolError("result download was cut short")
    return arr


def load_npy(path: str | os.PathLike[str]) -> np.ndarray:
    """A matmul operand from a user's .npy file (see ``load_npy_any``), checked and cast."""
    return check_operand(load_npy_any(path), str(path))


def load_npy_any(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a user's .npy file safely (no pickles) with clear errors."""
    p = Path(path)
    if not p.exists():
        raise ValidationError(f"{p}: no such file")
    if p.is_dir():
        raise ValidationError(f"{p}: is a directory, not a .npy file")
    try:
        with open(p, "rb") as f:
            if f.read(6) != b"\x93NUMPY":
                raise ValidationError(f"{p}: not a .npy file")
        arr = np.load(p, allow_pickle=False, mmap_mode="r")
    except PermissionError:
        raise ValidationError(f"{p}: permission denied") from None
    except ValueError as exc:  # object arrays need pickles, which we refuse
        raise ValidationError(f"{p}: cannot be read without pickle ({exc}); save a numeric array") from None
    except OSError as exc:
        raise ValidationError(f"{p}: unreadable: {exc}") from None
    if arr.dtype.hasobject or arr.dtype.kind not in "fiub":
        raise ValidationError(f"{p}: dtype {arr.dtype} is not numeric")
    return arr
