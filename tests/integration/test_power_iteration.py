"""A multi-round plugin end to end: examples/power_iteration.py on a real head and real providers
over loopback. The planner plans a round per iterate; the state machine and the I/O layer run it
like any other job."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from user_client import Client
from user_client.local import LocalCluster

pytestmark = pytest.mark.integration

PLUGIN = ["--plugins", "examples.power_iteration"]


@pytest.fixture(scope="module")
def pi_client() -> Iterator[Client]:
    with LocalCluster(2, heartbeat=0.5, threads=1, head_args=PLUGIN, provider_args=PLUGIN) as cluster, \
            Client(cluster.url) as client:
        yield client


def symmetric(n: int, seed: int) -> np.ndarray:
    """A symmetric matrix with a clear gap between its two largest eigenvalues."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    eigenvalues = np.linspace(1.0, 5.0, n)
    eigenvalues[-1] = 10.0
    return (q * eigenvalues) @ q.T


def test_power_iteration_finds_the_dominant_eigenvector(pi_client: Client) -> None:
    a = symmetric(300, seed=3)
    job = pi_client.submit("power_iteration", {"a": pi_client.upload(a)["blob_id"]},
                           {"max_iterations": 500, "tol": 1e-10})
    view = pi_client.wait(job, timeout=120)
    assert view["state"] == "done", view
    stats = view["stats"]["power_iteration"]
    assert 5 < stats["iterations"] < 500  # many rounds, and it converged before the cap
    assert view["progress"]["done"] == stats["iterations"]
    assert set(view["shares"]) == {"local-0", "local-1"}
    w, vecs = np.linalg.eigh(a)
    v = pi_client.result(job, name="vector")
    assert abs(stats["eigenvalue"] - w[-1]) < 1e-8
    assert min(np.linalg.norm(v - vecs[:, -1]), np.linalg.norm(v + vecs[:, -1])) < 1e-6


def test_bad_params_are_refused_at_submit(pi_client: Client) -> None:
    blob = pi_client.upload(np.eye(4))["blob_id"]
    with pytest.raises(Exception, match="max_iterations"):
        pi_client.submit("power_iteration", {"a": blob}, {"max_iterations": 0})
    with pytest.raises(Exception, match="square"):
        pi_client.submit("power_iteration", {"a": pi_client.upload(np.ones((3, 4)))["blob_id"]}, {})
