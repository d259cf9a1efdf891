"""Seeded fuzzing of the head's three ZeroMQ sockets (docs/PROTOCOL.md §2-§5, §7, §11) against a
real head with 2 providers.

* ROUTER (registration): every request through a REQ envelope gets exactly one reply within a
  timeout, an ``error`` for anything bad (a valid reply for valid requests); replays get the same
  answers; envelope-less frames from a raw DEALER are dropped without a reply; after a frame over
  1 MiB (ZMQ_MAXMSGSIZE: a disconnect without reply) a fresh REQ is served.
* PULL (results): garbage, truncated frames, absurd declared sizes, unknown keys are dropped and
  counted; nothing declared is allocated.
* XPUB (subtasks): random subscription frames never make a real provider unready.
* With a live job: forged ``result``/``ack``/``failed`` from a provider id that was not sent the
  subtask never change the job's result nor strike a subtask; late duplicates are ignored.

The tests named after a bug this fuzzing found (max message size, VERBOSE unsubscribes, peer in
logs) keep those bugs fixed.

After each batch the head is alive, ``GET /v1/health`` answers, a real matmul is exact, and the
head's RSS stays bounded although messages declared multi-GiB arrays.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Iterator
from typing import Any

import httpx
import msgpack
import numpy as np
import psutil
import pytest
import zmq

from common import protocol
from user_client import Client
from user_client.local import LocalCluster

pytestmark = pytest.mark.integration

SEED = 20261122
REPLY_TIMEOUT_MS = 2000
#: the head's RSS after all the fuzzing, although messages declared arrays of many GiB
RSS_LIMIT = 1 << 30
#: codes a head may answer a bad request with (``internal`` would be an unexpected exception: a bug)
BAD = {"error:bad_message", "error:bad_version", "error:too_large"}


# ---- helpers ------------------------------------------------------------------------------------
def _hdr(mtype: Any, fields: dict[str, Any] | None = None, *, v: Any = 1, arrays: Any = (),
         drop: tuple[str, ...] = ()) -> bytes:
    head: dict[str, Any] = {"v": v, "type": mtype, **(fields or {}), "arrays": list(arrays)}
    for key in drop:
        head.pop(key, None)
    return msgpack.packb(head, use_bin_type=True)


_IDS = random.Random(SEED)


def _pid() -> str:
    """A fresh id (32 lowercase hex digits), from a seeded generator."""
    return f"{_IDS.getrandbits(128):032x}"


def _register(pid: str, **over: Any) -> dict[str, Any]:
    """A valid register body for a fuzz provider. Its task type exists nowhere, so even if it were
    ready it would never be given work."""
    fields = {"provider_id": pid, "name": "fuzz", "host": "fuzz-host", "os": "Linux fuzz", "device_kind": "cpu",
              "device_name": "fuzz", "memory_bytes": 1 << 30, "cores": 1, "task_types": ["fuzz-no-such-task"],
              "dtypes": ["float64"], "version": "0", "gflops": 1.0}
    fields.update(over)
    return fields


def _heartbeat(pid: str, **over: Any) -> dict[str, Any]:
    return {"provider_id": pid, "running": [], "queued": 0, **over}


def _random_obj(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 4 else 6)
    if kind == 0:
        return rng.randint(-(2**63), 2**64 - 1)
    if kind == 1:
        return rng.choice([rng.random() * 1e300, float("nan"), float("inf"), -0.0])
    if kind == 2:
        return "".join(chr(rng.randrange(1, 0x2FFF)) for _ in range(rng.randrange(40)))
    if kind == 3:
        return rng.randbytes(rng.randrange(40))
    if kind == 4:
        return rng.choice([None, True, False])
    if kind == 5:
        return rng.choice(["v", "type", "arrays", "provider_id", "register", "heartbeat", 1])
    if kind == 6:
        return [_random_obj(rng, depth + 1) for _ in range(rng.randrange(6))]
    keys = ["v", "type", "arrays", "provider_id", "running", "queued", "x"]
    return {rng.choice(keys) if rng.random() < 0.7 else str(rng.random()): _random_obj(rng, depth + 1)
            for _ in range(rng.randrange(6))}


def _wrong_value(rng: random.Random, types: tuple[type, ...]) -> Any:
    """A value that fails the codec's check for a field of these types (§3)."""
    candidates: list[Any] = [None, b"bytes", [1, 2], {"k": 1}, "text", 1.5, 7, True, -3, float("nan")]
    bad = []
    for c in candidates:
        if isinstance(c, bool):
            ok = bool in types
        elif isinstance(c, int):
            ok = int in types and c >= 0
        elif isinstance(c, float):
            ok = float in types and np.isfinite(c)
        elif isinstance(c, bytes):
            ok = False  # msgpack bin is never a str
        else:
            ok = isinstance(c, types)
        if not ok:
            bad.append(c)
    return rng.choice(bad)


def _reply_kind(frames: list[bytes]) -> str:
    """The reply as "type" or "error:code"; the reply itself must follow the protocol."""
    msg = protocol.decode(frames)
    if msg.type == "error":
        assert len(msg["message"]) <= 500
        return f"error:{msg['code']}"
    return msg.type


