"""Verified results from untrusted providers, end to end: a real head, one honest provider and one that lies
(``--plugins tests.plugins.liar`` on it alone), over the co-located path (blocks written in place into the
head's output file) and over the network (``DCF_SHARED_FILES=off``). Every lie is caught by Freivalds'
check, its block is redone by the honest provider, and the job's C is the right one."""

from __future__ import annotations

import numpy as np
import pytest

from user_client import Client
from user_client.local import LocalCluster

pytestmark = pytest.mark.integration

LIAR = ["--plugins", "tests.plugins.liar"]
CASES = [("shared", "perturb"), ("shared", "nan"), ("shared", "skip"), ("wire", "perturb"), ("wire", "nan")]


@pytest.mark.parametrize(("path", "mode"), CASES, ids=[f"{p}-{m}" for p, m in CASES])
def test_a_lying_provider_is_caught_and_the_job_is_right(path: str, mode: str) -> None:
    env = {"DCF_TEST_LIAR": mode, **({"DCF_SHARED_FILES": "off"} if path == "wire" else {})}
    rng = np.random.default_rng(15)
    a, b = rng.standard_normal((600, 800)), rng.standard_normal((800, 500))  # enough work for two shares
    with LocalCluster(1, heartbeat=0.5, threads=1, env=env) as cl, Client(cl.url) as client:
        cl.add_provider(*LIAR)  # local-1
        cl.wait_ready(2)
        liar = next(n["provider_id"] for n in client.nodes() if n["name"] == "local-1")
        job = client.submit_matmul(a, b)
        view = client.wait(job, timeout=90)
        c = client.result(job)
        head_log = (cl.log_dir / "head.log").read_text()
    assert view["state"] == "done"
    np.testing.assert_allclose(c, a @ b, rtol=1e-12, atol=1e-12)
    assert view["stats"]["verify"]["blocks_rejected"] >= 1
    assert "local-1" not in view["shares"]  # every block it sent was refused and redone by local-0
    assert view["shares"] == {"local-0": pytest.approx(1.0)}
    rejected = [line for line in head_log.splitlines() if "failed Freivalds' check" in line]
    assert rejected and all(f"provider_id={liar}" in line for line in rejected), head_log[-3000:]
    assert all("invalid result: matmul result rows " in line for line in rejected)
    assert ("(written in place)" in rejected[0]) == (path == "shared")
    if path == "wire":
        assert view["stats"]["bytes_in"] > 0
    else:
        assert view["stats"]["bytes_in"] == 0  # nothing crossed a socket: the check read the output file
