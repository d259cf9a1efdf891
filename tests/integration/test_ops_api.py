"""Operations API with real processes: Prometheus /metrics, /v1/metrics (JSON and CSV), job
events, node detail and drain, the SSE stream, and the bearer token on every route."""

from __future__ import annotations

import csv
import io
import json
import math
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from tests.promtext import parse_prometheus, value
from user_client import Client
from user_client.local import LocalCluster

pytestmark = pytest.mark.integration

def scrape(url: str, **kw: Any) -> tuple[dict[str, str], dict[tuple[str, frozenset[tuple[str, str]]], float]]:
    r = httpx.get(url + "/metrics", timeout=10, **kw)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse_prometheus(r.text)


def matmul(client: Client, n: int = 300, seed: int = 0) -> tuple[str, dict[str, Any]]:
    rng = np.random.default_rng(seed)
    job = client.submit_matmul(rng.standard_normal((n, n)), rng.standard_normal((n, n)))
    view = client.wait(job, timeout=60)
    assert view["state"] == "done", view
    return job, view


def wait_for(pred: Any, timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = pred()
        if got:
            return got
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def sse(resp: httpx.Response) -> Iterator[tuple[str, Any]]:
    """(event name, decoded data) of a text/event-stream response, as they arrive."""
    name, data = "message", list[str]()
    for line in resp.iter_lines():
        if line == "":
            if data:
                yield name, json.loads("\n".join(data))
            name, data = "message", list[str]()
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())


# ---- Prometheus -------------------------------------------------------------------------------
def test_prometheus_metrics_parse_and_grow(cluster: LocalCluster, client: Client) -> None:
    types, before = scrape(cluster.url)
    for name, kind in {
        "dcf_providers": "gauge", "dcf_subtasks_dispatched_total": "counter",
        "dcf_subtasks_completed_total": "counter", "dcf_subtasks_failed_total": "counter",
        "dcf_subtasks_retried_total": "counter", "dcf_results_ignored_total": "counter",
        "dcf_providers_lost_total": "counter", "dcf_bytes_in_total": "counter", "dcf_bytes_out_total": "counter",
        "dcf_provider_heartbeat_lag_seconds": "gauge", "dcf_jobs": "gauge",
        "dcf_job_duration_seconds": "histogram", "dcf_cluster_throughput_gflops": "gauge",
    }.items():
        assert types.get(name) == kind, name
    assert value(before, "dcf_providers", state="ready") == 2
    assert value(before, "dcf_providers", state="dead") == 0
    lags = [v for (n, _), v in before.items() if n == "dcf_provider_heartbeat_lag_seconds"]
    assert len(lags) == 2 and all(0 <= lag < 5 for lag in lags)

    matmul(client, 200)
    _, after = scrape(cluster.url)
    assert value(after, "dcf_subtasks_completed_total") > value(before, "dcf_subtasks_completed_total")
    assert value(after, "dcf_subtasks_dispatched_total") >= value(after, "dcf_subtasks_completed_total")
    assert value(after, "dcf_jobs", state="done") >= 1
    count = value(after, "dcf_job_duration_seconds_count", type="matmul", state="done")
    assert count >= 1
    assert value(after, "dcf_job_duration_seconds_bucket", type="matmul", state="done", le="+Inf") == count
    assert value(after, "dcf_job_duration_seconds_sum", type="matmul", state="done") > 0
    buckets = sorted(((float(dict(ls)["le"]), v) for (n, ls), v in after.items()
                      if n == "dcf_job_duration_seconds_bucket" and ("type", "matmul") in ls
                      and ("state", "done") in ls), key=lambda b: b[0])
    assert [v for _, v in buckets] == sorted(v for _, v in buckets), "histogram buckets must be cumulative"
    assert buckets[-1][0] == math.inf


