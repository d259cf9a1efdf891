"""Unused uploads (issue 14 A7): deleted after --blob-ttl, bounded by --max-unused-bytes; a blob a job
names is never touched. Real files in a state dir and a real job store."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from common import layout
from common.errors import NoSpace
from common.jobs import JobRecord
from head_node.store import BlobStore, JobStore
from head_node.uploads import UnusedBlobs

NOW = time.time()


def _age(path: Path, seconds: float) -> None:
    os.utime(path, (NOW - seconds, NOW - seconds))


def _job_using(store: JobStore, blob_id: str, accepted: bool = True) -> None:
    meta = {"blob": blob_id, "dtype": "float64", "shape": [4, 4]}
    store.insert(JobRecord(job_id=uuid.uuid4().hex, type="matmul", params={}, inputs={"a": meta, "b": meta},
                           outputs={"c": {"dtype": "float64", "shape": [4, 4]}}, nodes=None,
                           created_at=NOW).message(), accepted=accepted)


@pytest.fixture
def parts(tmp_path: Path) -> tuple[BlobStore, JobStore]:
    return BlobStore(tmp_path), JobStore(tmp_path / "jobs.sqlite3")


def test_old_unused_blobs_and_stray_incoming_files_go_and_the_rest_stay(parts) -> None:
    blobs, store = parts
    old_unused, new_unused, old_used, old_pending = (blobs.put_array(np.ones((4, 4))) for _ in range(4))
    _job_using(store, old_used)
    _job_using(store, old_pending, accepted=False)  # being accepted right now
    for blob_id in (old_unused, old_used, old_pending):
        _age(blobs.blob_path(blob_id), 7200)
    stray = layout.incoming_path(blobs.root, uuid.uuid4().hex)
    stray.write_bytes(b"x" * 10)
    _age(stray, 7200)
    fresh = layout.incoming_path(blobs.root, uuid.uuid4().hex)
    fresh.write_bytes(b"x" * 10)
    sweep = UnusedBlobs(blobs, store, ttl=3600, max_bytes=1 << 30).sweep(NOW)
    assert sweep.deleted == 2 and sweep.kept == 1  # old_unused and the stray file; new_unused kept
    assert not blobs.blob_path(old_unused).exists() and not stray.exists()
    assert not (blobs.blob_dir / f".{old_unused}.npy.xxh3_128").exists()  # its digest went with it
    for blob_id in (new_unused, old_used, old_pending):
        assert blobs.blob_path(blob_id).exists()
    assert fresh.exists()


def test_ttl_zero_keeps_unused_blobs(parts) -> None:
    blobs, store = parts
    blob_id = blobs.put_array(np.ones(8))
    _age(blobs.blob_path(blob_id), 10 ** 6)
    sweep = UnusedBlobs(blobs, store, ttl=0, max_bytes=1 << 30).sweep(NOW)
    assert sweep.deleted == 0 and sweep.kept == 1 and blobs.blob_path(blob_id).exists()


def test_the_quota_counts_unused_bytes_exactly_before_it_refuses(parts) -> None:
    blobs, store = parts
    size = blobs.blob_path(blobs.put_array(np.ones((4, 4)))).stat().st_size  # 256 bytes of data + header
    unused = UnusedBlobs(blobs, store, ttl=3600, max_bytes=3 * size)
    unused.sweep(NOW)
    assert unused.unused_bytes == size
    unused.admit(size, NOW)  # 2 of 3
    blob_b = blobs.put_array(np.ones((4, 4)))
    unused.admit(size, NOW)  # counted 3 of 3 (over-counts: the upload above was admitted twice)
    with pytest.raises(NoSpace, match="--max-unused-bytes"):
        unused.admit(2 * size, NOW)  # swept: 2 unused, and 2 more do not fit
    _job_using(store, blob_b)
    unused.admit(2 * size, NOW)  # 4 of 3 by the count; counted exactly, only the first is unused: 3 of 3
