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


def in_log(cluster: LocalCluster, i: int, pattern: str) -> bool:
    return re.search(pattern, provider_log(cluster, i), re.MULTILINE) is not None


def test_cancel_drops_queued_subtasks_stops_running_ones_and_frees_the_providers(cluster: LocalCluster) -> None:
    rng = np.random.default_rng(0)
    a, b = rng.random((N, N)), rng.random((N, N))
    with Client(cluster.url) as c:
        inputs = {"a": c.upload(a)["blob_id"], "b": c.upload(b)["blob_id"]}
        running = c.submit("matmul", inputs)
        # both providers compute their share (one reported rows); a second job queues behind on both
        wait_for(lambda: c.status(running)["progress"]["done"] > 0, 60, "rows reported while the subtasks run")
        queued = c.submit("matmul", inputs)
        wait_for(lambda: [n["assigned"] for n in c.nodes()] == [2, 2], 10, "the second job queued on both")

        # the queued job's subtasks are dropped at once: each provider is left with the running one
        assert c.cancel(queued)["state"] == "cancelled"
        wait_for(lambda: [n["assigned"] for n in c.nodes()] == [1, 1], 10, "the queued subtasks dropped")
        for i in range(2):
            assert wait_for(partial(in_log, cluster, i, r"cancelled by the head: 1 queued subtasks dropped \["), 5,
                            f"provider {i} to drop its queued subtask")
        assert c.status(queued)["progress"] == {"done": 0, "total": N, "unit": "rows"}

        # the running job's subtasks stop between row blocks and the providers say so: nothing left assigned,
        # and the head got no result for it (a provider that ran its share to the end would send one, ignored)
        assert c.cancel(running)["state"] == "cancelled"
        wait_for(lambda: all(n["assigned"] == 0 for n in c.nodes()), 15, "the providers to be free")
        for i in range(2):
            assert wait_for(partial(in_log, cluster, i, r"subtask stopped after [\d.]+s: its job was cancelled"), 5,
                            f"provider {i} to stop its running subtask")
        counters = c._json("GET", "/v1/metrics")["counters"]
        assert counters["subtasks_stopped"] == 4 and counters["results_ignored"] == 0
        # a cancelled job keeps its real progress (the rows done when it stopped), not 100%
        stopped = c.status(running)["progress"]
        assert 0 < stopped["done"] < N and stopped["total"] == N and stopped["unit"] == "rows"
        end = next(e for e in c._json_list("GET", f"/v1/jobs/{running}/events") if e["kind"] == "job.cancelled")
        assert {k: end[k] for k in stopped} == stopped  # the event says the same
        # the next job runs on free providers
        small = rng.random((200, 200))
        np.testing.assert_allclose(c.matmul(small, small, timeout=30), small @ small)
        c.delete(queued)  # a deleted job tells no provider anything new: they hold nothing of it
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
