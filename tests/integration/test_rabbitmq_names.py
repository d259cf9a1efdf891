"""RabbitMQ as users see it: the management HTTP API shows the durable job queue and the event
exchange by sensible names, and node/job events flow through the topic exchange."""

from __future__ import annotations

import json
import os
import time
import uuid

import httpx
import numpy as np
import pytest

from tests.conftest import IN_CI
from user_client import Client
from user_client.local import LocalCluster

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq]

API = os.environ.get("DCF_TEST_RABBITMQ_API", "http://127.0.0.1:15672")
AUTH = ("guest", "guest")


@pytest.fixture
def mgmt(amqp_url: str):
    http = httpx.Client(base_url=f"{API}/api", auth=AUTH, timeout=10)
    try:
        http.get("/overview").raise_for_status()
    except httpx.HTTPError as exc:
        http.close()
        if IN_CI:
            pytest.fail(f"RabbitMQ management API not reachable at {API}: {exc}")
        pytest.skip(f"RabbitMQ management API not reachable at {API}")
    yield http
    http.close()


def test_queue_and_exchange_names_and_events(amqp_url: str, mgmt: httpx.Client) -> None:
    watch = f"test-watch-{uuid.uuid4().hex[:8]}"
    mgmt.put(f"/queues/%2F/{watch}", json={"durable": False, "auto_delete": False}).raise_for_status()
    try:
        with LocalCluster(1, heartbeat=0.5, threads=1, amqp_url=amqp_url) as cl, Client(cl.url) as c:
            queue = mgmt.get("/queues/%2F/dcf.jobs").json()
            assert queue["durable"] is True  # (consumer counts lag: the UI samples every 5 s)
            exchange = mgmt.get("/exchanges/%2F/dcf.events").json()
            assert exchange["type"] == "topic" and exchange["durable"] is True
            mgmt.post(f"/bindings/%2F/e/dcf.events/q/{watch}", json={"routing_key": "job.#"}).raise_for_status()
            job = c.submit_matmul(np.ones((20, 4)), np.ones((4, 3)))
            c.wait(job, timeout=60)
            kinds: list[str] = []
            deadline = time.monotonic() + 10
            while "job.done" not in kinds and time.monotonic() < deadline:
                got = mgmt.post(f"/queues/%2F/{watch}/get", json={"count": 50, "ackmode": "ack_requeue_false",
                                                                   "encoding": "auto"}).json()
                for message in got:
                    body = json.loads(message["payload"])
                    assert body["job_id"] == job and message["routing_key"] == body["kind"]
                    kinds.append(body["kind"])
                time.sleep(0.2)
            # the outcome goes to the exchange; the per-job steps stay on the head's own event API
            assert kinds == ["job.done"], kinds
            assert {"job.accepted", "job.started"} <= {e["kind"] for e in c._json_list("GET", f"/v1/jobs/{job}/events")}
    finally:
        mgmt.delete(f"/queues/%2F/{watch}")