class Requester:
    """A REQ client with a known identity; after a timeout (a REQ that lost its reply is stuck) it
    closes the socket and opens a fresh one with a new identity."""

    def __init__(self, ctx: zmq.Context, endpoint: str, name: str) -> None:
        self.ctx, self.endpoint, self.name = ctx, endpoint, name
        self.generation = 0
        self.timeouts = 0
        self.identities: list[bytes] = []
        self._open()

    def _open(self) -> None:
        self.identity = f"{self.name}-{self.generation}".encode()
        self.identities.append(self.identity)
        self.sock = self.ctx.socket(zmq.REQ)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTING_ID, self.identity)
        self.sock.connect(self.endpoint)

    def request(self, frames: list[bytes], timeout_ms: int = REPLY_TIMEOUT_MS) -> list[bytes] | None:
        self.sock.send_multipart(frames)
        if self.sock.poll(timeout_ms, zmq.POLLIN):
            return self.sock.recv_multipart()
        self.timeouts += 1
        self.sock.close(linger=0)
        self.generation += 1
        self._open()
        return None

    def close(self) -> None:
        self.sock.close(linger=0)


def _counters(url: str) -> dict[str, int]:
    return httpx.get(url + "/v1/metrics", timeout=10).json()["counters"]


def _wait_for(pred: Any, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _log(cluster: LocalCluster) -> str:
    return (cluster.log_dir / "head.log").read_text(errors="replace")


def _assert_healthy(cluster: LocalCluster, seed: int) -> None:
    """The head is alive, answers /v1/health, and a real matmul on the providers is exact."""
    assert cluster.head is not None and cluster.head.poll() is None, "the head process died"
    health = httpx.get(cluster.url + "/v1/health", timeout=10)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((97, 61)), rng.standard_normal((61, 43))
    with Client(cluster.url) as c:
        got = c.matmul(a, b, timeout=60)
    np.testing.assert_allclose(got, a @ b, rtol=1e-12, atol=1e-12)


def _ready_ids(cluster: LocalCluster) -> list[str]:
    with Client(cluster.url) as c:
        return sorted(n["provider_id"] for n in c.nodes() if n["state"] == "ready")


@pytest.fixture(scope="module")
def zctx() -> Iterator[zmq.Context]:
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


@pytest.fixture(scope="module")
def real_providers(cluster: LocalCluster) -> list[str]:
    ids = _ready_ids(cluster)
    assert len(ids) == 2
    return ids


def _endpoint(cluster: LocalCluster, which: str) -> str:
    return f"tcp://127.0.0.1:{cluster.ports[which]}"


# ---- ROUTER ---------------------------------------------------------------------------------------
def _router_cases(rng: random.Random) -> Iterator[tuple[str, list[bytes], set[str]]]:
    """(label, frames sent by a REQ, acceptable replies) in a seeded order."""
    for i in range(40):
        yield f"random bytes {i}", [rng.randbytes(rng.randrange(0, 3000))], BAD
    yield "empty frame", [b""], {"error:bad_message"}
    for i in range(30):
        obj = _random_obj(rng)
        try:
            frame = msgpack.packb(obj, use_bin_type=True)
        except (OverflowError, ValueError):
            continue
        yield f"random msgpack {i}", [frame], BAD
    valid = _hdr("register", _register(_pid()))
    for i in range(25):
        yield f"truncated msgpack {i}", [valid[: rng.randrange(0, len(valid))]], {"error:bad_message"}
    yield "trailing bytes after the map", [valid + b"\xc0"], {"error:bad_message"}
    for v in (0, 2, 255, 2**32, 2**64 - 1, -1, True, False, 1.0, "1", b"\x01", None, [1], {"v": 1}):
        yield f"version {v!r}", [_hdr("register", _register(_pid()), v=v)], {"error:bad_version"}
    yield "version missing", [_hdr("heartbeat", _heartbeat(_pid()), drop=("v",))], {"error:bad_version"}
    for _ in range(40):
        mtype = rng.choice(["register", "heartbeat", "unregister"])
        pid = _pid()
        fields = {"register": _register(pid), "heartbeat": _heartbeat(pid), "unregister": {"provider_id": pid}}[mtype]
        name = rng.choice(sorted(fields))
        spec = protocol.SCHEMAS[mtype][name]
        if rng.random() < 0.15:
            fields.pop(name)
            label = f"{mtype} without {name}"
        else:
            fields[name] = _wrong_value(rng, spec.types)
            label = f"{mtype} with {name}={fields[name]!r:.30}"
        yield label, [_hdr(mtype, fields)], {"error:bad_message"}
    for what, over in (("device_kind", {"device_kind": "tpu"}), ("gflops 0", {"gflops": 0}),
                       ("gflops 1e7", {"gflops": 1e7}), ("65 task types", {"task_types": ["t"] * 65}),
                       ("non-str dtype", {"dtypes": ["float64", 3]}), ("bad id", {"provider_id": "A" * 32}),
                       ("id with newline", {"provider_id": "a" * 32 + "\n"})):
        yield f"register {what}", [_hdr("register", _register(_pid(), **over))], {"error:bad_message"}
    absurd: list[tuple[list[Any], int, set[str]]] = [  # metas deliberately malformed
        ([{"dtype": "<f8", "shape": [2**39] * 8}], 1, {"error:too_large"}),
        ([{"dtype": "<f8", "shape": [2**39] * 8}], 0, {"error:bad_message"}),
        ([{"dtype": "<f8", "shape": [2**40]}], 1, {"error:bad_message"}),
        ([{"dtype": "<f8", "shape": [2**64 - 1]}], 1, {"error:bad_message"}),
        ([{"dtype": "<f8", "shape": [-1]}], 1, {"error:bad_message"}),
        ([{"dtype": "<f8", "shape": [True]}], 1, {"error:bad_message"}),
        ([{"dtype": "<f8", "shape": [1] * 9}], 1, {"error:bad_message"}),
        ([{"dtype": "<f8", "shape": "16"}], 1, {"error:bad_message"}),
        ([{"dtype": ">f8", "shape": [2]}], 1, {"error:bad_message"}),
        ([{"dtype": ["<f8"], "shape": [2]}], 1, {"error:bad_message"}),
        ([{"dtype": "object", "shape": [2]}], 1, {"error:bad_message"}),
        ([{"shape": [2]}], 1, {"error:bad_message"}),
        (["<f8"], 1, {"error:bad_message"}),
        ([{"dtype": "|u1", "shape": [1]}] * 17, 17, {"error:bad_message"}),
        ([{"dtype": "|u1", "shape": [3 << 30]}], 1, {"error:too_large"}),
        ([{"dtype": "<f4", "shape": [1 << 20, 1 << 20]}], 1, {"error:too_large"}),
        ([{"dtype": "<f4", "shape": [0]}], 1, {"error:unknown_provider"}),  # 0 bytes: allowed on ROUTER
    ]
    for i, (metas, nbuf, expect) in enumerate(absurd):
        frames = [_hdr("heartbeat", _heartbeat(_pid()), arrays=metas)] + [b"\0" * 8] * nbuf
        if metas == [{"dtype": "<f4", "shape": [0]}]:
            frames = frames[:1] + [b""]
        yield f"absurd arrays {i}: {metas[0]!r:.60}", frames, expect
    yield "arrays not a list", [_hdr("heartbeat", _heartbeat(_pid()), arrays={"dtype": "<f8"})], {"error:bad_message"}
    for n in (1, 2, 5, 40):
        frames = [_hdr("heartbeat", _heartbeat(_pid()))] + [rng.randbytes(16) for _ in range(n)]
        yield f"{n} extra frames", frames, {"error:bad_message"}
    yield "empty first frame then a header", [b"", _hdr("heartbeat", _heartbeat(_pid()))], {"error:bad_message"}
    # header size: exactly 64 KiB is fine (an unknown key pads it), one byte more is not
    base = _hdr("heartbeat", _heartbeat(_pid(), pad=""))
    pad = protocol.MAX_HEADER_BYTES - len(base) - 2  # str8 -> str16 adds 2 bytes of length
    exact = _hdr("heartbeat", _heartbeat(_pid(), pad="x" * pad))
    assert len(exact) == protocol.MAX_HEADER_BYTES
    yield "header of exactly 64 KiB", [exact], {"error:unknown_provider"}
    over_max = _hdr("heartbeat", _heartbeat(_pid(), pad="x" * (pad + 1)))
    yield "header of 64 KiB + 1", [over_max], {"error:too_large"}
    yield "header of 600 KiB", [_hdr("heartbeat", _heartbeat(_pid(), pad="y" * (600 << 10)))], {"error:too_large"}
    for bad_type in ("subtask", "result", "ack", "failed", "registered", "heartbeat_ack", "error", "ok", "blob",
                     "", "REGISTER", "register\x00", "x" * 5000, 7, None, b"register", ["register"]):
        yield f"type {bad_type!r:.30}", [_hdr(bad_type, _register(_pid()))], {"error:bad_message"}
    for bad_id in ("A" * 32, "a" * 31, "a" * 33, "g" * 32, "a" * 32 + "\n", " " + "a" * 31, "", "a" * 8 + "-" * 24):
        yield f"heartbeat id {bad_id!r}", [_hdr("heartbeat", _heartbeat(bad_id))], {"error:bad_message"}
    for i in range(15):
        yield f"heartbeat for unknown id {i}", [_hdr("heartbeat", _heartbeat(_pid()))], {"error:unknown_provider"}
    yield "fetch from an unknown provider", [_hdr("fetch", {"provider_id": _pid(), "blob_id": _pid()})], \
        {"error:unknown_provider"}


def test_router_fuzz_every_request_gets_an_error_reply(cluster: LocalCluster, zctx: zmq.Context) -> None:
    rng = random.Random(SEED)
    req = Requester(zctx, _endpoint(cluster, "registration"), "fuzz-router")
    before = _counters(cluster.url)
    seen: dict[str, int] = {}
    try:
        n = 0
        for label, frames, expect in _router_cases(rng):
            reply = req.request(frames)
            assert reply is not None, f"{label}: no reply within {REPLY_TIMEOUT_MS} ms"
            kind = _reply_kind(reply)
            assert kind in expect, f"{label}: got {kind}, expected one of {sorted(expect)}"
            seen[kind] = seen.get(kind, 0) + 1
            n += 1
        assert n >= 200 and req.timeouts == 0
        assert {"error:bad_message", "error:bad_version", "error:too_large", "error:unknown_provider"} <= set(seen)

        # frames of 2 MiB (over the 1 MiB ZMQ_MAXMSGSIZE of the ROUTER, see the test
        # below): a disconnect without reply, or an error; either way a (fresh) REQ is served after
        big = _hdr("heartbeat", _heartbeat(_pid()), arrays=[{"dtype": "|u1", "shape": [2 << 20]}])
        for frames in ([big, b"\0" * (2 << 20)], [_hdr("heartbeat", _heartbeat(_pid(), pad="z" * (2 << 20)))]):
            reply = req.request(frames, timeout_ms=1000)
            assert reply is None or _reply_kind(reply) in BAD
            assert _reply_kind(req.request([_hdr("heartbeat", _heartbeat(_pid()))]) or []) == "error:unknown_provider"
    finally:
        req.close()
    after = _counters(cluster.url)
    assert after["bad_messages"] - before["bad_messages"] >= sum(v for k, v in seen.items() if k in BAD)
    _assert_healthy(cluster, seed=1)

    # every refused request left a warning naming the REQ peer's identity (hex, first 16 digits)
    log = _log(cluster)
    peer = req.identities[0].hex()[:16]
    warnings = [ln for ln in log.splitlines() if "WARNING" in ln and "bad request from provider" in ln]
    assert sum(f"peer={peer}" in ln for ln in warnings) >= sum(v for k, v in seen.items() if k in BAD)
    assert "Traceback" not in log, "an unexpected exception was logged"


def test_router_replayed_and_duplicate_requests(cluster: LocalCluster, zctx: zmq.Context,
                                                real_providers: list[str]) -> None:
    """Registration requests are idempotent (§5.1, §8.3): replays get the same answers."""
    req = Requester(zctx, _endpoint(cluster, "registration"), "fuzz-replay")
    pid = _pid()
    epoch = httpx.get(cluster.url + "/v1/health", timeout=10).json()["epoch"]
    try:
        register = [_hdr("register", _register(pid))]
        for _ in range(5):
            msg = protocol.decode(req.request(register) or [])
            assert msg.type == "registered" and msg["provider_id"] == pid and msg["epoch"] == epoch
            assert msg["heartbeat_interval_s"] == cluster.heartbeat
        heartbeat = [_hdr("heartbeat", _heartbeat(pid, queued=3))]
        for _ in range(5):
            msg = protocol.decode(req.request(heartbeat) or [])
            assert msg.type == "heartbeat_ack" and msg["epoch"] == epoch
        with Client(cluster.url) as c:
            row = c.http.get(f"/v1/nodes/{pid}").json()
        assert row["state"] == "connecting"  # registered, never subscribed: it gets no work
        unregister = [_hdr("unregister", {"provider_id": pid})]
        for _ in range(3):
            assert _reply_kind(req.request(unregister) or []) == "ok"
        assert _reply_kind(req.request(heartbeat) or []) == "error:unknown_provider"
        # a fuzz provider registered and then silent is declared dead; its heartbeat is refused
        ghost = _pid()
        assert _reply_kind(req.request([_hdr("register", _register(ghost))]) or []) == "registered"
        _wait_for(lambda: httpx.get(f"{cluster.url}/v1/nodes/{ghost}", timeout=5).json()["state"] == "dead",
                  3 * cluster.heartbeat + 3, "the silent fuzz provider to be declared dead")
        assert _reply_kind(req.request([_hdr("heartbeat", _heartbeat(ghost))]) or []) == "error:unknown_provider"
        assert _reply_kind(req.request([_hdr("unregister", {"provider_id": ghost})]) or []) == "ok"
        assert req.timeouts == 0
    finally:
        req.close()
    assert _ready_ids(cluster) == real_providers
    _assert_healthy(cluster, seed=2)


def test_router_raw_dealer_without_delimiter_is_dropped(cluster: LocalCluster, zctx: zmq.Context) -> None:
    """A DEALER that does not send the empty delimiter frame gets no reply (§2, §11), and the head
    still serves a DEALER that does."""
    dealer = zctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.ROUTING_ID, b"fuzz-dealer")
    dealer.connect(_endpoint(cluster, "registration"))
    rng = random.Random(SEED + 1)
    before = _counters(cluster.url)
    hb = _hdr("heartbeat", _heartbeat(_pid()))
    dropped = [[hb], [b"junk", hb], [b""], [b"x", b"", hb], [rng.randbytes(100)]]
    dropped += [[rng.randbytes(rng.randrange(1, 64)) for _ in range(rng.randrange(1, 6))] for _ in range(20)]
    dropped = [f for f in dropped if not (len(f) >= 2 and f[0] == b"")]  # keep only envelope-less ones
    try:
        for frames in dropped:
            dealer.send_multipart(frames)
        assert not dealer.poll(1000, zmq.POLLIN), "the head answered a message without a REQ envelope"
        # with the delimiter the same socket is served, and the reply carries the delimiter back
        dealer.send_multipart([b"", hb])
        assert dealer.poll(REPLY_TIMEOUT_MS, zmq.POLLIN)
        reply = dealer.recv_multipart()
        assert reply[0] == b"" and _reply_kind(reply[1:]) == "error:unknown_provider"
        dealer.send_multipart([b"", b"", hb])  # delimiter, then an empty "header"
        assert dealer.poll(REPLY_TIMEOUT_MS, zmq.POLLIN)
        reply = dealer.recv_multipart()
        assert reply[0] == b"" and _reply_kind(reply[1:]) == "error:bad_message"
    finally:
        dealer.close(linger=0)
    after = _counters(cluster.url)
    assert after["bad_messages"] - before["bad_messages"] == len(dropped) + 1
    log = _log(cluster)
    assert log.count("dropped a registration message without a REQ envelope") >= len(dropped)
    _assert_healthy(cluster, seed=3)


