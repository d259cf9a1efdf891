"""Shared fixtures: real head and provider processes over loopback, and RabbitMQ."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest

from user_client import Client
from user_client.local import LocalCluster

ROOT = Path(__file__).resolve().parents[1]
AMQP_URL = os.environ.get("DCF_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def amqp_reachable(url: str = AMQP_URL) -> bool:
    u = urlparse(url)
    try:
        with socket.create_connection((u.hostname or "127.0.0.1", u.port or 5672), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def amqp_url() -> str:
    """RabbitMQ for tests: skipped on a laptop without it, a failure in CI (CI=true)."""
    if not amqp_reachable(AMQP_URL):
        msg = f"RabbitMQ not reachable at {AMQP_URL}"
        if IN_CI:
            pytest.fail(msg + " (CI=true: RabbitMQ tests must run)")
        pytest.skip(msg)
    return AMQP_URL


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """A head and 2 providers, shared by the tests of one module."""
    with LocalCluster(2, heartbeat=0.5, threads=1) as c:
        yield c


@pytest.fixture
def client(cluster: LocalCluster) -> Iterator[Client]:
    with Client(cluster.url) as c:
        yield c


def run_cli(*args: str, url: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ}
    if url:
        env["DCF_HEAD_URL"] = url
    return subprocess.run([sys.executable, "-m", "user_client", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)
