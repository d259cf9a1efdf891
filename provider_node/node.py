"""The provider's main loop.

Main thread: Lazy Pirate REQ (register, heartbeats), SUB (subtasks on this provider's
topic), PUSH (acks). Compute thread: runs subtasks one at a time and PUSHes results on
its own socket (ZeroMQ sockets are never shared between threads).
"""

from __future__ import annotations

import logging
import os
import platform
import queue
import socket
import threading
import time
import uuid
from argparse import Namespace
from collections import OrderedDict
from typing import Any

import numpy as np
import zmq

from common import __version__, layout, protocol, security, tasks
from common.errors import DcfError, TaskError

from .device import ComputeDevice, benchmark_gflops
from .pirate import LazyPirate
from .shared import SharedFiles

log = logging.getLogger("dcf.provider")

DATA_CACHE_ENTRIES = 8
RESUBSCRIBE_AFTER = 3  # heartbeat acks in a row without our subscription: connect SUB and PUSH anew
INLINE_SECONDS = 0.02  # subtasks expected to take less run on the socket thread
FETCH_TIMEOUT_MS = 30_000


def runnable_task_types() -> list[str]:
    return [name for name in tasks.names() if tasks.get(name).available()]


class ProviderNode:
    def __init__(self, cfg: Namespace, device: ComputeDevice, gflops: float | None = None) -> None:
        self.cfg = cfg
        self.keys = security.client_keys(cfg)  # None: CURVE off (ConfigError on bad key files)
        self.device = device
        self.provider_id = uuid.uuid4().hex
        self.topic = self.provider_id.encode()
        self.name = cfg.name or f"{socket.gethostname()}-{device.kind}-{os.getpid()}"
        self.gflops = gflops if gflops is not None else benchmark_gflops(device)
        self.ctx = zmq.Context()
        self.work: queue.Queue[protocol.Message | None] = queue.Queue()
        self.in_hand: set[tuple[str, int, str]] = set()  # (job, subtask, epoch) queued or running
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.registered = False
        self.epoch = ""
        self.heartbeat_interval = cfg.heartbeat_interval
        self.next_heartbeat = 0.0
        self.shared: SharedFiles | None = None
        self.data_cache: OrderedDict[str, np.ndarray] = OrderedDict()  # content key -> dataset array
        self.fetch_sockets = threading.local()  # one REQ socket per thread that fetches blobs
        device.fetch = self._fetch_blob
        self.register_at: float | None = None  # when to retry a refused registration
        self.register_backoff = 1.0
        self.push_generation = 0  # bumped when the compute thread's PUSH must be opened again
        self.unsubscribed_acks = 0  # heartbeat acks in a row saying the head does not see our SUB
        self.reconnect = False  # set: the main loop opens its SUB and PUSH connections anew
        self.renew_identity = False  # set: another key owns our provider id at the head (CURVE)

    def _socket(self, kind: int) -> zmq.Socket:
        """A socket to the head, a CURVE client of it when keys are configured."""
        sock = self.ctx.socket(kind)
        security.secure_client(sock, self.keys)
        return sock

    def _pirate(self, timeout: float) -> LazyPirate:
        return LazyPirate(self.ctx, self.endpoint(self.cfg.registration_port), timeout,
                          secure=(lambda sock: security.secure_client(sock, self.keys)) if self.keys else None)

    def endpoint(self, port: int) -> str:
        host = self.cfg.head
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # IPv6 literal
        return f"tcp://{host}:{port}"

    # ---- messages -------------------------------------------------------------------------
    def register_frames(self) -> list[Any]:
        return protocol.encode("register", {
            "provider_id": self.provider_id, "name": self.name, "host": socket.gethostname(),
            "os": f"{platform.system()} {platform.release()}", "device_kind": self.device.kind,
            "device_name": self.device.name, "memory_bytes": self.device.available_memory(),
            "cores": os.cpu_count() or 1, "task_types": runnable_task_types(), "dtypes": list(self.device.dtypes),
            "version": __version__, "gflops": float(self.gflops)})

    def heartbeat_frames(self) -> list[Any]:
        with self.lock:
            running = [f"{j}:{s}" for j, s, _ in sorted(self.in_hand)][:64]
        fields: dict[str, Any] = {"provider_id": self.provider_id, "running": running,
                                  "queued": self.work.qsize()}
        if self.shared is not None:
            fields["local_epoch"] = self.shared.epoch
        return protocol.encode("heartbeat", fields)

    # ---- main loop ------------------------------------------------------------------------
    def run(self) -> None:
        sub, acks = self._sub(), self._push()
        pirate = self._pirate(self.cfg.request_timeout)
        worker = threading.Thread(target=self._compute_loop, name="dcf-compute", daemon=True)
        worker.start()
        log.info("provider %s (%s, %s, %.1f GFLOP/s) connecting to %s%s", self.name, self.device.kind,
                 self.device.name, self.gflops, self.cfg.head,
                 f" with CURVE key {self.keys.public.decode()}" if self.keys else "",
                 extra={"provider_id": self.provider_id})
        pirate.send(self.register_frames(), time.monotonic())
        try:
            while not self.stopping.is_set():
                now = time.monotonic()
                wait = min(pirate.next_event(now), 0.5)
                if self.registered and not pirate.busy:
                    wait = min(wait, max(0.0, self.next_heartbeat - now))
                elif self.register_at is not None:
                    wait = min(wait, max(0.0, self.register_at - now))
                poller = zmq.Poller()
                poller.register(sub, zmq.POLLIN)
                poller.register(pirate.socket, zmq.POLLIN)
                events = dict(poller.poll(wait * 1000))
                if sub in events:
                    self._on_subtask(sub.recv_multipart(copy=False), acks)
                if pirate.socket in events:
                    reply = pirate.on_readable()
                    if reply is not None:
                        self._on_reply(reply, pirate)
                        if self.renew_identity:
                            self._new_identity(sub)
                        if self.registered and (pirate.refused or self.reconnect):
                            # a refused handshake (our key was not allowed then) is not retried by
                            # libzmq: the SUB and PUSH connections start over
                            log.info("opening the task and result connections anew",
                                     extra={"provider_id": self.provider_id})
                            pirate.refused = self.reconnect = False
                            sub.close(linger=0)
                            acks.close(linger=0)
                            sub, acks = self._sub(), self._push()
                            self.push_generation += 1
                now = time.monotonic()
                pirate.check(now)
                if self.register_at is not None and now >= self.register_at and not pirate.busy:
                    self.register_at = None
                    pirate.send(self.register_frames(), now)
                if self.registered and not pirate.busy and now >= self.next_heartbeat:
                    pirate.send(self.heartbeat_frames(), now)
                    self.next_heartbeat = now + self.heartbeat_interval
        finally:
            self._close_fetch_socket()
            self._leave(pirate)
            self.work.put(None)
            worker.join(timeout=5)
            sub.close(linger=0)
            acks.close(linger=0)
            self.ctx.term()

    def _new_identity(self, sub: zmq.Socket) -> None:
        self.renew_identity = False
        sub.setsockopt(zmq.UNSUBSCRIBE, self.topic)
        self.provider_id = uuid.uuid4().hex
        self.topic = self.provider_id.encode()
        sub.setsockopt(zmq.SUBSCRIBE, self.topic)

    def _sub(self) -> zmq.Socket:
        sub = self._socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 1000)
        sub.connect(self.endpoint(self.cfg.task_port))
        sub.setsockopt(zmq.SUBSCRIBE, self.topic)
        return sub

    def _push(self) -> zmq.Socket:
        sock = self._socket(zmq.PUSH)
        sock.copy_threshold = 1 << 20  # small results are cheaper to copy than to track
        sock.setsockopt(zmq.LINGER, 2000)
        sock.connect(self.endpoint(self.cfg.result_port))
        return sock

    def _on_reply(self, msg: protocol.Message, pirate: LazyPirate) -> None:
        now = time.monotonic()
        if msg.type == "registered":
            self.registered = True
            self.register_backoff = 1.0
            self.epoch = msg["epoch"]
            self.heartbeat_interval = float(msg["heartbeat_interval_s"])
            self.next_heartbeat = now + self.heartbeat_interval
            self.shared = None
            if self.cfg.shared_files == "auto" and msg.get("state_dir"):
                self.shared = SharedFiles.probe(msg["state_dir"], self.epoch, self.provider_id)
                self.next_heartbeat = now  # tell the head at once
            log.info("registered with head %s%s", self.epoch[:8],
                     " (shares its state dir)" if self.shared else "", extra={"provider_id": self.provider_id})
        elif msg.type == "heartbeat_ack":
            if msg["epoch"] != self.epoch:
                self.epoch = msg["epoch"]
            self.unsubscribed_acks = 0 if msg.get("subscribed", True) else self.unsubscribed_acks + 1
            if self.unsubscribed_acks >= RESUBSCRIBE_AFTER:
                self.unsubscribed_acks = 0
                self.reconnect = True
        elif msg.type == "error":
            self.registered = False
            if msg["code"] == "unknown_provider":
                log.warning("the head does not know this provider (restarted?); registering again")
                self.register_backoff = 1.0
                pirate.send(self.register_frames(), now)
            elif msg["code"] == "unauthorized":  # our id is bound to another CURVE key: take a new one
                log.warning("the head binds this provider id to another key; registering with a new id")
                self.renew_identity = True
                self.register_at = now
            else:  # refused: try again later, not in a tight loop
                log.error("head refused a request: %s: %s; retrying in %.0fs", msg["code"], msg["message"],
                          self.register_backoff)
                self.register_at = now + self.register_backoff
                self.register_backoff = min(self.register_backoff * 2, 60.0)

    def _on_subtask(self, frames: list[Any], acks: zmq.Socket) -> None:
        if frames[0].bytes != self.topic:
            return
        try:
            msg = protocol.decode(frames[1:], expect=("subtask",))
        except DcfError as exc:
            log.warning("bad subtask message: %s", exc.message)
            return
        key = (msg["job_id"], msg["subtask"], msg["epoch"])
        _send_or_drop(acks, protocol.encode("ack", self._key_fields(msg)))
        try:
            tasks.get(msg["task_type"])
        except DcfError as exc:
            _send_or_drop(acks, protocol.encode("failed", {**self._key_fields(msg), "error": exc.message,
                                                           "retryable": True}))
            return
        with self.lock:
            if key in self.in_hand:  # re-sent because an ack was lost: the first copy is enough
                return
            idle = not self.in_hand
            self.in_hand.add(key)
        if idle and self._is_quick(msg):
            # A few milliseconds of work while the compute thread waits: run it here and save two
            # thread hand-offs (training steps). Heartbeats wait at most INLINE_SECONDS.
            _send_or_drop(acks, self._execute(msg))
            with self.lock:
                self.in_hand.discard(key)
            return
        self.work.put(msg)

    def _is_quick(self, msg: protocol.Message) -> bool:
        if self.cfg.delay:  # a simulated slow device must not hold up heartbeats
            return False
        cost = msg.get("cost")
        return isinstance(cost, (int, float)) and cost / (self.gflops * 1e9) < INLINE_SECONDS

    def _close_fetch_socket(self) -> None:
        sock = getattr(self.fetch_sockets, "socket", None)
        if sock is not None:
            sock.close(linger=0)
            self.fetch_sockets.socket = None

    def _key_fields(self, msg: protocol.Message) -> dict[str, Any]:
        return {"job_id": msg["job_id"], "subtask": msg["subtask"], "attempt": msg["attempt"],
                "epoch": msg["epoch"], "provider_id": self.provider_id}

    def _leave(self, pirate: LazyPirate) -> None:
        if not self.registered:
            pirate.close()
            return
        pirate.close()
        pirate = self._pirate(1.0)
        pirate.send(protocol.encode("unregister", {"provider_id": self.provider_id}), time.monotonic())
        if pirate.socket.poll(1000):
            pirate.on_readable()
        pirate.close()

    # ---- compute thread -------------------------------------------------------------------
    def _fetch_blob(self, blob_id: str, key: str) -> np.ndarray:
        """A dataset array, once per content key: mapped when co-located, else asked of the head."""
        if key in self.data_cache:
            self.data_cache.move_to_end(key)
            return self.data_cache[key]
        if self.shared is not None:
            arr = np.load(layout.blob_path(self.shared.root, blob_id), mmap_mode="r", allow_pickle=False)
        else:
            arr = self._request_blob(blob_id)
        self.data_cache[key] = arr
        while len(self.data_cache) > DATA_CACHE_ENTRIES:
            self.data_cache.popitem(last=False)
        return arr

    def _request_blob(self, blob_id: str) -> np.ndarray:
        request = protocol.encode("fetch", {"provider_id": self.provider_id, "blob_id": blob_id})
        for attempt in range(3):
            sock = getattr(self.fetch_sockets, "socket", None)
            if sock is None:
                sock = self.fetch_sockets.socket = self._socket(zmq.REQ)
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(self.endpoint(self.cfg.registration_port))
            sock.send_multipart(request)
            if sock.poll(FETCH_TIMEOUT_MS):
                msg = protocol.decode(sock.recv_multipart(copy=False))
                if msg.type == "error":
                    raise TaskError(f"the head refused blob {blob_id}: {msg['message']}")
                if msg.type != "blob" or len(msg.arrays) != 1:
                    raise TaskError("malformed blob reply")
                return msg.arrays[0]
            sock.close(linger=0)  # Lazy Pirate: a stuck REQ is closed and reopened
            self.fetch_sockets.socket = None
            log.warning("no reply to a blob request (try %d)", attempt + 1)
        raise TaskError(f"could not fetch blob {blob_id} from the head")

    def _compute_loop(self) -> None:
        push, generation = self._push(), self.push_generation
        try:
            while True:
                msg = self.work.get()
                if msg is None:
                    return
                frames = self._execute(msg)
                while not self.stopping.is_set():
                    if generation != self.push_generation:  # the main thread started its sockets over
                        push.close(linger=0)
                        push, generation = self._push(), self.push_generation
                    try:  # never block for good: a PUSH whose connection was refused has nowhere to queue
                        push.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
                        break
                    except zmq.Again:
                        time.sleep(0.05)
                with self.lock:
                    self.in_hand.discard((msg["job_id"], msg["subtask"], msg["epoch"]))
        finally:
            push.close(linger=2000)
            self._close_fetch_socket()

    def _execute(self, msg: protocol.Message) -> list[Any]:
        fields = self._key_fields(msg)
        ctx = {"job_id": msg["job_id"], "subtask": msg["subtask"], "attempt": msg["attempt"]}
        if self.cfg.delay:
            time.sleep(self.cfg.delay)
        t0 = time.perf_counter()
        shared = msg.get("shared")
        try:
            if shared is not None:
                outputs = self._run_shared(msg, shared)
            else:
                outputs = tasks.get(msg["task_type"]).run(msg["params"], msg.arrays, self.device)
        except Exception as exc:
            retryable = not (isinstance(exc, DcfError) and exc.http_status < 500)
            log.error("subtask failed: %s: %s", type(exc).__name__, exc, extra=ctx)
            return protocol.encode("failed", {**fields, "error": f"{type(exc).__name__}: {exc}"[:500],
                                              "retryable": retryable})
        elapsed = time.perf_counter() - t0
        nonfinite = sum(int(a.size - np.count_nonzero(np.isfinite(a))) for a in outputs
                        if a.dtype.kind == "f")
        log.debug("subtask done in %.3fs", elapsed, extra=ctx)
        stats = {"nonfinite": nonfinite, "device": self.device.kind}
        if shared is not None:
            return protocol.encode("result", {**fields, "elapsed_s": elapsed, "stats": stats, "in_place": True})
        return protocol.encode("result", {**fields, "elapsed_s": elapsed, "stats": stats}, outputs)

    def _run_shared(self, msg: protocol.Message, shared: dict[str, Any]) -> list[np.ndarray]:
        files = self.shared
        if files is None or msg["epoch"] != files.epoch:
            raise TaskError("subtask by reference, but this provider does not share the head's state dir")
        blob_ids, names = shared.get("inputs"), shared.get("outputs")
        if not isinstance(blob_ids, dict) or not isinstance(names, list):
            raise TaskError("malformed 'shared' field")
        task = tasks.get(msg["task_type"])
        arrays = task.subtask_inputs(msg["params"], files.inputs(blob_ids))
        outputs = files.outputs(msg["job_id"], names, msg["epoch"])
        return task.run_into(msg["params"], arrays, outputs, self.device)


def _send_or_drop(sock: zmq.Socket, frames: list[Any]) -> None:
    """Send from the main loop without ever blocking it. A PUSH with no connection to queue on (its
    handshake was refused) drops the message: the head's ack timeout or deadline sends the subtask again."""
    try:
        sock.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
    except zmq.Again:
        log.warning("no connection to the head's result socket: message dropped (the head will re-send)")