def test_router_frame_over_1mib_disconnects_the_peer(cluster: LocalCluster, zctx: zmq.Context) -> None:
    """PROTOCOL.md §1/§11: the head ROUTER has ZMQ_MAXMSGSIZE = 1 MiB; libzmq disconnects a peer that
    sends a larger frame, without a reply."""
    req = Requester(zctx, _endpoint(cluster, "registration"), "fuzz-maxmsgsize")
    try:
        big = _hdr("heartbeat", _heartbeat(_pid()), arrays=[{"dtype": "|u1", "shape": [2 << 20]}])
        reply = req.request([big, b"\0" * (2 << 20)], timeout_ms=1500)
        assert reply is None, f"a 2 MiB frame was read and answered: {_reply_kind(reply)}"
    finally:
        req.close()


def test_router_envelope_less_drop_names_the_peer(cluster: LocalCluster, zctx: zmq.Context) -> None:
    dealer = zctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.ROUTING_ID, b"fuzz-dealer-peer")
    dealer.connect(_endpoint(cluster, "registration"))
    try:
        dealer.send_multipart([_hdr("heartbeat", _heartbeat(_pid()))])
        peer = b"fuzz-dealer-peer".hex()[:16]
        _wait_for(lambda: any("without a REQ envelope" in ln and f"peer={peer}" in ln
                              for ln in _log(cluster).splitlines()), 1.5, "a warning naming the DEALER")
    finally:
        dealer.close(linger=0)


