"""Verified results from untrusted providers, end to end: a real head, one honest provider and one that lies
(``--plugins tests.plugins.liar`` on it alone), over the co-located path (blocks written in place into the
head's output file) and over the network (``DCF_SHARED_FILES=off``). Every lie is caught by Freivalds'
check, its block is redone by the honest provider, and the job's C is the right one."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tests.conftest import run_cli
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
    rejected = [line for line in head_log.splitlines()
                if "failed Freivalds' check" in line and "provider quarantined" not in line]
    assert any("provider quarantined" in line and f"provider_id={liar}" in line for line in head_log.splitlines())
    assert rejected and all(f"provider_id={liar}" in line for line in rejected), head_log[-3000:]
    assert all("wrong result: matmul result rows " in line for line in rejected)
    assert ("(written in place)" in rejected[0]) == (path == "shared")
    if path == "wire":
        assert view["stats"]["bytes_in"] > 0
    else:
        assert view["stats"]["bytes_in"] == 0  # nothing crossed a socket: the check read the output file


def _node(client: Client, name: str) -> dict:
    return next(n for n in client.nodes() if n["name"] == name)


def _wait_state(client: Client, name: str, state: str, timeout: float = 30.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            node = _node(client, name)
            if node["state"] == state:
                return node
        except StopIteration:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{name} not {state} within {timeout}s: {client.nodes()}")


def test_a_caught_liar_is_quarantined_across_a_head_restart_until_an_operator_clears_it() -> None:
    """Caught once, the liar gets no more work (later jobs: nothing rejected, all on the honest provider), it
    stays quarantined after the head restarts (the list is in the state dir), and `dcf clear` trusts it again."""
    env = {"DCF_TEST_LIAR": "perturb", "DCF_SHARED_FILES": "off"}
    rng = np.random.default_rng(16)
    a, b = rng.standard_normal((600, 800)), rng.standard_normal((800, 500))
    with LocalCluster(1, heartbeat=0.5, threads=1, env=env) as cl, Client(cl.url) as client:
        cl.add_provider(*LIAR)  # local-1
        cl.wait_ready(2)
        first = client.wait(client.submit_matmul(a, b), timeout=90)
        assert first["state"] == "done" and first["stats"]["verify"]["blocks_rejected"] >= 1
        liar = _wait_state(client, "local-1", "quarantined")
        assert "Freivalds" in liar["quarantined"]
        later = [client.wait(client.submit_matmul(a, b), timeout=90) for _ in range(2)]
        for view in later:
            assert view["state"] == "done" and view["stats"]["verify"]["blocks_rejected"] == 0
            assert view["shares"] == {"local-0": pytest.approx(1.0)}
        np.testing.assert_allclose(client.result(later[-1]["job_id"]), a @ b, rtol=1e-12, atol=1e-12)
        shown = run_cli("nodes", url=cl.url)
        assert shown.returncode == 0 and "quarantined" in shown.stdout
        assert "is quarantined" in shown.stderr and "dcf clear" in shown.stderr

        cl.kill_head()
        cl.start_head()
        assert _wait_state(client, "local-1", "quarantined")["quarantined"] == liar["quarantined"]
        _wait_state(client, "local-0", "ready")
        after = client.wait(client.submit_matmul(a, b), timeout=90)
        assert after["shares"] == {"local-0": pytest.approx(1.0)}

        cleared = run_cli("clear", "local-1", url=cl.url)
        assert cleared.returncode == 0, cleared.stderr
        assert "it gets work again" in cleared.stdout
        assert _node(client, "local-1")["quarantined"] is None
        again = run_cli("clear", "local-1", url=cl.url)  # not quarantined any more: 409
        assert again.returncode != 0 and "not quarantined" in again.stderr
        head_log = (cl.log_dir / "head.log").read_text()
    assert "provider quarantined" in head_log and "cleared of quarantine" in head_log
