"""A head whose job store lost its jobs refuses to start (issue 14, B2): `truncate -s 0 jobs.sqlite3`
with the head stopped, or its -wal file cut after kill -9, used to start an empty head that answered
"no job" for every accepted id and logged nothing. Now: one line, exit 2, and a way on
(`--accept-empty-store`). A malformed store is one line too (it was a traceback). Real head processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from user_client import Client
from user_client.local import LocalCluster, free_port

ROOT = Path(__file__).resolve().parents[2]


def _head(cluster: LocalCluster, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run a head on the cluster's state dir until it exits (a refusal) or 20 s pass."""
    args = [sys.executable, "-m", "head_node", "--host", "127.0.0.1", "--http-port", str(free_port()),
            "--state-dir", str(cluster.state_dir), *cluster.port_args(), "--rendezvous-port", str(free_port()),
            *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=20, cwd=ROOT)


def _refusal(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("dcf-head:")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def _accepted_jobs(cl: LocalCluster) -> list[str]:
    with Client(cl.url) as client:
        jobs = client.submit_many([{"type": "matmul", "inputs": {"a": np.eye(2), "b": np.ones((2, 2))}}] * 3)
        client.gather(jobs, timeout=60)
    return jobs


def test_an_emptied_store_is_refused_then_accepted_on_request(tmp_path: Path) -> None:
    with LocalCluster(1, heartbeat=0.5, threads=1, state_dir=str(tmp_path / "state")) as cl:
        jobs = _accepted_jobs(cl)
        assert cl.head is not None
        cl.head.terminate()
        cl.head.wait(timeout=20)
        os.truncate(cl.state_dir / "jobs.sqlite3", 0)  # truncate -s 0, the head stopped
        line = _refusal(_head(cl))
        assert "jobs.sqlite3 is empty, but this state dir's jobs were accepted" in line
        assert "--accept-empty-store" in line
        # the operator chooses to go on: the head starts, says so, and the next start needs no flag
        cl.head_args = ["--accept-empty-store"]
        cl.start_head()
        log = (cl.log_dir / "head.log").read_text()
        assert "starting with an empty job store as --accept-empty-store asks" in log
        with Client(cl.url) as client:
            assert client.jobs() == []
        cl.head.terminate()
        cl.head.wait(timeout=20)
        cl.head_args = []
        cl.start_head()
        cl.wait_ready(1)
        assert len(_accepted_jobs(cl)) == len(jobs)


def test_a_wal_cut_after_kill_9_is_refused(tmp_path: Path) -> None:
    with LocalCluster(1, heartbeat=0.5, threads=1, state_dir=str(tmp_path / "state")) as cl:
        _accepted_jobs(cl)
        cl.kill_head()
        wal = cl.state_dir / "jobs.sqlite3-wal"
        assert wal.stat().st_size > 0, "kill -9 left the commits in the -wal file"
        os.truncate(wal, 0)
        line = _refusal(_head(cl))
        assert "is empty" in line and "--accept-empty-store" in line


def test_a_malformed_store_is_one_line(tmp_path: Path) -> None:
    with LocalCluster(0, state_dir=str(tmp_path / "state")) as cl:
        assert cl.head is not None
        cl.head.terminate()
        cl.head.wait(timeout=20)
        for p in cl.state_dir.glob("jobs.sqlite3*"):
            p.unlink()
        (cl.state_dir / "jobs.sqlite3").write_bytes(os.urandom(8192))
        line = _refusal(_head(cl))
        assert "jobs.sqlite3 is unreadable (file is not a database)" in line
        assert "--accept-empty-store" in line
