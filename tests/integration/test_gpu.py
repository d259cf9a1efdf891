"""The CUDA/MPS provider path. CI has no GPU: these skip there."""

from __future__ import annotations

import numpy as np
import pytest

from user_client import Client
from user_client.local import LocalCluster

torch = pytest.importorskip("torch")
HAS_CUDA = torch.cuda.is_available()
HAS_MPS = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()

pytestmark = [pytest.mark.gpu, pytest.mark.integration,
              pytest.mark.skipif(not (HAS_CUDA or HAS_MPS), reason="no CUDA or MPS device")]


def test_gpu_provider_detects_device_and_multiplies() -> None:
    kind = "cuda" if HAS_CUDA else "mps"
    dtype = "float64" if HAS_CUDA else "float32"
    with LocalCluster(1, heartbeat=0.5, provider_args=["--device", kind]) as cl, Client(cl.url) as c:
        node = c.nodes()[0]
        assert node["device"] == kind and node["gflops"] > 0
        rng = np.random.default_rng(0)
        a = rng.standard_normal((1500, 700)).astype(dtype)
        b = rng.standard_normal((700, 900)).astype(dtype)
        c_ = c.matmul(a, b)
        np.testing.assert_allclose(c_, a @ b, rtol=1e-3 if dtype == "float32" else 1e-9, atol=1e-3)


@pytest.mark.skipif(not HAS_MPS, reason="needs MPS")
def test_float64_is_not_sent_to_mps_and_the_job_says_why() -> None:
    with LocalCluster(1, heartbeat=0.5, provider_args=["--device", "mps"]) as cl, Client(cl.url) as c:
        job = c.submit_matmul(np.ones((4, 4)), np.ones((4, 4)))
        view = c.status(job, wait=1.0)
        assert view["state"] == "queued" and "float64" in view["waiting"]
