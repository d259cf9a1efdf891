"""A replicated broker (issue 15 §2): the jobs queue as a quorum queue on a 3-node RabbitMQ cluster this test
starts on 127.0.0.1 (tests/rabbitcluster.py), with the head given every node (``--amqp-url a,b,c``).

Jobs are submitted one after another while one node is killed (SIGKILL), started again, and then another
node is killed: the head's connection moves to a live node, the queue keeps its jobs (Raft: a majority holds
each confirmed message), every accepted job completes once with the right result, and the queue is empty at
the end (every delivery acked, on whichever node it was acked)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import pika
import pytest

from tests import rabbitcluster
from tests.chaos.harness import Figures
from tests.conftest import IN_CI
from user_client import Client
from user_client.local import LocalCluster

pytestmark = [pytest.mark.chaos, pytest.mark.integration, pytest.mark.rabbitmq]

QUEUE = "dcf.test.quorum"
JOBS = 24


@pytest.fixture(scope="module")
def rabbit() -> Iterator[rabbitcluster.RabbitCluster]:
    why = rabbitcluster.unavailable()
    if why:
        if IN_CI:
            pytest.fail(f"{why} (CI=true: the cluster test must run)")
        pytest.skip(why)
    with rabbitcluster.RabbitCluster(3) as cluster:
        yield cluster


class Submitter:
    """Submits ``JOBS`` small matmuls, one at a time, ``pause`` apart, from its own thread and client (each
    submission retries while the queue is unreachable: ``queue_wait``)."""

    def __init__(self, url: str, pause: float) -> None:
        self.url, self.pause = url, pause
        self.accepted: list[tuple[str, int]] = []  # (job id, its scale)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with Client(self.url, queue_wait=60) as client:
                for i in range(JOBS):
                    job = client.submit_matmul(np.eye(40) * (i + 1), np.ones((40, 40)))
                    self.accepted.append((job, i + 1))
                    time.sleep(self.pause)
        except BaseException as exc:  # noqa: BLE001 (reported by the test)
            self.error = exc

    def wait_for(self, count: int, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        while len(self.accepted) < count and self.thread.is_alive() and time.monotonic() < end:
            time.sleep(0.05)
        assert self.error is None, self.error
        assert len(self.accepted) >= count, f"only {len(self.accepted)} jobs accepted"


LOST = "lost; reconnecting"


def _head_log(cl: LocalCluster) -> str:
    return (cl.log_dir / "head.log").read_text(errors="replace")


def _reconnected(cl: LocalCluster, client: Client, losses: int, timeout: float = 60.0) -> float:
    """Seconds from now until the head has seen its ``losses``-th lost connection and is connected again."""
    t0 = time.monotonic()
    while _head_log(cl).count(LOST) < losses or not client.health().get("queue_connected"):
        assert time.monotonic() - t0 < timeout, f"the head did not reconnect to a live node:\n{_head_log(cl)[-3000:]}"
        time.sleep(0.05)
    return time.monotonic() - t0


def test_node_kills_mid_job_lose_nothing_and_duplicate_nothing(rabbit: rabbitcluster.RabbitCluster,
                                                               figures: Figures) -> None:
    n0, n1, _ = rabbit.nodes
    head_args = ["--amqp-queue-type", "quorum", "--amqp-queue", QUEUE]
    with (LocalCluster(2, heartbeat=0.5, threads=1, amqp_url=rabbit.urls, head_args=head_args,
                       env={"DCF_DELAY": "1"}) as cl,
          Client(cl.url) as client):
        submitter = Submitter(cl.url, pause=0.25)  # each job takes a provider about 1 s (DCF_DELAY)
        submitter.wait_for(5)
        running = sum(j["state"] == "running" for j in client.jobs())
        rabbit.kill(n0)  # the node the head connected to first, where the queue's leader was elected
        figures.fault("RabbitMQ cluster node kill -9 (quorum queue)")
        took = _reconnected(cl, client, 1)
        figures.timing("head on a live RabbitMQ node after a node kill", took)
        print(f"node {n0.name} killed with {running} jobs running: the head was on another node {took:.2f} s later")
        submitter.wait_for(10)
        rabbit.start_node(n0)
        rabbit.wait_members(3)
        running = sum(j["state"] == "running" for j in client.jobs())
        rabbit.kill(n1)
        figures.fault("RabbitMQ cluster node kill -9 (quorum queue)")
        took = _reconnected(cl, client, 2)
        figures.timing("head on a live RabbitMQ node after a node kill", took)
        print(f"node {n1.name} killed with {running} jobs running: the head was connected again {took:.2f} s later")
        submitter.thread.join(120)
        assert submitter.error is None, submitter.error
        accepted = submitter.accepted
        assert len(accepted) == JOBS
        results = client.gather([job for job, _ in accepted], timeout=120)
        for (job, scale), got in zip(accepted, results, strict=True):
            right = bool(np.array_equal(got["c"], np.full((40, 40), float(scale))))
            kinds = [e["kind"] for e in client._json_list("GET", f"/v1/jobs/{job}/events")]
            once = kinds.count("job.done") == 1 and "job.failed" not in kinds
            figures.job("ok" if right and once else ("wrong" if not right else "lost"))
            assert right, job
            assert once, (job, kinds)
        log = _head_log(cl)
    assert "job queue: RabbitMQ quorum queue" in log
    left = rabbit.ctl(rabbit.nodes[2], "list_queues", "name", "type", "--no-table-headers")
    assert [QUEUE, "quorum"] in [line.split() for line in left.splitlines()], left
    assert _messages_left(rabbit.nodes[2].url) == []  # every delivery was acked: nothing waits to be redone
    print(f"{JOBS} jobs accepted across 2 node kills: {JOBS} done once each, 0 lost, queue left empty")


def _messages_left(url: str) -> list[str]:
    """The ids of the messages still in the jobs queue (the head is gone: what it held unacked is back)."""
    conn = pika.BlockingConnection(pika.URLParameters(url))
    try:
        ch = conn.channel()
        left = []
        while (got := ch.basic_get(QUEUE))[0] is not None:
            left.append(str(got[1].message_id))
        return left
    finally:
        conn.close()


def test_a_queue_of_the_other_type_is_refused_with_how_to_mend_it(amqp_url: str, tmp_path, caplog) -> None:
    """The machine's broker holds a classic queue of that name: a head asked for a quorum queue says why it
    cannot use it, and what to do, instead of an AMQP code."""
    import asyncio

    from head_node.jobqueue import AmqpQueue, _connect_error
    from head_node.store import JobStore

    name = f"dcf.test.type.{time.monotonic_ns()}"
    conn = pika.BlockingConnection(pika.URLParameters(amqp_url))
    conn.channel().queue_declare(name, durable=True)
    try:
        queue = AmqpQueue(amqp_url, JobStore(tmp_path / "jobs.sqlite3"), b"k" * 32, queue_name=name,
                          queue_type="quorum")

        async def attempt() -> str:
            try:
                await queue._connect()
            except Exception as exc:  # noqa: BLE001 (what the head's log would say is the point)
                return _connect_error(exc, queue)
            finally:
                await queue._drop_connection()
            return "connected"

        said = asyncio.run(attempt())
    finally:
        conn.channel().queue_delete(name)
        conn.close()
    assert f"queue {name} exists on the broker with another type than quorum" in said, said
    assert "use another --amqp-queue, or drain and delete the old queue" in said
