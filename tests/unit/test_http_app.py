"""The head's HTTP routers against a fake head (no sockets, no processes): what each route answers,
the one token check, the error format, and the schemas /openapi.json documents."""

from __future__ import annotations

import asyncio
import io
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from common.errors import Conflict, NotFound
from common.jobs import JobRecord, JobState, Progress
from common.protocol import batch
from common.protocol.batch import JobSpec
from head_node.api import create_app
from head_node.entities import Provider, ProviderInfo
from head_node.events import EventBus
from head_node.store import BlobStore, JobStore
from head_node.views import provider_row

JOB = "a" * 32
PROVIDER = "b" * 32
TOKEN = "s3cret"


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def done_view(job_id: str = JOB) -> dict[str, Any]:
    record = JobRecord(job_id=job_id, type="matmul", params={"seed": 1, "scale": 0.5},
                       inputs={"a": {"blob": "c" * 32, "dtype": "float64", "shape": [4, 3]}},
                       outputs={"c": {"dtype": "float64", "shape": [4, 2]}}, nodes=None,
                       created_at=1722000000.25, state=JobState.DONE, started_at=1722000001.5,
                       finished_at=1722000002.75, stats={"shares": {"local-0": 1}, "wall_s": 1.25})
    return record.view(progress=Progress(3, 3), shares={"local-0": 1})


def node_row(now: float) -> dict[str, Any]:
    info = ProviderInfo(provider_id=PROVIDER, name="local-0", host="h", os="Linux", device_kind="cpu",
                        device_name="x86", memory_bytes=2**33, cores=4, task_types=frozenset({"matmul"}),
                        dtypes=frozenset({"float32", "float64"}), version="0.1.0", gflops=12)
    return provider_row(Provider(info=info, last_seen=now - 0.25, subscribed=True), now)


class FakeHead:
    """Meets ``head_node.http.facade.HeadApi`` with fixed answers, and records what it was asked."""

    def __init__(self, root: Path, token: str = "") -> None:
        self.cfg = SimpleNamespace(api_token=token, max_upload_bytes=1 << 20, fsync=False)
        self.incarnation = "e" * 32
        self.root = root
        self.queue = SimpleNamespace(name="embedded", is_connected=True)
        self.fenced: str | None = None
        self.blobs = BlobStore(root)
        self.events = EventBus()
        self.stopping = asyncio.Event()
        self.state = SimpleNamespace(providers={}, jobs={})  # read by the sampler and the short ids
        self.store: JobStore | None = None  # the job store's rows, for short ids
        self.views = {JOB: done_view()}
        self.asked: list[tuple[str, Any]] = []
        self.fail_with: Exception | None = None

    def last_asked(self) -> tuple[str, Any]:
        return self.asked[-1]

    def admit_upload(self, nbytes: int) -> None:
        self.asked.append(("admit_upload", nbytes))

    async def submit(self, spec: JobSpec) -> str:
        self.asked.append(("submit", spec))
        return JOB

    async def submit_many(self, specs: list[JobSpec], wait: float) -> list[dict[str, Any]]:
        self.asked.append(("submit_many", (specs, wait)))
        return [{"job_id": JOB, "state": "done", "error": None, "results": {"c": np.ones((2, 2))}}]

    async def gather(self, job_ids: list[str], wait: float, forget: bool) -> list[dict[str, Any]]:
        self.asked.append(("gather", (job_ids, wait, forget)))
        return [{"job_id": j, "state": "queued", "error": None} for j in job_ids]

    def job_view(self, job_id: str) -> dict[str, Any]:
        if self.fail_with is not None:
            raise self.fail_with
        if job_id not in self.views:
            raise NotFound(f"no job {job_id}")
        copy: dict[str, Any] = json.loads(json.dumps(self.views[job_id]))
        return copy

    def list_jobs(self, state: str | None, limit: int) -> list[dict[str, Any]]:
        self.asked.append(("list_jobs", (state, limit)))
        return [v for v in self.views.values() if state in (None, v["state"])][:limit]

    async def wait(self, job_id: str, timeout: float) -> dict[str, Any]:
        self.asked.append(("wait", (job_id, timeout)))
        return self.job_view(job_id)

    def cancel(self, job_id: str) -> dict[str, Any]:
        raise Conflict(f"job {job_id} is already done")

    async def delete(self, job_id: str) -> None:
        self.job_view(job_id)
        self.asked.append(("delete", job_id))

    def result_file(self, job_id: str, name: str | None) -> Path | np.ndarray:
        self.job_view(job_id)
        path = self.root / "c.npy"
        path.write_bytes(npy(np.zeros((4, 2))))
        return path

    def nodes(self) -> list[dict[str, Any]]:
        return [node_row(time.time())]

    def node_view(self, provider_id: str) -> dict[str, Any]:
        if provider_id != PROVIDER:
            raise NotFound(f"no provider {provider_id}")
        return node_row(time.time())

    def drain(self, provider_id: str, draining: bool = True) -> dict[str, Any]:
        row = self.node_view(provider_id)
        row["state"] = "draining" if draining else "ready"
        return row

    def clear_quarantine(self, provider_id: str) -> dict[str, Any]:
        row = self.node_view(provider_id)
        row["state"] = "ready"
        return row

    def snapshot(self) -> dict[str, Any]:
        now = time.time()
        return {"time": now, "epoch": self.incarnation, "uptime_s": 3.5, "queue": "embedded", "queue_connected": True,
                "nodes": [node_row(now)], "jobs": [], "counters": {"subtasks_completed": 3, "bytes_in": 0},
                "finished": [("matmul", "done", 1.5)]}


