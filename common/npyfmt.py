"""The .npy file format: header framing and validation, on numpy's header readers.

Used by the head to check uploads as they stream in, and by the client to receive
results into a preallocated array. ``numpy.lib.format`` reads the header dict (with
``ast.literal_eval``); nothing is unpickled, and no array is loaded through ``np.load``.
"""

from __future__ import annotations

import io
import struct
import tokenize
import warnings
from typing import Any

import numpy as np

from .arrays import ArrayMeta
from .errors import ValidationError

NPY_MAGIC = b"\x93NUMPY"
MAX_NPY_HEADER = 64 * 1024
ACCEPTED_DTYPES = ("float32", "float64", "int64", "int32")


def parse_npy_header(data: bytes) -> tuple[ArrayMeta, int] | None:
    """(meta, header length) from the first bytes of a .npy file; None if more bytes are needed.
    Raises ValidationError for anything that is not a plain numeric C-ordered array.

    This module frames the header (so that an upload can be checked as it streams in) and
    applies dcf's policy; numpy's own ``numpy.lib.format`` readers parse it (``safe_eval``,
    the key checks, ``descr_to_dtype``), with ``MAX_NPY_HEADER`` as their size limit."""
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
    shape, fortran, dtype = _read_header(data[:start + hlen], major)
    return _meta(shape, fortran, dtype), start + hlen


def _read_header(data: bytes, major: int) -> tuple[Any, bool, np.dtype[Any]]:
    """numpy's reader of a complete header; its ValueError (and the literal parser's own
    errors) become one ValidationError."""
    fp = io.BytesIO(data)
    fmt = np.lib.format
    try:
        fmt.read_magic(fp)
        with warnings.catch_warnings():  # numpy warns of a header it must pad: not ours to report
            warnings.simplefilter("ignore")
            if major == 1:
                return fmt.read_array_header_1_0(fp, max_header_size=MAX_NPY_HEADER)
            # 2.0 and 3.0 differ only in the text's encoding (latin1, utf8), and the accepted
            # descriptors are ASCII: the 2.0 reader reads both
            return fmt.read_array_header_2_0(fp, max_header_size=MAX_NPY_HEADER)
    except ValueError as exc:
        raise ValidationError(_explain(str(exc))) from None
    except (SyntaxError, TypeError, tokenize.TokenError, UnicodeDecodeError, RecursionError, MemoryError):
        raise ValidationError("malformed .npy header") from None


def _explain(numpy_message: str) -> str:
    """numpy's complaint about a header, in dcf's words."""
    if numpy_message.startswith("descr is not a valid dtype descriptor"):
        return f"unknown dtype in .npy header ({numpy_message[len('descr is not a valid dtype descriptor: '):][:40]})"
    if numpy_message.startswith("shape is not valid"):
        return "malformed shape in .npy header"
    if "max_header_size" in numpy_message:
        return ".npy header too large"
    return "malformed .npy header"


def _meta(shape: Any, fortran: bool, dtype: np.dtype[Any]) -> ArrayMeta:
    if dtype.names is not None or dtype.subdtype is not None:
        raise ValidationError("structured or object arrays are not accepted")
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
