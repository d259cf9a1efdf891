"""A task type's bug is contained: the job it belongs to fails with a message naming the task type
and the method (its stats bug only loses its stats), and the head goes on serving other jobs."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from user_client import Client
from user_client.local import LocalCluster

pytestmark = pytest.mark.integration

PLUGIN = ["--plugins", "tests.plugins.buggy"]


@pytest.fixture(scope="module")
def bug_client() -> Iterator[Client]:
    # arrays over the wire: the head itself calls subtask_inputs, check_result and merge
    with LocalCluster(1, heartbeat=0.5, threads=1, head_args=PLUGIN,
                      provider_args=[*PLUGIN, "--shared-files", "off"]) as cluster, Client(cluster.url) as client:
        yield client


@pytest.mark.parametrize("bug", ["eligible", "split", "subtask_inputs", "check_result", "merge"])
def test_a_bug_fails_its_job_and_the_head_goes_on(bug_client: Client, bug: str) -> None:
    x = bug_client.upload(np.arange(6.0).reshape(2, 3))["blob_id"]
    job = bug_client.submit("buggy", {"x": x}, {"bug": bug})
    view = bug_client.status(job, wait=30)
    assert view["state"] == "failed", view
    assert "buggy" in view["error"] and f"{bug} bug" in view["error"], view["error"]
    good = bug_client.submit("buggy", {"x": x}, {"bug": "none"})
    assert bug_client.wait(good, timeout=30)["state"] == "done"
    np.testing.assert_array_equal(bug_client.result(good, name="y"), np.arange(6.0).reshape(2, 3) * 2)


def test_a_bug_in_the_planners_summary_loses_only_the_stats(bug_client: Client) -> None:
    x = bug_client.upload(np.ones((2, 2)))["blob_id"]
    job = bug_client.submit("buggy", {"x": x}, {"bug": "summary"})
    view = bug_client.wait(job, timeout=30)
    assert view["state"] == "done", view
    np.testing.assert_array_equal(bug_client.result(job, name="y"), np.full((2, 2), 2.0))
