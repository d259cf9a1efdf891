"""A client given several heads (``DCF_HEAD_URL=h1,h2``) follows the one that serves, for its streamed
downloads too: a result read while the client still points at a head that is gone comes from the next."""

from __future__ import annotations

import numpy as np
import pytest

from user_client import Client
from user_client.local import LocalCluster, free_ports

pytestmark = pytest.mark.integration


def test_a_result_download_moves_on_from_a_head_that_is_gone(cluster: LocalCluster) -> None:
    (gone,) = free_ports(1)  # nothing listens there: a head that died
    a, b = np.arange(12.0).reshape(3, 4), np.ones((4, 2))
    with Client(f"http://127.0.0.1:{gone},{cluster.url}", shared_files="off", reconnect_wait=20) as client:
        job = client.submit_matmul(a, b)  # refused by the first: sent to the second
        assert client.url == cluster.url.rstrip("/")
        client.wait(job, timeout=60)
        client.channel.move_on(client.url)  # as after a failover back: the client points at the dead one
        assert client.url.endswith(f":{gone}")
        np.testing.assert_array_equal(client.result(job), a @ b)  # streamed (httpx), not through the channel
        assert client.url == cluster.url.rstrip("/")
