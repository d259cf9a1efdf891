"""Fuzzing the head's REST API: property-based with schemathesis against the live head's
``/openapi.json`` (every operation but the endless ``/v1/stream``, positive and negative data,
then the GET and action routes again with real ids), plus hand-written hostile requests: a huge
declared Content-Length, 10 MB of garbage, deeply nested JSON, unicode and path traversal in ids,
negative and huge query parameters.

Checked everywhere: no 5xx, every error is JSON ``{"error": {"code", "message"}}`` (README), the
responses conform to the schema where schemathesis can check it, and the head stays alive.

schemathesis is a test dependency (``pip install 'schemathesis>=4.32'``); without it the
schemathesis test is skipped, except under CI=true where it fails.
"""

from __future__ import annotations

import io
import json
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from tests.conftest import IN_CI
from user_client import Client
from user_client.local import LocalCluster

try:
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import not_a_server_error
    from schemathesis.core.failures import FailureGroup
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_schema_conformance,
    )
except ImportError as exc:  # pragma: no cover - depends on the environment
    schemathesis = None  # type: ignore[assignment]
    SCHEMATHESIS_MISSING = f"schemathesis is not installed ({exc}); pip install 'schemathesis>=4.32'"
else:
    SCHEMATHESIS_MISSING = ""

pytestmark = pytest.mark.integration

MAX_EXAMPLES = int(os.environ.get("DCF_FUZZ_EXAMPLES", "25"))
#: what the pre-handler layers of FastAPI/Starlette answer in their own format: a route that does not
#: match (404), a method it has not (405), a body that is not decodable JSON (400). Tolerated by the
#: fuzzers here, checked by test_framework_errors_use_the_error_format.
FRAMEWORK_DETAILS = {(404, "Not Found"), (405, "Method Not Allowed"), (400, "There was an error parsing the body")}


# ---- helpers --------------------------------------------------------------------------------------
def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


def _error_problem(status: int, body: bytes, tolerate_framework: bool = True) -> str | None:
    """None if this response is fine; else what is wrong with it."""
    if status >= 500:
        return f"server error {status}: {body[:200]!r}"
    if status < 400:
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return f"{status} error body is not JSON: {body[:200]!r}"
    if tolerate_framework and isinstance(data, dict) and (status, data.get("detail")) in FRAMEWORK_DETAILS:
        return None
    err = data.get("error") if isinstance(data, dict) else None
    if (not isinstance(err, dict) or set(data) != {"error"} or not isinstance(err.get("code"), str)
            or not isinstance(err.get("message"), str) or not err["code"]):
        return f"{status} error body is not {{'error': {{'code', 'message'}}}}: {body[:200]!r}"
    return None


