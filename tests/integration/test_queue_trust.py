"""RabbitMQ is trusted with delivery only (issue 14, A6), against a real broker and real processes:

* a job message injected by someone with broker credentials (unsigned, or signed with another key)
  never runs, is logged, and the head goes on serving;
* jobs a competing consumer of the head's queue took (and acked: gone from the broker) are published
  again after ``--amqp-republish-after`` seconds and complete, each once."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import numpy as np
import pika
import pytest

from common.jobs import JobRecord
from common.protocol import JOB_SIGNATURE_HEADER, encode_job_message, sign_job_message
from user_client import Client
from user_client.local import LocalCluster

pytestmark = [pytest.mark.integration, pytest.mark.rabbitmq]


@pytest.fixture
def queue_name(amqp_url: str) -> Iterator[str]:
    """A queue of this test's own, deleted afterwards."""
    name = f"dcf.test.{uuid.uuid4().hex[:10]}"
    yield name
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        conn.channel().queue_delete(name)
    finally:
        conn.close()


def _publish(amqp_url: str, queue: str, body: bytes, headers: dict[str, str]) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        ch = conn.channel()
        ch.queue_declare(queue, durable=True)
        ch.basic_publish("", queue, body, pika.BasicProperties(delivery_mode=2, headers=headers, message_id="x"))
    finally:
        conn.close()


def _injected_job() -> tuple[str, bytes]:
    """A well-formed matmul job message, its operands inline: what a head would publish, but no head did."""
    a, b = np.ones((2, 2)), np.ones((2, 2))
    job_id = uuid.uuid4().hex
    message = JobRecord(job_id=job_id, type="matmul", params={},
                        inputs={"a": {"dtype": "float64", "shape": [2, 2]}, "b": {"dtype": "float64", "shape": [2, 2]}},
                        outputs={"c": {"dtype": "float64", "shape": [2, 2]}}, nodes=None, created_at=time.time(),
                        inline={"a": a.tobytes(), "b": b.tobytes()}).message()
    return job_id, encode_job_message(message)


def _log(cl: LocalCluster) -> str:
    return (cl.log_dir / "head.log").read_text(errors="replace")


def test_an_injected_job_message_never_runs(amqp_url: str, queue_name: str) -> None:
    env = {"DCF_AMQP_QUEUE": queue_name}
    with LocalCluster(1, heartbeat=0.5, threads=1, amqp_url=amqp_url, env=env) as cl, Client(cl.url) as c:
        unsigned, body = _injected_job()
        _publish(amqp_url, queue_name, body, {})
        forged, body2 = _injected_job()
        _publish(amqp_url, queue_name, body2, {JOB_SIGNATURE_HEADER: sign_job_message(body2, b"guessed" * 8)})
        deadline = time.monotonic() + 20
        while _log(cl).count("not published by a head") < 2:
            assert time.monotonic() < deadline, _log(cl)
            time.sleep(0.1)
        job = c.submit_matmul(np.eye(3), np.ones((3, 3)))  # the head goes on serving
        c.wait(job, timeout=60)
        np.testing.assert_array_equal(c.result(job), np.ones((3, 3)))
        listed = {j["job_id"] for j in c.jobs()}
        assert unsigned not in listed and forged not in listed
        assert job in listed


class Thief:
    """A competing consumer of the head's queue: it takes what the broker gives it and acks it (the
    messages are gone from the broker), until told to stop."""

    def __init__(self, amqp_url: str, queue: str) -> None:
        self.taken: list[str] = []
        self.ready = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(amqp_url, queue), daemon=True)
        self.thread.start()
        assert self.ready.wait(10), "the competing consumer did not start"

    def _run(self, amqp_url: str, queue: str) -> None:
        conn = pika.BlockingConnection(pika.URLParameters(amqp_url))  # this thread's own connection
        ch = conn.channel()
        ch.queue_declare(queue, durable=True)
        ch.basic_qos(prefetch_count=100)

        def take(channel, method, props, body) -> None:  # noqa: ANN001 (pika's callback)
            self.taken.append(props.message_id)
            channel.basic_ack(method.delivery_tag)

        ch.basic_consume(queue, take)
        self.ready.set()
        while not self.stop.is_set():
            conn.sleep(0.05)  # serves the consumer meanwhile
        conn.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)


def test_jobs_a_competing_consumer_took_are_published_again(amqp_url: str, queue_name: str) -> None:
    env = {"DCF_AMQP_QUEUE": queue_name, "DCF_AMQP_REPUBLISH_AFTER": "1"}
    with LocalCluster(2, heartbeat=0.5, threads=1, amqp_url=amqp_url, env=env) as cl, Client(cl.url) as c:
        thief = Thief(amqp_url, queue_name)
        try:
            jobs = c.submit_many([{"type": "matmul", "inputs": {"a": np.eye(4) * (i + 1), "b": np.ones((4, 4))}}
                                  for i in range(8)])
            deadline = time.monotonic() + 10
            while not thief.taken and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            thief.close()
        taken = set(thief.taken)
        assert taken and taken <= set(jobs), (thief.taken, jobs)  # round robin: the broker gave it some
        t0 = time.monotonic()
        results = c.gather(jobs, timeout=90)
        print(f"a competing consumer took {len(taken)} of {len(jobs)} jobs; all done "
              f"{time.monotonic() - t0:.1f} s later (republish after 1 s)")
        for i, got in enumerate(results):
            np.testing.assert_array_equal(got["c"], np.full((4, 4), i + 1.0))
        for job in jobs:
            kinds = [e["kind"] for e in c._json_list("GET", f"/v1/jobs/{job}/events")]
            assert kinds.count("job.done") == 1, (job, kinds)
            assert ("job.republished" in kinds) == (job in taken), (job, kinds)
        assert "never came back from queue" in _log(cl)
