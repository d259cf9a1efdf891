"""A slow link between the head and one provider: an asyncio TCP proxy (tests/chaos/harness.py SlowLink)
sits on that provider's registration, task and result connections and gives them 20 MB/s with 30 ms of
one-way delay; the provider sends arrays over it (--shared-files off) while the other one shares the
head's state dir. Several matmul jobs run: they finish with the right results and the slow provider is
never taken for dead. The head learns a provider's speed from the service time it observes (from sending
a subtask, or from the provider's previous result if it was busy, to receiving the result), not only from
the compute time the provider reports (result.elapsed_s): the transfers count, so the slow link gets a
smaller share of each later job (head_node/state.py service_seconds)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from tests.chaos.harness import SEED, Figures, SlowLink, check_matmul, node, submit_matmul
from user_client import Client
from user_client.local import LocalCluster

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

JOBS = 5
N = 1000  # float64: 8 MB per operand; each provider's half is 5e8 FLOP, enough for the head to learn from
SLOW = "local-1"


@pytest.fixture(scope="module")
def slow_run(figures: Figures) -> Iterator[dict[str, Any]]:
    rng = random.Random(f"{SEED}:slow-link")
    nprng = np.random.default_rng(rng.randrange(2**32))
    with LocalCluster(1, heartbeat=0.5, threads=1) as cl, Client(cl.url) as c, \
            SlowLink(cl.ports, latency=0.03, rate=20e6) as link:
        cl.add_provider(*link.provider_args(), "--shared-files", "off")
        cl.wait_ready(2)
        figures.fault("slow link (20 MB/s, 30 ms) to one provider")
        run: dict[str, Any] = {"shares": [], "states": set(), "gflops": []}
        for _ in range(JOBS):
            job = submit_matmul(c, nprng, N)
            view = check_matmul(c, job, figures)
            run["shares"].append(view["shares"].get(SLOW, 0.0))
            row = node(c, SLOW)
            run["states"].add(row["state"] if row else "gone")
            run["gflops"].append({n["name"]: n["gflops"] for n in c.nodes()})
        run["bytes"] = dict(link.bytes)
        run["lost"] = c.http.get("/v1/metrics").json()["counters"]["providers_lost"]
        slow, last = run["shares"], run["shares"][-1]
        figures.notes.append(f"slow link: the slow provider's share went {slow[0]:.2f} -> {last:.2f} over "
                             f"{JOBS} jobs (an even split is 0.50): {', '.join(f'{s:.2f}' for s in slow)}; "
                             f"its learned GFLOP/s {', '.join(f'{g.get(SLOW, 0):.1f}' for g in run['gflops'])}")
        yield run


def test_slow_link_jobs_finish_and_the_provider_stays_alive(slow_run: dict[str, Any]) -> None:
    assert slow_run["states"] == {"ready"} and slow_run["lost"] == 0
    # the slow provider's arrays really crossed the proxy: at least B and its rows of A per job, and C back
    assert slow_run["bytes"]["task"] >= JOBS * N * N * 8
    assert slow_run["bytes"]["result"] >= JOBS * N * N * 8 * min(slow_run["shares"])
    assert all(0 < s < 1 for s in slow_run["shares"])


def test_slow_link_provider_gets_a_smaller_share_of_later_jobs(slow_run: dict[str, Any]) -> None:
    # through the link its half of a job takes ~0.9 s against ~0.03 s next door: the head, measuring what
    # a provider costs end to end, gives it well under a quarter of the rows by the last job
    assert slow_run["shares"][-1] < 0.25, slow_run["shares"]
