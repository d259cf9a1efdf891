"""Failures with real processes: no providers, provider kill -9, head kill -9 and restart,
RabbitMQ-backed durability, garbage on the ZeroMQ sockets."""

from __future__ import annotations

import time

import msgpack
import numpy as np
import pytest
import zmq

from tests.conftest import run_cli
from user_client import Client
from user_client.local import LocalCluster

pytestmark = pytest.mark.integration


def _wait_for(pred, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _operands(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, n)), rng.standard_normal((n, n))


def test_job_waits_without_providers_then_runs() -> None:
    with LocalCluster(0, heartbeat=0.5, threads=1) as cl, Client(cl.url) as c:
        a, b = _operands(100)
        job = c.submit_matmul(a, b)
        time.sleep(0.5)
        view = c.status(job)
        assert view["state"] == "queued" and "waiting for providers" in view["waiting"]
        out = run_cli("status", job, url=cl.url)
        assert out.returncode == 0 and "waiting for providers" in out.stdout
        cl.add_provider()
        c.wait(job, timeout=60)
        np.testing.assert_allclose(c.result(job), a @ b, rtol=1e-10, atol=1e-10)


def test_cancel_queued_job() -> None:
    with LocalCluster(0, heartbeat=0.5) as cl, Client(cl.url) as c:
        job = c.submit_matmul(np.ones((3, 3)), np.ones((3, 3)))
        assert c.cancel(job)["state"] == "cancelled"
        out = run_cli("result", job, "-o", "/tmp/never.npy", url=cl.url)
        assert out.returncode == 2 and "cancelled" in out.stderr


def test_provider_killed_mid_job_work_goes_elsewhere() -> None:
    with LocalCluster(2, heartbeat=0.3, threads=1, provider_args=["--delay", "1.5"]) as cl, \
            Client(cl.url) as c:
        a, b = _operands(300)
        job = c.submit_matmul(a, b)
        _wait_for(lambda: c.status(job)["state"] == "running", 10, "job start")
        victim = cl.providers[0]
        t_kill = time.monotonic()
        victim.kill()
        detect = _wait_for(lambda: any(n["state"] == "dead" for n in c.nodes()), 10, "dead provider")
        assert detect <= 3 * 0.3 + 1.0, f"dead provider detected after {detect:.2f}s"
        view = c.wait(job, timeout=60)
        assert time.monotonic() - t_kill < 30
        np.testing.assert_allclose(c.result(job), a @ b, rtol=1e-10, atol=1e-10)
        assert view["shares"] == {"local-1": 1.0}


def _head_restart_completes(cl: LocalCluster) -> None:
    with Client(cl.url) as c:
        a, b = _operands(300, seed=7)
        job = c.submit_matmul(a, b)
        _wait_for(lambda: c.status(job)["state"] == "running", 10, "job start")
        cl.kill_head()  # kill -9 while the providers compute
        cl.start_head()
        cl.wait_ready(2, timeout=30)  # providers noticed, re-registered (Lazy Pirate)
        view = c.wait(job, timeout=60)
        assert view["state"] == "done"
        np.testing.assert_allclose(c.result(job), a @ b, rtol=1e-10, atol=1e-10)
        assert [j["job_id"] for j in c.jobs() if j["job_id"] == job] == [job]


def test_head_killed_and_restarted_job_completes_embedded() -> None:
    with LocalCluster(2, heartbeat=0.3, threads=1, provider_args=["--delay", "1.0"]) as cl:
        _head_restart_completes(cl)


@pytest.mark.rabbitmq
def test_head_killed_and_restarted_job_completes_rabbitmq(amqp_url: str) -> None:
    with LocalCluster(2, heartbeat=0.3, threads=1, amqp_url=amqp_url,
                      provider_args=["--delay", "1.0"]) as cl:
        _head_restart_completes(cl)


@pytest.mark.rabbitmq
def test_4096_float64_through_rabbitmq_claim_check(amqp_url: str) -> None:
    """128 MiB per operand: bulk data stays in the state dir, the queue holds references."""
    with LocalCluster(2, heartbeat=0.5, amqp_url=amqp_url) as cl, Client(cl.url, timeout=120) as c:
        rng = np.random.default_rng(4)
        a = rng.standard_normal((4096, 4096))
        b = rng.standard_normal((4096, 4096))
        job = c.submit_matmul(a, b)
        c.wait(job, timeout=300)
        got = c.result(job)
        ref = a[:64] @ b  # spot-check rows from both providers' shares
        np.testing.assert_allclose(got[:64], ref, rtol=1e-10, atol=1e-9)
        np.testing.assert_allclose(got[-64:], a[-64:] @ b, rtol=1e-10, atol=1e-9)


def test_garbage_on_zmq_sockets_does_not_hurt(cluster_fresh: LocalCluster) -> None:
    cl = cluster_fresh
    ctx = zmq.Context()
    try:
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.RCVTIMEO, 3000)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(f"tcp://127.0.0.1:{cl.ports['registration']}")
        for payload in ([b"\x00\xffgarbage"], [msgpack.packb({"v": 99, "type": "register"})],
                        [msgpack.packb({"v": 1, "type": "heartbeat", "provider_id": 5})],
                        [msgpack.packb({"v": 1, "type": "subtask"})],
                        [msgpack.packb({"v": 1, "type": "heartbeat", "provider_id": "a" * 32, "running": [],
                                        "queued": 0, "arrays": [{"dtype": "<f8", "shape": [10**9]}]})]):
            req.send_multipart(payload)
            reply = msgpack.unpackb(req.recv())
            assert reply["type"] == "error" and reply["code"] in ("bad_message", "bad_version",
                                                                   "unknown_provider"), reply
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(f"tcp://127.0.0.1:{cl.ports['result']}")
        push.send_multipart([b"junk", b"more junk"])
        push.send_multipart([msgpack.packb({"v": 1, "type": "result", "job_id": "b" * 32, "subtask": 0,
                                            "attempt": 1, "epoch": "c" * 32, "provider_id": "d" * 32,
                                            "elapsed_s": 0.1, "stats": {}, "arrays": []})])
        with Client(cl.url) as c:
            a, b = _operands(64)
            np.testing.assert_allclose(c.matmul(a, b), a @ b, rtol=1e-10, atol=1e-10)
    finally:
        ctx.destroy(linger=0)


@pytest.fixture
def cluster_fresh():
    with LocalCluster(2, heartbeat=0.5, threads=1) as cl:
        yield cl


def test_straggler_is_copied_to_an_idle_provider_and_alerted() -> None:
    with LocalCluster(0, heartbeat=0.5, threads=1) as cl, Client(cl.url) as c:
        cl.add_provider()
        cl.add_provider("--delay", "6")  # a straggler: sleeps 6 s before each subtask
        cl.wait_ready(2)
        rng = np.random.default_rng(5)  # work enough for two shares of >= rows.MIN_SHARE_SECONDS each
        a, b = rng.random((200, 1000)), rng.random((1000, 1000))
        t0 = time.monotonic()
        job = c.submit_matmul(a, b)
        c.wait(job, timeout=60)
        took = time.monotonic() - t0
        np.testing.assert_allclose(c.result(job), a @ b, rtol=1e-10, atol=1e-10)
        assert took < 5.5, f"took {took:.1f}s: the straggler's share was not run elsewhere"
        events = c._json_any("GET", f"/v1/jobs/{job}/events")
        stragglers = [e for e in events if e["kind"] == "straggler"]
        assert len(stragglers) == 1 and stragglers[0]["copied_to"]
        assert c.status(job)["shares"] == {"local-0": 1.0}