@pytest.fixture
def head(tmp_path: Path) -> FakeHead:
    return FakeHead(tmp_path)


@pytest.fixture
def http(head: FakeHead) -> Iterator[TestClient]:
    with TestClient(create_app(head), raise_server_exceptions=False) as client:
        yield client


def spec_routes(http: TestClient) -> list[tuple[str, str]]:
    spec = http.get("/openapi.json").json()
    return [(method.upper(), path) for path, ops in spec["paths"].items() for method in ops]


# ---- what the routes answer -----------------------------------------------------------------------
def test_job_view_passes_through_unchanged(http: TestClient, head: FakeHead) -> None:
    r = http.get(f"/v1/jobs/{JOB}", params={"wait": 2.5})
    assert r.status_code == 200 and head.last_asked() == ("wait", (JOB, 2.5))
    view = done_view()
    assert r.json() == view
    assert list(r.json()) == list(view)  # the keys in the head's order
    assert r.json()["shares"]["local-0"] == 1 and isinstance(r.json()["shares"]["local-0"], int)
    assert json.dumps(r.json()) == json.dumps(view)  # 1 stays 1, never 1.0


def test_extra_keys_are_not_dropped(http: TestClient, head: FakeHead) -> None:
    head.views[JOB] = {**done_view(), "something_new": {"x": 1}}
    assert http.get(f"/v1/jobs/{JOB}").json()["something_new"] == {"x": 1}


def test_short_ids_resolve_to_the_one_match(http: TestClient, head: FakeHead) -> None:
    # live jobs (the head's state) and stored rows (the job store) both count
    other = "a" * 8 + "0" * 24
    head.views[other] = done_view(other)
    head.state.jobs = {JOB: object()}
    head.store = store = JobStore(head.root / "jobs.sqlite3")
    store.insert({"job_id": other, "type": "matmul", "params": {}, "inputs": {}, "outputs": {}, "nodes": None,
                       "created_at": 1.0}, accepted=True)
    r = http.get("/v1/jobs/aaaaaaaaa")
    assert r.status_code == 200 and r.json()["job_id"] == JOB and head.last_asked() == ("wait", (JOB, 0.0))
    assert http.get("/v1/jobs/aaaaaaaa0").json()["job_id"] == other
    r = http.get("/v1/jobs/aaaa/events")
    assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"
    assert JOB in r.json()["error"]["message"] and other in r.json()["error"]["message"]
    assert http.get("/v1/jobs/abcd").status_code == 404  # no match: the head's own 404
    assert http.get("/v1/jobs/aaa").status_code == 404  # too short to be a prefix
    head.state.providers = {PROVIDER: object()}
    r = http.post("/v1/nodes/bbbb/drain")
    assert r.status_code == 200 and r.json()["provider_id"] == PROVIDER


