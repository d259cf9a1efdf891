"""The .npy file format, read without numpy's loader: header parsing and validation.

Used by the head to check uploads as they stream in, and by the client to receive
results into a preallocated array. ``ast.literal_eval`` reads the header dict; nothing
is unpickled.
"""

from __future__ import annotations

import ast
import io
import struct
from typing import Any

import numpy as np

from .arrays import ArrayMeta
from .errors import ValidationError

NPY_MAGIC = b"\x93NUMPY"
MAX_NPY_HEADER = 64 * 1024
ACCEPTED_DTYPES = ("float32", "float64", "int64", "int32")


def parse_npy_header(data: bytes) -> tuple[ArrayMeta, int] | None:
    """(meta, header length) from the first bytes of a .npy file; None if more bytes are needed.
    Raises ValidationError for anything that is not a plain numeric C-ordered array."""
    if len(data) < 10:
        if not NPY_MAGIC.startswith(data[:6]):
            raise ValidationError("not a .npy file (bad magic)")
        return None
    if data[:6] != NPY_MAGIC:
        raise ValidationError("not a .npy file (bad magic)")
    major = data[6]
    if major == 1:
        hlen, start = struct.unpack("<H", data[8:10])[0], 10
    elif major in (2, 3):
        if len(data) < 12:
            return None
        hlen, start = struct.unpack("<I", data[8:12])[0], 12
    else:
        raise ValidationError(f"unsupported .npy format version {major}")
    if hlen > MAX_NPY_HEADER:
        raise ValidationError(".npy header too large")
    if len(data) < start + hlen:
        return None
    try:
        header = ast.literal_eval(data[start:start + hlen].decode("latin1"))
    except (ValueError, SyntaxError, UnicodeDecodeError, TypeError, RecursionError, MemoryError):
        raise ValidationError("malformed .npy header") from None
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise ValidationError("malformed .npy header")
    return _meta_from_header(header), start + hlen


def _meta_from_header(header: dict[str, Any]) -> ArrayMeta:
    descr, shape, fortran = header["descr"], header["shape"], header["fortran_order"]
    if not isinstance(descr, str):
        raise ValidationError("structured or object arrays are not accepted")
    try:
        dtype = np.dtype(descr)
    except TypeError:
        raise ValidationError(f"unknown dtype {descr!r}") from None
    if dtype.hasobject or dtype.kind not in "fiub":
        raise ValidationError(f"dtype {dtype} is not numeric")
    if dtype.name not in ACCEPTED_DTYPES:
        raise ValidationError(f"dtype {dtype.name} is not accepted; use float32, float64, int64 or int32")
    if dtype.byteorder == ">":
        raise ValidationError("big-endian arrays are not accepted")
    if fortran:
        raise ValidationError("Fortran-ordered arrays are not accepted; save with C order")
    if not isinstance(shape, tuple) or not all(type(d) is int and d >= 0 for d in shape):
        raise ValidationError("malformed shape in .npy header")
    if len(shape) == 0:
        raise ValidationError("0-d arrays are not accepted")
    if 0 in shape:
        raise ValidationError(f"empty array (shape {list(shape)})")
    return ArrayMeta(dtype.name, tuple(shape))


def npy_header(arr: np.ndarray) -> bytes:
    """The .npy header bytes for ``arr`` (C order): what precedes its raw buffer."""
    buf = io.BytesIO()
    info = np.lib.format.header_data_from_array_1_0(arr)
    try:
        np.lib.format.write_array_header_1_0(buf, info)
    except ValueError:  # header too long for format 1.0
        buf = io.BytesIO()
        np.lib.format.write_array_header_2_0(buf, info)
    return buf.getvalue()
