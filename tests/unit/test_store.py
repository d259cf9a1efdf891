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


def test_ids_with_prefix_scans_the_primary_key(tmp_path: Path) -> None:
    db = JobStore(tmp_path / "jobs.sqlite3")
    ids = ["abcd" + "0" * 28, "abcd" + "f" * 28, "abce" + "0" * 28, "0bcd" + "0" * 28]
    for job_id in ids:
        db.insert(_record(job_id), accepted=True)
    db.commit()
    assert db.ids_with_prefix("abcd") == ids[:2]
    assert db.ids_with_prefix("abcd", limit=1) == ids[:1]
    assert db.ids_with_prefix("abc") == ids[:3]
    assert db.ids_with_prefix("abcdf") == [ids[1]]
    assert db.ids_with_prefix("beef") == []
    # only lowercase hex is a prefix (no LIKE wildcards, no other characters)
    assert db.ids_with_prefix("ab%") == [] and db.ids_with_prefix("") == [] and db.ids_with_prefix("ABCD") == []
    plan = " ".join(str(r) for r in db.db.execute(
        "EXPLAIN QUERY PLAN SELECT job_id FROM jobs WHERE job_id >= ? AND job_id < ? ORDER BY job_id LIMIT ?",
        ("abcd", "abcd~", 11)))
    assert "USING" in plan and "INDEX" in plan, plan  # a range of the primary key's index, not a scan
    db.close()
