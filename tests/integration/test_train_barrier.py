"""The start barrier of a train job through the real CLI against a real head: `--min-providers`,
`--start-timeout`, what `dcf status` says while it waits, a timeout that fails the job, and a 422."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

from common.tasks.train import datasets  # noqa: E402
from common.tasks.train.defaults import MAX_MIN_PROVIDERS  # noqa: E402
from tests.conftest import run_cli  # noqa: E402
from user_client import Client  # noqa: E402
from user_client.local import LocalCluster  # noqa: E402

pytestmark = pytest.mark.integration

TINY = ("--dataset", "digits", "--model", "logreg", "--epochs", "1", "--batch-size", "128")


@pytest.fixture(scope="module")
def cluster1() -> Iterator[LocalCluster]:
    with LocalCluster(1, heartbeat=0.5, threads=1) as cl:
        cl.wait_ready(1)
        yield cl


def submit(url: str, *flags: str) -> str:
    out = run_cli("--json", "submit", "train", *TINY, *flags, "--no-wait", url=url)
    assert out.returncode == 0, out.stderr
    return str(json.loads(out.stdout)["job_id"])


def status_until(url: str, job: str, text: str, timeout: float = 45) -> str:
    """`dcf status` until its text contains ``text`` (the head builds the planner after it delivers the job)."""
    end = time.monotonic() + timeout
    while True:
        out = run_cli("status", job, url=url)
        if text in out.stdout or time.monotonic() > end:
            return out.stdout
        time.sleep(0.2)


def test_the_job_waits_for_its_providers_then_trains(tmp_path) -> None:
    with LocalCluster(1, heartbeat=0.5, threads=1) as cl:
        cl.wait_ready(1)
        job = submit(cl.url, "--min-providers", "2", "--start-timeout", "60", "-o", str(tmp_path / "m.pt"))
        shown = status_until(cl.url, job, "waiting for 2 providers, 1 ready")
        assert "waiting for 2 providers, 1 ready" in shown and "running" in shown
        with Client(cl.url) as c:
            assert c.status(job)["progress"]["done"] == 0  # nothing trained before the barrier
        cl.add_provider()
        out = run_cli("status", job, "--wait", url=cl.url, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "done" in out.stdout and "waiting for" not in out.stdout
        with Client(cl.url) as c:
            view = c.status(job)
        assert view["progress"]["done"] == view["progress"]["total"] > 0
        assert len(view["shares"]) == 2  # both providers trained


def test_a_barrier_not_met_in_time_fails_the_job(cluster1: LocalCluster) -> None:
    job = submit(cluster1.url, "--min-providers", "2", "--start-timeout", "1.5")
    out = run_cli("status", job, "--wait", url=cluster1.url, timeout=45)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "failed" in out.stdout
    assert "start barrier: needed 2 providers within 1.5 s, 1 was ready" in out.stdout


def test_more_providers_than_any_cluster_holds_is_refused_with_422(cluster1: LocalCluster) -> None:
    too_many = str(MAX_MIN_PROVIDERS + 1)
    out = run_cli("submit", "train", *TINY, "--min-providers", too_many, "--no-wait", url=cluster1.url)
    assert out.returncode == 2 and f"min_providers must be an integer in 1..{MAX_MIN_PROVIDERS}" in out.stderr
    with Client(cluster1.url) as c:  # the head's answer itself: 422
        ds = datasets.digits(0)
        blobs = {name: c.upload(getattr(ds, attr))["blob_id"] for name, attr in
                 {"x": "x_train", "y": "y_train", "x_test": "x_test", "y_test": "y_test"}.items()}
    params = {"model": "logreg", "min_providers": MAX_MIN_PROVIDERS + 1}
    body = json.dumps({"type": "train", "inputs": blobs, "params": params}).encode()
    req = urllib.request.Request(cluster1.url + "/v1/jobs", body, {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 422
    error = json.loads(err.value.read())["error"]
    assert error["code"] == "invalid" and "min_providers" in error["message"]
