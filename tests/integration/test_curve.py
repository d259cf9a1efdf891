"""ZeroMQ CURVE in the Ironhouse pattern (common/security.py, head_node/zap.py), against a real head.

A head with CURVE keys and one allowed provider runs matmul jobs. A stranger holding a key pair
that is not on the allow-list, or no key at all, cannot register, receive subtasks or inject
results, while the same moves made with an allowed key (positive controls) do work, so the
test would notice if the keys were not enforced. An allowed key cannot act in another
provider's name. A key added to the allow-list directory is accepted without a restart.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from common import protocol, security
from user_client import Client
from user_client.local import LocalCluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(1, heartbeat=0.5, threads=1, curve=True, provider_args=["--shared-files", "off"]) as c:
        yield c


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Key pairs the head has never seen (their own head key too, unused)."""
    key_dir = tmp_path_factory.mktemp("stranger-keys")
    security.generate_head(key_dir)
    security.generate_provider(key_dir, "stranger")
    security.generate_provider(key_dir, "latecomer")
    return key_dir


@pytest.fixture
def zctx() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def _wait_for(probe: Callable[[], bool], timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if probe():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _counters(c: Client) -> dict[str, int]:
    return c.http.get("/v1/metrics").json()["counters"]


def _socket(ctx: zmq.Context, kind: int, cluster: LocalCluster, port: str,
            keys: security.ClientKeys | None) -> zmq.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    security.secure_client(sock, keys)
    sock.connect(f"tcp://127.0.0.1:{cluster.ports[port]}")
    return sock


def _keys(cluster: LocalCluster, secret_file: Path) -> security.ClientKeys:
    public, secret = security.load_secret(secret_file)
    assert cluster.key_dir is not None
    return security.ClientKeys(public, secret, security.load_public(cluster.key_dir / "head.key"))


def _allowed_keys(cluster: LocalCluster) -> security.ClientKeys:
    assert cluster.key_dir is not None
    return _keys(cluster, cluster.key_dir / "providers" / "local-0.key_secret")


def _provider(cluster: LocalCluster, name: str, *curve_args: str) -> subprocess.Popen[bytes]:
    log = open(cluster.log_dir / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process below)
    args = [sys.executable, "-m", "provider_node", "--head", "127.0.0.1", "--threads", "1", "--name", name,
            "--request-timeout", "0.5", *cluster.port_args(), *curve_args]
    proc = subprocess.Popen(args, stdout=log, stderr=log)
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


def _names(c: Client) -> set[str]:
    return {n["name"] for n in c.nodes()}


def _request(ctx: zmq.Context, cluster: LocalCluster, keys: security.ClientKeys | None,
             frames: list[Any], timeout_ms: int = 2000) -> protocol.Message | None:
    req = _socket(ctx, zmq.REQ, cluster, "registration", keys)
    try:
        req.send_multipart(frames)
        if not req.poll(timeout_ms):
            return None
        return protocol.decode(req.recv_multipart(copy=False), max_bytes=0)
    finally:
        req.close(linger=0)


def _register_frames(pid: str) -> list[Any]:
    return protocol.encode("register", {
        "provider_id": pid, "name": "raw", "host": "h", "os": "Linux", "device_kind": "cpu", "device_name": "x",
        "memory_bytes": 1 << 30, "cores": 1, "task_types": ["no-such-task"], "dtypes": ["float64"],
        "version": "0", "gflops": 1.0})


def test_allowed_provider_computes_over_curve(cluster: LocalCluster) -> None:
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((300, 200)), rng.standard_normal((200, 150))
    with Client(cluster.url) as c:
        assert _names(c) == {"local-0"}
        np.testing.assert_allclose(c.matmul(a, b, timeout=60), a @ b, rtol=1e-12, atol=1e-10)
    head_log = (cluster.log_dir / "head.log").read_text()
    assert "CURVE on" in head_log


def test_raw_request_needs_an_allowed_key(cluster: LocalCluster, stranger: Path, zctx: zmq.Context) -> None:
    pid_ok, pid_bad = "a" * 32, "b" * 32
    # positive control: the allowed key gets a reply
    reply = _request(zctx, cluster, _allowed_keys(cluster), _register_frames(pid_ok))
    assert reply is not None and reply.type == "registered"
    # a stranger's key and no key at all get nothing: the handshake never completes
    assert _request(zctx, cluster, _keys(cluster, stranger / "providers" / "stranger.key_secret"),
                    _register_frames(pid_bad)) is None
    assert _request(zctx, cluster, None, _register_frames(pid_bad)) is None
    with Client(cluster.url) as c:
        ids = {n["provider_id"] for n in c.nodes()}
        assert pid_ok in ids and pid_bad not in ids
        assert _counters(c)["curve_refused"] >= 1
    head_log = (cluster.log_dir / "head.log").read_text()
    assert "refused a connection from 127.0.0.1: key not in the allow-list" in head_log
    # an allowed key cannot speak for a provider registered with another key... (pid_ok is this key's)
    reply = _request(zctx, cluster, _allowed_keys(cluster),
                     protocol.encode("unregister", {"provider_id": pid_ok}))
    assert reply is not None and reply.type == "ok"


def test_provider_with_a_stranger_key_or_none_cannot_register(cluster: LocalCluster, stranger: Path) -> None:
    assert cluster.key_dir is not None
    head_key = str(cluster.key_dir / "head.key")
    bad = _provider(cluster, "stranger", "--curve-secret-key", str(stranger / "providers" / "stranger.key_secret"),
                    "--curve-server-key", head_key)
    plain = _provider(cluster, "plain")
    wrong_head = _provider(cluster, "wrong-head", "--curve-secret-key",
                           str(cluster.key_dir / "providers" / "local-0.key_secret"),
                           "--curve-server-key", str(stranger / "head.key"))
    try:
        _wait_for(lambda: "refused this provider's CURVE key" in (cluster.log_dir / "stranger.log").read_text(),
                  20, "the stranger provider to log that its key was refused")
        time.sleep(1.0)
        with Client(cluster.url) as c:
            assert _names(c) == {"local-0"}
        for proc in (bad, plain, wrong_head):
            assert proc.poll() is None  # they keep retrying, they do not crash
    finally:
        for proc in (bad, plain, wrong_head):
            _stop(proc)


def test_stranger_receives_no_subtasks_and_cannot_inject_results(
        cluster: LocalCluster, stranger: Path, zctx: zmq.Context) -> None:
    stranger_keys = _keys(cluster, stranger / "providers" / "stranger.key_secret")
    with Client(cluster.url) as c:
        refused_before = _counters(c)["curve_refused"]
        provider = next(n["provider_id"] for n in c.nodes() if n["name"] == "local-0")
    snoop_bad = _socket(zctx, zmq.SUB, cluster, "task", stranger_keys)
    # positive control: local-0's own key on its own topic (the only subscription the head grants it)
    snoop_ok = _socket(zctx, zmq.SUB, cluster, "task", _allowed_keys(cluster))
    snoop_bad.setsockopt(zmq.SUBSCRIBE, b"")
    snoop_ok.setsockopt(zmq.SUBSCRIBE, provider.encode())
    push_bad = _socket(zctx, zmq.PUSH, cluster, "result", stranger_keys)
    assert cluster.key_dir is not None
    other_secret, _ = security.generate_provider(cluster.key_dir, "other")  # allowed, but not local-0's
    time.sleep(1.5)  # the head re-reads its allow-list
    push_ok = _socket(zctx, zmq.PUSH, cluster, "result", _keys(cluster, other_secret))
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((800, 600)), rng.standard_normal((600, 500))
    try:
        time.sleep(0.5)  # let the subscriptions reach the head
        with Client(cluster.url) as c:
            before = _counters(c)
            job = c.submit_matmul(a, b)
            seen_ok: list[protocol.Message] = []
            end = time.monotonic() + 60
            while time.monotonic() < end and not seen_ok:
                if snoop_ok.poll(100):
                    seen_ok.append(protocol.decode(snoop_ok.recv_multipart()[1:]))
            assert seen_ok, "the allowed subscriber saw no subtask: the test proves nothing"
            key = {k: seen_ok[0][k] for k in ("job_id", "subtask", "attempt", "epoch")}
            rows = seen_ok[0]["params"]["rows"]

            def forged() -> list[Any]:
                return protocol.encode("result", {**key, "provider_id": provider, "elapsed_s": 0.1, "stats": {}},
                                       [np.full((rows, b.shape[1]), 7.0)])

            for _ in range(3):  # queued at most: its handshake never completes, so nothing is delivered
                with contextlib.suppress(zmq.Again):
                    push_bad.send_multipart(forged(), flags=zmq.NOBLOCK)
            time.sleep(0.5)
            # an allowed key speaking for a provider registered with another key is refused too
            time.sleep(0.5)
            push_ok.send_multipart(forged())
            view = c.wait(job, timeout=60)
            assert view["state"] == "done"
            np.testing.assert_allclose(c.result(job), a @ b, rtol=1e-10)
            _wait_for(lambda: _counters(c)["bad_messages"] > before["bad_messages"], 10,
                      "the allowed key's forged result to be refused")
            time.sleep(0.5)
            after = _counters(c)
            # only the allowed key's message reached the head (and was refused): none of the stranger's
            assert after["bad_messages"] == before["bad_messages"] + 1
            assert after["subtasks_failed"] == before["subtasks_failed"]
            assert after["curve_refused"] >= refused_before + 2  # the stranger's SUB and PUSH
        assert not snoop_bad.poll(200), "a subscriber without an allowed key received a subtask"
        head_log = (cluster.log_dir / "head.log").read_text()
        assert "is not registered with this CURVE key" in head_log
    finally:
        for s in (snoop_bad, snoop_ok, push_bad, push_ok):
            s.close(linger=0)


def test_an_allowed_key_cannot_read_or_unsubscribe_another_providers_topic(
        cluster: LocalCluster, zctx: zmq.Context) -> None:
    """CURVE's known gap (issue 15 §4, issue 14 A4): an allowed insider key subscribed to the empty
    topic, a prefix or another provider's id and read its operands. Now the head grants a key only the
    topics of the ids it owns; the insider's unsubscribe of the provider's topic does not mark it lost.
    Positive control: the provider's own key on its own topic sees the subtask."""
    assert cluster.key_dir is not None
    insider_secret, _ = security.generate_provider(cluster.key_dir, "insider")  # allowed
    time.sleep(1.5)  # the head re-reads its allow-list
    with Client(cluster.url) as c:
        provider = next(n["provider_id"] for n in c.nodes() if n["name"] == "local-0")
        refused_before = _counters(c)["subscriptions_refused"]
        insiders = [_socket(zctx, zmq.SUB, cluster, "task", _keys(cluster, insider_secret)) for _ in range(3)]
        for sock, topic in zip(insiders, (b"", provider[:4].encode(), provider.encode()), strict=True):
            sock.setsockopt(zmq.SUBSCRIBE, topic)
        own = _socket(zctx, zmq.SUB, cluster, "task", _allowed_keys(cluster))
        own.setsockopt(zmq.SUBSCRIBE, provider.encode())
        try:
            _wait_for(lambda: _counters(c)["subscriptions_refused"] >= refused_before + 3, 10,
                      "the insider's three subscriptions to be refused")
            insiders[2].setsockopt(zmq.UNSUBSCRIBE, provider.encode())  # not its topic to end
            time.sleep(2.0)  # past the disconnect grace (0.5 s) and heartbeats at 0.5 s
            assert next(n["state"] for n in c.nodes() if n["provider_id"] == provider) == "ready"
            a = np.arange(12.0).reshape(4, 3)
            job = c.submit_matmul(a, a.T)
            assert own.poll(30_000), "the provider's own key saw no subtask: the test proves nothing"
            c.wait(job, timeout=60)
            np.testing.assert_allclose(c.result(job), a @ a.T)
            for sock in insiders:
                assert not sock.poll(200), "an insider key received another provider's subtask"
        finally:
            for sock in (*insiders, own):
                sock.close(linger=0)
    print(f"insider subscriptions refused: {_counters_after(cluster) - refused_before} (empty topic, a prefix, "
          "another key's provider id); its unsubscribe ignored; the provider's own key served")


def _counters_after(cluster: LocalCluster) -> int:
    with Client(cluster.url) as c:
        return int(_counters(c)["subscriptions_refused"])


def test_key_added_to_the_allow_list_is_accepted_without_restart(cluster: LocalCluster, stranger: Path) -> None:
    assert cluster.key_dir is not None
    proc = _provider(cluster, "latecomer", "--curve-secret-key",
                     str(stranger / "providers" / "latecomer.key_secret"),
                     "--curve-server-key", str(cluster.key_dir / "head.key"))
    try:
        with Client(cluster.url) as c:
            time.sleep(2.0)
            assert "latecomer" not in _names(c)
            shutil.copyfile(stranger / "allowed" / "latecomer.key", cluster.key_dir / "allowed" / "latecomer.key")
            # registered, and subscribed for subtasks: its SUB connection was refused too and starts over
            _wait_for(lambda: any(n["name"] == "latecomer" and n["state"] == "ready" for n in c.nodes()), 30,
                      "the latecomer to be ready once its key is allowed")
    finally:
        _stop(proc)
        (cluster.key_dir / "allowed" / "latecomer.key").unlink(missing_ok=True)


@pytest.mark.parametrize("argv, message", [
    (["--curve-secret-key", "/nonexistent/head.key_secret", "--curve-allow", "/tmp"], "cannot read CURVE key"),
    (["--curve-allow", "/tmp"], "needs both"),
])
def test_head_refuses_bad_curve_configuration(argv: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "head_node", *argv],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr


def test_provider_refuses_a_public_key_as_its_secret(stranger: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "provider_node", "--curve-secret-key",
                           str(stranger / "allowed" / "stranger.key"), "--curve-server-key",
                           str(stranger / "head.key")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "holds no secret key" in proc.stderr


def test_head_kill_and_restart_with_curve(tmp_path: Path) -> None:
    """kill -9 of a CURVE head: restarted on the same state dir, ports and keys, it knows no provider
    key; the providers re-register (unknown_provider), reconnect SUB and PUSH, and a job runs."""
    with LocalCluster(2, heartbeat=0.5, threads=1, curve=True, state_dir=str(tmp_path / "state")) as cl, \
            Client(cl.url) as c:
        rng = np.random.default_rng(3)
        a, b = rng.standard_normal((400, 300)), rng.standard_normal((300, 200))
        np.testing.assert_allclose(c.matmul(a, b, timeout=60), a @ b, rtol=1e-12, atol=1e-10)
        cl.kill_head()
        cl.start_head()
        cl.wait_ready(2, timeout=60)
        np.testing.assert_allclose(c.matmul(a, b, timeout=60), a @ b, rtol=1e-12, atol=1e-10)


def test_garbage_on_the_curve_ports_changes_nothing(cluster: LocalCluster) -> None:
    """Random bytes, a ZMTP greeting naming CURVE followed by a garbage HELLO, and a NULL greeting, on
    each of the three CURVE ports: the head stays up and a job still computes."""
    import random
    import socket

    rng = random.Random(20261122)
    greeting_curve = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"CURVE".ljust(20, b"\x00") + b"\x00" * 31
    greeting_null = b"\xff" + b"\x00" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\x00") + b"\x00" * 31
    payloads = [rng.randbytes(rng.randrange(1, 4096)) for _ in range(5)]
    payloads += [greeting_curve + b"\x04\xc8\x05HELLO" + rng.randbytes(194), greeting_null + rng.randbytes(300)]
    for port in cluster.ports.values():
        for payload in payloads:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s, contextlib.suppress(OSError):
                s.sendall(payload)
                s.settimeout(0.5)
                s.recv(4096)
    rng_np = np.random.default_rng(4)
    a, b = rng_np.standard_normal((200, 100)), rng_np.standard_normal((100, 50))
    with Client(cluster.url) as c:
        assert c.health()["status"] == "ok"
        np.testing.assert_allclose(c.matmul(a, b, timeout=60), a @ b, rtol=1e-12, atol=1e-10)