# ---- PULL -----------------------------------------------------------------------------------------
def _key(job_id: str, epoch: str, subtask: int = 0, attempt: int = 1) -> dict[str, Any]:
    return {"job_id": job_id, "subtask": subtask, "attempt": attempt, "epoch": epoch}


def _pull_cases(rng: random.Random, epoch: str) -> tuple[list[list[bytes]], list[list[bytes]], int]:
    """(messages the head must drop as bad, well-formed messages it must ignore, how many of the
    latter are results it counts in results_ignored)."""
    bad: list[list[bytes]] = []
    for _ in range(40):
        bad.append([rng.randbytes(rng.randrange(0, 2000)) for _ in range(rng.randrange(1, 4))])
    for _ in range(20):
        try:
            bad.append([msgpack.packb(_random_obj(rng), use_bin_type=True)])
        except (OverflowError, ValueError):
            continue
    res = {**_key(_pid(), epoch), "provider_id": _pid(), "elapsed_s": 0.1, "stats": {}}
    good = _hdr("result", res, arrays=[{"dtype": "<f8", "shape": [4, 4]}])
    for _ in range(15):
        bad.append([good[: rng.randrange(0, len(good))], b"\0" * 128])  # truncated header
    bad.append([good])  # the buffer frame is missing
    bad.append([good, b"\0" * 127])  # one byte short
    bad.append([good, b"\0" * 129])  # one byte long
    bad.append([good, b"\0" * 128, b"\0" * 128])  # one frame too many
    for metas, nbufs in (
            ([{"dtype": "<f8", "shape": [1 << 31]}], [16]),  # 16 GiB declared: over the 4 GiB limit
            ([{"dtype": "<f8", "shape": [1 << 28]}], [16]),  # 2 GiB declared, 16 bytes sent
            ([{"dtype": "<f8", "shape": [1 << 20, 1 << 20]}], [16]),  # 8 TiB
            ([{"dtype": "<f8", "shape": [2**39] * 8}], [16]),
            ([{"dtype": "|u1", "shape": [3 << 30]}] * 2, [1, 1]),  # 6 GiB in two arrays
            ([{"dtype": "<f8", "shape": [-4]}], [0]),
            ([{"dtype": "<c16", "shape": [1]}], [16]),
            ([{"dtype": "<f8", "shape": [2, 2]}] * 17, [32] * 17),
    ):
        bad.append([_hdr("result", res, arrays=metas)] + [b"\0" * n for n in nbufs])
    for v in (0, 2, True, 1.0, None):
        bad.append([_hdr("ack", {**_key(_pid(), epoch), "provider_id": _pid()}, v=v)])
    for mtype in ("register", "heartbeat", "subtask", "registered", "error", "", 5):
        bad.append([_hdr(mtype, {**_key(_pid(), epoch), "provider_id": _pid()})])
    for bad_pid in ("A" * 32, "a" * 32 + "\n", "", 7):
        bad.append([_hdr("ack", {**_key(_pid(), epoch), "provider_id": bad_pid})])
    for _ in range(20):
        mtype = rng.choice(["ack", "result", "failed"])
        fields: dict[str, Any] = {**_key(_pid(), epoch), "provider_id": _pid()}
        if mtype == "result":
            fields.update(elapsed_s=0.5, stats={"nonfinite": 0})
        if mtype == "failed":
            fields.update(error="fuzz", retryable=True)
        name = rng.choice(sorted(fields))
        fields[name] = _wrong_value(rng, protocol.SCHEMAS[mtype][name].types)
        bad.append([_hdr(mtype, fields)])
    # one real 32 MiB frame the header does not describe: received, rejected, freed
    bad.append([_hdr("result", res, arrays=[{"dtype": "<f8", "shape": [8]}]), bytes(32 << 20)])

    ignored: list[list[bytes]] = []
    results = 0
    for i in range(60):
        mtype = ("ack", "result", "failed")[i % 3]
        job = _pid() if i % 2 else "not-an-id/../../x"
        ep = epoch if i % 4 < 2 else _pid()
        fields = {**_key(job, ep, subtask=rng.choice([0, 1, 2**31, 2**63]), attempt=rng.choice([0, 1, 2**40])),
                  "provider_id": _pid()}
        arrays: list[np.ndarray] = []
        if mtype == "result":
            fields.update(elapsed_s=rng.choice([0, 1e-300, 1e300, 2**64 - 1]),
                          stats={"nonfinite": rng.choice([0, 2**64 - 1]), "device": "fuzz"})
            arrays = [np.zeros((rng.randrange(0, 5), 3), dtype=rng.choice([np.float32, np.float64, np.int8]))]
            results += 1
        if mtype == "failed":
            fields.update(error="x" * rng.choice([0, 10, 10_000]), retryable=rng.random() < 0.5)
        ignored.append(protocol.encode(mtype, fields, arrays))
    return bad, ignored, results


