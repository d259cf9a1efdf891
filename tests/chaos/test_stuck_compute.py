"""A provider whose compute is stuck while its heartbeats go on (issue 14 B5), real processes over loopback.

``local-1`` runs with ``--delay 600``: its compute thread sleeps ten minutes before each subtask, while its
socket thread acknowledges subtasks and heartbeats as usual (listing what it holds in ``running``, its
queue in ``queued``). Before the fix it stayed ``ready`` and got a share of every job: each one waited for a
speculative copy, and in a burst the stragglers that found no idle provider when they were flagged waited
the 60 s deadline. Now a straggler of a provider that finishes nothing, while its heartbeats say it still
holds work, makes it ``stuck`` (event ``node.stuck``): no new work, what it holds is copied to idle
providers as soon as there is one, and its speed is learned from how long it has held the straggler."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from tests.chaos.harness import EventWatcher, Figures, check_matmul, node, submit_matmul, wait_for
from user_client import Client
from user_client.local import LocalCluster

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

HEARTBEAT = 0.5
N = 800  # 1e9 FLOP: split over both; each share (5e8 FLOP) is big enough to learn a speed from
GOOD, STUCK = "local-0", "local-1"
JOBS = 8
BURST = 6


def counters(c: Client) -> dict[str, Any]:
    return c.http.get("/v1/metrics").json()["counters"]


def test_a_provider_with_stuck_compute_gets_no_new_work_and_nothing_waits_the_deadline(
        figures: Figures, nprng: np.random.Generator) -> None:
    with LocalCluster(1, heartbeat=HEARTBEAT, threads=1) as cl, Client(cl.url) as c, \
            EventWatcher(cl.url, period=0.5) as events:
        cl.add_provider("--delay", "600")
        cl.wait_ready(2)
        wait_for(lambda: events.connections > 0, 30, "the event stream")
        figures.fault("provider compute stuck (--delay 600), heartbeats going on")
        benchmark = (node(c, STUCK) or {})["benchmark_gflops"]
        seconds, states = [], []
        for _ in range(JOBS):
            t0 = time.monotonic()
            check_matmul(c, submit_matmul(c, nprng, N), figures)
            seconds.append(time.monotonic() - t0)
            states.append((node(c, STUCK) or {}).get("state"))
        copies = counters(c)["subtasks_speculative"]
        t0 = time.monotonic()
        burst = [submit_matmul(c, nprng, N) for _ in range(BURST)]
        for job in burst:
            check_matmul(c, job, figures, timeout=120)
        burst_s = time.monotonic() - t0
        row = node(c, STUCK) or {}
        got = counters(c)
        with events.lock:
            stuck = [e for e in events.events.values() if e["kind"] == "node.stuck" and e.get("name") == STUCK]
        figures.notes.append(
            f"stuck compute: {JOBS} jobs one after another took " + ", ".join(f"{s:.2f}" for s in seconds)
            + f" s ({copies} speculative copies); {STUCK} " + ", ".join(map(str, states))
            + f"; a burst of {BURST} jobs {burst_s:.2f} s ({got['subtasks_speculative'] - copies} more copies); "
            + f"its GFLOP/s {benchmark:.1f} benchmarked -> {row.get('gflops', 0):.2f} learned")
        assert stuck, "no node.stuck event"
        assert states[3:] == ["stuck"] * (JOBS - 3), states
        # once it is stuck (at most 5 s after it got its first subtask) no job waits for it
        assert all(s < 1.5 for s in seconds[3:]), seconds
        assert copies <= 3, copies
        assert burst_s < 15 and got["subtasks_speculative"] == copies, (burst_s, got)  # none waited 60 s
        # what it was learned to be: no faster than its straggler's cost over the time it held it (about 0.1
        # GFLOP/s), folded into its estimate like any measurement (weight 0.5): about half its benchmark
        assert row["state"] == "stuck" and row["gflops"] < 0.6 * benchmark, row
        assert got["providers_lost"] == 0 and got["providers_stuck"] == 1, got
