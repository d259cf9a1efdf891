"""Short ids (issue 11 item 11): a unique prefix of a job or provider id is accepted wherever the
REST API takes an id, the answer carries the full id, and an ambiguous prefix is a 409 that lists
the matches; the same through the real CLI (``dcf status PREFIX``)."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from tests.conftest import run_cli
from user_client import Client
from user_client.local import LocalCluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def idle() -> Iterator[LocalCluster]:
    """A head with one provider, drained later: the many jobs of the ambiguity test stay queued."""
    with LocalCluster(1, heartbeat=0.5, threads=1) as cl:
        yield cl


def test_a_unique_prefix_reaches_the_job_and_the_provider(idle: LocalCluster) -> None:
    with Client(idle.url) as c:
        job = c.submit_matmul(np.ones((4, 3)), np.ones((3, 2)))
        assert c.wait(job, timeout=60)["state"] == "done"
        pid = c.nodes()[0]["provider_id"]
    base = idle.url
    r = httpx.get(f"{base}/v1/jobs/{job[:8]}", timeout=10)
    assert r.status_code == 200 and r.json()["job_id"] == job  # the full id comes back
    r = httpx.get(f"{base}/v1/jobs/{job[:6]}/result", timeout=10)
    assert r.status_code == 200 and job in r.headers["content-disposition"]
    assert httpx.get(f"{base}/v1/jobs/{job[:6]}/events", timeout=10).json()[0]["job_id"] == job
    assert httpx.get(f"{base}/v1/jobs/{job[:3]}", timeout=10).status_code == 404  # too short: not a prefix
    r = httpx.get(f"{base}/v1/nodes/{pid[:5]}", timeout=10)
    assert r.status_code == 200 and r.json()["provider_id"] == pid

    cli = run_cli("--json", "status", job[:8], url=base)
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["job_id"] == job

    r = httpx.delete(f"{base}/v1/jobs/{job[:10]}", timeout=10)
    assert r.status_code == 204
    assert httpx.get(f"{base}/v1/jobs/{job[:8]}", timeout=10).status_code == 404  # gone from the store too


def test_an_ambiguous_prefix_lists_the_matches(idle: LocalCluster) -> None:
    with Client(idle.url) as c:
        pid = c.nodes()[0]["provider_id"]
        assert httpx.post(f"{idle.url}/v1/nodes/{pid[:4]}/drain", timeout=10).json()["state"] == "draining"
        # jobs until two share their first 4 digits (65,536 prefixes: 97% within 700 jobs)
        by_prefix: dict[str, list[str]] = defaultdict(list)
        for _ in range(10):
            for job_id in c.submit_many([{"type": "matmul", "inputs": {"a": np.ones((1, 1)), "b": np.ones((1, 1))}}
                                         for _ in range(500)]):
                by_prefix[job_id[:4]].append(job_id)
            shared = [ids for ids in by_prefix.values() if len(ids) > 1]
            if shared:
                break
        assert shared, "no two of 5000 job ids share a 4-digit prefix"
        ids = shared[0]
        prefix = ids[0][:4]
        r = httpx.get(f"{idle.url}/v1/jobs/{prefix}", timeout=10)
        assert r.status_code == 409, r.text
        err = r.json()["error"]
        assert err["code"] == "conflict" and "ambiguous" in err["message"]
        assert all(job_id in err["message"] for job_id in ids)
        cli = run_cli("status", prefix, url=idle.url)
        assert cli.returncode != 0 and "ambiguous" in cli.stderr and ids[0] in cli.stderr, cli
        # the longer, unique prefix works (the jobs differ within 32 digits)
        first = ids[0]
        unique = next(first[:n] for n in range(5, 33) if not any(o.startswith(first[:n]) for o in ids[1:]))
        assert httpx.post(f"{idle.url}/v1/jobs/{unique}/cancel", timeout=10).json()["job_id"] == first