def test_submit_list_filter_cancel_delete(http: TestClient, head: FakeHead) -> None:
    r = http.post("/v1/jobs", json={"type": "matmul", "inputs": {"a": "c" * 32}})
    assert r.status_code == 201 and r.json()["job_id"] == JOB
    assert head.last_asked() == ("submit", JobSpec("matmul", {"a": "c" * 32}, {}, {}, None))
    assert [j["job_id"] for j in http.get("/v1/jobs", params={"state": "done"}).json()] == [JOB]
    assert head.last_asked() == ("list_jobs", ("done", 100))
    assert http.get("/v1/jobs", params={"type": "matmul", "limit": 1}).json()[0]["job_id"] == JOB
    assert head.last_asked() == ("list_jobs", (None, 10_000))  # filtered by type here, then cut to limit
    assert http.get("/v1/jobs", params={"type": "train"}).json() == []
    r = http.post(f"/v1/jobs/{JOB}/cancel")
    assert r.status_code == 409 and r.json() == {"error": {"code": "conflict", "message": f"job {JOB} is already done"}}
    r = http.delete(f"/v1/jobs/{JOB}")
    assert r.status_code == 204 and r.content == b"" and head.last_asked() == ("delete", JOB)


def test_result_and_events(http: TestClient, head: FakeHead) -> None:
    r = http.get(f"/v1/jobs/{JOB}/result")
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    np.testing.assert_array_equal(np.load(io.BytesIO(r.content)), np.zeros((4, 2)))
    head.events.emit("job.accepted", job_id=JOB, type="matmul")
    head.events.emit("job.done", job_id=JOB)
    events = http.get(f"/v1/jobs/{JOB}/events", params={"since": 1}).json()
    assert [(e["seq"], e["kind"], e["job_id"]) for e in events] == [(2, "job.done", JOB)]
    r = http.get(f"/v1/jobs/{'0' * 32}/events")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_blob_upload_and_delete(http: TestClient, head: FakeHead) -> None:
    r = http.put("/v1/blobs", content=npy(np.arange(12.0).reshape(3, 4)))
    assert r.status_code == 201
    body = r.json()
    assert list(body) == ["blob_id", "dtype", "shape", "bytes"]
    assert body["dtype"] == "float64" and body["shape"] == [3, 4] and body["bytes"] == 96
    r = http.put("/v1/blobs", content=b"x" * 10, headers={"content-length": str(2 << 20)})
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
    assert http.delete(f"/v1/blobs/{body['blob_id']}").status_code == 204
    assert http.delete(f"/v1/blobs/{body['blob_id']}").json()["error"]["code"] == "not_found"


def test_nodes_drain_health_info(http: TestClient, head: FakeHead) -> None:
    rows = http.get("/v1/nodes").json()
    assert [r["provider_id"] for r in rows] == [PROVIDER] and list(rows[0]) == list(node_row(0.0))
    assert rows[0]["benchmark_gflops"] == 12 and isinstance(rows[0]["benchmark_gflops"], int)
    assert http.post(f"/v1/nodes/{PROVIDER}/drain").json()["state"] == "draining"
    assert http.post(f"/v1/nodes/{PROVIDER}/undrain").json()["state"] == "ready"
    assert http.get(f"/v1/nodes/{'f' * 32}").status_code == 404
    health = http.get("/v1/health").json()
    assert health["status"] == "ok" and health["epoch"] == head.incarnation and "matmul" in health["task_types"]
    assert http.get("/v1/info").json() == {"epoch": head.incarnation, "state_dir": str(head.root.resolve()),
                                          "fsync": False}


def test_metrics_json_csv_prometheus(http: TestClient) -> None:
    body = http.get("/v1/metrics").json()
    assert body["counters"] == {"subtasks_completed": 3, "bytes_in": 0} and body["jobs"] == []
    assert {"cursor", "series", "shares", "training", "alerts"} <= set(body)
    r = http.get("/v1/metrics.csv")
    assert r.status_code == 200 and r.text.startswith("time,throughput_gflops")
    r = http.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4") and "dcf_up" in r.text


def test_stream_sends_a_full_snapshot_first(http: TestClient, head: FakeHead) -> None:
    head.stopping.set()  # the stream ends after its first message
    r = http.get("/v1/stream")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    first = re.search(r"event: snapshot\ndata: (.*)\n", r.text)
    assert first is not None
    msg = json.loads(first.group(1))
    assert msg["full"] is True and "finished" not in msg["snapshot"] and msg["snapshot"]["finished_count"] == 1


def test_dashboard_and_static_files(http: TestClient) -> None:
    r = http.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert http.get("/static/app.js").status_code == 200
    assert http.get("/static/nope.js").status_code == 404