def test_pull_fuzz_bad_messages_are_dropped(cluster: LocalCluster, zctx: zmq.Context) -> None:
    rng = random.Random(SEED + 2)
    epoch = httpx.get(cluster.url + "/v1/health", timeout=10).json()["epoch"]
    bad, ignored, results = _pull_cases(rng, epoch)
    before = _counters(cluster.url)
    warnings_before = _log(cluster).count("bad message on the result socket")
    push = zctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(_endpoint(cluster, "result"))
    try:
        for frames in bad:
            push.send_multipart(frames)
        for frames in ignored:
            push.send_multipart(frames, copy=False)
        # one PUSH connection: the head handles its messages in order, so once the last result is
        # counted, every earlier message has been handled
        _wait_for(lambda: _counters(cluster.url)["results_ignored"] - before["results_ignored"] >= results, 20,
                  "the head to handle the fuzz messages")
    finally:
        push.close(linger=0)
    after = _counters(cluster.url)
    assert after["bad_messages"] - before["bad_messages"] == len(bad)
    assert after["results_ignored"] - before["results_ignored"] == results
    for name in ("subtasks_completed", "subtasks_failed", "subtasks_retried"):
        assert after[name] == before[name], name
    _wait_for(lambda: _log(cluster).count("bad message on the result socket") - warnings_before >= len(bad), 5,
              "a warning per bad message")
    _assert_healthy(cluster, seed=4)


