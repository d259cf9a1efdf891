"""matmul end to end: real head and providers over loopback, the Python API and the CLI."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from tests.conftest import run_cli
from user_client import Client
from user_client.local import LocalCluster

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_client_api_matches_numpy(client: Client, dtype: str) -> None:
    rng = np.random.default_rng(1)
    a = rng.standard_normal((301, 177)).astype(dtype)
    b = rng.standard_normal((177, 95)).astype(dtype)
    c = client.matmul(a, b)
    assert c.dtype == np.dtype(dtype) and c.shape == (301, 95)
    np.testing.assert_allclose(c, a @ b, rtol=1e-4 if dtype == "float32" else 1e-12, atol=1e-4)


def test_rows_are_shared_by_both_providers_and_placed_by_offset(client: Client) -> None:
    # enough work for a share of >= rows.MIN_SHARE_SECONDS on each provider
    a = np.arange(400 * 1000, dtype=np.float64).reshape(400, 1000) / 1000
    b = np.eye(1000)  # C must equal A row for row: any misplaced block shows
    job = client.submit_matmul(a, b)
    view = client.wait(job, timeout=60)
    assert view["progress"] == {"done": 400, "total": 400, "unit": "rows"}
    assert set(view["shares"]) == {"local-0", "local-1"}
    assert abs(sum(view["shares"].values()) - 1.0) < 1e-6
    np.testing.assert_array_equal(client.result(job), a)


def test_nodes_cap_uses_one_provider(client: Client) -> None:
    a = np.ones((64, 8))
    job = client.submit_matmul(a, np.ones((8, 4)), nodes=1)
    view = client.wait(job, timeout=60)
    assert len(view["shares"]) == 1
    np.testing.assert_array_equal(client.result(job), np.full((64, 4), 8.0))


def test_nan_inputs_are_allowed_and_reported(client: Client) -> None:
    a = np.ones((10, 3))
    a[2, 1] = np.nan
    job = client.submit_matmul(a, np.ones((3, 2)))
    view = client.wait(job, timeout=60)
    assert view["stats"]["result_nonfinite"] == 2
    c = client.result(job)
    assert np.isnan(c[2]).all() and np.isfinite(np.delete(c, 2, axis=0)).all()


def test_nodes_table_and_json(cluster: LocalCluster) -> None:
    out = run_cli("--json", "nodes", url=cluster.url)
    assert out.returncode == 0, out.stderr
    nodes = json.loads(out.stdout)
    assert len(nodes) == 2 and all(n["state"] == "ready" and n["gflops"] > 0 for n in nodes)
    assert {"device", "os", "memory_bytes", "cores", "task_types", "dtypes", "version"} <= set(nodes[0])
    table = run_cli("nodes", url=cluster.url)
    assert table.returncode == 0 and "GFLOP/S" in table.stdout and "local-0" in table.stdout


def test_cli_files_submit_status_result_jobs(cluster: LocalCluster, tmp_path) -> None:
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((120, 40)), rng.standard_normal((40, 30))
    np.save(tmp_path / "a.npy", a)
    np.save(tmp_path / "b.npy", b)
    out = run_cli("--json", "submit", "matmul", "--a", str(tmp_path / "a.npy"), "--b", str(tmp_path / "b.npy"),
                  "-o", str(tmp_path / "c.npy"), url=cluster.url)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    np.testing.assert_allclose(np.load(tmp_path / "c.npy"), a @ b, rtol=1e-10, atol=1e-10)
    job = report["job_id"]

    status = json.loads(run_cli("--json", "status", job, url=cluster.url).stdout)
    assert status["job_id"] == job and status["state"] == "done"
    got = run_cli("result", job, "-o", str(tmp_path / "again.npy"), url=cluster.url)
    assert got.returncode == 0, got.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "again.npy"), np.load(tmp_path / "c.npy"))
    jobs = json.loads(run_cli("--json", "jobs", url=cluster.url).stdout)
    assert isinstance(jobs, list) and job in {j["job_id"] for j in jobs}


def test_cli_random_operands_no_wait_then_result(cluster: LocalCluster, tmp_path) -> None:
    out = run_cli("--json", "submit", "matmul", "--size", "200", "--dtype", "float32", "--seed", "3",
                  "--no-wait", url=cluster.url)
    assert out.returncode == 0, out.stderr
    job = json.loads(out.stdout)["job_id"]
    assert len(job) == 32
    with Client(cluster.url) as c:
        c.wait(job, timeout=60)
    assert run_cli("result", job, "-o", str(tmp_path / "c.npy"), url=cluster.url).returncode == 0
    rng = np.random.default_rng(3)
    a = rng.standard_normal((200, 200), dtype=np.float32)
    b = rng.standard_normal((200, 200), dtype=np.float32)
    np.testing.assert_allclose(np.load(tmp_path / "c.npy"), a @ b, rtol=1e-4, atol=1e-4)


def test_cli_check_flag(cluster: LocalCluster) -> None:
    out = run_cli("--json", "submit", "matmul", "--size", "150", "--check", url=cluster.url)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["check"] is True


def test_cancel_finished_job_is_refused_and_delete_removes_it(cluster: LocalCluster, client: Client) -> None:
    job = client.submit_matmul(np.ones((4, 4)), np.ones((4, 4)))
    client.wait(job, timeout=60)
    out = run_cli("cancel", job, url=cluster.url)
    assert out.returncode == 2 and "already done" in out.stderr
    client.delete(job)
    gone = run_cli("status", job, url=cluster.url)
    assert gone.returncode == 2 and "no job" in gone.stderr


# ---- bad input ---------------------------------------------------------------------------------
@pytest.fixture
def files(tmp_path):
    good = tmp_path / "good.npy"
    np.save(good, np.ones((3, 3)))
    objs = tmp_path / "obj.npy"
    np.save(objs, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    text = tmp_path / "text.npy"
    text.write_text("not numpy")
    strs = tmp_path / "str.npy"
    np.save(strs, np.array([["a", "b"]]))
    scalar = tmp_path / "scalar.npy"
    np.save(scalar, np.float64(3.0))
    empty = tmp_path / "empty.npy"
    np.save(empty, np.ones((0, 3)))
    wide = tmp_path / "wide.npy"
    np.save(wide, np.ones((3, 5)))
    return {"good": good, "obj": objs, "text": text, "str": strs, "scalar": scalar, "empty": empty,
            "wide": wide, "missing": tmp_path / "nope.npy", "dir": tmp_path}


@pytest.mark.parametrize("a,b,expect", [
    ("missing", "good", "no such file"),
    ("dir", "good", "directory"),
    ("text", "good", "not a .npy"),
    ("obj", "good", "pickle"),
    ("str", "good", "not numeric"),
    ("scalar", "good", "0-d"),
    ("empty", "good", "empty"),
    ("good", "wide", None),  # 3x3 @ 3x5 is fine
    ("wide", "good", "shape mismatch"),
])
def test_cli_bad_files(cluster: LocalCluster, files, a, b, expect) -> None:
    out = run_cli("submit", "matmul", "--a", str(files[a]), "--b", str(files[b]), url=cluster.url)
    if expect is None:
        assert out.returncode == 0, out.stderr
        return
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dcf: error:") and expect in lines[0], out.stderr


def test_cli_unknown_job_and_unreachable_head(cluster: LocalCluster) -> None:
    out = run_cli("status", "0" * 32, url=cluster.url)
    assert out.returncode == 2 and "no job" in out.stderr
    out = run_cli("result", "nope", "-o", "/tmp/x.npy", url=cluster.url)
    assert out.returncode == 2 and "no job" in out.stderr
    out = run_cli("nodes", url="http://127.0.0.1:9")
    assert out.returncode == 3 and "unreachable" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def _error(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"} and {"code", "message"} <= set(body["error"]), body
    return body["error"]


def test_http_bad_input_gets_4xx_json(cluster: LocalCluster) -> None:
    with httpx.Client(base_url=cluster.url) as http:
        r = http.put("/v1/blobs", content=b"garbage that is not npy")
        assert r.status_code == 422 and "npy" in _error(r)["message"]
        import io
        buf = io.BytesIO()
        np.save(buf, np.ones((4, 4)))
        r = http.put("/v1/blobs", content=buf.getvalue()[:-8])
        assert r.status_code == 422 and "truncated" in _error(r)["message"]
        buf = io.BytesIO()
        np.save(buf, np.ones((4, 4), dtype=np.uint8))
        r = http.put("/v1/blobs", content=buf.getvalue())
        assert r.status_code == 422 and "uint8" in _error(r)["message"]
        ints = http.put("/v1/blobs", content=_npy(np.ones((4, 4), dtype=np.int64))).json()["blob_id"]
        r = http.post("/v1/jobs", json={"type": "matmul", "inputs": {"a": ints, "b": ints}})
        assert r.status_code == 422 and "int64" in _error(r)["message"]
        ok = http.put("/v1/blobs", content=_npy(np.ones((4, 4)))).json()["blob_id"]
        other = http.put("/v1/blobs", content=_npy(np.ones((5, 2)))).json()["blob_id"]
        r = http.post("/v1/jobs", json={"type": "matmul", "inputs": {"a": ok, "b": other}})
        assert r.status_code == 422 and "do not align" in _error(r)["message"]
        r = http.post("/v1/jobs", json={"type": "matmul", "inputs": {"a": ok, "b": "f" * 32}})
        assert r.status_code == 404 and _error(r)["code"] == "not_found"
        r = http.post("/v1/jobs", json={"type": "nope", "inputs": {}})
        assert r.status_code == 404 and "unknown task type" in _error(r)["message"]
        r = http.post("/v1/jobs", json={"type": "matmul", "inputs": {"a": ok}})
        assert r.status_code == 422 and "missing" in _error(r)["message"]
        r = http.post("/v1/jobs", json={"type": "matmul", "inputs": {"a": ok, "b": "../../etc/passwd"}})
        assert r.status_code == 400 and _error(r)
        r = http.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 422 and _error(r)
        r = http.post("/v1/jobs", json={"type": "matmul", "inputs": {"a": ok, "b": ok}, "nodes": 0})
        assert r.status_code == 422 and "nodes" in _error(r)["message"]
        r = http.get("/v1/jobs/" + "a" * 32)
        assert r.status_code == 404
        r = http.get("/v1/jobs/" + "a" * 32 + "/result")
        assert r.status_code == 404
        assert http.get("/v1/health").json()["status"] == "ok"  # still serving


def _npy(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def test_demo_command_runs() -> None:
    out = run_cli("demo", "--size", "300", timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "check against numpy: OK" in out.stdout and "GFLOP/s" in out.stdout
    assert "% of the rows" in out.stdout
