"""A plugin task type end to end: examples/rowstats.py loaded with ``--plugins`` on a real head and
real providers over loopback, driven through the Python client."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest

from common.errors import DcfError, NotFound, ValidationError
from user_client import Client
from user_client.local import LocalCluster

pytestmark = pytest.mark.integration

PLUGIN = ["--plugins", "examples.rowstats"]
ALL = ["mean", "std", "min", "max", "norm"]


def reference(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return np.stack([x.mean(axis=1), x.std(axis=1), x.min(axis=1), x.max(axis=1),
                     np.linalg.norm(x, axis=1)], axis=1)


@pytest.fixture(scope="module")
def plugin_cluster() -> Iterator[LocalCluster]:
    with LocalCluster(2, heartbeat=0.5, threads=1, head_args=PLUGIN, provider_args=PLUGIN) as c:
        yield c


@pytest.fixture
def pclient(plugin_cluster: LocalCluster) -> Iterator[Client]:
    with Client(plugin_cluster.url) as c:
        yield c


def test_head_and_providers_advertise_the_plugin(pclient: Client) -> None:
    assert "rowstats" in pclient.health()["task_types"]
    nodes = pclient.nodes()
    assert len(nodes) == 2 and all("rowstats" in n["task_types"] for n in nodes)


def test_rowstats_matches_numpy(pclient: Client) -> None:
    x = np.random.default_rng(42).standard_normal((500, 40))
    blob = pclient.upload(x)
    assert blob["shape"] == [500, 40] and blob["dtype"] == "float64"
    job = pclient.submit("rowstats", {"x": blob["blob_id"]}, {"stats": ALL})
    view = pclient.wait(job, timeout=60)
    assert view["state"] == "done"
    assert view["progress"] == {"done": 2, "total": 2, "unit": "subtasks"}
    assert set(view["shares"]) == {"local-0", "local-1"}
    # co-located providers: run_into wrote into the head's output file, no array crossed a socket
    assert view["stats"]["bytes_out"] == 0 and view["stats"]["bytes_in"] == 0
    stats = pclient.result(job, name="stats")
    assert stats.dtype == np.float64 and stats.shape == (500, 5)
    np.testing.assert_allclose(stats, reference(x), rtol=1e-12, atol=1e-12)


def test_float32_input_and_column_order(pclient: Client) -> None:
    x = np.random.default_rng(7).uniform(-5, 5, (123, 17)).astype(np.float32)
    blob = pclient.upload(x)["blob_id"]
    job = pclient.submit("rowstats", {"x": blob}, {"stats": ["norm", "max"]}, nodes=1)
    view = pclient.wait(job, timeout=60)
    assert len(view["shares"]) == 1
    stats = pclient.result(job, name="stats")
    assert stats.dtype == np.float64 and stats.shape == (123, 2)
    np.testing.assert_allclose(stats, reference(x)[:, [4, 3]], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("params", "match"), [
    ({"stats": ["mean", "median"]}, "unknown statistics"),
    ({"stats": []}, "non-empty list"),
    ({"stats": ["min", "min"]}, "more than once"),
    ({}, "non-empty list"),
    ({"stats": ["mean"], "axis": 0}, "unknown params"),
])
def test_bad_params_are_a_4xx_and_the_head_keeps_serving(pclient: Client, params, match) -> None:
    blob = pclient.upload(np.ones((4, 3)))["blob_id"]
    with pytest.raises(ValidationError, match=match) as info:
        pclient.submit("rowstats", {"x": blob}, params)
    assert isinstance(info.value, DcfError) and 400 <= info.value.http_status < 500
    assert pclient.health()["status"] == "ok"
    assert not [j for j in pclient.jobs() if j["state"] in ("queued", "running", "failed")]
    job = pclient.submit("rowstats", {"x": blob}, {"stats": ["mean", "norm"]})
    pclient.wait(job, timeout=60)
    np.testing.assert_allclose(pclient.result(job, name="stats"), [[1.0, np.sqrt(3.0)]] * 4)


def test_bad_inputs_are_a_4xx(pclient: Client) -> None:
    one_d = pclient.upload(np.ones(5))["blob_id"]
    with pytest.raises(ValidationError, match="must be 2-D"):
        pclient.submit("rowstats", {"x": one_d}, {"stats": ["mean"]})
    with pytest.raises(ValidationError, match="takes inputs"):
        pclient.submit("rowstats", {"a": one_d}, {"stats": ["mean"]})
    with pytest.raises(NotFound, match="unknown task type"):
        pclient.submit("rowstatz", {"x": one_d}, {"stats": ["mean"]})
    assert pclient.health()["status"] == "ok"


def test_results_sent_over_the_network() -> None:
    """Providers that do not share the head's state dir: subtask_inputs, check_result and merge
    run on the head (the co-located default uses run_into instead)."""
    off = ["--shared-files", "off"]
    with LocalCluster(2, heartbeat=0.5, threads=1, head_args=PLUGIN, provider_args=[*PLUGIN, *off]) as cl, \
            Client(cl.url, shared_files="off") as c:
        x = np.random.default_rng(11).standard_normal((301, 9))
        job = c.submit("rowstats", {"x": c.upload(x)["blob_id"]}, {"stats": ALL})
        view = c.wait(job, timeout=60)
        assert view["progress"] == {"done": 2, "total": 2, "unit": "subtasks"}
        assert view["stats"]["bytes_out"] == x.nbytes and view["stats"]["bytes_in"] == 301 * 5 * 8
        np.testing.assert_allclose(c.result(job, name="stats"), reference(x), rtol=1e-12, atol=1e-12)


def test_providers_without_the_plugin_are_not_used() -> None:
    """Code never travels: a job waits until a provider with the plugin installed connects."""
    with LocalCluster(1, heartbeat=0.5, threads=1, head_args=PLUGIN) as cl, Client(cl.url) as c:
        x = np.arange(12.0).reshape(3, 4)
        job = c.submit("rowstats", {"x": c.upload(x)["blob_id"]}, {"stats": ["max"]})
        time.sleep(0.5)
        view = c.status(job)
        assert view["state"] == "queued" and "lacks task type rowstats" in view["waiting"]
        cl.add_provider(*PLUGIN)
        c.wait(job, timeout=60)
        np.testing.assert_array_equal(c.result(job, name="stats"), [[3.0], [7.0], [11.0]])
