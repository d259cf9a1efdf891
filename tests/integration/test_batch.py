"""The batch API end to end on real processes: many small jobs in one request, their results
inline, all or nothing, on the embedded store and on RabbitMQ."""

from __future__ import annotations

import http.client
from collections.abc import Iterator

import numpy as np
import pytest

from common.errors import NotFound, TooLarge, ValidationError
from common.protocol import batch
from user_client import Client
from user_client.local import LocalCluster


@pytest.fixture(scope="module")
def amqp_cluster(amqp_url: str) -> Iterator[LocalCluster]:
    with LocalCluster(2, threads=1, amqp_url=amqp_url) as cl:
        yield cl


def _operands(count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"a": rng.random((3, 4)), "b": rng.random((4, 2))} for _ in range(count)]


def _check_map(client: Client) -> None:
    inputs = _operands(120)
    out = client.map("matmul", inputs)
    assert len(out) == len(inputs)
    for got, ops in zip(out, inputs, strict=True):
        np.testing.assert_allclose(got["c"], ops["a"] @ ops["b"], rtol=1e-12, atol=1e-10)


def test_map_returns_every_result_in_order(client: Client) -> None:
    before = {j["job_id"] for j in client.jobs(limit=10_000)}
    _check_map(client)
    after = {j["job_id"] for j in client.jobs(limit=10_000)}
    assert after == before, "map forgets its jobs once their results are read"


def test_map_on_rabbitmq(amqp_cluster: LocalCluster) -> None:
    with Client(amqp_cluster.url) as client:
        _check_map(client)
        a = np.arange(12.0).reshape(3, 4)
        np.testing.assert_array_equal(client.matmul(a, a.T), a @ a.T)


def test_a_small_matmul_is_one_request_and_its_result_stays_readable(client: Client) -> None:
    a, b = np.arange(16.0).reshape(4, 4), np.eye(4) * 2
    np.testing.assert_array_equal(client.matmul(a, b), a @ b)
    job = client.submit_matmul(a, b)
    view = client.wait(job, timeout=30)
    assert view["state"] == "done" and view["inputs"]["a"] == {"dtype": "float64", "shape": [4, 4]}
    np.testing.assert_array_equal(client.result(job), a @ b)  # GET /result serves the row's bytes
    client.delete(job)
    with pytest.raises(NotFound):
        client.status(job)


def test_a_batch_is_accepted_whole_or_not_at_all(client: Client) -> None:
    before = {j["job_id"] for j in client.jobs(limit=10_000)}
    jobs = [{"type": "matmul", "inputs": ops} for ops in _operands(5)]
    jobs[3] = {"type": "matmul", "inputs": {"a": np.ones((3, 4)), "b": np.ones((5, 2))}}  # shapes do not fit
    with pytest.raises(ValidationError, match=r"jobs\[3\]"):
        client.submit_many(jobs)
    with pytest.raises(NotFound, match=r"jobs\[1\]: unknown task type 'no_such_task'"):
        client.submit_many([jobs[0], {"type": "no_such_task", "inputs": {}}])
    assert {j["job_id"] for j in client.jobs(limit=10_000)} == before


def test_limits_are_refused_with_the_limit_named(client: Client) -> None:
    huge = np.ones(batch.MAX_INLINE_BYTES // 8 + 1)
    body = batch.encode_batch_request([{"type": "matmul", "inputs": {"a": huge, "b": np.ones((1, 1))}}])
    with pytest.raises(TooLarge, match=str(batch.MAX_INLINE_BYTES)):
        client._batch("/v1/jobs/batch", body)
    conn = http.client.HTTPConnection("127.0.0.1", int(client.url.rsplit(":", 1)[1]), timeout=10)
    conn.request("POST", "/v1/jobs/batch", body=b"x", headers={"content-length": str(batch.MAX_BATCH_BYTES + 1)})
    resp = conn.getresponse()
    assert resp.status == 413 and str(batch.MAX_BATCH_BYTES).encode() in resp.read()


def test_submit_async_and_gather(client: Client) -> None:
    a = np.arange(6.0).reshape(2, 3)
    futures = [client.submit_async("matmul", {"a": a * i, "b": a.T}) for i in range(40)]
    out = client.gather(futures, timeout=60, forget=True)
    for i, got in enumerate(out):
        np.testing.assert_allclose(got["c"], (a * i) @ a.T)


def test_submit_async_shares_requests_and_a_bad_job_fails_alone(client: Client) -> None:
    a = np.arange(6.0).reshape(2, 3)
    futures = [client.submit_async("matmul", {"a": a * i, "b": a.T}) for i in range(200)]
    bad = client.submit_async("matmul", {"a": a, "b": a})  # (2, 3) @ (2, 3): refused
    more = [client.submit_async("matmul", {"a": a * i, "b": a.T}) for i in range(200, 260)]
    with pytest.raises(ValidationError, match="inner dimensions|shape"):
        bad.result(60)
    ids = [f.result(60) for f in futures + more]
    assert len(set(ids)) == 260  # each job once: a request refused for the bad one made none of them
    out = client.gather(ids, timeout=60, forget=True)
    for i, got in enumerate(out):
        np.testing.assert_allclose(got["c"], (a * i) @ a.T)


def test_gather_of_a_deleted_job_is_not_found(client: Client) -> None:
    job = client.submit_matmul(np.ones((2, 2)), np.ones((2, 2)))
    np.testing.assert_array_equal(client.gather([job])[0]["c"], np.full((2, 2), 2.0))
    client.delete(job)
    with pytest.raises(NotFound):
        client.gather([job])


def test_map_with_results_too_large_to_travel_inline(client: Client) -> None:
    """Outputs over 256 KiB are files: fetched after the gather, and only then the job is deleted."""
    rng = np.random.default_rng(3)
    inputs = [{"a": rng.random((300, 20)), "b": rng.random((20, 300))} for _ in range(2)]  # C: 720 KB each
    before = {j["job_id"] for j in client.jobs(limit=10_000)}
    out = client.map("matmul", inputs)
    for got, ops in zip(out, inputs, strict=True):
        np.testing.assert_allclose(got["c"], ops["a"] @ ops["b"], rtol=1e-12, atol=1e-10)
    assert {j["job_id"] for j in client.jobs(limit=10_000)} == before
