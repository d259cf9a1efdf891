"""Secure by default (issue 15 §4, issue 14 A1): a head started with no security flags, against a real
head over loopback.

* On its first start it creates an API token and a CURVE key pair in its state dir (owner-only files),
  turns both on and says where they are (never the token itself); a restart reuses them.
* Without the token every data route answers 401 (what the red team did to an open head: list and
  download jobs and results, read events and metrics, drain a provider, delete jobs); with it, 200.
* A provider without keys cannot register; one enrolled with ``dcf keys add-provider`` gets in and
  computes (the positive control: the refusal is the keys', not a broken head).
* ``dcf`` on the head's machine finds the token by itself (DCF_STATE_DIR, or ./dcf-state), and sends
  a found token to a loopback head only.
* ``--insecure`` (DCF_INSECURE) starts open, with a warning, and creates nothing.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import zmq

from common import config, protocol, security
from tests.conftest import ROOT
from user_client import Client
from user_client.local import LocalCluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def head() -> Iterator[LocalCluster]:
    """A head started with no security flags (LocalCluster(secure=True) passes none) and no providers."""
    with LocalCluster(0, heartbeat=0.5, threads=1, secure=True) as c:
        yield c


def _log(cluster: LocalCluster, name: str = "head") -> str:
    return (cluster.log_dir / f"{name}.log").read_text(errors="replace")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cli(*args: str, env: dict[str, str], cwd: Path | str = ROOT) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("DCF_API_TOKEN", "DCF_STATE_DIR", "DCF_HEAD_URL")}
    return subprocess.run([sys.executable, "-m", "user_client", *args], capture_output=True, text=True,
                          env={**clean, "PYTHONPATH": str(ROOT), **env}, timeout=120, cwd=cwd)


def _provider(cluster: LocalCluster, name: str, *curve_args: str) -> subprocess.Popen[bytes]:
    log = open(cluster.log_dir / f"{name}.log", "wb")  # noqa: SIM115 (closed in _stop)
    proc = subprocess.Popen([sys.executable, "-m", "provider_node", "--head", "127.0.0.1", "--threads", "1",
                             "--name", name, "--request-timeout", "0.5", *cluster.port_args(), *curve_args],
                            stdout=log, stderr=log, cwd=ROOT)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    proc.log.close()  # type: ignore[attr-defined]


# ---- first start: token and keys created, owner-only, announced -----------------------------------------
def test_first_start_creates_a_token_and_curve_keys(head: LocalCluster) -> None:
    state = head.state_dir
    token_file, keys = state / config.API_TOKEN_FILE, state / config.KEY_DIR
    token = token_file.read_text().strip()
    assert len(token) >= 32 and token == head.api_token
    assert _mode(token_file) == 0o600
    assert _mode(keys / "head.key_secret") == 0o600 and _mode(keys) == 0o700
    security.load_secret(keys / "head.key_secret")  # a valid pair
    assert (keys / "allowed").is_dir() and not list((keys / "allowed").glob("*.key"))  # nobody allowed yet
    text = _log(head)
    assert "secure by default" in text and str(token_file.resolve()) in text and "created now" in text
    assert "dcf keys add-provider NAME" in text and "--insecure" in text
    assert "CURVE on" in text  # the head's sockets are CURVE servers
    assert token not in text  # the token itself is never logged


# ---- HTTP: 401 without the token ----------------------------------------------------------------------
GUARDED = [("GET", "/v1/jobs"), ("GET", "/v1/jobs/0123456789abcdef0123456789abcdef"),
           ("GET", "/v1/jobs/0123456789abcdef0123456789abcdef/result"), ("DELETE", "/v1/jobs/0123456789abcdef"),
           ("GET", "/v1/jobs/0123456789abcdef/events"), ("GET", "/v1/nodes"), ("POST", "/v1/nodes/0123abcd/drain"),
           ("GET", "/v1/metrics"), ("GET", "/metrics"), ("GET", "/v1/info"), ("GET", "/v1/stream"),
           ("POST", "/v1/jobs"), ("PUT", "/v1/blobs")]


def test_http_requires_the_token(head: LocalCluster) -> None:
    token = head.api_token
    refused = 0
    with httpx.Client(base_url=head.url, timeout=10, trust_env=False) as http:
        for method, path in GUARDED:
            for headers in ({}, {"Authorization": "Bearer wrong-" + token[:8]}, {"Authorization": token}):
                r = http.request(method, path, headers=headers)
                assert r.status_code == 401, (method, path, headers, r.status_code, r.text)
                refused += 1
        r = http.get("/v1/stream", params={"token": "nope"})
        assert r.status_code == 401
        # what needs no token holds no data: liveness, the dashboard page
        assert http.get("/v1/health").status_code == 200
        assert http.get("/").status_code == 200
        # positive controls: the token opens the same routes (the header, and ?token= for the stream)
        auth = {"Authorization": f"Bearer {token}"}
        assert http.get("/v1/jobs", headers=auth).status_code == 200
        assert http.get("/v1/metrics", headers=auth).status_code == 200
        with http.stream("GET", "/v1/stream", params={"token": token, "period": "0.2"}) as s:
            assert s.status_code == 200
    print(f"\nsecure default: {refused} unauthenticated HTTP requests on {len(GUARDED)} routes, all 401")
    assert token not in _log(head)


# ---- ZeroMQ: a peer without keys cannot register; an enrolled provider can --------------------------------
def test_provider_without_keys_is_refused_and_an_enrolled_one_gets_in(head: LocalCluster, tmp_path: Path) -> None:
    ctx = zmq.Context()
    try:  # a raw register without CURVE: no answer
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(f"tcp://127.0.0.1:{head.ports['registration']}")
        req.send_multipart(protocol.encode("register", {
            "provider_id": "0" * 32, "name": "raw", "host": "h", "os": "Linux", "device_kind": "cpu",
            "device_name": "x", "memory_bytes": 1 << 30, "cores": 1, "task_types": ["matmul"],
            "dtypes": ["float64"], "version": "0", "gflops": 1.0}))
        assert not req.poll(1500), "the head answered a peer without CURVE keys"
        req.close(linger=0)
    finally:
        ctx.destroy(linger=0)
    # real providers: one with no keys (the handshake fails: no CURVE), one with a key pair of its own
    # that the head never allowed (ZAP refuses it, and says so)
    own, _ = security.generate_provider(tmp_path / "stranger", "stranger")
    strangers = [_provider(head, "keyless"),
                 _provider(head, "stranger", "--curve-server-key", str(head.state_dir / "keys" / "head.key"),
                           "--curve-secret-key", str(own))]
    try:  # until both have tried (a provider measures its device first) and been turned away
        end = time.monotonic() + 60
        while not ("key not in the allow-list" in _log(head) and "no reply from the head" in _log(head, "keyless")):
            assert time.monotonic() < end, "the providers did not try to register"
            time.sleep(0.2)
        time.sleep(1)
        assert all(p.poll() is None for p in strangers)
        with Client(head.url, token=head.api_token) as c:
            assert c.nodes() == []
    finally:
        for p in strangers:
            _stop(p)
    assert "refused a connection from 127.0.0.1: key not in the allow-list" in _log(head)
    assert "dcf keys add-provider NAME" in _log(head, "keyless")  # the keyless provider says what it lacks

    out = tmp_path / "gpu1-keys"
    r = _cli("keys", "add-provider", "gpu1", "--head-state-dir", str(head.state_dir), "--out", str(out), env={})
    assert r.returncode == 0, r.stderr
    assert (head.state_dir / "keys" / "allowed" / "gpu1.key").is_file()
    assert sorted(p.name for p in out.iterdir()) == ["gpu1.key", "gpu1.key_secret", "head.key"]
    assert _mode(out / "gpu1.key_secret") == 0o600
    assert f"--curve-secret-key {out / 'gpu1.key_secret'}" in r.stdout
    enrolled = _provider(head, "gpu1", "--curve-server-key", str(out / "head.key"),
                         "--curve-secret-key", str(out / "gpu1.key_secret"))
    try:
        head.wait_ready(1, 30)
        rng = np.random.default_rng(3)
        a, b = rng.standard_normal((120, 80)), rng.standard_normal((80, 60))
        with Client(head.url, token=head.api_token) as c:
            assert [n["name"] for n in c.nodes()] == ["gpu1"]
            np.testing.assert_allclose(c.matmul(a, b, timeout=60), a @ b, rtol=1e-12, atol=1e-10)
    finally:
        _stop(enrolled)
    # an unknown name fails in one line, and a head without keys is named
    r = _cli("keys", "add-provider", "x", "--dir", str(tmp_path / "nokeys"), env={})
    assert r.returncode == 2 and "no head key pair" in r.stderr and "Traceback" not in r.stderr


# ---- the CLI on the head's machine finds the token ---------------------------------------------------------
def test_a_local_cli_finds_the_token(head: LocalCluster, tmp_path: Path) -> None:
    env = {"DCF_HEAD_URL": head.url}
    r = _cli("--json", "nodes", env={**env, "DCF_STATE_DIR": str(head.state_dir)}, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = _cli("jobs", "--head-state-dir", str(head.state_dir), env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    # negative control: no hint and no ./dcf-state here: 401, one line
    r = _cli("nodes", env=env, cwd=tmp_path)
    assert r.returncode == 2 and "token" in r.stderr.lower() and "Traceback" not in r.stderr, r.stderr
    # the default path: ./dcf-state of the working directory
    (tmp_path / "dcf-state").mkdir()
    (tmp_path / "dcf-state" / config.API_TOKEN_FILE).write_text(head.api_token + "\n")
    r = _cli("nodes", env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_a_found_token_goes_to_loopback_heads_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "dcf-state").mkdir()
    (tmp_path / "dcf-state" / config.API_TOKEN_FILE).write_text("t" * 43 + "\n")
    monkeypatch.chdir(tmp_path)
    for url in ("http://127.0.0.1:8080", "http://localhost:9", "http://[::1]:8080"):
        assert config.ClientSettings.from_values({"head_url": url}, env={}).api_token == "t" * 43, url
    for url in ("http://10.0.0.5:8080", "http://head.example:8080"):
        assert config.ClientSettings.from_values({"head_url": url}, env={}).api_token == "", url
    given = config.ClientSettings.from_values({"api_token": "mine"}, env={})
    assert given.api_token == "mine"  # a given token wins
    assert "t" * 43 not in repr(config.ClientSettings.from_values({}, env={}))


# ---- later starts reuse them -----------------------------------------------------------------------------
def test_a_restart_reuses_the_token_and_keys(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with LocalCluster(0, heartbeat=0.5, threads=1, secure=True, state_dir=str(state)) as c:
        token, secret = c.api_token, (state / "keys" / "head.key_secret").read_bytes()
    assert _mode(state) == 0o700
    with LocalCluster(0, heartbeat=0.5, threads=1, secure=True, state_dir=str(state),
                      log_dir=str(tmp_path / "logs2")) as c:
        assert c.api_token == token and (state / "keys" / "head.key_secret").read_bytes() == secret
        with Client(c.url, token=token) as client:
            assert client.jobs() == []
        assert "kept" in _log(c) and "created now" not in _log(c)


# ---- --insecure: open, with a warning, nothing created -----------------------------------------------------
@pytest.mark.parametrize("how", ["flag", "env"])
def test_insecure_starts_open_with_a_warning(how: str, tmp_path: Path) -> None:
    state = tmp_path / "state"
    # LocalCluster passes --insecure itself; secure=True + DCF_INSECURE=1: no flag, the variable only
    kwargs: dict = {"secure": True, "env": {"DCF_INSECURE": "1"}} if how == "env" else {}
    with LocalCluster(0, heartbeat=0.5, threads=1, state_dir=str(state), **kwargs) as c:
        with httpx.Client(base_url=c.url, timeout=10, trust_env=False) as http:
            assert http.get("/v1/jobs").status_code == 200
        text = _log(c)
    assert "--insecure:" in text and "WARNING" in text and "no CURVE" in text and "no token" in text
    assert not (state / config.API_TOKEN_FILE).exists() and not (state / config.KEY_DIR).exists()
