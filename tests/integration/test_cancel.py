"""Cancel reaches the providers (issue 11 items 1 and 13): a cancelled matmul stops on both providers
between row blocks, `assigned` says so, the next job runs at once; a provider stopped with Ctrl-C
leaves (INFO), it is not lost; a job's events never precede its job.accepted."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import numpy as np
import pytest

from user_client import Client
from user_client.local import LocalCluster

pytestmark = pytest.mark.integration

#: big enough that each provider's share takes seconds (6000^3 x 2 flops over two providers), never done
#: by the time it is cancelled: the test cancels at the first progress report (after 0.25 s)
N = 6000


def wait_for(probe: Callable[[], Any], timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = probe()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(2, heartbeat=0.5, threads=1) as c:
        yield c


def provider_log(cluster: LocalCluster, i: int) -> str:
    return (cluster.log_dir / f"provider-{i}.log").read_text(errors="replace")


def stopped_in_log(cluster: LocalCluster, i: int) -> bool:
    """The provider stopped its running subtask because of the cancel (not at its end)."""
    return re.search(r"subtask stopped after [\d.]+s: its job was cancelled", provider_log(cluster, i)) is not None


def test_cancel_stops_the_subtasks_on_both_providers_and_frees_them(cluster: LocalCluster) -> None:
    rng = np.random.default_rng(0)
    a, b = rng.random((N, N)), rng.random((N, N))
    with Client(cluster.url) as c:
        job = c.submit_matmul(a, b)
        # both providers are computing their share (assigned 1 each) and one reported rows
        wait_for(lambda: c.status(job)["progress"]["done"] > 0, 60, "rows reported while the subtasks run")
        assert [n["assigned"] for n in c.nodes()] == [1, 1]
        view = c.cancel(job)
        assert view["state"] == "cancelled"
        # the providers stop between row blocks and say so: nothing left assigned, and the head got no
        # result for the job (a provider that ran its share to the end would send one, ignored)
        wait_for(lambda: all(n["assigned"] == 0 for n in c.nodes()), 15, "the providers to be free")
        for i in range(2):
            assert wait_for(partial(stopped_in_log, cluster, i), 5, f"provider {i} to log the stop")
        counters = c._json("GET", "/v1/metrics")["counters"]
        assert counters["subtasks_stopped"] == 2 and counters["results_ignored"] == 0
        # a cancelled job keeps its real progress (what was done when it stopped), not 100%
        stored = c.status(job)
        assert stored["state"] == "cancelled" and 0 < stored["progress"]["done"] < N
        assert stored["progress"]["total"] == N and stored["progress"]["unit"] == "rows"
        # the next job runs on free providers
        small = rng.random((200, 200))
        np.testing.assert_allclose(c.matmul(small, small, timeout=30), small @ small)
        c.delete(job)  # a deleted job tells no provider anything new: they hold nothing of it
        assert all(n["assigned"] == 0 for n in c.nodes())


def test_events_of_a_job_follow_its_acceptance(cluster: LocalCluster) -> None:
    with Client(cluster.url) as c:
        m = np.ones((50, 50))
        for _ in range(5):
            job = c.submit_matmul(m, m)
            c.wait(job, timeout=30)
            events = c._json_list("GET", f"/v1/jobs/{job}/events")
            kinds = [e["kind"] for e in events]
            assert kinds[0] == "job.accepted" and kinds[-1] == "job.done", kinds
            assert [e["seq"] for e in events] == sorted(e["seq"] for e in events)
            started = next(e for e in events if e["kind"] == "job.started")
            assert started["unit"] == "rows" and started["total"] == 50


def test_ctrl_c_of_a_provider_is_a_clean_leave(cluster: LocalCluster) -> None:
    proc = cluster.add_provider()
    cluster.wait_ready(3)
    with Client(cluster.url) as c:
        name = f"local-{len(cluster.providers) - 1}"
        proc.send_signal(signal.SIGINT)  # what Ctrl-C in its terminal sends
        assert proc.wait(timeout=15) == 0
        wait_for(lambda: name not in {n["name"] for n in c.nodes()}, 10, "the provider to leave")
    head_log = (cluster.log_dir / "head.log").read_text(errors="replace")
    left = [line for line in head_log.splitlines() if "provider left" in line]
    assert left and all(" INFO " in line for line in left)
    assert "provider lost" not in head_log
    assert "Traceback" not in provider_log(cluster, len(cluster.providers) - 1)
