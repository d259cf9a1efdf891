"""A provider's result connection black-holed while its heartbeats flow (issue 14 B4), real processes over
loopback.

One provider reaches the head through a TCP proxy that, on command, drops every byte of its result link
in both directions (existing connections and new ones alike: a firewall or NAT that silently eats that one
flow) while its registration and task links go on. Its acks and results never arrive. Before the fix it
stayed ``ready`` forever and every job waited the ack timeout for its share; now two acks missed in a row
(nothing heard from it on the result channel meanwhile) make it ``unhealthy``: no new work, event
``node.unhealthy``, and its next heartbeat reply asks it to open its connections anew (``reconnect``). After
a wait it is probed with one subtask over fresh connections; once the link carries bytes again the probe's
ack makes it healthy (``node.healthy``) and it shares jobs again."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from typing import Any

import numpy as np
import pytest

from tests.chaos.harness import EventWatcher, Figures, SlowLink, check_matmul, node, submit_matmul, wait_for
from user_client import Client
from user_client.local import LocalCluster

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

HEARTBEAT = 1.0  # its first wait before a probe: max(ACK_TIMEOUT, 3 x HEARTBEAT) = 3 s, then 2 heartbeats
ACK_TIMEOUT = 2.0
N = 800  # 1e9 FLOP: split over both providers (each share well over rows.MIN_SHARE_SECONDS)
GOOD, BAD = "local-0", "local-1"
JOBS = 6


class BlackHoleLink(SlowLink):
    """The harness's proxy without its rate limit; a link named in ``holes`` drops what it carries (both
    directions, every connection, new ones too) and keeps the connections open."""

    def __init__(self, targets: dict[str, int]) -> None:
        super().__init__(targets, latency=0.0, rate=1e12)
        self.holes: set[str] = set()
        self.dropped = Counter[str]()

    def __enter__(self) -> BlackHoleLink:
        self.start()
        return self

    async def _pipe(self, name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                chunk = await reader.read(1 << 16)
                if not chunk:
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                    return
                if name in self.holes:
                    self.dropped[name] += len(chunk)
                    continue
                self.bytes[name] += len(chunk)
                writer.write(chunk)
                await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def node_events(events: EventWatcher, kind: str, name: str) -> list[dict[str, Any]]:
    with events.lock:
        return sorted((e for e in events.events.values() if e["kind"] == kind and e.get("name") == name),
                      key=lambda e: e["seq"])


def test_a_black_holed_result_connection_makes_the_provider_unhealthy_and_it_recovers(
        figures: Figures, nprng: np.random.Generator) -> None:
    with LocalCluster(1, heartbeat=HEARTBEAT, threads=1, head_args=["--ack-timeout", str(ACK_TIMEOUT)]) as cl, \
            Client(cl.url) as c, BlackHoleLink(cl.ports) as link, EventWatcher(cl.url, period=0.5) as events:
        cl.add_provider(*link.provider_args(), "--shared-files", "off")
        cl.wait_ready(2)
        wait_for(lambda: events.connections > 0, 30, "the event stream")
        warm = check_matmul(c, submit_matmul(c, nprng, N), figures)
        assert set(warm["shares"]) == {GOOD, BAD}, warm["shares"]

        link.holes.add("result")
        figures.fault("result connection black-holed (heartbeats flowing)")
        t_hole = time.monotonic()
        seconds, shares, states = [], [], []
        for _ in range(JOBS):
            t0 = time.monotonic()
            view = check_matmul(c, submit_matmul(c, nprng, N), figures)
            seconds.append(time.monotonic() - t0)
            shares.append(view["shares"])
            states.append((node(c, BAD) or {}).get("state"))
        unhealthy = node_events(events, "node.unhealthy", BAD)
        figures.notes.append(
            "result link black-holed: job seconds " + ", ".join(f"{s:.2f}" for s in seconds)
            + f" (ack timeout {ACK_TIMEOUT:.0f} s); {BAD} " + ", ".join(map(str, states))
            + (f"; node.unhealthy after {unhealthy[0]['missed_acks']} missed acks, "
               f"{unhealthy[0]['ts'] - events_ts0(events, t_hole):.1f} s" if unhealthy else "; no node.unhealthy"))
        # two jobs wait the ack timeout for its share; from then on it gets nothing and nothing waits
        assert unhealthy and unhealthy[0]["missed_acks"] == 2, unhealthy
        assert states[1:] == ["unhealthy"] * (JOBS - 1), states
        assert all(s == {GOOD: 1.0} for s in shares[2:]), shares
        assert all(s < ACK_TIMEOUT for s in seconds[2:]), seconds
        assert link.dropped["result"] > 0

        link.holes.discard("result")
        figures.fault("result connection restored")
        t_heal = time.monotonic()
        recovered = None
        for _ in range(10):  # the probe goes out once its wait is over; the ack of it makes it healthy
            view = check_matmul(c, submit_matmul(c, nprng, N), figures)
            if node_events(events, "node.healthy", BAD) and BAD in view["shares"]:
                recovered = time.monotonic() - t_heal
                break
            time.sleep(0.5)
        assert recovered is not None, "the provider did not come back after its link was restored"
        figures.timing("black-holed result link restored to the provider sharing jobs again", recovered)
        assert (node(c, BAD) or {}).get("state") == "ready"
        got = c.http.get("/v1/metrics").json()["counters"]
        assert got["providers_lost"] == 0 and got["providers_unhealthy"] >= 1, got


def events_ts0(events: EventWatcher, t_mono: float) -> float:
    """The head's wall clock at monotonic time ``t_mono`` of this machine (same machine, same clock)."""
    return time.time() - (time.monotonic() - t_mono)