# ---- XPUB -----------------------------------------------------------------------------------------
def test_xpub_fuzz_random_subscriptions(cluster: LocalCluster, zctx: zmq.Context,
                                        real_providers: list[str]) -> None:
    """Random subscription frames from an XSUB and random topics from a SUB. None of them is a real
    provider's exact id (a second subscriber to a real id is covered by its own test
    below), but prefixes and near misses of the real ids are."""
    rng = random.Random(SEED + 3)
    xsub = zctx.socket(zmq.XSUB)
    xsub.setsockopt(zmq.LINGER, 0)
    xsub.connect(_endpoint(cluster, "task"))
    sub = zctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(_endpoint(cluster, "task"))
    time.sleep(0.2)
    try:
        frames: list[bytes] = [b"", b"\x00", b"\x01", b"\x02" + _pid().encode(), b"\xff" * 33]
        frames += [bytes([rng.choice([0, 1])]) + rng.randbytes(rng.randrange(0, 100)) for _ in range(80)]
        frames += [b"\x01" + _pid().upper().encode(), b"\x01" + _pid().encode() + b"\n", b"\x01" + bytes(64 << 10)]
        frames += [b"\x01" + _pid().encode() for _ in range(20)]  # ids of providers that never register
        frames += [rng.randbytes(rng.randrange(1, 200)) for _ in range(30)]  # not subscriptions at all
        for pid in real_providers:
            frames += [b"\x01" + pid[:16].encode(), b"\x01" + pid.encode() + b"0", b"\x01" + pid.upper().encode(),
                       b"\x00" + pid[:16].encode(), b"\x00" + pid.encode()]  # (the XSUB never subscribed pid)
        rng.shuffle(frames)
        for f in frames:
            xsub.send(f)
        xsub.send_multipart([b"multi", b"\x00" + real_providers[0].encode(), b"\x01" + _pid().encode()])
        for _ in range(40):
            sub.setsockopt(zmq.SUBSCRIBE, rng.randbytes(rng.randrange(1, 40)))
        for pid in real_providers:
            sub.setsockopt(zmq.SUBSCRIBE, pid[:31].encode())
            sub.setsockopt(zmq.UNSUBSCRIBE, pid[:31].encode())
        sub.setsockopt(zmq.SUBSCRIBE, b"")  # everything: this SUB now sees every subtask
        time.sleep(0.5)
        assert cluster.head is not None and cluster.head.poll() is None
        assert _ready_ids(cluster) == real_providers
        _assert_healthy(cluster, seed=5)
    finally:
        xsub.close(linger=0)
        sub.close(linger=0)
    time.sleep(0.3)  # libzmq unsubscribes the closed sockets' topics: nothing of the real providers'
    assert _ready_ids(cluster) == real_providers
    _assert_healthy(cluster, seed=6)


