"""Untrusted peers, for the chaos figures (issue 15: "results verified and wrong results caught; the
unauthenticated attempts refused"): a head started with no security flags (its own token and CURVE keys),
``--verify-rate 1``, two honest providers and one that lies about matmul blocks, gradients and predictions
(``tests.plugins.liar`` and ``tests.plugins.grad_liar`` on it alone), plus strangers without the token or an
allowed key. Every lie is caught (Freivalds for matmul, outvoted for the rest), every stranger refused, and
every result is the honest one."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from common import security
from tests.chaos.harness import Figures
from tests.conftest import ROOT
from user_client import Client
from user_client.local import LocalCluster

pytestmark = [pytest.mark.chaos, pytest.mark.integration]
torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from common.tasks.train import datasets  # noqa: E402
from tests.integration.test_training import PARAMS, max_diff, reference  # noqa: E402

LIAR = ["--plugins", "tests.plugins.liar,tests.plugins.grad_liar"]
ROUTES = ["/v1/jobs", "/v1/nodes", "/metrics", "/v1/info", "/v1/stream"]


def _refused_requests(url: str) -> int:
    """Requests without the token, or with a wrong one: how many got 401 (all must)."""
    refused = 0
    for route in ROUTES:
        for headers in ({}, {"Authorization": "Bearer not-the-token"}):
            if httpx.get(url + route, headers=headers, timeout=10).status_code == 401:
                refused += 1
    return refused


def _stranger_refused(cl: LocalCluster, tmp: Path, client: Client) -> bool:
    """A provider with a CURVE key of its own, not on the head's allow-list, never registers."""
    keys = tmp / "stranger-keys"
    secret, _ = security.generate_provider(keys, "stranger")
    assert cl.key_dir is not None
    log = open(tmp / "stranger.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([sys.executable, "-m", "provider_node", "--head", "127.0.0.1", "--name", "stranger",
                             *cl.port_args(), "--curve-secret-key", str(secret), "--curve-server-key",
                             str(cl.key_dir / "head.key")], stdout=log, stderr=log, cwd=ROOT)
    try:
        end = time.monotonic() + 20
        while "not in the allow-list" not in (cl.log_dir / "head.log").read_text(errors="replace"):
            assert time.monotonic() < end, "the head did not log the stranger's key"
            time.sleep(0.1)
        return all(n["name"] != "stranger" for n in client.nodes())
    finally:
        proc.kill()
        proc.wait()
        log.close()


def test_liars_are_caught_and_strangers_refused(tmp_path: Path, figures: Figures) -> None:
    digits = datasets.digits(0)
    ref = reference(digits, 1)
    with (LocalCluster(2, heartbeat=0.5, threads=1, secure=True, head_args=["--verify-rate", "1"],
                       env={"DCF_SHARED_FILES": "off"}) as cl,
          Client(cl.url, token=cl.api_token) as c):
        cl.add_provider(*LIAR)
        cl.wait_ready(3)
        figures.fault("a provider lying about every result (matmul, gradients, predictions)")
        refused = _refused_requests(cl.url)
        figures.count("unauthenticated HTTP requests refused (401)", refused)
        assert refused == 2 * len(ROUTES)
        figures.fault("a provider with a key not on the allow-list")
        assert _stranger_refused(cl, tmp_path, c)
        figures.count("providers with an unknown CURVE key refused", 1)

        rng = np.random.default_rng(15)
        a, b = rng.standard_normal((600, 800)), rng.standard_normal((800, 500))
        matmul = c.wait(c.submit_matmul(a, b), timeout=90)
        right = bool(np.allclose(c.result(matmul["job_id"]), a @ b, rtol=1e-12, atol=1e-12))
        figures.job("ok" if right else "wrong")
        figures.count("matmul blocks caught wrong by Freivalds' check", matmul["stats"]["verify"]["blocks_rejected"])
        assert right and matmul["stats"]["verify"]["blocks_rejected"] >= 1

        liar = next(n for n in c.nodes() if n["name"] == "local-2")
        assert liar["state"] == "quarantined"  # caught on the matmul job
        figures.count("liars quarantined")
        c.clear_quarantine(liar["provider_id"])  # trusted again, to lie on training
        job = c.submit_train(digits, epochs=1, sync="sync", min_providers=3, **PARAMS)
        trained = c.wait(job, timeout=120)
        c.save_model(job, tmp_path / "model.pt")
        exact = max_diff(tmp_path / "model.pt", ref) < 1e-5
        figures.job("ok" if exact and trained["state"] == "done" else "wrong")
        verify = trained["stats"]["verify"]
        figures.count("gradient subtasks verified by a second provider", verify["verified"])
        figures.count("gradient results that disagreed (a liar outvoted)", verify["disagreements"])
        assert exact and verify["disagreements"] >= 1
        caught = next(n for n in c.nodes() if n["name"] == "local-2")
        assert caught["state"] == "quarantined"
        figures.count("liars quarantined")
    print(f"liars caught and strangers refused: {dict(figures.counts)}")
