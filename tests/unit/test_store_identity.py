"""The job store notices that it lost this state dir's jobs (issue 14, B2): emptied, deleted, cut short
by a lost -wal file, or a state dir whose job folders have no rows; a malformed file is one line too.
Real SQLite files in a temporary state dir."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from common.errors import ConfigError
from head_node.store import STORE_FILE, JobStore, check_state_dir, identity_path

JOB = "a" * 32


def _store_with_a_job(root: Path) -> JobStore:
    store = JobStore(root / STORE_FILE)
    store.insert_many([{"job_id": JOB, "type": "matmul", "params": {}, "inputs": {}, "outputs": {}, "nodes": None,
                        "created_at": time.time()}], accepted=True)
    return store


def test_a_fresh_store_is_marked_with_its_first_job(tmp_path: Path) -> None:
    store = JobStore(tmp_path / STORE_FILE)
    assert not identity_path(tmp_path / STORE_FILE).exists(), "no job yet: nothing to lose"
    store.close()
    JobStore(tmp_path / STORE_FILE).close()  # an empty store without jobs may be reset freely
    _store_with_a_job(tmp_path).close()
    assert identity_path(tmp_path / STORE_FILE).read_text()
    JobStore(tmp_path / STORE_FILE).close()  # the same store: opens


def test_an_emptied_store_is_refused_in_one_line(tmp_path: Path) -> None:
    _store_with_a_job(tmp_path).close()
    os.truncate(tmp_path / STORE_FILE, 0)
    with pytest.raises(ConfigError) as err:
        JobStore(tmp_path / STORE_FILE)
    assert "is empty, but this state dir's jobs were accepted" in err.value.message
    assert "--accept-empty-store" in err.value.message and "\n" not in err.value.message
    assert (tmp_path / STORE_FILE).stat().st_size == 0, "the refused file is left as it was"
    with pytest.raises(ConfigError):
        check_state_dir(tmp_path, accept_empty=False)
    check_state_dir(tmp_path, accept_empty=True)  # goes on, and marks the new store
    store = JobStore(tmp_path / STORE_FILE)
    assert store.get(JOB) is None
    store.close()


def test_a_deleted_store_is_refused(tmp_path: Path) -> None:
    _store_with_a_job(tmp_path).close()
    for p in tmp_path.glob(STORE_FILE + "*"):
        p.unlink()
    with pytest.raises(ConfigError, match="is empty"):
        check_state_dir(tmp_path, accept_empty=False)


def test_a_lost_wal_after_a_crash_is_refused(tmp_path: Path) -> None:
    """kill -9 before any checkpoint, then the -wal file truncated: the store's tables are gone."""
    live = tmp_path / "live"
    live.mkdir()
    store = _store_with_a_job(live)  # not closed: as a killed head leaves it (WAL not checkpointed)
    crashed = tmp_path / "crashed"
    shutil.copytree(live, crashed)
    store.close()
    os.truncate(crashed / (STORE_FILE + "-wal"), 0)
    with pytest.raises(ConfigError, match="is empty"):
        JobStore(crashed / STORE_FILE)


def test_another_store_is_refused(tmp_path: Path) -> None:
    _store_with_a_job(tmp_path).close()
    other = tmp_path / "other"
    other.mkdir()
    _store_with_a_job(other).close()
    shutil.copy(other / STORE_FILE, tmp_path / STORE_FILE)
    with pytest.raises(ConfigError, match="is another store"):
        JobStore(tmp_path / STORE_FILE)


def test_a_store_whose_jobs_were_all_deleted_opens(tmp_path: Path) -> None:
    store = _store_with_a_job(tmp_path)
    store.delete(JOB)
    store.db.execute("DELETE FROM tombstones")  # even once the tombstones expired
    store.close()
    JobStore(tmp_path / STORE_FILE).close()


def test_job_folders_without_rows_are_refused(tmp_path: Path) -> None:
    """A state dir from before the marker: only its job folders say it held jobs."""
    JobStore(tmp_path / STORE_FILE).close()
    (tmp_path / "jobs" / JOB).mkdir(parents=True)
    with pytest.raises(ConfigError, match="holds 1 job folders"):
        JobStore(tmp_path / STORE_FILE)
    JobStore(tmp_path / STORE_FILE, accept_empty=True).close()
    JobStore(tmp_path / STORE_FILE).close()  # accepted once: marked, opens from now on


def test_a_store_written_before_the_marker_is_marked_at_once(tmp_path: Path) -> None:
    store = _store_with_a_job(tmp_path)
    store.close()
    identity_path(tmp_path / STORE_FILE).unlink()
    JobStore(tmp_path / STORE_FILE).close()
    assert identity_path(tmp_path / STORE_FILE).exists()


def test_a_malformed_store_is_one_line(tmp_path: Path) -> None:
    (tmp_path / STORE_FILE).write_bytes(b"this is no database\n" * 400)
    with pytest.raises(ConfigError) as err:
        JobStore(tmp_path / STORE_FILE)
    assert "is unreadable (file is not a database)" in err.value.message
    assert "--accept-empty-store" in err.value.message and "\n" not in err.value.message
