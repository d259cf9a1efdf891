"""Unit tests of common/npyfmt.py: .npy header parsing (incremental, strict) and writing."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest

from common.errors import ValidationError
from common.npyfmt import MAX_NPY_HEADER, NPY_MAGIC, npy_header, parse_npy_header
from common.tasks import ArrayMeta


def saved(arr: np.ndarray | np.generic) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def parsed(data: bytes) -> tuple[ArrayMeta, int]:
    """``parse_npy_header`` of a complete header."""
    got = parse_npy_header(data)
    assert got is not None, "the header is incomplete"
    return got


def v1_file(header_text: str, body: bytes = b"") -> bytes:
    """A format 1.0 file with a hand-written header dict."""
    text = header_text.encode("latin1")
    pad = 64 - (10 + len(text) + 1) % 64
    text += b" " * (pad % 64) + b"\n"
    return NPY_MAGIC + b"\x01\x00" + struct.pack("<H", len(text)) + text + body


# ---- real np.save output ------------------------------------------------------------------------------
@pytest.mark.parametrize(("dtype", "shape"), [
    ("float64", (3, 4)), ("float32", (5,)), ("float64", (1, 1)), ("float32", (2, 3, 4)),
    ("float64", (1000, 7)),
])
def test_parse_np_save_output(dtype, shape):
    arr = np.zeros(shape, dtype=dtype)
    data = saved(arr)
    meta, hlen = parsed(data)
    assert meta == ArrayMeta(dtype, shape)
    assert len(data) - hlen == arr.nbytes
    assert hlen % 64 == 0  # numpy aligns the data
    assert data[hlen:] == arr.tobytes()


def test_parse_with_trailing_data_present():
    arr = np.arange(6, dtype=np.float64).reshape(2, 3)
    data = saved(arr)
    meta, hlen = parsed(data + b"more")
    assert meta.shape == (2, 3)
    assert np.array_equal(np.frombuffer(data[hlen:], dtype="<f8").reshape(meta.shape), arr)


def test_parse_format_version_2():
    arr = np.zeros((2, 2), dtype=np.float32)
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, version=(2, 0))
    data = buf.getvalue()
    assert data[6] == 2
    meta, hlen = parsed(data)
    assert meta == ArrayMeta("float32", (2, 2))
    assert len(data) - hlen == arr.nbytes


def test_parse_format_version_3():
    arr = np.zeros(3, dtype=np.float64)
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, version=(3, 0))
    data = buf.getvalue()
    assert data[6] == 3
    assert parsed(data)[0] == ArrayMeta("float64", (3,))


# ---- incremental ----------------------------------------------------------------------------------
def test_incremental_returns_none_until_header_complete():
    data = saved(np.zeros((4, 5), dtype=np.float32))
    _, hlen = parsed(data)
    for cut in range(hlen):
        assert parse_npy_header(data[:cut]) is None, cut
    meta, got = parsed(data[:hlen])
    assert got == hlen and meta == ArrayMeta("float32", (4, 5))


def test_incremental_version_2_short_length_field():
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.zeros(2), version=(2, 0))
    data = buf.getvalue()
    for cut in (8, 9, 10, 11, 12, 20):
        assert parse_npy_header(data[:cut]) is None


def test_empty_input_needs_more():
    assert parse_npy_header(b"") is None


# ---- bad magic and framing ---------------------------------------------------------------------------
@pytest.mark.parametrize("data", [b"x", b"\x93NUMPX", b"PK\x03\x04", b"not a numpy file at all",
                                  b"\x93numpy\x01\x00\x10\x00" + b" " * 16])
def test_bad_magic(data):
    with pytest.raises(ValidationError, match="bad magic"):
        parse_npy_header(data)


def test_bad_magic_detected_on_a_short_prefix():
    with pytest.raises(ValidationError, match="bad magic"):
        parse_npy_header(b"\x93NUX")


@pytest.mark.parametrize("major", [0, 4, 255])
def test_unsupported_version(major):
    data = NPY_MAGIC + bytes([major, 0]) + b"\x10\x00" + b" " * 16
    with pytest.raises(ValidationError, match="unsupported .npy format version"):
        parse_npy_header(data)


def test_header_too_large_v2():
    data = NPY_MAGIC + b"\x02\x00" + struct.pack("<I", MAX_NPY_HEADER + 1)
    with pytest.raises(ValidationError, match="too large"):
        parse_npy_header(data)


@pytest.mark.parametrize("text", [
    "not python", "{'descr': '<f8', 'fortran_order': False}",
    "{'descr': '<f8', 'fortran_order': False, 'shape': (2,), 'extra': 1}", "[1, 2, 3]", "'a string'",
    "{'descr': '<f8', 'fortran_order': False, 'shape': (2,)", "__import__('os')",
])
def test_malformed_header(text):
    with pytest.raises(ValidationError, match="malformed"):
        parse_npy_header(v1_file(text))


@pytest.mark.parametrize("text", ["{[]: 1}", "{'descr': '<f8', {}: 2}", "-" * 5000 + "1"])
def test_malformed_header_other_literal_eval_errors(text):
    with pytest.raises(ValidationError):
        parse_npy_header(v1_file(text))


# ---- rejected arrays -----------------------------------------------------------------------------------
def test_rejects_object_dtype():
    data = saved(np.array([1, "a", None], dtype=object))
    with pytest.raises(ValidationError, match="not numeric"):
        parse_npy_header(data)


def test_rejects_structured_dtype():
    data = saved(np.zeros(3, dtype=[("x", "<f8"), ("y", "<i4")]))
    with pytest.raises(ValidationError, match="structured"):
        parse_npy_header(data)


@pytest.mark.parametrize("dtype", ["uint8", "bool", "float16", "complex128", "<U3", "S4", "datetime64[s]"])
def test_rejects_other_dtypes(dtype):
    with pytest.raises(ValidationError):
        parse_npy_header(saved(np.zeros(3, dtype=dtype)))


def test_rejects_small_int_dtype_with_advice():
    with pytest.raises(ValidationError, match="uint8 is not accepted; use float32, float64, int64 or int32"):
        parse_npy_header(saved(np.zeros((2, 2), dtype=np.uint8)))


@pytest.mark.parametrize("dtype", ["int32", "int64"])
def test_accepts_integer_labels(dtype):
    meta, _ = parsed(saved(np.zeros(3, dtype=dtype)))
    assert meta.dtype == dtype


def test_rejects_unknown_descr():
    with pytest.raises(ValidationError, match="unknown dtype"):
        parse_npy_header(v1_file("{'descr': '<q99', 'fortran_order': False, 'shape': (2,)}"))


def test_rejects_big_endian():
    with pytest.raises(ValidationError, match="big-endian"):
        parse_npy_header(saved(np.zeros((2, 2), dtype=">f8")))


def test_rejects_fortran_order():
    arr = np.asfortranarray(np.zeros((3, 4)))
    data = saved(arr)
    assert b"'fortran_order': True" in data[:128]
    with pytest.raises(ValidationError, match="Fortran"):
        parse_npy_header(data)


def test_rejects_zero_d():
    with pytest.raises(ValidationError, match="0-d"):
        parse_npy_header(saved(np.float64(1.5)))


@pytest.mark.parametrize("shape", [(0,), (0, 3), (3, 0), (2, 0, 2)])
def test_rejects_empty(shape):
    with pytest.raises(ValidationError, match="empty array"):
        parse_npy_header(saved(np.zeros(shape)))


@pytest.mark.parametrize("shape", ["[2, 3]", "(2, -1)", "(2.0,)", "('2',)", "None", "(2, None)"])
def test_rejects_malformed_shape(shape):
    with pytest.raises(ValidationError, match="malformed shape"):
        parse_npy_header(v1_file(f"{{'descr': '<f8', 'fortran_order': False, 'shape': {shape}}}"))


# ---- npy_header ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("dtype", "shape"), [("float64", (3, 4)), ("float32", (7,)), ("float64", (2, 3, 5))])
def test_npy_header_round_trip(dtype, shape):
    arr = np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)
    header = npy_header(arr)
    meta, hlen = parsed(header)
    assert hlen == len(header)
    assert meta == ArrayMeta(dtype, shape)
    data = header + arr.tobytes()
    assert data == saved(arr)  # byte-identical with np.save
    loaded = np.load(io.BytesIO(data), allow_pickle=False)
    np.testing.assert_array_equal(loaded, arr)


def test_npy_header_of_a_view():
    base = np.arange(20, dtype=np.float64).reshape(4, 5)
    view = np.ascontiguousarray(base[1:3])
    meta, _ = parsed(npy_header(view))
    assert meta == ArrayMeta("float64", (2, 5))


def test_npy_header_many_dims():
    arr = np.zeros((1,) * 32)
    header = npy_header(arr)
    assert header[6] == 1
    meta, hlen = parsed(header)
    assert hlen == len(header) and meta.shape == (1,) * 32


def test_npy_header_falls_back_to_version_2_for_long_headers():
    dtype = np.dtype([(f"field_{i:05d}", "<f8") for i in range(4000)])
    header = npy_header(np.zeros(1, dtype=dtype))
    assert header[:6] == NPY_MAGIC and header[6] == 2
    assert len(header) > 65535
    with pytest.raises(ValidationError):  # too large or structured: refused either way
        parse_npy_header(header)
