"""Stop RabbitMQ mid-job (``rabbitmqctl stop_app``) and start it again (``start_app``): jobs already accepted
keep running and complete once, a job submitted while the broker is down is refused at once with a clear
503 (HeadUnreachable, "job queue ... unreachable"; CLI exit code 3), ``dcf status`` of a running job still
answers, and the head reconnects by itself (aio-pika connect_robust). Runs after every other test of the
session; skipped when rabbitmqctl cannot control the local broker, a failure under CI=true. The broker is
always started again (finally), and the test waits until its app runs and 5672 accepts connections."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator

import numpy as np
import pytest

from common.errors import HeadUnreachable, NotFound
from tests.chaos.harness import (
    Figures,
    appears_once,
    broker_queue_counts,
    broker_running,
    broker_start,
    broker_stop,
    check_matmul,
    rabbitmqctl_problem,
    submit_matmul,
    vhost_of,
    wait_for,
)
from tests.conftest import IN_CI, run_cli
from user_client import Client
from user_client.local import LocalCluster

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.rabbitmq, pytest.mark.runs_last]

#: each subtask takes this long: the first job is still running while the broker is down
DELAY = 6.0
#: what the outage test saw, for the tests that judge it
SEEN: dict[str, object] = {}


@pytest.fixture(scope="module")
def broker(chaos_amqp_url: str) -> Iterator[str]:
    problem = rabbitmqctl_problem()
    if problem:
        if IN_CI:
            pytest.fail(f"{problem} (CI=true: the broker outage test must run)")
        pytest.skip(problem)
    yield chaos_amqp_url
    if not broker_running():  # whatever happened above, leave the broker as we found it
        broker_start()


def test_broker_stop_and_start_mid_job(broker: str, figures: Figures, rng: random.Random,
                                       nprng: np.random.Generator) -> None:
    with LocalCluster(2, heartbeat=0.5, threads=1, amqp_url=broker, provider_args=["--delay", str(DELAY)]) as cl, \
            Client(cl.url) as c:
        jobs = [submit_matmul(c, nprng, rng.randint(100, 300)) for _ in range(2)]  # the 2nd runs after the 1st
        wait_for(lambda: c.status(jobs[0].job_id)["state"] == "running", 10, "the first job to start")
        t_stop = time.monotonic()
        stopper = broker_stop()
        figures.fault("RabbitMQ stop_app mid-job")
        try:
            wait_for(lambda: not broker_running(), 30, "RabbitMQ to stop", poll=0.1)
            # the CLI while the broker is down: status of a running job still answers from the head
            out = run_cli("status", jobs[0].job_id, url=cl.url, timeout=60)
            assert out.returncode == 0, out.stderr
            assert f"{jobs[0].job_id}  matmul  running" in out.stdout, out.stdout
            view = json.loads(run_cli("--json", "status", jobs[0].job_id, url=cl.url, timeout=60).stdout)
            assert view["state"] == "running"
            figures.notes.append(f"`dcf status` of a running job while RabbitMQ is down: exit 0, "
                                 f"{out.stdout.splitlines()[0].split('  ', 1)[1]!r} (no word of the broker)")
            # a new job is refused at once with a clear 503, not left hanging
            t0 = time.monotonic()
            with pytest.raises(HeadUnreachable, match="job queue"):
                submit_matmul(c, nprng, 50)
            refused = time.monotonic() - t0
            figures.timing("submit refused while RabbitMQ is down", refused)
            assert refused < 16, f"the refusal took {refused:.1f}s"
            out = run_cli("submit", "matmul", "--size", "20", "--no-wait", url=cl.url, timeout=60)
            assert out.returncode == 3 and "job queue" in out.stderr, (out.returncode, out.stderr)
            assert stopper.wait(timeout=60) == 0, stopper.stdout.read() if stopper.stdout else ""
            assert c.health()["status"] == "ok"
            # the first job ends while the broker is down (its queue message cannot be acked now); its
            # user takes the result and deletes the job
            check_matmul(c, jobs[0], figures, timeout=30)
            SEEN["ended_during_outage"] = True
            c.delete(jobs[0].job_id)
        finally:
            if stopper.poll() is None:
                stopper.wait(timeout=60)
            broker_start()
        figures.timing("RabbitMQ outage (stop_app to app running again)", time.monotonic() - t_stop)
        t_back = time.monotonic()
        accepted: list = []

        def submit_again() -> bool:
            try:
                accepted.append(submit_matmul(c, nprng, rng.randint(100, 300)))
            except HeadUnreachable:
                return False
            return True

        wait_for(submit_again, 60, "the head to accept jobs again (reconnected)", poll=0.2)
        figures.timing("RabbitMQ back to the first accepted job", time.monotonic() - t_back)
        for job in [jobs[1], *accepted]:
            check_matmul(c, job, figures, timeout=60)
        appears_once(c, [j.job_id for j in [jobs[1], *accepted]])
        # every job message was acked once its outcome was stored, also those whose ack failed while the
        # broker was down (redelivered after the reconnect, recognised as finished and acked)
        wait_for(lambda: broker_queue_counts(vhost=vhost_of(broker)) == (0, 0), 20, "dcf.jobs to drain", poll=0.5)
        time.sleep(1.0)  # (the redelivered message of the deleted job has been handled by now)
        SEEN["deleted_job_after_reconnect"] = _state(c, jobs[0].job_id)
        refused_rows = [j for j in c.jobs(state="failed") if "job queue unavailable" in (j.get("error") or "")]
        if refused_rows:
            figures.notes.append(f"{len(refused_rows)} submissions refused during the outage are listed by "
                                 "`dcf jobs` as failed jobs, though their ids were never returned")


def _state(c: Client, job_id: str) -> str:
    try:
        view = c.status(job_id)
    except NotFound:
        return "deleted"
    return f"{view['state']}: {view.get('error') or ''}"


@pytest.mark.xfail(strict=True, reason="bug: a job deleted while its queue message is unacked (it ended during a "
                                       "broker outage) comes back as a failed job when the message is redelivered")
def test_job_deleted_during_the_outage_stays_deleted() -> None:
    assert SEEN.get("ended_during_outage"), "the outage test did not get that far"
    assert SEEN["deleted_job_after_reconnect"] == "deleted", SEEN["deleted_job_after_reconnect"]
