"""A full state-dir disk (issue 14 B1): the head's state dir on a small tmpfs, filled by jobs that are kept.

Before, results were written through memory maps of sparse files: when the tmpfs filled, both providers and
then the head died of SIGBUS, and the head crash-looped on restart. Now every output file's blocks are
allocated before it is mapped (``posix_fallocate``) and an upload's before its bytes come, with a reserve kept
free for the job store: what does not fit is refused with ``no space left in the state dir`` (HTTP 507
``no_space`` for an upload, a failed job otherwise), and every process goes on. Deleting finished jobs makes
room, and the next job runs. The state dir is shared with one provider (it maps the output files) and not with
the other (the head writes what arrives through its map)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from common.errors import NoSpace, TaskError
from head_node.store import NO_SPACE
from user_client import Client
from user_client.local import LocalCluster

pytestmark = pytest.mark.integration

TMPFS_MB = 40
N = 600  # float64: 2.9 MB per operand, about 8.6 MB per job with its result
JOBS = 12  # about 100 MB: more than the tmpfs holds


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "state"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MB}m,mode=0700", "dcf-full", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_state_dir_fails_jobs_clearly_and_every_process_goes_on(small_disk: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    with LocalCluster(1, state_dir=str(small_disk), log_dir=str(tmp_path / "logs"), threads=1,
                      heartbeat=0.5) as cl, Client(cl.url, timeout=60) as c:
        cl.add_provider("--shared-files", "off")  # results cross the wire: the head writes them through its map
        cl.wait_ready(2)
        done: list[str] = []
        failed: dict[str, str] = {}
        refused = 0
        for _ in range(JOBS):
            a, b = rng.standard_normal((N, N)), rng.standard_normal((N, N))
            try:
                job = c.submit_matmul(a, b)
            except NoSpace as exc:  # an upload that does not fit: 507, before its bytes are taken
                assert NO_SPACE in exc.message
                refused += 1
                continue
            try:
                view = c.wait(job, timeout=120)
            except TaskError:
                view = c.status(job)
            if view["state"] == "done":
                assert np.allclose(c.result(job), a @ b, rtol=1e-9, atol=1e-9)
                done.append(job)
            else:
                failed[job] = view["state"] + ": " + str(view.get("error"))
        assert done, "no job fitted at all"
        assert refused or failed, "the disk never filled: the test proves nothing"
        assert all(NO_SPACE in why and why.startswith("failed") for why in failed.values()), failed
        # an upload that can never fit is refused before its bytes are taken (HTTP 507 no_space)
        with pytest.raises(NoSpace, match=NO_SPACE):
            c.upload(np.zeros(TMPFS_MB << 17))  # TMPFS_MB MiB of float64
        # nobody died: not the head, not a provider
        assert cl.head is not None and cl.head.poll() is None
        assert all(p.poll() is None for p in cl.providers)
        assert c.health()
        assert {n["state"] for n in c.nodes()} == {"ready"}
        # every accepted job has its one outcome, and the head still knows it
        states = {j["job_id"]: j["state"] for j in c.jobs(limit=100)}
        assert all(states[j] == "done" for j in done) and all(states[j] == "failed" for j in failed)
        # room made: the next job runs
        for job in [*done, *failed]:
            c.delete(job)
        a, b = rng.standard_normal((N, N)), rng.standard_normal((N, N))
        assert np.allclose(c.matmul(a, b), a @ b, rtol=1e-9, atol=1e-9)