def test_prometheus_counts_failed_jobs() -> None:
    # a finished job leaves the head's live state once its outcome is stored: the counts must not
    # come from there (dcf_jobs{state="failed"} stayed 0 after a failure)
    plugin = ["--plugins", "tests.plugins.buggy"]
    with LocalCluster(1, heartbeat=0.5, threads=1, head_args=plugin, provider_args=plugin) as cl, \
            Client(cl.url) as c:
        _, before = scrape(cl.url)
        assert value(before, "dcf_jobs", state="failed") == 0
        x = c.upload(np.ones((2, 3)))["blob_id"]
        failed = c.submit("buggy", {"x": x}, {"bug": "merge"})
        assert c.status(failed, wait=30)["state"] == "failed"
        good = c.submit("buggy", {"x": x}, {"bug": "none"})
        assert c.wait(good, timeout=30)["state"] == "done"
        types, after = scrape(cl.url)  # counted as the job's end event happened
        assert types["dcf_jobs_finished_total"] == "counter"
        assert value(after, "dcf_jobs", state="failed") == 1
        assert value(after, "dcf_jobs_finished_total", type="buggy", state="failed") == 1
        assert value(after, "dcf_job_duration_seconds_count", type="buggy", state="failed") == 1
        assert value(after, "dcf_jobs", state="done") == 1


# ---- JSON and CSV -----------------------------------------------------------------------------
def test_metrics_json_and_csv(cluster: LocalCluster, client: Client) -> None:
    matmul(client, 500, seed=1)  # 0.25 GFLOP: shows in the next sample

    def has_throughput() -> dict[str, Any] | None:
        body = httpx.get(cluster.url + "/v1/metrics", timeout=10).json()
        return body if any(v > 0 for v in body["series"]["throughput_gflops"]) else None

    body = wait_for(has_throughput, 10, "a sample with throughput")
    assert {"subtasks_completed", "bytes_in", "bytes_out"} <= set(body["counters"])
    series = body["series"]
    n = len(series["t"])
    assert n >= 1 and len(series["throughput_gflops"]) == n
    assert series["t"] == sorted(series["t"])
    names = {p["name"] for p in series["providers"].values()}
    assert names == {"local-0", "local-1"}
    for col in series["providers"].values():
        assert len(col["gflops"]) == n
    shares = body["shares"]
    assert {s["name"] for s in shares} == {"local-0", "local-1"}
    assert abs(sum(s["share"] for s in shares) - 1.0) < 1e-3

    def both_worked() -> list[dict[str, Any]] | None:
        # the scheduler may give one job's subtasks to one provider: another job, until both have
        got = httpx.get(cluster.url + "/v1/metrics", timeout=10).json()["shares"]
        if all(s["flops_done"] > 0 for s in got):
            return got
        matmul(client, 500, seed=2)
        return None

    shares = wait_for(both_worked, 60, "work done by both providers")
    assert abs(sum(s["share"] for s in shares) - 1.0) < 1e-3
    assert body["training"] == {} and isinstance(body["alerts"], list)

    r = httpx.get(cluster.url + "/v1/metrics.csv", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(r.text)))
    assert rows[0][:2] == ["time", "throughput_gflops"]
    assert sorted(rows[0][2:]) == ["local-0_gflops", "local-1_gflops"]
    assert len(rows) >= 2 and all(len(row) == len(rows[0]) for row in rows)
    assert any(float(row[1]) > 0 for row in rows[1:])
    for row in rows[1:]:
        float(row[0])
        assert all(cell == "" or float(cell) >= 0 for cell in row[1:])


