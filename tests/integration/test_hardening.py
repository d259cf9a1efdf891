"""Issue 14's red-team findings on a real head over loopback: what an attacker (or an unlucky
operator) did, and what the head does now.

* A8: the state dir and every file in it are the owner's only; the wrong-token warning is one
  line per source per 10 s, not one per request; .env.example's placeholder secrets are refused.
* A7: a connection that sends no complete request head is closed (slow loris).
* B8: a busy ZeroMQ port at start is one line naming it, not a traceback.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import ROOT
from user_client import Client
from user_client.local import LocalCluster, free_port

pytestmark = pytest.mark.integration

TOKEN = "hardening-" + os.urandom(8).hex()
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def guarded() -> Iterator[LocalCluster]:
    """A head with an API token and one provider, for this module (the token in DCF_API_TOKEN, where
    LocalCluster's own client finds it)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DCF_API_TOKEN", TOKEN)
        with LocalCluster(1, heartbeat=0.5, threads=1, head_args=["--api-token", TOKEN]) as c:
            yield c


def _head_log(cluster: LocalCluster) -> str:
    return (cluster.log_dir / "head.log").read_text(errors="replace")


# ---- A8: owner-only state dir -----------------------------------------------------------------------
def test_state_dir_and_its_files_are_owner_only(guarded: LocalCluster) -> None:
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((400, 300)), rng.standard_normal((300, 200))
    # over HTTP (uploads), and as a client on the head's machine (files adopted from incoming/)
    for shared in ("off", "auto"):
        with Client(guarded.url, token=TOKEN, timeout=30, shared_files=shared) as c:
            job = c.submit_matmul(a, b)
            assert c.wait(job, timeout=60)["state"] == "done"
            np.testing.assert_allclose(c.result(job), a @ b, rtol=1e-9, atol=1e-9)
    root = guarded.state_dir
    checked: list[str] = []
    loose: list[str] = []
    for path in [root, *root.rglob("*")]:
        rel = path.relative_to(root)
        if rel.parts and rel.parts[0] == "logs":  # the test's own log files, written by LocalCluster
            continue
        mode = stat.S_IMODE(path.lstat().st_mode)
        checked.append(str(rel))
        if mode & 0o077:
            loose.append(f"{rel or '.'}: {oct(mode)}")
    assert not loose, f"readable by others: {loose}"
    assert "jobs.sqlite3" in checked and any(p.startswith("blobs/") for p in checked), checked
    assert any(p.startswith("jobs/") and p.count("/") >= 2 for p in checked), checked  # a result file


# ---- A8: the wrong-token warning --------------------------------------------------------------------
def test_wrong_token_warning_is_throttled(guarded: LocalCluster) -> None:
    before = _head_log(guarded).count("rejected request without a valid token")
    with httpx.Client(base_url=guarded.url, timeout=10, trust_env=False) as http:
        codes = {http.get("/v1/jobs", headers={"Authorization": "Bearer wrong"}).status_code for _ in range(300)}
        codes |= {http.post("/v1/jobs/batch", content=b"\x80").status_code for _ in range(100)}  # the fast front
        assert http.get("/v1/jobs", headers=AUTH).status_code == 200
    assert codes == {401}
    with Client(guarded.url, token=TOKEN) as c:  # the head has written what it logged by now
        c.health()
    lines = _head_log(guarded).count("rejected request without a valid token") - before
    assert 1 <= lines <= 5, f"{lines} warning lines for 400 rejected requests"


# ---- A8: .env.example placeholders ------------------------------------------------------------------
@pytest.mark.parametrize("args", [
    ["--api-token", "change-me-api-token"],
    ["--amqp-url", "amqp://dcf:change-me-rabbitmq-password@127.0.0.1:9/"],
])
def test_placeholder_secrets_are_refused(args: list[str], tmp_path: Path) -> None:
    head = subprocess.run([sys.executable, "-m", "head_node", "--host", "127.0.0.1", "--http-port", str(free_port()),
                           "--state-dir", str(tmp_path / "h"), "--registration-port", str(free_port()),
                           "--task-port", str(free_port()), "--result-port", str(free_port()), *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert head.returncode == 2, head.stderr
    assert "placeholder of .env.example" in head.stderr and "Traceback" not in head.stderr, head.stderr
    assert len(head.stderr.strip().splitlines()) == 1, head.stderr


# ---- A7: slow loris ---------------------------------------------------------------------------------
def test_connections_without_a_request_are_closed(guarded: LocalCluster) -> None:
    """60 connections: 30 send nothing, 30 a request line and then a header byte a second. All are
    closed by the head (within its 10 s header timeout; 40 s allowed); a real request still works."""
    socks: list[socket.socket] = []
    talking: list[socket.socket] = []
    try:
        for i in range(60):
            s = socket.create_connection(("127.0.0.1", guarded.http_port), timeout=5)
            if i % 2:
                s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")
                talking.append(s)
            socks.append(s)
        with Client(guarded.url, token=TOKEN, timeout=10) as c:
            assert c.health()["status"] == "ok"
        open_socks = set(socks)
        deadline = time.monotonic() + 40
        while open_socks and time.monotonic() < deadline:
            for s in [s for s in talking if s in open_socks]:
                with contextlib.suppress(OSError):
                    s.send(b"X")  # one more byte of a header name: never a complete request head
            readable, _, _ = select.select(list(open_socks), [], [], 1.0)
            for s in readable:
                try:
                    data = s.recv(4096)
                except OSError:  # reset: closed
                    data = b""
                if not data:
                    open_socks.discard(s)
        assert not open_socks, f"{len(open_socks)} of 60 idle connections still open after 40 s"
    finally:
        for s in socks:
            s.close()


# ---- B8: a busy ZeroMQ port -------------------------------------------------------------------------
def test_a_busy_zeromq_port_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        head = subprocess.run([sys.executable, "-m", "head_node", "--host", "127.0.0.1",
                               "--http-port", str(free_port()),
                               "--state-dir", str(tmp_path / "h"), "--registration-port", str(free_port()),
                               "--task-port", str(port), "--result-port", str(free_port())],
                              capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert head.returncode == 1, head.stderr
    assert str(port) in head.stderr and "in use" in head.stderr, head.stderr
    assert "Traceback" not in head.stderr, head.stderr
