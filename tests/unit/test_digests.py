"""Digests of stored files (common/digests.py, head_node/store.py): XXH3-128 beside every blob, a SHA-256
left by an earlier head still checked, a changed byte caught either way."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from common import digests
from common.errors import ValidationError
from head_node.store import BlobStore


def _spoil(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_blob_gets_an_xxh3_digest_that_catches_a_changed_byte(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    blob = blobs.put_array(np.arange(100.0))
    path = blobs.blob_path(blob)
    algorithm, digest = digests.read_digest(path) or ("", "")
    assert algorithm == "xxh3_128" and digest == digests.file_digest(path) and len(digest) == 32
    assert np.array_equal(BlobStore(tmp_path).open(blob), np.arange(100.0))  # a fresh head checks it
    _spoil(path)
    with pytest.raises(ValidationError, match="checksum mismatch"):
        BlobStore(tmp_path).open(blob)


def test_a_sha256_digest_of_an_earlier_head_is_still_checked(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    blob = blobs.put_array(np.arange(50.0))
    path = blobs.blob_path(blob)
    digests.digest_path(path).unlink()  # as an earlier head left it: a SHA-256 only
    digests.digest_path(path, "sha256").write_text(f"sha256 {hashlib.sha256(path.read_bytes()).hexdigest()}\n")
    assert digests.read_digest(path) == ("sha256", hashlib.sha256(path.read_bytes()).hexdigest())
    assert np.array_equal(BlobStore(tmp_path).open(blob), np.arange(50.0))
    _spoil(path)
    with pytest.raises(ValidationError, match="checksum mismatch"):
        BlobStore(tmp_path).open(blob)
    blobs.delete_blob(blob)
    assert not digests.digest_path(path, "sha256").exists()


def test_an_unreadable_digest_file_is_a_mismatch(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path)
    blob = blobs.put_array(np.ones(8))
    path = blobs.blob_path(blob)
    digests.digest_path(path).write_text("xxh3_128 nothex\n")
    assert digests.read_digest(path) == ("", "")
    with pytest.raises(ValidationError, match="its checksum file is unreadable"):
        BlobStore(tmp_path).open(blob)