def test_other_subscriber_leaving_keeps_the_provider_ready(zctx: zmq.Context) -> None:
    """A second SUB on a provider's topic (a monitor, a duplicate, or the provider's own old
    connection after a reconnect) leaving must not make the provider unready: it still is subscribed."""
    with LocalCluster(1, heartbeat=0.5, threads=1) as cl:
        (pid,) = _ready_ids(cl)
        other = zctx.socket(zmq.SUB)
        other.setsockopt(zmq.LINGER, 0)
        other.setsockopt(zmq.SUBSCRIBE, pid.encode())
        other.connect(_endpoint(cl, "task"))
        time.sleep(0.3)
        other.close(linger=0)
        time.sleep(0.5)
        assert _ready_ids(cl) == [pid]


# ---- forged results for a live job ------------------------------------------------------------------
def _snoop(zctx: zmq.Context, cluster: LocalCluster) -> zmq.Socket:
    """A SUB that also receives the subtasks sent to the real providers: subscribed to each one's exact
    id, which a head without CURVE grants to anyone who knows it (the empty topic it never grants; the
    subscriber leaving keeps them ready: test_other_subscriber_leaving_keeps_the_provider_ready)."""
    sub = zctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    for pid in _ready_ids(cluster):
        sub.setsockopt(zmq.SUBSCRIBE, pid.encode())
    sub.connect(_endpoint(cluster, "task"))
    time.sleep(0.3)
    return sub


def _forge(push: zmq.Socket, key: dict[str, Any], rows: int, cols: int, rng: np.random.Generator) -> int:
    """Every kind of message a provider other than the assignee could send for this subtask."""
    other = _pid()
    wrong = np.full((rows, cols), 7.0)
    base = {**key, "provider_id": other}
    msgs = [
        protocol.encode("ack", base),
        protocol.encode("result", {**base, "elapsed_s": 1e-9, "stats": {"nonfinite": 0}}, [wrong]),
        protocol.encode("result", {**base, "elapsed_s": 0.1, "stats": {}, "in_place": True}),
        protocol.encode("result", {**base, "elapsed_s": 0.1, "stats": {}}, [wrong[:, :-1]]),  # wrong shape
        protocol.encode("result", {**base, "elapsed_s": 0.1, "stats": {}}, [wrong.astype(np.float32)]),  # dtype
        protocol.encode("result", {**base, "elapsed_s": 0.1, "stats": {}}, [wrong, wrong]),  # one array too many
        protocol.encode("failed", {**base, "error": "forged", "retryable": True}),
        protocol.encode("failed", {**base, "error": "forged", "retryable": False}),
        protocol.encode("result", {**key, "provider_id": "not-an-id", "elapsed_s": 0.1, "stats": {}}, [wrong]),
    ]
    # byte length that does not match the declared shape
    head = _hdr("result", {**base, "elapsed_s": 0.1, "stats": {}}, arrays=[{"dtype": "<f8", "shape": [rows, cols]}])
    msgs.append([head, rng.bytes(rows * cols * 8 - 8)])
    for frames in msgs:
        push.send_multipart(frames, copy=False)
    return len(msgs)


def test_forged_results_from_another_provider_do_not_change_the_result(
        cluster: LocalCluster, zctx: zmq.Context, real_providers: list[str]) -> None:
    rng = np.random.default_rng(SEED)
    a, b = rng.standard_normal((1600, 1200)), rng.standard_normal((1200, 1000))
    sub = _snoop(zctx, cluster)
    push = zctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(_endpoint(cluster, "result"))
    forged = 0
    assignees: dict[tuple[int, int], str] = {}
    keys: list[dict[str, Any]] = []
    failed_before = _counters(cluster.url)["subtasks_failed"]
    try:
        with Client(cluster.url) as c:
            job = c.submit_matmul(a, b)
            end = time.monotonic() + 60
            while time.monotonic() < end:
                if sub.poll(100, zmq.POLLIN):
                    frames = sub.recv_multipart()
                    msg = protocol.decode(frames[1:])
                    if msg["job_id"] != job:
                        continue
                    key = {k: msg[k] for k in ("job_id", "subtask", "attempt", "epoch")}
                    assignees[(msg["subtask"], msg["attempt"])] = frames[0].decode()
                    keys.append(key)
                    if msg["attempt"] == 1:  # forge once per subtask, right as it is dispatched
                        forged += _forge(push, key, msg["params"]["rows"], b.shape[1], rng)
                elif c.status(job)["state"] in ("done", "failed", "cancelled"):
                    break
            view = c.wait(job, timeout=60)
            assert view["state"] == "done"
            assert forged >= 10 and keys
            assert _counters(cluster.url)["subtasks_failed"] == failed_before, "a stranger's message struck a subtask"
            got = c.result(job)
            np.testing.assert_allclose(got, a @ b, rtol=1e-10, atol=1e-10)

            # late and duplicate results, now even from the real assignee, change nothing
            before = _counters(cluster.url)
            for key in keys:
                pid = assignees[(key["subtask"], key["attempt"])]
                late = protocol.encode("result", {**key, "provider_id": pid, "elapsed_s": 0.1, "stats": {}},
                                       [np.full((2, 2), -1.0)])  # any shape: the job is finished
                for _ in range(2):
                    push.send_multipart(late, copy=False)
            _wait_for(lambda: _counters(cluster.url)["results_ignored"] - before["results_ignored"] >= 2 * len(keys),
                      10, "the late results to be ignored")
            assert c.status(job)["state"] == "done"
            np.testing.assert_allclose(c.result(job), a @ b, rtol=1e-10, atol=1e-10)
    finally:
        sub.close(linger=0)
        push.close(linger=0)
    _assert_healthy(cluster, seed=7)


