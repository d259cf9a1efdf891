"""A user's .npz is untrusted input (issue 14, A8): a zip bomb is refused before it is inflated, and a
malformed member is one ValidationError, never a traceback or a pickle."""

from __future__ import annotations

import io
import struct
import zipfile

import numpy as np
import pytest

from common.errors import ValidationError
from common.tasks.train import datasets


def _npz(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def test_a_good_npz_still_loads() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 3)).astype(np.float32)
    y = rng.integers(0, 3, 50)
    ds = datasets.from_npz(_npz(X=x, y=y, X_test=np.asfortranarray(x[:10]), y_test=y[:10]), "good.npz")
    assert ds.x_train.shape == (50, 3) and ds.n_classes == int(y.max()) + 1
    np.testing.assert_array_equal(ds.x_train, x)
    np.testing.assert_array_equal(ds.x_test, x[:10])  # a Fortran-ordered member reads the same
    uint8 = datasets.from_npz(_npz(X=(x * 10).astype(np.uint8), y=y.astype(np.int32)), "bytes.npz")
    assert uint8.x_train.dtype == np.float32 and len(uint8.x_train) + len(uint8.x_test) == 50


def test_a_zip_bomb_is_refused_before_it_is_inflated() -> None:
    """256 MiB of zeros pack into ~250 kB: refused from the declared sizes alone."""
    bomb = _npz(X=np.zeros((2**24, 4), np.float32), y=np.zeros(2**24, np.int64))
    assert len(bomb) < 2 * 1024**2
    with pytest.raises(ValidationError, match="zip bomb"):
        datasets.from_npz(bomb, "bomb.npz")
    # past the absolute limit, however well it compresses
    small = _npz(X=np.ones((1000, 10), np.float32), y=np.zeros(1000, np.int64))
    with pytest.raises(ValidationError, match="inflates to"):
        datasets.from_npz(small, "small.npz", max_bytes=10_000)


def test_a_member_whose_header_lies_about_its_size_is_refused() -> None:
    """An .npy header declaring 2**40 elements in a member of a few bytes: refused, nothing allocated."""
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (1099511627776, 1), }"
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    member = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + b"\x00" * 64
    with pytest.raises(ValidationError, match="declares"):
        datasets.from_npz(_zip({"X.npy": member, "y.npy": _npy(np.zeros(4, np.int64))}), "liar.npz")


@pytest.mark.parametrize("members", [
    {"X.npy": b"not an npy at all", "y.npy": b"x"},  # garbage member
    {"X.npy": _npy(np.zeros((4, 2)))[:-8], "y.npy": _npy(np.zeros(4, np.int64))},  # truncated data
    {"X.npy": _npy(np.array([{"a": 1}, None], dtype=object)), "y.npy": _npy(np.zeros(2, np.int64))},  # a pickle
    {"X.npy": _npy(np.array(3.0)), "y.npy": _npy(np.array(1))},  # a 0-d X: was a TypeError traceback
    {"X.npy": _npy(np.zeros((4, 2))), "y.npy": _npy(np.zeros((4, 2), np.int64))},  # 2-D labels
])
def test_a_malformed_member_is_one_validation_error(members: dict[str, bytes]) -> None:
    with pytest.raises(ValidationError) as info:
        datasets.from_npz(_zip(members), "bad.npz")
    assert info.value.message.startswith("bad.npz") and "\n" not in info.value.message


def test_not_a_zip_is_one_validation_error() -> None:
    with pytest.raises(ValidationError, match="not a readable .npz"):
        datasets.from_npz(b"PK\x03\x04 truncated", "cut.npz")