# ---- errors -----------------------------------------------------------------------------------------
def test_errors_are_one_format(http: TestClient, head: FakeHead) -> None:
    cases = [("GET", "/v1/nope", 404, "not_found"), ("POST", "/v1/health", 405, "method_not_allowed"),
             ("GET", "/v1/jobs?state=DONE", 422, "invalid"), ("GET", "/v1/jobs?limit=0", 422, "invalid"),
             ("POST", "/v1/jobs", 422, "invalid")]
    for method, path, status, code in cases:
        r = http.request(method, path)
        assert r.status_code == status and set(r.json()) == {"error"}, (method, path, r.text)
        assert r.json()["error"]["code"] == code and isinstance(r.json()["error"]["message"], str)
    r = http.post("/v1/jobs", content=b'{"type": ', headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500 and set(r.json()) == {"error"}
    head.fail_with = RuntimeError("a bug")
    r = http.get(f"/v1/jobs/{JOB}")
    assert r.status_code == 500
    assert r.json() == {"error": {"code": "internal", "message": "internal error: RuntimeError"}}


# ---- the token --------------------------------------------------------------------------------------
def test_one_token_check_on_every_route_but_health(tmp_path: Path) -> None:
    head = FakeHead(tmp_path, token=TOKEN)
    head.stopping.set()
    with TestClient(create_app(head), raise_server_exceptions=False) as http:
        routes = spec_routes(http)
        assert len(routes) == len(set(routes)) >= 18
        for method, path in routes:
            concrete = re.sub(r"\{[^}]+\}", JOB, path)
            for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"bearer {TOKEN}"}):
                r = http.request(method, concrete, headers=headers)
                if path == "/v1/health":
                    assert r.status_code == 200
                    continue
                assert r.status_code == 401, (method, path, headers)
                assert r.json() == {"error": {"code": "unauthorized", "message": "missing or wrong bearer token"}}
            good = http.request(method, concrete, headers={"Authorization": f"Bearer {TOKEN}"})
            assert good.status_code != 401, (method, path)
        assert http.get("/v1/metrics", params={"token": TOKEN}).status_code == 401
        assert http.get("/v1/stream", params={"token": "nope"}).status_code == 401
        assert http.get("/v1/stream", params={"token": TOKEN}).status_code == 200
        assert http.get("/").status_code == 200 and http.get("/static/app.js").status_code == 200


def test_health_gives_the_heads_run_id_only_with_the_token(tmp_path: Path) -> None:
    """``/v1/health`` is for anyone (liveness); the epoch, which provider-protocol messages carry, only for
    token holders (issue 14 A8: it was handed to anyone)."""
    head = FakeHead(tmp_path, token=TOKEN)
    with TestClient(create_app(head), raise_server_exceptions=False) as http:
        for headers in ({}, {"Authorization": "Bearer nope"}):
            body = http.get("/v1/health", headers=headers).json()
            assert body["status"] == "ok" and "epoch" not in body and "state_dir" not in body
        body = http.get("/v1/health", headers={"Authorization": f"Bearer {TOKEN}"}).json()
        assert body["epoch"] == head.incarnation


# ---- the schemas ------------------------------------------------------------------------------------
def response_ref(spec: dict[str, Any], path: str, method: str, status: str) -> str:
    schema = spec["paths"][path][method]["responses"][status]["content"]["application/json"]["schema"]
    if schema.get("type") == "array":
        schema = schema["items"]
    return str(schema["$ref"]).rsplit("/", 1)[-1]


def test_openapi_documents_every_json_response(http: TestClient) -> None:
    spec = http.get("/openapi.json").json()
    expected = {
        ("/v1/jobs", "post", "201"): "JobView", ("/v1/jobs", "get", "200"): "JobView",
        ("/v1/jobs/{job_id}", "get", "200"): "JobView", ("/v1/jobs/{job_id}/cancel", "post", "200"): "JobView",
        ("/v1/jobs/{job_id}/events", "get", "200"): "Event", ("/v1/nodes", "get", "200"): "NodeView",
        ("/v1/nodes/{provider_id}", "get", "200"): "NodeView",
        ("/v1/nodes/{provider_id}/drain", "post", "200"): "NodeView",
        ("/v1/health", "get", "200"): "Health", ("/v1/info", "get", "200"): "Info",
        ("/v1/metrics", "get", "200"): "MetricsView", ("/v1/blobs", "put", "201"): "BlobInfo",
        ("/v1/blobs/adopt", "post", "201"): "BlobInfo",
        ("/v1/jobs/{job_id}", "get", "404"): "ErrorBody", ("/v1/jobs", "get", "422"): "ErrorBody",
        ("/v1/nodes", "get", "401"): "ErrorBody",
    }
    for (path, method, status), model in expected.items():
        assert response_ref(spec, path, method, status) == model, (path, method, status)
    schemas = spec["components"]["schemas"]
    assert "HTTPValidationError" not in schemas  # 422 answers are ErrorBody, as they really are
    assert set(schemas["JobView"]["required"]) == {
        "job_id", "type", "state", "params", "inputs", "outputs", "nodes", "created_at", "started_at",
        "finished_at", "error", "waiting", "progress", "shares", "stats"}
    assert schemas["JobState"]["enum"] == [s.value for s in JobState]
    assert "binary" in json.dumps(spec["paths"]["/v1/blobs"]["put"]["requestBody"])


