"""kill -9 providers again and again, during matmul jobs and during a sync training job, starting a
replacement each time: every job ends with the right result, and the head marks each killed provider
dead within 3 heartbeat intervals + 1 s (measured by polling GET /v1/nodes)."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

from tests.chaos.harness import (
    Figures,
    appears_once,
    check_matmul,
    kill_provider,
    measure_detection,
    provider_name,
    ready_providers,
    submit_matmul,
    wait_for,
)
from user_client import Client
from user_client.local import LocalCluster

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

HEARTBEAT = 0.4
#: seconds each provider sleeps before a subtask: the kill lands while subtasks are out. Well below the
#: head's 2 s straggler threshold, so no speculative copy blurs the picture.
DELAY = 0.25
ROUNDS = 6


def test_kill9_providers_during_matmul_jobs(figures: Figures, rng: random.Random,
                                            nprng: np.random.Generator) -> None:
    with LocalCluster(3, heartbeat=HEARTBEAT, threads=1, provider_args=["--delay", str(DELAY)]) as cl, \
            Client(cl.url) as c:
        ids: list[str] = []
        for _ in range(ROUNDS):
            jobs = [submit_matmul(c, nprng, rng.randint(120, 400)) for _ in range(2)]
            ids += [j.job_id for j in jobs]
            def started(job_id: str = jobs[0].job_id) -> bool:
                return c.status(job_id)["state"] != "queued"

            wait_for(started, 10, "the first job to start")
            time.sleep(rng.uniform(0.0, DELAY))  # somewhere while the subtasks are out
            victim = rng.choice(ready_providers(cl, c))
            t_kill = kill_provider(cl, victim)
            figures.fault("provider kill -9 (matmul)")
            cl.add_provider()  # the replacement boots while the head notices the death
            seconds = measure_detection(c, provider_name(victim), t_kill, HEARTBEAT, figures)
            assert seconds <= 3 * HEARTBEAT + 1.0, f"{provider_name(victim)} marked dead after {seconds:.2f}s"
            for job in jobs:
                check_matmul(c, job, figures)
            cl.wait_ready(3, timeout=30)
        appears_once(c, ids)
        lost = c.http.get("/v1/metrics").json()["counters"]["providers_lost"]
        assert lost == ROUNDS, f"{lost} providers declared dead, {ROUNDS} were killed"


def test_kill9_providers_during_sync_training(figures: Figures, rng: random.Random, reference_params,
                                              tmp_path) -> None:
    from tests.integration.test_training import DIGITS, PARAMS, max_diff

    ref = reference_params(1)
    with LocalCluster(3, heartbeat=HEARTBEAT, threads=1, provider_args=["--delay", "0.1"]) as cl, \
            Client(cl.url) as c:
        job = c.submit_train(DIGITS, epochs=1, **PARAMS)
        for step in sorted(rng.sample(range(2, 18), 2)):  # of 22 steps
            def reached(step: int = step) -> bool:
                return c.status(job)["progress"]["done"] >= step

            wait_for(reached, 60, f"training step {step}")
            assert c.status(job)["state"] == "running"
            victim = rng.choice(ready_providers(cl, c))
            t_kill = kill_provider(cl, victim)  # it holds a shard of the current step
            figures.fault("provider kill -9 (sync training)")
            cl.add_provider()
            measure_detection(c, provider_name(victim), t_kill, HEARTBEAT, figures)
        try:
            view = c.wait(job, timeout=120)
        except Exception:
            figures.job("lost")
            raise
        c.save_model(job, tmp_path / "model.pt")
        diff = max_diff(tmp_path / "model.pt", ref)
        figures.job("ok" if diff < 1e-5 else "wrong")
        assert view["state"] == "done" and view["progress"] == {"done": 22, "total": 22, "unit": "steps"}
        assert diff < 1e-5, f"parameters differ from single-process training by {diff:.2e}"
        appears_once(c, [job])
