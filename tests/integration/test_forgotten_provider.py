"""A provider the head no longer knows drops what it held (PROTOCOL.md §8, step 4): the head re-queued
it (or restarted, and it is of the old epoch). A stale subtask used to keep the compute thread: after
a head restart, an allreduce member waited 60 s (the collective timeout) for peers that never came,
and a slow provider ran its whole old queue before any new work. Real processes over loopback."""

from __future__ import annotations

import time

import numpy as np

from user_client import Client
from user_client.local import LocalCluster


def _provider_log(cl: LocalCluster) -> str:
    return (cl.log_dir / "provider-0.log").read_text(errors="replace")


def test_after_a_head_restart_the_provider_drops_its_stale_subtasks() -> None:
    a = np.arange(12.0).reshape(4, 3)
    with LocalCluster(1, heartbeat=0.3, threads=1, provider_args=["--delay", "2"]) as cl, Client(cl.url) as c:
        jobs = [c.submit_matmul(a * (i + 1), a.T) for i in range(3)]
        deadline = time.monotonic() + 30
        while not all(c.status(j)["state"] == "running" for j in jobs):  # all three in the provider's hands
            assert time.monotonic() < deadline
            time.sleep(0.05)
        cl.kill_head()
        cl.start_head()
        results = c.gather(jobs, timeout=60)
        log = _provider_log(cl)
    assert "dropped the 3 subtasks this provider held: the head re-queued them" in log, log
    for i, got in enumerate(results):
        np.testing.assert_allclose(got["c"], (a * (i + 1)) @ a.T)
