"""Checksums of stored operands and results (issue 14, B3): 64 changed bytes in a result file are a
clear error ("result c of job J is corrupt: checksum mismatch"), never a wrong result, over HTTP and
for a client reading the head's state dir; a corrupt operand fails its job, saying which blob. Real
head and provider processes over loopback; the files are changed as a disk or a stray process would."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from common import layout
from common.errors import InternalError, TaskError
from user_client import Client
from user_client.local import LocalCluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with LocalCluster(2, heartbeat=0.5, threads=1, state_dir=str(tmp_path_factory.mktemp("state"))) as c:
        yield c


def _spoil(path: Path, count: int = 64) -> None:
    """Change ``count`` bytes in the middle of a .npy file's data, in place (its header intact)."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 2)
        old = f.read(count)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in old))


def _job(client: Client, seed: int, n: int = 64) -> tuple[str, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a, b = rng.random((n, n)), rng.random((n, n))
    blobs = {"a": client.upload(a)["blob_id"], "b": client.upload(b)["blob_id"]}
    job = client.submit("matmul", blobs)
    client.wait(job, timeout=60)
    return job, a, b, a @ b


@pytest.mark.parametrize("shared", ["auto", "off"])
def test_a_changed_result_is_refused_not_served(cluster: LocalCluster, shared: str) -> None:
    with Client(cluster.url, shared_files=shared) as client:
        job, _, _, want = _job(client, 1)
        path = layout.output_path(cluster.state_dir, job, "c")
        assert (path.parent / ".c.npy.xxh3_128").read_text().startswith("xxh3_128 ")
        np.testing.assert_allclose(client.result(job), want)  # unchanged: served, and right
        _spoil(path)
        with pytest.raises(InternalError, match=f"result c of job {job} is corrupt: checksum mismatch"):
            client.result(job)
        with Client(cluster.url, shared_files="off") as http, pytest.raises(InternalError, match="checksum mismatch"):
            http.result(job)  # over HTTP as well
        _spoil(path)  # the same bytes back: served again
        np.testing.assert_allclose(client.result(job), want)
        client.delete(job)
        assert not path.parent.exists()


@pytest.mark.parametrize("shared", ["auto", "off"])
def test_a_corrupt_operand_fails_its_job_clearly(cluster: LocalCluster, shared: str) -> None:
    with Client(cluster.url, shared_files=shared) as client:
        rng = np.random.default_rng(2)
        a, b = rng.random((64, 64)), rng.random((64, 64))
        blob_a, blob_b = client.upload(a)["blob_id"], client.upload(b)["blob_id"]
        path = layout.blob_path(cluster.state_dir, blob_a)
        assert (path.parent / f".{path.name}.xxh3_128").exists()
        _spoil(path)
        job = client.submit("matmul", {"a": blob_a, "b": blob_b})
        with pytest.raises(TaskError, match=f"blob {blob_a} is corrupt: checksum mismatch"):
            client.wait(job, timeout=60)
        client.delete(job)
        assert not path.exists() and not (path.parent / f".{path.name}.xxh3_128").exists()


def test_after_a_restart_files_are_checked_once(tmp_path: Path) -> None:
    """Changed while the head was down (its memory of checked files gone): found on first use."""
    with LocalCluster(1, heartbeat=0.5, threads=1, state_dir=str(tmp_path / "state")) as cl:
        with Client(cl.url, shared_files="off") as client:
            good, _, _, want = _job(client, 3)
            bad, _, _, _ = _job(client, 4)
            rng = np.random.default_rng(5)
            blob_a = client.upload(rng.random((32, 32)))["blob_id"]
            blob_b = client.upload(rng.random((32, 32)))["blob_id"]
        assert cl.head is not None
        cl.head.terminate()  # a clean stop, as an operator's
        cl.head.wait(timeout=20)
        _spoil(layout.output_path(cl.state_dir, bad, "c"))
        _spoil(layout.blob_path(cl.state_dir, blob_a))
        cl.start_head()
        cl.wait_ready(1)
        with Client(cl.url, shared_files="off") as client:
            np.testing.assert_allclose(client.result(good), want)
            with pytest.raises(InternalError, match=f"result c of job {bad} is corrupt"):
                client.result(bad)
            job = client.submit("matmul", {"a": blob_a, "b": blob_b})
            with pytest.raises(TaskError, match=f"blob {blob_a} is corrupt"):
                client.wait(job, timeout=60)
        log = (cl.log_dir / "head.log").read_text()
        assert f"result c of job {bad} is corrupt: checksum mismatch" in log


def test_files_stored_before_checksums_are_served_as_they_are(cluster: LocalCluster) -> None:
    """A state dir from an earlier version has no digest files: its results are still served."""
    with Client(cluster.url, shared_files="off") as client:
        job, _, _, want = _job(client, 6)
        os.unlink(layout.job_dir(cluster.state_dir, job) / ".c.npy.xxh3_128")
        os.utime(layout.output_path(cluster.state_dir, job, "c"))  # changed since the head checked it
        np.testing.assert_allclose(client.result(job), want)