def _raw(port: int, request: bytes, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are (no client-side normalisation of the path or the headers) and read the
    whole response; the request should carry ``Connection: close``."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                chunk = s.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                headers = _headers(head)
                length = headers.get("content-length")
                if length is not None and len(body) >= int(length):
                    break
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, _headers(head), body


def _headers(head: bytes) -> dict[str, str]:
    out = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        out[name.decode("latin-1").strip().lower()] = value.decode("latin-1").strip()
    return out


def _assert_alive(cluster: LocalCluster) -> None:
    assert cluster.head is not None and cluster.head.poll() is None, "the head process died"
    r = httpx.get(cluster.url + "/v1/health", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok"


@pytest.fixture(scope="module")
def seeded(cluster: LocalCluster) -> dict[str, Any]:
    """Real ids to aim at: a finished matmul job, a blob, a provider."""
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((40, 30)), rng.standard_normal((30, 20))
    with Client(cluster.url) as c:
        job = c.submit_matmul(a, b)
        c.wait(job, timeout=60)
        np.testing.assert_allclose(c.result(job), a @ b, rtol=1e-12, atol=1e-12)
        blob = c.upload(np.arange(12.0).reshape(3, 4))["blob_id"]
        providers = sorted(n["provider_id"] for n in c.nodes())
    return {"job_id": job, "blob_id": blob, "provider_id": providers[0], "providers": providers, "c": a @ b}


@pytest.fixture
def http(cluster: LocalCluster) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=cluster.url, timeout=30, trust_env=False) as c:
        yield c
    _assert_alive(cluster)


# ---- schemathesis ---------------------------------------------------------------------------------
def _schema(cluster: LocalCluster) -> Any:
    if schemathesis is None:
        if IN_CI:
            pytest.fail(SCHEMATHESIS_MISSING + " (CI=true: the fuzz tests must run)")
        pytest.skip(SCHEMATHESIS_MISSING)
    _msgpack_bodies()
    return schemathesis.openapi.from_url(cluster.url + "/openapi.json")


def _msgpack_bodies() -> None:
    """The batch routes take msgpack (documented as a binary body): the generated bytes go as they are,
    which fuzzes the batch decoder with garbage; anything else generated is packed first."""
    import msgpack

    @schemathesis.serializer("application/msgpack")
    def pack(ctx: Any, value: Any) -> bytes:
        if isinstance(value, bytes | bytearray):
            return bytes(value)
        try:
            return bytes(msgpack.packb(value, use_bin_type=True))
        except (TypeError, ValueError):
            return repr(value).encode()


def _fuzz_operation(op: Any, mode: Any, url: str, failures: list[str], stats: dict[str, int],
                    path_parameters: dict[str, Any] | None = None) -> None:
    checks = [not_a_server_error, response_schema_conformance, content_type_conformance]
    if (op.method.upper(), op.path) == ("GET", "/v1/jobs/{job_id}/result"):
        checks = [not_a_server_error]  # a .npy file, documented as JSON: test_result_content_type_is_documented
    if mode == schemathesis.GenerationMode.NEGATIVE:
        checks.append(negative_data_rejection)
    label = f"{op.method.upper()} {op.path} [{mode.value}{', real ids' if path_parameters else ''}]"

    import requests  # schemathesis' transport

    session = requests.Session()

    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=op.as_strategy(generation_mode=mode, path_parameters=path_parameters))
    def run(case: Any) -> None:
        response = case.call(base_url=url, session=session, timeout=30)
        stats["calls"] += 1
        stats[f"{response.status_code // 100}xx"] = stats.get(f"{response.status_code // 100}xx", 0) + 1
        problem = _error_problem(response.status_code, response.content)
        if problem:
            failures.append(f"{label}: {problem}\n    {case.as_curl_command()}")
        try:
            case.validate_response(response, checks=checks)
        except FailureGroup as group:
            for failure in group.exceptions:
                failures.append(f"{label}: {getattr(failure, 'title', type(failure).__name__)}: "
                                f"{str(failure)[:300]}\n    {case.as_curl_command()}")

    try:
        run()
    except Unsatisfiable:
        stats["unsatisfiable"] = stats.get("unsatisfiable", 0) + 1  # e.g. no negative data for a bare GET
    finally:
        session.close()


