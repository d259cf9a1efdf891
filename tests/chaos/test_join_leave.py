"""Providers join and leave (clean exit: SIGTERM, the provider unregisters) while jobs run. A matmul job is
split once, when it starts: the next assignment (the next job, or a subtask taken back from a leaver)
includes the newcomers and never the leavers. A sync training job re-plans every round: a newcomer gets a
shard of the next round, and the final parameters still match single-process training."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest

from tests.chaos.harness import (
    Figures,
    appears_once,
    check_matmul,
    node,
    provider_name,
    ready_providers,
    submit_matmul,
    wait_for,
)
from user_client import Client
from user_client.local import LocalCluster

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

HEARTBEAT = 0.4


def _changes(rng: random.Random, start: int) -> list[str]:
    """Two joins and two leaves in a random order that never leaves the cluster without a provider."""
    while True:
        changes = ["join", "join", "leave", "leave"]
        rng.shuffle(changes)
        members, ok = start, True
        for change in changes:
            members += 1 if change == "join" else -1
            ok = ok and members >= 1
        if ok:
            return changes


def _leave(cl: LocalCluster, index: int) -> None:
    cl.providers[index].terminate()  # SIGTERM: finish the subtask in hand, unregister, exit


def _ready_names(c: Client) -> set[str]:
    return {n["name"] for n in c.nodes() if n["state"] == "ready"}


#: square matmuls this big hold work enough for a share of >= rows.MIN_SHARE_SECONDS on every provider
MATMUL_MIN = 1000


def test_matmul_providers_join_and_leave(figures: Figures, rng: random.Random, nprng: np.random.Generator) -> None:
    with LocalCluster(2, heartbeat=HEARTBEAT, threads=1, provider_args=["--delay", "0.5"]) as cl, \
            Client(cl.url) as c:
        ids: list[str] = []
        for change in _changes(rng, 2):
            during = submit_matmul(c, nprng, rng.randint(MATMUL_MIN, MATMUL_MIN + 200))
            ids.append(during.job_id)
            def running(job_id: str = during.job_id) -> bool:
                return c.status(job_id)["state"] == "running"

            wait_for(running, 10, "the job to start")
            time.sleep(rng.uniform(0.0, 0.3))
            if change == "join":
                name = provider_name(len(cl.providers))
                cl.add_provider()
            else:
                index = rng.choice(ready_providers(cl, c))
                name = provider_name(index)
                _leave(cl, index)
            figures.fault(f"provider {change} (matmul)")
            check_matmul(c, during, figures)
            if change == "join":
                def ready(name: str = name) -> bool:
                    return (node(c, name) or {}).get("state") == "ready"

                wait_for(ready, 30, f"{name} to be ready")
            else:
                def left(name: str = name) -> bool:
                    return node(c, name) is None

                wait_for(left, 15, f"{name} to leave")
                assert cl.providers[index].wait(timeout=10) == 0
            members = _ready_names(c)
            after = submit_matmul(c, nprng, rng.randint(MATMUL_MIN, MATMUL_MIN + 200))
            ids.append(after.job_id)
            view = check_matmul(c, after, figures)
            assert set(view["shares"]) == members, f"after {change} of {name}: shares {view['shares']}, " \
                                                   f"providers {sorted(members)}"
        appears_once(c, ids)


def test_training_providers_join_and_leave(figures: Figures, rng: random.Random, reference_params,
                                           tmp_path) -> None:
    from tests.integration.test_training import DIGITS, PARAMS, max_diff

    ref = reference_params(2)
    with LocalCluster(2, heartbeat=HEARTBEAT, threads=1, provider_args=["--delay", "0.1"]) as cl, \
            Client(cl.url) as c:
        job = c.submit_train(DIGITS, epochs=2, **PARAMS)  # 44 steps
        join_at = rng.randint(2, 8)
        wait_for(lambda: c.status(job)["progress"]["done"] >= join_at, 60, f"training step {join_at}")
        newcomer = provider_name(len(cl.providers))
        cl.add_provider()
        figures.fault("provider join (training)")
        ready_step = work_step = None
        while work_step is None:
            row, view = node(c, newcomer), c.status(job)
            assert view["state"] == "running", f"the job ended before {newcomer} got work"
            if row is not None and row["state"] == "ready" and ready_step is None:
                ready_step = view["progress"]["done"]
            if row is not None and row["subtasks_done"] > 0:
                work_step = view["progress"]["done"]
            time.sleep(0.01)
        assert ready_step is not None and work_step - ready_step <= 3, (ready_step, work_step)
        leaver = rng.choice([0, 1])
        _leave(cl, leaver)
        figures.fault("provider leave (training)")
        wait_for(lambda: node(c, provider_name(leaver)) is None, 15, "the provider to leave")
        left_at = c.status(job)["progress"]["done"]
        try:
            view = c.wait(job, timeout=120)
        except Exception:
            figures.job("lost")
            raise
        c.save_model(job, tmp_path / "model.pt")
        diff = max_diff(tmp_path / "model.pt", ref)
        figures.job("ok" if diff < 1e-5 else "wrong")
        assert view["state"] == "done" and view["progress"] == {"done": 44, "total": 44, "unit": "steps"}
        assert diff < 1e-5, f"parameters differ from single-process training by {diff:.2e}"
        assert left_at < 44, "the provider left only after the job's last step"
        appears_once(c, [job])