# ---- the batch API (msgpack) ----------------------------------------------------------------------
MSGPACK = {"content-type": "application/msgpack"}


def test_the_token_is_optional_in_openapi_without_one(http: TestClient, tmp_path: Path) -> None:
    spec = http.get("/openapi.json").json()
    assert {} in spec["paths"]["/v1/jobs"]["post"]["security"]
    with TestClient(create_app(FakeHead(tmp_path, TOKEN))) as guarded:
        assert {} not in guarded.get("/openapi.json").json()["paths"]["/v1/jobs"]["post"]["security"]


def test_batch_submit_decodes_inline_operands_and_replies_in_msgpack(http: TestClient, head: FakeHead) -> None:
    a = np.arange(6.0).reshape(2, 3)
    body = batch.encode_batch_request([{"type": "matmul", "inputs": {"a": a, "b": "c" * 32}, "nodes": 2}], wait=5)
    r = http.post("/v1/jobs/batch", content=body, headers=MSGPACK)
    assert r.status_code == 200 and r.headers["content-type"] == "application/msgpack"
    [outcome] = batch.decode_outcomes(r.content)
    assert outcome["job_id"] == JOB and outcome["state"] == "done"
    np.testing.assert_array_equal(outcome["results"]["c"], np.ones((2, 2)))
    kind, (specs, wait) = head.last_asked()
    assert kind == "submit_many" and wait == 5.0
    np.testing.assert_array_equal(specs[0].inline["a"], a)
    assert specs[0].blobs == {"b": "c" * 32} and specs[0].nodes == 2


def test_batch_limits_are_named_and_nothing_is_submitted(http: TestClient, head: FakeHead) -> None:
    tiny = {"type": "matmul", "inputs": {"a": np.ones((1, 1))}}
    too_many = batch.encode_batch_request([tiny] * (batch.MAX_BATCH_JOBS + 1))
    r = http.post("/v1/jobs/batch", content=too_many, headers=MSGPACK)
    assert r.status_code == 413 and str(batch.MAX_BATCH_JOBS) in r.json()["error"]["message"]
    big = batch.encode_batch_request([tiny, {"type": "matmul", "inputs": {"a": np.ones(batch.MAX_INLINE_BYTES)}}])
    r = http.post("/v1/jobs/batch", content=big, headers=MSGPACK)
    assert r.status_code == 413 and "jobs[1]" in r.json()["error"]["message"]
    r = http.post("/v1/jobs/batch", content=b"\x93" * 4, headers=MSGPACK)
    assert r.status_code == 400
    r = http.post("/v1/jobs/batch", content=batch.encode_batch_request([tiny], wait=600), headers=MSGPACK)
    assert r.status_code == 422 and "wait" in r.json()["error"]["message"]
    bad = batch._pack({"v": 1, "jobs": [{"type": "matmul", "inputs": {"a": {"dtype": "float64", "shape": [2, 2],
                                                                             "data": b"x" * 31}}}]})
    r = http.post("/v1/jobs/batch", content=bad, headers=MSGPACK)
    assert r.status_code == 400 and "32" in r.json()["error"]["message"]
    assert not [a for a in head.asked if a[0] == "submit_many"]


def test_gather_passes_ids_wait_and_forget(http: TestClient, head: FakeHead) -> None:
    r = http.post("/v1/jobs/gather", content=batch.encode_gather_request([JOB], 2.5, forget=True), headers=MSGPACK)
    assert r.status_code == 200
    assert batch.decode_outcomes(r.content) == [{"job_id": JOB, "state": "queued", "error": None}]
    assert head.last_asked() == ("gather", ([JOB], 2.5, True))
    r = http.post("/v1/jobs/gather", content=batch.encode_gather_request(["nope"]), headers=MSGPACK)
    assert r.status_code == 400