def test_schemathesis_every_operation(cluster: LocalCluster, seeded: dict[str, Any]) -> None:
    schema = _schema(cluster)
    failures: list[str] = []
    stats = {"calls": 0}
    covered = set()
    for result in schema.get_all_operations():
        op = result.ok()
        if op.path == "/v1/stream":  # never ends by itself
            continue
        covered.add((op.method.upper(), op.path))
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            _fuzz_operation(op, mode, cluster.url, failures, stats)
        _assert_alive(cluster)
    assert {("GET", "/v1/health"), ("PUT", "/v1/blobs"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs/{job_id}"),
            ("DELETE", "/v1/jobs/{job_id}"), ("GET", "/v1/nodes/{provider_id}")} <= covered
    assert stats["calls"] >= 10 * len(covered), stats
    assert not failures, f"{len(failures)} problems ({stats}):\n" + "\n".join(failures[:30])


def test_schemathesis_with_real_ids(cluster: LocalCluster, seeded: dict[str, Any]) -> None:
    """The id routes again, aimed at a finished job and a live provider, so that their 200 answers
    are checked against the schema too (random ids only ever get 404)."""
    schema = _schema(cluster)
    failures: list[str] = []
    stats = {"calls": 0}
    ids = {"job_id": seeded["job_id"], "provider_id": seeded["provider_id"]}
    try:
        for result in schema.get_all_operations():
            op = result.ok()
            names = {p.name for p in op.path_parameters}
            if not names or not names <= set(ids) or op.method.upper() == "DELETE":
                continue  # (deleting the job would leave nothing to aim at)
            path_parameters = {n: ids[n] for n in names}
            _fuzz_operation(op, schemathesis.GenerationMode.POSITIVE, cluster.url, failures, stats,
                            path_parameters=path_parameters)
    finally:
        httpx.post(f"{cluster.url}/v1/nodes/{seeded['provider_id']}/undrain", timeout=10)
    assert stats.get("2xx", 0) >= 10, stats
    assert not failures, f"{len(failures)} problems ({stats}):\n" + "\n".join(failures[:30])
    with Client(cluster.url) as c:
        assert sorted(n["provider_id"] for n in c.nodes() if n["state"] == "ready") == seeded["providers"]
        np.testing.assert_allclose(c.result(seeded["job_id"]), seeded["c"], rtol=1e-12, atol=1e-12)
    _assert_alive(cluster)


# ---- hand-written hostile requests ------------------------------------------------------------------
def _part_files(cluster: LocalCluster) -> list[str]:
    return sorted(p.name for p in (cluster.state_dir / "blobs").glob(".*.part"))


def _put_declaring(cluster: LocalCluster, declared: int) -> tuple[int, bytes]:
    request = (f"PUT /v1/blobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
               f"Content-Length: {declared}\r\nConnection: close\r\n\r\n").encode() + b"\x93NUMPY"
    status, _, body = _raw(cluster.http_port, request)
    return status, body


def test_huge_declared_content_length_is_refused(cluster: LocalCluster) -> None:
    """A Content-Length over --max-upload-bytes (8 GiB) is refused before a byte is stored."""
    for declared in (8 * 2**30 + 1, 99_999_999_999_999):
        status, body = _put_declaring(cluster, declared)
        assert 400 <= status < 500, (declared, status, body[:200])
        assert json.loads(body)["error"]["code"] == "too_large"
    status, body = _put_declaring(cluster, 2**64)  # not even an integer the HTTP parser takes
    assert 400 <= status < 500, (status, body[:200])
    # a valid .npy header that declares 8 TB, then a few bytes: refused as soon as the header is read
    huge = _npy(np.zeros((1, 1)))
    header = huge[: huge.index(b"\n") + 1].replace(b"(1, 1)", b"(1000000, 1000000)")
    r = httpx.put(cluster.url + "/v1/blobs", content=header + b"\0" * 64, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large", r.text
    assert _part_files(cluster) == []
    _assert_alive(cluster)


def test_huge_declared_content_length_is_413(cluster: LocalCluster) -> None:
    status, body = _put_declaring(cluster, 99_999_999_999_999)
    assert status == 413, (status, body[:200])


def test_garbage_bodies_of_10_mb(cluster: LocalCluster, http: httpx.Client) -> None:
    rng = np.random.default_rng(11)
    garbage = rng.bytes(10 * 2**20)
    text = bytes(rng.integers(0x20, 0x7F, 10 * 2**20, dtype=np.uint8))  # printable, not JSON
    cases = [
        ("PUT", "/v1/blobs", garbage, {"content-type": "application/octet-stream"}),
        ("PUT", "/v1/blobs", b"\x93NUMPY\x01\x00" + garbage, {}),
        ("PUT", "/v1/blobs", _npy(np.zeros((4, 4))) + garbage, {}),  # a valid array, then 10 MB too many
        ("PUT", "/v1/blobs", _npy(np.zeros((512, 512)))[:-1], {}),  # truncated by one byte
        ("POST", "/v1/jobs", text, {"content-type": "application/json"}),
        ("POST", "/v1/jobs", b'{"type": "matmul", "params": "' + text + b'"}', {"content-type": "application/json"}),
        ("POST", "/v1/blobs/adopt", text, {"content-type": "application/json"}),
        ("POST", "/v1/jobs", text, {"content-type": "text/plain"}),
    ]
    for method, path, body, headers in cases:
        r = http.request(method, path, content=body, headers=headers)
        assert 400 <= r.status_code < 500, (method, path, r.status_code, r.text[:200])
        assert _error_problem(r.status_code, r.content, tolerate_framework=False) is None, (method, path, r.text[:200])
    assert _part_files(cluster) == []


def test_deeply_nested_json_is_refused_not_fatal(cluster: LocalCluster, http: httpx.Client,
                                                 seeded: dict[str, Any]) -> None:
    for depth in (1_000, 100_000):  # past the JSON parser's recursion limit
        for opener, closer in (("[", "]"), ('{"a":', "}")):
            body = '{"type":"matmul","params":{"x":' + opener * depth + "1" + closer * depth + "}}"
            r = http.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
            assert 400 <= r.status_code < 500, (depth, r.status_code, r.text[:200])
    # nested, but valid JSON of moderate depth and no inputs: a plain validation error
    spec = {"type": "matmul", "inputs": {}, "params": {"x": json.loads("[" * 100 + "]" * 100)}}
    r = http.post("/v1/jobs", json=spec)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid"
    assert http.get("/v1/jobs").status_code == 200


def test_deeply_nested_params_do_not_poison_the_job_list() -> None:
    with LocalCluster(0, heartbeat=0.5, threads=1) as cl, httpx.Client(base_url=cl.url, timeout=30) as http:
        blob = http.put("/v1/blobs", content=_npy(np.ones((2, 2)))).json()["blob_id"]
        nested = "[" * 300 + "1" + "]" * 300
        body = f'{{"type":"matmul","inputs":{{"a":"{blob}","b":"{blob}"}},"params":{{"x":{nested}}}}}'
        r = http.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
        assert r.status_code in (201, 422), (r.status_code, r.text[:200])
        listed = http.get("/v1/jobs")
        assert listed.status_code == 200, listed.text[:200]
        for job in listed.json():
            assert http.get(f"/v1/jobs/{job['job_id']}").status_code == 200


ODD_IDS = ["✓", "日本語", "\u202eabc", "😀" * 8, "A" * 32, "a" * 31, "a" * 33, "a" * 32 + " ", "%00", "%0a", "%ff",
           "..", "...", "%2e%2e", "..%5c..%5cjobs.sqlite3", ".dcf-head", "jobs.sqlite3", "-1", "0" * 10_000]


def test_unicode_and_odd_ids(cluster: LocalCluster, http: httpx.Client, seeded: dict[str, Any]) -> None:
    routes = [("GET", "/v1/jobs/{}"), ("GET", "/v1/jobs/{}/result"), ("GET", "/v1/jobs/{}/events"),
              ("POST", "/v1/jobs/{}/cancel"), ("DELETE", "/v1/jobs/{}"), ("DELETE", "/v1/blobs/{}"),
              ("GET", "/v1/nodes/{}"), ("POST", "/v1/nodes/{}/drain"), ("POST", "/v1/nodes/{}/undrain")]
    for odd in ODD_IDS:
        for method, route in routes:
            r = http.request(method, route.format(odd))
            assert r.status_code in (400, 404, 422), (method, route, odd, r.status_code, r.text[:200])
            assert _error_problem(r.status_code, r.content) is None, (method, route, odd, r.text[:200])
    for name in ("✓", "../c", "..", ".c.npy", "c.npy", "%00", "x" * 64):
        r = http.get(f"/v1/jobs/{seeded['job_id']}/result", params={"name": name})
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (name, r.text[:200])
    assert http.get("/v1/jobs", params={"type": "✓" * 64}).json() == []
    assert http.get(f"/v1/jobs/{seeded['job_id']}").json()["state"] == "done"


def test_path_traversal_in_ids(cluster: LocalCluster, seeded: dict[str, Any]) -> None:
    """Raw request targets (no client-side dot-segment removal): nothing outside the API answers,
    nothing is deleted, nothing of the state dir is served."""
    sqlite = cluster.state_dir / "jobs.sqlite3"
    blob = cluster.state_dir / "blobs" / f"{seeded['blob_id']}.npy"
    before = sqlite.stat().st_size
    job = seeded["job_id"]
    targets = [
        "GET /v1/jobs/../x", "GET /v1/jobs/..%2Fx", "GET /v1/jobs/..%2f..%2fjobs.sqlite3", "GET /v1/jobs/%2e%2e/x",
        f"GET /v1/jobs/{job}/result?name=../../jobs.sqlite3", f"GET /v1/jobs/{job}/result?name=..%2F..%2Fjobs.sqlite3",
        f"GET /v1/jobs/{job}/result?name=%2Fetc%2Fpasswd", f"GET /v1/jobs/{job}/result?name=.dcf-head",
        f"GET /v1/jobs/..%2F{job}", f"GET /v1/jobs/{job}%2F..%2F..%2Fjobs.sqlite3/result",
        "DELETE /v1/blobs/..%2Fjobs.sqlite3", f"DELETE /v1/blobs/..%2Fblobs%2F{seeded['blob_id']}",
        "DELETE /v1/blobs/%2e%2e%2f%2e%2e%2fjobs.sqlite3", f"DELETE /v1/jobs/..%2F{job}",
        "GET /v1/nodes/..%2F..%2Fetc%2Fpasswd", "GET /static/..%2F..%2F..%2Fcommon%2Fprotocol.py",
        "GET /static/../../server.py", "GET /v1/jobs/%00", "POST /v1/jobs/..%2F..%2Fv1%2Fhealth/cancel",
    ]
    for target in targets:
        method, path = target.split(" ", 1)
        request = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        status, _, body = _raw(cluster.http_port, request)
        assert 400 <= status < 500, (target, status, body[:200])
        assert _error_problem(status, body) is None or path.startswith("/static"), (target, body[:200])
        assert b"SQLite format" not in body and b"root:" not in body and b"import " not in body, target
    assert sqlite.exists() and sqlite.stat().st_size >= before and blob.exists()
    with Client(cluster.url) as c:
        np.testing.assert_allclose(c.result(job), seeded["c"], rtol=1e-12, atol=1e-12)
    _assert_alive(cluster)


def test_negative_and_huge_query_parameters(cluster: LocalCluster, http: httpx.Client,
                                            seeded: dict[str, Any]) -> None:
    job = seeded["job_id"]
    bad = {
        f"/v1/jobs/{job}": ("wait", ["-1", "-0.001", "60.0001", "1e308", "1e400", "inf", "-inf", "nan", "abc", "",
                                     "1" * 400, "0x10"]),
        "/v1/jobs": ("limit", ["-1", "0", "10001", "1e3", "1.5", "9" * 40, "abc", "", "-9" * 20]),
        f"/v1/jobs/{job}/events": ("since", ["-1", "1.5", "abc", "", "-" + "9" * 40]),
    }
    for path, (name, values) in bad.items():
        for value in values:
            r = http.get(path, params={name: value})
            assert r.status_code == 422, (path, name, value, r.status_code, r.text[:200])
            assert r.json()["error"]["code"] == "invalid"
    for state in ("../x", "DONE", "done\n", "✓"):
        r = http.get("/v1/jobs", params={"state": state})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid"
    r = http.get("/v1/jobs", params={"type": "x" * 65})
    assert r.status_code == 422
    # the edges that are allowed
    for wait in ("0", "60", "1e-300"):
        assert http.get(f"/v1/jobs/{job}", params={"wait": wait}).json()["state"] == "done"
    for limit in ("1", "10000"):
        assert http.get("/v1/jobs", params={"limit": limit}).status_code == 200
    r = http.get(f"/v1/jobs/{job}/events", params={"since": str(2**70)})
    assert r.status_code in (200, 422) and _error_problem(r.status_code, r.content) is None
    r = http.get("/v1/jobs", params=[("limit", "1"), ("limit", "-5")])  # repeated parameter
    assert r.status_code in (200, 422) and _error_problem(r.status_code, r.content) is None


def test_framework_errors_use_the_error_format(cluster: LocalCluster, http: httpx.Client) -> None:
    problems = []
    for method, path, body in (("GET", "/v1/no-such-route", None), ("POST", "/v1/health", None),
                               ("PATCH", "/v1/jobs", None), ("GET", "/v1/jobs/..%2Fx", None),
                               ("POST", "/v1/jobs", b'{"type": "\xff\xfe"}'),
                               ("POST", "/v1/jobs", b"[" * 100_000 + b"]" * 100_000),
                               ("POST", "/v1/blobs/adopt", b"\x80" * 10)):
        r = http.request(method, path, content=body, headers={"content-type": "application/json"})
        problem = _error_problem(r.status_code, r.content, tolerate_framework=False)
        if problem:
            problems.append(f"{method} {path}: {problem}")
    assert not problems, "\n".join(problems)


def test_result_content_type_is_documented(cluster: LocalCluster, http: httpx.Client,
                                           seeded: dict[str, Any]) -> None:
    spec = http.get("/openapi.json").json()
    documented = spec["paths"]["/v1/jobs/{job_id}/result"]["get"]["responses"]["200"]["content"]
    r = http.get(f"/v1/jobs/{seeded['job_id']}/result")
    assert r.status_code == 200
    assert r.headers["content-type"].split(";")[0] in documented, (r.headers["content-type"], list(documented))
