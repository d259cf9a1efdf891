"""The job store's tombstones: a deleted (or refused) job id never comes back."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from head_node import store as store_mod
from head_node.store import JobStore


def _record(job_id: str) -> dict[str, Any]:
    return {"job_id": job_id, "type": "matmul", "params": {}, "inputs": {}, "outputs": {}, "nodes": None,
            "created_at": time.time()}


def test_deleted_job_leaves_a_tombstone_that_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "jobs.sqlite3"
    db = JobStore(path)
    db.insert(_record("a" * 32), accepted=True)
    db.insert(_record("b" * 32), accepted=True)
    assert not db.is_deleted("a" * 32)
    db.delete("a" * 32)
    assert db.get("a" * 32) is None and db.is_deleted("a" * 32)
    assert db.get("b" * 32) is not None and not db.is_deleted("b" * 32)
    db.close()
    db = JobStore(path)
    assert db.is_deleted("a" * 32)
    db.close()


def test_old_tombstones_are_purged_at_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "jobs.sqlite3"
    db = JobStore(path)
    db.delete("c" * 32)
    db.close()
    monkeypatch.setattr(store_mod, "TOMBSTONE_SECONDS", -1.0)
    db = JobStore(path)
    assert not db.is_deleted("c" * 32)
    db.close()


def test_replace_file_with_fsync_syncs_the_file_and_its_directory(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[int] = []
    real = store_mod.os.fsync

    def record(fd: int) -> None:
        synced.append(fd)
        real(fd)

    monkeypatch.setattr(store_mod.os, "fsync", record)
    tmp, final = tmp_path / ".x.part", tmp_path / "x"
    tmp.write_bytes(b"abc")
    store_mod.replace_file(tmp, final, fsync=False)
    assert final.read_bytes() == b"abc" and synced == []
    tmp.write_bytes(b"def")
    store_mod.replace_file(tmp, final, fsync=True)
    assert final.read_bytes() == b"def" and not tmp.exists()
    assert len(synced) == 2  # the file's data, then the directory entry