# ---- jobs and nodes ---------------------------------------------------------------------------
def test_job_events(cluster: LocalCluster, client: Client) -> None:
    job, _ = matmul(client, 200, seed=2)
    events = httpx.get(f"{cluster.url}/v1/jobs/{job}/events", timeout=10).json()
    kinds = [e["kind"] for e in events]
    for kind in ("job.accepted", "job.started", "job.done"):
        assert kind in kinds, kinds
    # (the embedded queue delivers inside publish, so job.started can come before job.accepted)
    assert max(kinds.index("job.accepted"), kinds.index("job.started")) < kinds.index("job.done")
    assert all(e["job_id"] == job for e in events)
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs)
    later = httpx.get(f"{cluster.url}/v1/jobs/{job}/events", params={"since": seqs[-2]}, timeout=10).json()
    assert [e["seq"] for e in later] == seqs[-1:]
    r = httpx.get(f"{cluster.url}/v1/jobs/{'0' * 32}/events", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_jobs_type_filter(cluster: LocalCluster, client: Client) -> None:
    job, _ = matmul(client, 50, seed=3)
    got = httpx.get(cluster.url + "/v1/jobs", params={"type": "matmul", "limit": 5}, timeout=10).json()
    assert 1 <= len(got) <= 5 and all(j["type"] == "matmul" for j in got) and got[0]["job_id"] == job
    assert httpx.get(cluster.url + "/v1/jobs", params={"type": "nope"}, timeout=10).json() == []
    done = httpx.get(cluster.url + "/v1/jobs", params={"type": "matmul", "state": "done"}, timeout=10).json()
    assert done and all(j["state"] == "done" for j in done)
    r = httpx.get(cluster.url + "/v1/jobs", params={"state": "bogus"}, timeout=10)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid"


def test_node_detail_drain_undrain(cluster: LocalCluster, client: Client) -> None:
    nodes = sorted(client.nodes(), key=lambda n: n["name"])
    target, other = nodes
    r = httpx.get(f"{cluster.url}/v1/nodes/{target['provider_id']}", timeout=10)
    assert r.status_code == 200
    detail = r.json()
    assert detail["provider_id"] == target["provider_id"] and detail["name"] == target["name"]
    assert detail["state"] == "ready" and {"device", "os", "gflops", "assigned", "last_heartbeat_s"} <= set(detail)
    r = httpx.get(f"{cluster.url}/v1/nodes/{'f' * 32}", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert httpx.post(f"{cluster.url}/v1/nodes/{'f' * 32}/drain", timeout=10).status_code == 404

    r = httpx.post(f"{cluster.url}/v1/nodes/{target['provider_id']}/drain", timeout=10)
    try:
        assert r.status_code == 200 and r.json()["state"] == "draining"
        _, samples = scrape(cluster.url)
        assert value(samples, "dcf_providers", state="draining") == 1
        _, view = matmul(client, 600, seed=4)
        assert set(view["shares"]) == {other["name"]}, view["shares"]
        events = httpx.get(f"{cluster.url}/v1/jobs/{view['job_id']}/events", timeout=10).json()
        # a one-subtask job's progress is its job.done; a longer one's job.progress names who did the work
        assert {e.get("provider_id") for e in events if e["kind"] == "job.progress"} <= {other["provider_id"]}
    finally:
        r = httpx.post(f"{cluster.url}/v1/nodes/{target['provider_id']}/undrain", timeout=10)
    assert r.status_code == 200 and r.json()["state"] == "ready"
    _, view = matmul(client, 600, seed=5)
    assert set(view["shares"]) == {target["name"], other["name"]}


# ---- SSE --------------------------------------------------------------------------------------
def test_stream_snapshot_then_job_events(cluster: LocalCluster, client: Client) -> None:
    got: dict[str, Any] = {}
    with httpx.stream("GET", cluster.url + "/v1/stream", timeout=httpx.Timeout(10.0)) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = sse(resp)
        name, first = next(events)
        assert name == "snapshot" and first["full"] is True
        assert {n["name"] for n in first["snapshot"]["nodes"]} == {"local-0", "local-1"}
        assert "counters" in first["snapshot"] and "series" in first["observe"]
        assert "finished" not in first["snapshot"]
        seqs = [e["seq"] for e in first["recent_events"]]
        assert seqs == sorted(set(seqs))

        rng = np.random.default_rng(6)
        job = client.submit_matmul(rng.standard_normal((100, 20)), rng.standard_normal((20, 10)))
        end = time.monotonic() + 30
        for name, data in events:
            assert time.monotonic() < end, "no job.done on the stream in time"
            if name == "snapshot":
                assert data["full"] is False
                got["snapshots"] = got.get("snapshots", 0) + 1
            elif name == "event":
                assert data["seq"] > (seqs[-1] if seqs else 0), "each event once, in the head's order"
                seqs.append(data["seq"])
            if name == "event" and data.get("job_id") == job:
                got.setdefault("kinds", []).append(data["kind"])
                if data["kind"] == "job.done":
                    break
    assert {"job.accepted", "job.started", "job.done"} <= set(got["kinds"]), got["kinds"]
    # the stream's subscriber is removed once the client has gone
    wait_for(lambda: value(scrape(cluster.url)[1], "dcf_event_subscribers") == 0, 10,
             "the stream's subscriber to be removed")


def test_stream_snapshots_every_period(cluster: LocalCluster) -> None:
    t0 = time.monotonic()
    with httpx.stream("GET", cluster.url + "/v1/stream", params={"period": 0.3}, timeout=10.0) as resp:
        events = sse(resp)
        snapshots: list[dict[str, Any]] = []
        for name, data in events:
            if name == "snapshot":
                snapshots.append(data)
                if len(snapshots) == 4:
                    break
    assert time.monotonic() - t0 < 5
    assert [s["full"] for s in snapshots] == [True, False, False, False]
    assert all("cursor" in s["observe"] and "recent_jobs" in s for s in snapshots)


# ---- dashboard assets and auth ----------------------------------------------------------------
def test_dashboard_page_and_static_files(cluster: LocalCluster) -> None:
    r = httpx.get(cluster.url + "/", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert "/static/app.js" in page and "/static/vendor/uPlot.iife.min.js" in page
    for path in re.findall(r'(?:src|href)="(/static/[^"]+)"', page):
        assert httpx.get(cluster.url + path, timeout=10).status_code == 200, path
    # no request leaves the machine: no absolute URLs in what the page loads
    for path in ["/", "/static/app.js", "/static/style.css"]:
        text = httpx.get(cluster.url + path, timeout=10).text
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text), path
        assert "fetch(\"http" not in text and "cdn" not in text.lower(), path
    assert httpx.get(cluster.url + "/static/nope.js", timeout=10).status_code == 404


def test_token_on_every_route() -> None:
    cl = LocalCluster(0, heartbeat=0.5, threads=1, head_args=["--api-token", "s3cret"])
    try:
        cl.start_head()
        url = cl.url
        good = {"Authorization": "Bearer s3cret"}
        bad = {"Authorization": "Bearer nope"}
        spec = httpx.get(url + "/openapi.json", timeout=10).json()
        routes = [(method.upper(), path) for path, ops in spec["paths"].items() for method in ops]
        assert ("GET", "/metrics") in routes and ("GET", "/v1/stream") in routes
        assert ("POST", "/v1/nodes/{provider_id}/drain") in routes
        dummy = "0" * 32
        checked = 0
        for method, path in routes:
            if path == "/v1/health":
                continue
            concrete = re.sub(r"\{[^}]+\}", dummy, path)
            for headers in ({}, bad):
                r = httpx.request(method, url + concrete, headers=headers, timeout=10)
                assert r.status_code == 401, (method, path, r.status_code)
                assert r.json()["error"]["code"] == "unauthorized"
            checked += 1
            if path == "/v1/stream":
                continue  # never ends: checked below with a streaming read
            r = httpx.request(method, url + concrete, headers=good, timeout=10)
            assert r.status_code != 401, (method, path)
        assert checked >= 15

        for path in ["/metrics", "/v1/metrics", "/v1/metrics.csv", "/v1/jobs", "/v1/nodes", "/v1/info"]:
            assert httpx.get(url + path, headers=good, timeout=10).status_code == 200, path
        # the token in the query string counts for the event stream only
        assert httpx.get(url + "/v1/metrics", params={"token": "s3cret"}, timeout=10).status_code == 401
        assert httpx.get(url + "/v1/stream", params={"token": "nope"}, timeout=10).status_code == 401
        by_header: list[tuple[dict[str, str] | None, dict[str, str] | None]] = [(good, None),
                                                                                 (None, {"token": "s3cret"})]
        for auth_headers, auth_params in by_header:
            with httpx.stream("GET", url + "/v1/stream", timeout=10, headers=auth_headers,
                              params=auth_params) as resp:
                assert resp.status_code == 200
                name, first = next(sse(resp))
                assert name == "snapshot" and first["full"] is True
        # the page and its static files load without a token; the page then asks for one
        assert httpx.get(url + "/", timeout=10).status_code == 200
        assert httpx.get(url + "/", params={"token": "s3cret"}, timeout=10).status_code == 200
        assert httpx.get(url + "/static/app.js", timeout=10).status_code == 200
        assert httpx.get(url + "/v1/health", timeout=10).status_code == 200
    finally:
        cl.stop()
