"""A standby never becomes a second active head beside one started without --standby (head_node/__main__.py):
when the lock is free because that head's broker connection is gone, but the head still serves (such a head
does not fence itself), the standby refuses to start; once that head is gone, it takes over."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.conftest import ROOT
from user_client.local import free_ports

pytestmark = pytest.mark.integration


def head_args(state: Path, amqp_url: str, queue: str, *extra: str) -> list[str]:
    http, reg, task, res, rdv = free_ports(5)
    return [sys.executable, "-m", "head_node", "--host", "127.0.0.1", "--http-port", str(http), "--state-dir",
            str(state), "--amqp-url", amqp_url, "--amqp-queue", queue, "--amqp-heartbeat", "2", "--insecure",
            "--registration-port", str(reg), "--task-port", str(task), "--result-port", str(res),
            "--rendezvous-port", str(rdv), *extra]


def role(port: str) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/health", timeout=2) as resp:
            return str(json.loads(resp.read()).get("role"))
    except OSError:
        return None


def test_a_standby_refuses_beside_a_head_alone_that_still_serves(tmp_path: Path, amqp_url: str) -> None:
    queue = f"dcf-test-{uuid.uuid4().hex[:8]}"
    state = tmp_path / "state"
    # a head started alone whose broker is unreachable (as after its connection dropped): it serves anyway,
    # and the broker's leader lock is free
    alone = head_args(state, "amqp://guest:guest@127.0.0.1:1/", queue)
    a = subprocess.Popen(alone, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port = alone[alone.index("--http-port") + 1]
        end = time.monotonic() + 60
        while role(port) != "active" or not (state / "active-head.json").exists():
            assert time.monotonic() < end and a.poll() is None, "the head started alone did not come up"
            time.sleep(0.2)
        refused = subprocess.run(head_args(state, amqp_url, queue, "--standby"), capture_output=True, text=True,
                                 timeout=60, cwd=ROOT)
        assert refused.returncode == 2, refused.stderr[-2000:]
        assert "started without --standby and still serves" in refused.stderr
    finally:
        a.kill()
        a.wait(10)
    # that head gone: a standby takes the lock and serves
    standby = head_args(state, amqp_url, queue, "--standby")
    b = subprocess.Popen(standby, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port = standby[standby.index("--http-port") + 1]
        end = time.monotonic() + 60
        while role(port) != "active":
            assert time.monotonic() < end and b.poll() is None, "the standby did not take over"
            time.sleep(0.2)
    finally:
        b.terminate()
        b.wait(15)
