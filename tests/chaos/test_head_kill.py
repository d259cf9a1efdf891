"""kill -9 the head at random points of a job's life and restart it with the same state dir and ports,
with the embedded store and with RabbitMQ: right after submit returns, while subtasks are out, while
results arrive, during the recovery of a job, and during training between checkpoints. Every job whose
id was returned completes, once: listed once, the right result, one job.done event (followed across
head restarts on GET /v1/stream, and on the RabbitMQ dcf.events exchange)."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator

import numpy as np
import pytest

from tests.chaos.harness import (
    EventTap,
    EventWatcher,
    Figures,
    appears_once,
    broker_queue_counts,
    check_matmul,
    rabbitmqctl_problem,
    submit_matmul,
    vhost_of,
    wait_for,
)
from user_client import Client
from user_client.local import LocalCluster

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

HEARTBEAT = 0.5
#: one job's three subtasks report at about 0.15, 0.45 and 0.75 s: there is a "while results arrive"
DELAYS = ("0.15", "0.45", "0.75")
PHASES = ("after_submit", "subtasks_out", "results_arrive", "during_recovery")


@pytest.fixture(params=["embedded", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)])
def store(request: pytest.FixtureRequest) -> Iterator[tuple[str, EventTap | None]]:
    """("", None) for the embedded store; (AMQP URL, a tap on the dcf.events exchange) for RabbitMQ."""
    if request.param == "embedded":
        yield "", None
        return
    url = request.getfixturevalue("chaos_amqp_url")
    tap = EventTap(f"chaos-tap-{uuid.uuid4().hex[:8]}", vhost_of(url))
    try:
        yield url, tap
    finally:
        tap.close()


def _restart(cl: LocalCluster, figures: Figures, providers: int) -> None:
    t0 = time.monotonic()
    cl.start_head()
    cl.wait_ready(providers, timeout=30)
    figures.timing("head restart to providers ready", time.monotonic() - t0)


def _exactly_once(c: Client, watch: EventWatcher, tap: EventTap | None, ids: list[str]) -> None:
    """One job.done per job at the head (all epochs) and, with RabbitMQ, on the dcf.events exchange."""
    wait_for(lambda: all(watch.count("job.done")[j] >= 1 for j in ids), 15, "a job.done event of every job")
    sources = {"head events": watch.count}
    if tap is not None:
        wait_for(lambda: all(tap.count("job.done")[j] >= 1 for j in ids), 15, "job.done on dcf.events")
        sources["dcf.events exchange"] = tap.count
    time.sleep(0.5)  # a duplicate would follow at once
    for where, count in sources.items():
        seen = count("job.done")
        assert {j: seen[j] for j in ids} == dict.fromkeys(ids, 1), f"job.done per job in {where}"
    for j in ids:  # the last head's own record of the job agrees (0 if it finished under an earlier head)
        events = c.http.get(f"/v1/jobs/{j}/events").json()
        assert sum(e["kind"] == "job.done" for e in events) <= 1


def _queue_settles(url: str) -> None:
    """With RabbitMQ: every job message was acked once its outcome was stored (dcf.jobs drains)."""
    if rabbitmqctl_problem() is None:
        wait_for(lambda: broker_queue_counts(vhost=vhost_of(url)) == (0, 0), 15,
                 "dcf.jobs to drain (all job messages acked)", poll=0.5)


def test_head_kill9_at_random_points_of_a_jobs_life(store, figures: Figures, rng: random.Random,
                                                    nprng: np.random.Generator) -> None:
    url, tap = store
    with LocalCluster(0, heartbeat=HEARTBEAT, threads=1, amqp_url=url) as cl, Client(cl.url) as c, \
            EventWatcher(cl.url) as watch:
        for d in DELAYS:
            cl.add_provider("--delay", d)
        cl.wait_ready(3)
        phases = list(PHASES)
        rng.shuffle(phases)
        ids: list[str] = []
        for phase in phases:
            job = submit_matmul(c, nprng, rng.randint(150, 400))
            ids.append(job.job_id)
            if phase == "subtasks_out":
                def running(job_id: str = job.job_id) -> bool:
                    return c.status(job_id)["state"] == "running"

                wait_for(running, 10, "the job to start")
                time.sleep(rng.uniform(0.0, 0.1))
            elif phase == "results_arrive":
                def a_result(job_id: str = job.job_id) -> bool:
                    return c.status(job_id)["progress"]["done"] >= 1

                wait_for(a_result, 10, "a first result")
                time.sleep(rng.uniform(0.0, 0.25))
            cl.kill_head()
            figures.fault(f"head kill -9 ({phase}, {'rabbitmq' if url else 'embedded'})")
            if phase == "during_recovery":  # again, while the new head brings the job back
                cl.start_head()
                time.sleep(rng.uniform(0.0, 0.5))
                cl.kill_head()
                figures.fault(f"head kill -9 ({phase}, {'rabbitmq' if url else 'embedded'})")
            _restart(cl, figures, 3)
            check_matmul(c, job, figures)
        appears_once(c, ids)
        _exactly_once(c, watch, tap, ids)
        if url:
            _queue_settles(url)


def test_head_kill9_during_training_between_checkpoints(store, figures: Figures, rng: random.Random,
                                                        reference_params, tmp_path) -> None:
    torch = pytest.importorskip("torch")
    from tests.integration.test_training import DIGITS, PARAMS, max_diff

    url, tap = store
    ref = reference_params(1)
    every = 4
    with LocalCluster(2, heartbeat=HEARTBEAT, threads=1, amqp_url=url, provider_args=["--delay", "0.05"]) as cl, \
            Client(cl.url) as c, EventWatcher(cl.url) as watch:
        job = c.submit_train(DIGITS, epochs=1, checkpoint_every=every, **PARAMS)
        step = rng.choice([s for s in range(5, 20) if s % every])  # of 22 steps
        wait_for(lambda: c.status(job)["progress"]["done"] >= step, 60, f"training step {step}")
        at_kill = c.status(job)["progress"]["done"]
        cl.kill_head()
        figures.fault(f"head kill -9 (training, {'rabbitmq' if url else 'embedded'})")
        checkpoint = torch.load(cl.state_dir / "jobs" / job / "checkpoint.pt", weights_only=True)
        assert int(checkpoint["global_step"]) <= at_kill
        _restart(cl, figures, 2)
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
        _exactly_once(c, watch, tap, [job])
        if url:
            _queue_settles(url)
