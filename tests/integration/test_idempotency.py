"""Idempotency keys (issue 14, B6): a submission whose reply is lost, retried with its key, is the job
the first try made, never a second one. Real head and provider processes over loopback; the lost
reply is made by a TCP proxy between the client and the head that swallows one reply (and, in the
last test, kills the head the moment that reply, sent only once the job was committed, arrives)."""

from __future__ import annotations

import http.client
import json
import select
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import numpy as np
import pytest

from common.protocol import batch
from user_client import Client
from user_client.local import LocalCluster

REQUEST_LINES = (b"GET ", b"POST ", b"PUT ", b"DELETE ", b"HEAD ")


class ReplyDropper:
    """A TCP proxy to the head's HTTP port that, while ``drop`` > 0, swallows the reply to a
    ``POST /v1/jobs...`` request and closes the client's connection (the client sees the head go
    away after sending its request): ``on_drop`` runs first, in the proxy's thread."""

    def __init__(self, upstream_port: int, on_drop: Callable[[], None] | None = None) -> None:
        self.upstream_port = upstream_port
        self.on_drop = on_drop
        self.drop = 0
        self.dropped = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.closed = True
        self.listener.close()

    def _accept(self) -> None:
        while not self.closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            up = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
        except OSError:  # the head is down: the client sees its connection closed
            conn.close()
            return
        submitting = False
        with conn, up:
            while not self.closed:
                readable, _, _ = select.select([conn, up], [], [], 0.5)
                for s in readable:
                    try:
                        data = s.recv(1 << 16)
                    except OSError:
                        return
                    if not data:
                        return
                    if s is conn:
                        if data.startswith(REQUEST_LINES):
                            submitting = data.startswith(b"POST /v1/jobs")
                        up.sendall(data)
                    elif submitting and self.drop > 0:
                        self.drop -= 1
                        self.dropped += 1
                        if self.on_drop is not None:
                            self.on_drop()
                        return  # both closed: the reply is lost
                    else:
                        conn.sendall(data)


@pytest.fixture
def blobs(client: Client) -> dict[str, str]:
    rng = np.random.default_rng(1)
    return {"a": client.upload(rng.random((40, 30)))["blob_id"], "b": client.upload(rng.random((30, 20)))["blob_id"]}


