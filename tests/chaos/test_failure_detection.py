"""Failure detection with real processes over loopback (docs/RELIABILITY.md, PROTOCOL.md §7):

* a provider killed with kill -9 is declared lost, and its subtask re-queued, within about a second, long
  before its heartbeats could expire (5 s interval: the heartbeat rule needs at least 10 s after a kill):
  its SUB connection closes, the head's XPUB reports the unsubscribe, and no re-subscribe comes within
  the disconnect grace;
* a silent provider (SIGSTOP: its sockets stay open, it answers nothing) is declared lost by the
  heartbeat rule, within about 3 intervals, and is back once it runs again (SIGCONT: it registers again);
* a provider whose task connection breaks and comes back at once (a TCP proxy cuts it) loses nothing.

Timing bounds are loose (a noisy 2-core machine); the figures go to the chaos summary, not into asserts."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import numpy as np
import pytest

from common import config
from tests.chaos.harness import (
    EventWatcher,
    Figures,
    SlowLink,
    check_matmul,
    kill_provider,
    node,
    provider_name,
    ready_providers,
    submit_matmul,
    wait_for,
)
from user_client import Client
from user_client.local import LocalCluster

pytestmark = [pytest.mark.chaos, pytest.mark.integration]


def counters(c: Client) -> dict[str, Any]:
    return c.http.get("/v1/metrics").json()["counters"]


def busy_provider(cl: LocalCluster, c: Client) -> int:
    """A ready provider that holds at least one subtask (the job was just submitted)."""
    def holding() -> list[int]:
        return [i for i in ready_providers(cl, c) if (node(c, provider_name(i)) or {}).get("assigned", 0) > 0]
    wait_for(holding, 20, "a provider holding a subtask")
    return holding()[0]


def wait_dead(c: Client, name: str, timeout: float) -> None:
    def dead() -> bool:
        row = node(c, name)
        return row is not None and row["state"] == "dead"
    wait_for(dead, timeout, f"the head to mark {name} dead", poll=0.02)


def test_kill9_is_noticed_and_its_work_requeued_long_before_heartbeats_expire(figures: Figures,
                                                                              nprng: np.random.Generator) -> None:
    heartbeat, delay = 5.0, 1.5  # the production interval; each subtask takes 1.5 s
    with LocalCluster(2, heartbeat=heartbeat, threads=1, provider_args=["--delay", str(delay)]) as cl, \
            Client(cl.url) as c, EventWatcher(cl.url, period=0.5) as events:
        wait_for(lambda: events.connections > 0, 30, "the event stream")
        job = submit_matmul(c, nprng, 200)
        victim = busy_provider(cl, c)
        name = provider_name(victim)
        wall = time.time()
        t_kill = kill_provider(cl, victim)
        figures.fault("provider kill -9 (5 s heartbeat)")
        wait_dead(c, name, timeout=20)
        seconds = time.monotonic() - t_kill
        figures.timing("kill -9 to dead, 5 s heartbeat", seconds)
        assert seconds < 3.0, f"{name} marked dead {seconds:.2f}s after kill -9 (heartbeat {heartbeat}s)"
        wait_for(lambda: events.node_lost(name, wall) is not None, 10, f"node.lost of {name}")
        lost = events.node_lost(name, wall)
        assert lost is not None and lost["reason"] == "disconnected" and lost["requeued"] >= 1, lost
        check_matmul(c, job, figures)  # the survivor computed the victim's subtask
        # the heartbeat rule cannot fire before last_seen + 3 intervals >= kill + 2 intervals: the job was
        # finished by then only because the disconnect re-queued the subtask
        assert time.monotonic() - t_kill < 2 * heartbeat, "the job waited for the heartbeat rule"
        assert c.status(job.job_id)["shares"] == {provider_name(1 - victim): 1.0}
        assert counters(c)["providers_lost"] == 1


def test_sigstopped_provider_is_lost_within_three_intervals_and_comes_back(figures: Figures,
                                                                          nprng: np.random.Generator) -> None:
    heartbeat = 0.5
    with LocalCluster(2, heartbeat=heartbeat, threads=1, provider_args=["--delay", "1.0"]) as cl, \
            Client(cl.url) as c, EventWatcher(cl.url, period=0.5) as events:
        wait_for(lambda: events.connections > 0, 30, "the event stream")
        job = submit_matmul(c, nprng, 200)
        victim = busy_provider(cl, c)
        name, proc = provider_name(victim), cl.providers[victim]
        wall, t_stop = time.time(), time.monotonic()
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            figures.fault("provider SIGSTOP (0.5 s heartbeat)")
            wait_dead(c, name, timeout=20)
            seconds = time.monotonic() - t_stop
            figures.timing("SIGSTOP to dead, 0.5 s heartbeat", seconds)
            assert seconds < 3 * heartbeat + 1.5, f"{name} marked dead {seconds:.2f}s after SIGSTOP"
            wait_for(lambda: events.node_lost(name, wall) is not None, 10, f"node.lost of {name}")
            lost = events.node_lost(name, wall)
            assert lost is not None and lost["reason"] == "silent" and lost["requeued"] >= 1, lost
            check_matmul(c, job, figures)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        # running again, it hears unknown_provider on its next heartbeat and registers again
        wait_for(lambda: (node(c, name) or {}).get("state") == "ready", 20, f"{name} to be ready again")
        proc.kill()
        proc.wait()


def test_a_task_connection_that_comes_back_at_once_loses_nothing(figures: Figures,
                                                                 nprng: np.random.Generator) -> None:
    with LocalCluster(0, heartbeat=5.0, threads=1) as cl, Client(cl.url) as c, \
            SlowLink(cl.ports, latency=0.0, rate=1e9) as link:
        cl.add_provider(*link.provider_args(), "--shared-files", "off", "--delay", "2.0")
        cl.wait_ready(1)
        name = provider_name(0)
        job = submit_matmul(c, nprng, 100)
        wait_for(lambda: (node(c, name) or {}).get("assigned", 0) > 0, 20, "the subtask to be sent")
        time.sleep(0.5)  # delivered and acknowledged (loopback), now being computed
        assert link.cut("task") >= 1
        figures.fault("task connection cut and re-established")
        time.sleep(config.DISCONNECT_GRACE + 1.0)  # past the grace and a tick: it must have subscribed again
        row = node(c, name)
        assert row is not None and row["state"] == "ready", row
        check_matmul(c, job, figures)
        got = counters(c)
        assert got["providers_lost"] == 0 and got["subtasks_retried"] == 0, got