def test_forged_failed_from_another_provider_cannot_fail_a_job(
        cluster: LocalCluster, zctx: zmq.Context, real_providers: list[str]) -> None:
    """A stranger's retryable `failed` on every attempt must not strike the subtask: the assignee's
    genuine (in-place) result still counts. (Fixed in 35c6be7: the by-reference mark of an attempt was
    dropped by a result/failed from any sender, so the genuine in-place result was then refused.)"""
    rng = np.random.default_rng(SEED + 1)
    # each half takes the providers ~0.1 s: the forged message is in long before the real result
    a, b = rng.standard_normal((2400, 1500)), rng.standard_normal((1500, 1500))
    sub = _snoop(zctx, cluster)
    push = zctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(_endpoint(cluster, "result"))
    failed_before = _counters(cluster.url)["subtasks_failed"]
    try:
        with Client(cluster.url) as c:
            job = c.submit_matmul(a, b)
            end = time.monotonic() + 60
            while time.monotonic() < end:
                if sub.poll(100, zmq.POLLIN):
                    msg = protocol.decode(sub.recv_multipart()[1:])
                    if msg["job_id"] == job:  # on every attempt: one forged `failed` from a stranger
                        key = {k: msg[k] for k in ("job_id", "subtask", "attempt", "epoch")}
                        push.send_multipart(protocol.encode("failed", {**key, "provider_id": _pid(),
                                                                       "error": "forged", "retryable": True}))
                elif c.status(job)["state"] in ("done", "failed", "cancelled"):
                    break
            view = c.status(job)
            assert view["state"] == "done", view.get("error")
            assert _counters(cluster.url)["subtasks_failed"] == failed_before
            np.testing.assert_allclose(c.result(job), a @ b, rtol=1e-10, atol=1e-10)
    finally:
        sub.close(linger=0)
        push.close(linger=0)


# ---- memory -----------------------------------------------------------------------------------------
def test_memory_bounded_after_declared_huge_arrays(cluster: LocalCluster, zctx: zmq.Context) -> None:
    """Messages that declare multi-GiB arrays allocate nothing: the head's RSS stays bounded."""
    before = _counters(cluster.url)
    push = zctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(_endpoint(cluster, "result"))
    req = Requester(zctx, _endpoint(cluster, "registration"), "fuzz-memory")
    epoch = httpx.get(cluster.url + "/v1/health", timeout=10).json()["epoch"]
    sent = 0
    try:
        res = {**_key(_pid(), epoch), "provider_id": _pid(), "elapsed_s": 0.1, "stats": {}}
        for shape in ([1 << 29], [1 << 30], [1 << 31], [3 << 30, 1], [1 << 20, 1 << 20], [2**39] * 8):
            for dtype in ("<f8", "|u1"):
                for _ in range(20):
                    push.send_multipart([_hdr("result", res, arrays=[{"dtype": dtype, "shape": shape}]), b"\0" * 64])
                    sent += 1
        for _ in range(8):  # real 16 MiB frames that do not match their header
            push.send_multipart([_hdr("result", res, arrays=[{"dtype": "<f8", "shape": [1 << 28]}]), bytes(16 << 20)])
            sent += 1
        for shape in ([1 << 31], [2**39] * 8):
            for _ in range(20):
                reply = req.request([_hdr("heartbeat", _heartbeat(_pid()), arrays=[{"dtype": "<f8", "shape": shape}]),
                                     b"\0" * 64])
                assert reply is not None and _reply_kind(reply) in BAD
        _wait_for(lambda: _counters(cluster.url)["bad_messages"] - before["bad_messages"] >= sent + 40, 20,
                  "the head to drop the oversized declarations")
    finally:
        push.close(linger=0)
        req.close()
    rss = psutil.Process(cluster.head.pid).memory_info().rss  # type: ignore[union-attr]
    print(f"head RSS after fuzzing: {rss / 2**20:.0f} MiB")
    assert rss < RSS_LIMIT, f"head RSS {rss / 2**20:.0f} MiB after the fuzzing"
    _assert_healthy(cluster, seed=8)
    log = _log(cluster)
    assert re.search(r"WARNING .*bad message on the result socket: .*(limit is|needs \d+ bytes)", log)