def _post_job(port: int, body: dict[str, Any], key: str | None) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        headers = {"content-type": "application/json", **({"idempotency-key": key} if key is not None else {})}
        conn.request("POST", "/v1/jobs", body=json.dumps(body), headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _post_batch(port: int, doc: dict[str, Any]) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("POST", "/v1/jobs/batch", body=msgpack.packb(doc, use_bin_type=True),
                     headers={"content-type": "application/msgpack"})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, (batch.decode_outcomes(data) if resp.status == 200 else json.loads(data))
    finally:
        conn.close()


def _ids(client: Client) -> set[str]:
    return {j["job_id"] for j in client.jobs(limit=10_000)}


def test_a_retry_with_the_same_key_is_the_same_job(cluster: LocalCluster, client: Client,
                                                   blobs: dict[str, str]) -> None:
    before = _ids(client)
    body = {"type": "matmul", "inputs": blobs}
    key = uuid.uuid4().hex
    status, first = _post_job(cluster.http_port, body, key)
    assert status == 201, first
    status, again = _post_job(cluster.http_port, body, key)  # the retry of a request whose reply was lost
    assert status == 201 and again["job_id"] == first["job_id"]
    client.wait(first["job_id"], timeout=60)
    status, late = _post_job(cluster.http_port, body, key)  # also once the job is done
    assert status == 201 and late["job_id"] == first["job_id"] and late["state"] == "done"
    assert _ids(client) - before == {first["job_id"]}, "one key, one job"
    # the same key for another job is refused, naming the job it made
    status, err = _post_job(cluster.http_port, {**body, "nodes": 1}, key)
    assert status == 422 and first["job_id"] in err["error"]["message"], err
    # without a key every POST is a new job, as before
    status, one = _post_job(cluster.http_port, body, None)
    status2, two = _post_job(cluster.http_port, body, None)
    assert status == status2 == 201 and one["job_id"] != two["job_id"]
    # a deleted job frees its key
    client.delete(first["job_id"])
    status, fresh = _post_job(cluster.http_port, body, key)
    assert status == 201 and fresh["job_id"] != first["job_id"]


@pytest.mark.parametrize("key", ["", "x" * 129, "has space", "semi;colon", "ü"])
def test_a_bad_key_is_a_clear_422(cluster: LocalCluster, blobs: dict[str, str], key: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", cluster.http_port, timeout=30)
    try:
        conn.putrequest("POST", "/v1/jobs")
        conn.putheader("content-type", "application/json")
        body = json.dumps({"type": "matmul", "inputs": blobs}).encode()
        conn.putheader("content-length", str(len(body)))
        conn.putheader("idempotency-key", key.encode("utf-8"))
        conn.endheaders(body)
        resp = conn.getresponse()
        err = json.loads(resp.read())
    finally:
        conn.close()
    assert resp.status == 422, err
    assert "idempotency key is 1 to 128 ASCII letters" in err["error"]["message"]


def test_a_batch_retried_with_its_keys_makes_no_second_jobs(cluster: LocalCluster, client: Client) -> None:
    before = _ids(client)
    rng = np.random.default_rng(2)
    ops = [(rng.random((3, 4)), rng.random((4, 2))) for _ in range(5)]
    jobs = [{"type": "matmul", "inputs": {"a": batch.pack_array(a), "b": batch.pack_array(b)},
             "idempotency_key": f"k-{uuid.uuid4().hex}"} for a, b in ops]
    status, first = _post_batch(cluster.http_port, {"v": 1, "jobs": jobs, "wait": 30})
    assert status == 200, first
    status, again = _post_batch(cluster.http_port, {"v": 1, "jobs": jobs, "wait": 30})
    assert status == 200
    assert [o["job_id"] for o in again] == [o["job_id"] for o in first]
    for o, (a, b) in zip(again, ops, strict=True):
        assert o["state"] == "done"
        np.testing.assert_allclose(o["results"]["c"], a @ b)
    assert _ids(client) - before == {o["job_id"] for o in first}
    # one batch naming a key twice, or a key in the wrong type: 422, nothing accepted
    status, err = _post_batch(cluster.http_port, {"v": 1, "jobs": [jobs[0], {**jobs[1], "idempotency_key":
                                                                              jobs[0]["idempotency_key"]}]})
    assert status == 422 and "jobs[1]" in err["error"]["message"], err
    status, err = _post_batch(cluster.http_port, {"v": 1, "jobs": [{**jobs[0], "idempotency_key": 7}]})
    assert status == 422 and "idempotency key" in err["error"]["message"], err


def test_the_client_retries_a_lost_reply_with_its_key(cluster: LocalCluster, client: Client,
                                                      blobs: dict[str, str]) -> None:
    """Before the keys, the lost reply raised HeadUnreachable (and a retry made a second job)."""
    before = _ids(client)
    proxy = ReplyDropper(cluster.http_port)
    try:
        with Client(proxy.url, reconnect_wait=20, shared_files="off") as via:
            via.health()
            proxy.drop = 1
            job = via.submit("matmul", blobs)
            assert proxy.dropped == 1
            proxy.drop = 1
            small = via.submit_many([{"type": "matmul", "inputs": {"a": np.eye(3), "b": np.ones((3, 2))}}] * 3)
            assert proxy.dropped == 2
            via.wait(job, timeout=60)
    finally:
        proxy.close()
    assert _ids(client) - before == {job, *small}, "each lost reply's retry returned the first job"
    assert len(set(small)) == 3


def test_a_head_killed_between_commit_and_reply(tmp_path: Any) -> None:
    """The head accepted the job (committed: the reply leaves only after that) and dies before its
    reply reaches the client; restarted on the same state dir, it answers the client's retry with
    that job, which runs once."""
    with LocalCluster(1, heartbeat=0.5, threads=1, state_dir=str(tmp_path / "state")) as cl:
        restarted = threading.Event()

        def kill_and_restart() -> None:
            cl.kill_head()

            def restart() -> None:
                cl.start_head()
                restarted.set()

            threading.Thread(target=restart, daemon=True).start()

        proxy = ReplyDropper(cl.http_port, on_drop=kill_and_restart)
        rng = np.random.default_rng(3)
        a, b = rng.random((50, 40)), rng.random((40, 30))
        try:
            with Client(proxy.url, reconnect_wait=60, shared_files="off") as via:
                blobs = {"a": via.upload(a)["blob_id"], "b": via.upload(b)["blob_id"]}
                proxy.drop = 1
                job = via.submit("matmul", blobs)
                assert proxy.dropped == 1 and restarted.wait(30)
                via.wait(job, timeout=60)
                np.testing.assert_allclose(via.result(job), a @ b)
                assert [j["job_id"] for j in via.jobs()] == [job], "one job, not two"
        finally:
            proxy.close()


@pytest.fixture(scope="module")
def amqp_cluster(amqp_url: str) -> Iterator[LocalCluster]:
    queue = f"dcf.test.idempotency.{uuid.uuid4().hex[:8]}"  # its own queue: no other head takes its jobs
    with LocalCluster(1, threads=1, amqp_url=amqp_url, head_args=["--amqp-queue", queue]) as cl:
        yield cl


def test_keys_on_rabbitmq(amqp_cluster: LocalCluster) -> None:
    with Client(amqp_cluster.url) as client:
        a, b = np.arange(12.0).reshape(3, 4), np.ones((4, 2))
        body = {"type": "matmul", "inputs": {"a": client.upload(a)["blob_id"], "b": client.upload(b)["blob_id"]}}
        key = uuid.uuid4().hex
        status, first = _post_job(amqp_cluster.http_port, body, key)
        assert status == 201, first
        status, again = _post_job(amqp_cluster.http_port, body, key)
        assert status == 201 and again["job_id"] == first["job_id"]
        client.wait(first["job_id"], timeout=60)
        assert [j["job_id"] for j in client.jobs()] == [first["job_id"]]
