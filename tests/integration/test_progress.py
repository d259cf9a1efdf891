"""Progress is one number for one job everywhere (issue 11 item 2): the job list, the job view, the
job's events and its stored outcome agree, in one unit (steps for training, rows for matmul); a
matmul's rows move while its subtasks run; a cancelled job keeps its real progress."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

from common.tasks.train import datasets  # noqa: E402
from tests.conftest import run_cli  # noqa: E402
from user_client import Client  # noqa: E402
from user_client.local import LocalCluster  # noqa: E402

pytestmark = pytest.mark.integration

DIGITS = datasets.digits(0)
TRAIN: dict[str, Any] = {"model": "mlp", "batch_size": 32, "optimizer": "sgd", "lr": 0.05, "seed": 3}
STEPS_PER_EPOCH = len(DIGITS.x_train) // TRAIN["batch_size"]


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    with LocalCluster(2, heartbeat=0.5, threads=1) as cl, Client(cl.url) as c:
        yield c


def listed(c: Client, job: str) -> dict[str, Any]:
    return next(j for j in c.jobs() if j["job_id"] == job)


def test_training_progress_is_steps_everywhere(client: Client) -> None:
    total = 2 * STEPS_PER_EPOCH
    job = client.submit_train(DIGITS, epochs=2, **TRAIN)
    seen = []
    while (view := client.status(job))["state"] not in ("done", "failed", "cancelled"):
        row = listed(client, job)
        for p in (view["progress"], row["progress"]):
            if view["state"] == "running":
                assert p["unit"] == "steps" and p["total"] == total, p
        seen.append(view["progress"]["done"])
        time.sleep(0.05)
    assert view["state"] == "done"
    assert seen == sorted(seen)  # it never goes back
    want = {"done": total, "total": total, "unit": "steps"}
    assert view["progress"] == want and listed(client, job)["progress"] == want
    events = client._json_list("GET", f"/v1/jobs/{job}/events")
    progress = [e for e in events if e["kind"] == "job.progress"]
    assert progress and all(e["unit"] == "steps" and e["total"] == total for e in progress)
    assert [e["done"] for e in progress] == sorted(e["done"] for e in progress)
    started = next(e for e in events if e["kind"] == "job.started")
    assert started["total"] == total and started["unit"] == "steps"


def test_a_cancelled_training_keeps_its_progress(client: Client) -> None:
    total = 20 * STEPS_PER_EPOCH
    job = client.submit_train(DIGITS, epochs=20, **TRAIN)
    end = time.monotonic() + 60
    while client.status(job)["progress"]["done"] < 5 and time.monotonic() < end:
        time.sleep(0.05)
    client.cancel(job)
    view = client.status(job)
    assert view["state"] == "cancelled"
    done = view["progress"]["done"]
    assert 5 <= done < total and view["progress"] == {"done": done, "total": total, "unit": "steps"}
    time.sleep(0.5)  # stored once the outcome is committed: the same then
    assert client.status(job)["progress"] == view["progress"] == listed(client, job)["progress"]
    # and the CLI shows that one number: `dcf jobs` and `dcf status`, text and JSON
    url = client.url
    shown = f"{done}/{total}"
    row = next(line for line in run_cli("jobs", url=url).stdout.splitlines() if line.startswith(job))
    assert shown in row.split(), row
    status = run_cli("status", job, url=url)
    assert status.returncode == 1 and f"{shown} steps" in status.stdout, status.stdout
    listed_json = next(j for j in json.loads(run_cli("--json", "jobs", url=url).stdout) if j["job_id"] == job)
    assert listed_json["progress"] == json.loads(run_cli("--json", "status", job, url=url).stdout)["progress"] \
        == view["progress"]


def test_matmul_rows_move_while_the_subtasks_run(client: Client) -> None:
    n = 4000
    rng = np.random.default_rng(1)
    a, b = rng.random((n, n)), rng.random((n, n))
    job = client.submit_matmul(a, b)
    seen: set[int] = set()
    while (view := client.status(job))["state"] != "done":
        assert view["state"] in ("queued", "running")
        assert view["progress"]["unit"] == "rows" and view["progress"]["total"] in (0, n)
        seen.add(view["progress"]["done"])
        time.sleep(0.05)
    shares = view["stats"].get("shares") or {}
    assert view["progress"] == {"done": n, "total": n, "unit": "rows"} and len(shares) == 2
    # rows counted before a subtask's result: values other than 0, n and what whole subtasks hold
    # (each provider's block is ~n/2 rows; reports come in blocks of 128 rows)
    partial = {d for d in seen if 0 < d < n and d % 128 == 0}
    assert partial, sorted(seen)
    np.testing.assert_allclose(client.result(job)[:3], a[:3] @ b)
