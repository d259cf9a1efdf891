"""The provider process: the I/O shell around its session with the head (``session.py``).

Main thread: Lazy Pirate REQ (register, heartbeats), SUB (subtasks and cancels on this provider's
topic), PUSH (acks); it feeds the session replies and deadlines and carries out what it
decides. Compute thread: runs subtasks one at a time and PUSHes results (and the progress of a long
one) on its own socket (ZeroMQ sockets are never shared between threads). A ``cancel`` drops the job's
queued subtasks at once and stops its running one at its next block (``common.tasks.checkpoint``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq

from common import __version__, protocol, security, tasks
from common.config import ProviderSettings
from common.errors import DcfError, TaskError
from common.tasks.base import SubtaskCancelled

from . import local_data
from .blobs import BlobCache, HeadBlobs
from .device import ComputeDevice, SubtaskDevice, TaskDevice, benchmark_gflops
from .pirate import LazyPirate, zmtp_heartbeats
from .session import (
    Command,
    Reconnect,
    Registered,
    RenewIdentity,
    SendHeartbeat,
    SendRegister,
    Session,
    WaitToRegister,
)
from .shared import SharedFiles

log = logging.getLogger("dcf.provider")

INLINE_SECONDS = 0.02  # subtasks expected to take less run on the socket thread
LOOP_WAKEUP_S = 0.5  # the socket loop looks at ``stopping`` at least this often
#: with several heads (``--head h1,h2``), lost replies in a row before the next head is tried: one stall of the
#: active head (a long merge) must not send its providers to a standby, which would declare them lost
HEAD_PATIENCE = 2


def runnable_task_types() -> list[str]:
    return [name for name in tasks.names() if tasks.get(name).available()]


def collectives(device_kind: str) -> list[str]:
    """The torch.distributed backends this provider can join a training group with (``register.collectives``):
    none without torch or its distributed package (some builds lack it), gloo, and NCCL on CUDA."""
    try:
        import torch.distributed as dist
    except ImportError:
        return []
    if not dist.is_available():
        return []
    out = ["gloo"] if dist.is_gloo_available() else []
    if device_kind == "cuda" and dist.is_nccl_available():
        out.append("nccl")
    return out


Key = tuple[str, int, str]  # (job id, subtask, head incarnation)


@dataclass
class Slot:
    """One subtask this provider holds (queued or running)."""

    msg: protocol.Message
    cancelled: bool = False  # a cancel came: dropped if queued, stopped at its next block if running
    #: the head forgot this provider (declared it dead, or restarted) and re-queued what it held:
    #: dropped if queued, stopped if running, never answered
    forgotten: bool = False

    @property
    def dropped(self) -> bool:
        """Cancelled or forgotten: not to run (queued), or to stop at its next block (running)."""
        return self.cancelled or self.forgotten

    @property
    def key(self) -> Key:
        return (self.msg["job_id"], self.msg["subtask"], self.msg["epoch"])


@dataclass
class MainSockets:
    """The socket thread's connections to the head."""

    sub: zmq.Socket  # subtasks on this provider's topic
    acks: zmq.Socket  # PUSH: acks, and results of quick subtasks run on this thread
    pirate: LazyPirate  # REQ: register, heartbeat, unregister


class ProviderNode:
    """One provider process: the I/O shell around its ``Session`` with the head."""

    def __init__(self, cfg: ProviderSettings, device: ComputeDevice, gflops: float | None = None) -> None:
        self.cfg = cfg
        self.keys = security.client_keys(cfg)  # None: CURVE off (ConfigError on bad key files)
        self.hardware = device
        self.session = Session(uuid.uuid4().hex, share_files=cfg.shared_files == "auto")
        self.name = cfg.name or f"{socket.gethostname()}-{device.kind}-{os.getpid()}"
        self.gflops = gflops if gflops is not None else benchmark_gflops(device)
        self.ctx = zmq.Context()
        self.work: queue.Queue[Slot | None] = queue.Queue()
        self.in_hand: dict[Key, Slot] = {}  # queued or running, not cancelled
        self.running: Slot | None = None  # the compute thread's subtask
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.shared: SharedFiles | None = None  # the head's state dir, when this process shares it
        #: the heads it may use (an active head and its standbys: ``--head h1,h2``), and the one in use
        self.heads = [h.strip() for h in cfg.head.split(",") if h.strip()] or [cfg.head]
        self.head = self.heads[0]
        self.head_blobs = HeadBlobs(self._blob_socket, lambda: self.session.provider_id, head=lambda: self.head)
        self.blobs = BlobCache(self.head_blobs)
        self.local_data = local_data.load(cfg.data)  # checked before the provider registers: a bad file stops it
        self.device = TaskDevice(device, self.blobs, self.head, {k: h.arrays for k, h in self.local_data.items()})
        self.push_generation = 0  # bumped when the compute thread's PUSH must be opened again

    @property
    def provider_id(self) -> str:
        return self.session.provider_id

    @property
    def topic(self) -> bytes:
        return self.session.provider_id.encode()

    def _socket(self, kind: int) -> zmq.Socket:
        """A socket to the head, a CURVE client of it when keys are configured, with ZMTP heartbeats (a
        connection to a head that vanished is closed, and libzmq connects again)."""
        sock = self.ctx.socket(kind)
        zmtp_heartbeats(sock, self.cfg.heartbeat_interval)
        security.secure_client(sock, self.keys)
        return sock

    def _pirate(self, timeout: float) -> LazyPirate:
        return LazyPirate(self.ctx, self.endpoint(self.cfg.registration_port), timeout,
                          secure=(lambda sock: security.secure_client(sock, self.keys)) if self.keys else None,
                          heartbeat_interval=self.cfg.heartbeat_interval)

    def _blob_socket(self) -> zmq.Socket:
        sock = self._socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint(self.cfg.registration_port))
        return sock

    def endpoint(self, port: int) -> str:
        host = self.head
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # IPv6 literal
        return f"tcp://{host}:{port}"

    # ---- messages -------------------------------------------------------------------------
    def offered_memory(self) -> int:
        """The memory reported at registration: what the device has free, at most ``--memory-limit``."""
        free = self.hardware.available_memory()
        return min(free, self.cfg.memory_limit) if self.cfg.memory_limit else free

    def register_frames(self) -> list[Any]:
        hardware = self.hardware
        return protocol.encode("register", {
            "provider_id": self.provider_id, "name": self.name, "host": socket.gethostname(),
            "os": f"{platform.system()} {platform.release()}", "device_kind": hardware.kind,
            "device_name": hardware.name, "memory_bytes": self.offered_memory(),
            "cores": os.cpu_count() or 1, "task_types": runnable_task_types(), "dtypes": list(hardware.dtypes),
            "version": __version__, "gflops": float(self.gflops), "datasets": local_data.wire(self.local_data),
            "collectives": collectives(hardware.kind)})

    def heartbeat_frames(self) -> list[Any]:
        with self.lock:  # a cancelled subtask still running (it stops at its next block) is still held
            held = set(self.in_hand) | ({self.running.key} if self.running is not None else set())
            running = sorted({f"{j}:{s}" for j, s, _ in held})[:64]
        fields: dict[str, Any] = {"provider_id": self.provider_id, "running": running,
                                  "queued": self.work.qsize()}
        if self.shared is not None:
            fields["local_epoch"] = self.shared.incarnation
        return protocol.encode("heartbeat", fields)

    # ---- main loop ------------------------------------------------------------------------
    def run(self) -> None:
        io = MainSockets(self._sub(), self._push(), self._pirate(self.cfg.request_timeout))
        compute = threading.Thread(target=self._compute_loop, name="dcf-compute", daemon=True)
        compute.start()
        log.info("provider %s (%s, %s, %.1f GFLOP/s) connecting to %s%s", self.name, self.hardware.kind,
                 self.hardware.name, self.gflops, ", ".join(self.heads),
                 f" with CURVE key {self.keys.public.decode()}" if self.keys else "",
                 extra={"provider_id": self.provider_id})
        self._carry_out(self.session.start(), io, time.monotonic())
        try:
            while not self.stopping.is_set():
                self._step(io)
        finally:
            self._shut_down(io, compute)

    def _step(self, io: MainSockets) -> None:
        """Wait for a subtask, a reply or the session's next deadline, and act on what came."""
        sub, pirate = io.sub, io.pirate
        now = time.monotonic()
        wait = min(pirate.next_event(now), LOOP_WAKEUP_S)
        session_wait = self.session.seconds_until_due(now)
        if session_wait is not None:
            wait = min(wait, session_wait)
        poller = zmq.Poller()
        poller.register(sub, zmq.POLLIN)
        poller.register(pirate.socket, zmq.POLLIN)
        events = dict(poller.poll(int(wait * 1000)))
        if sub in events:
            self._on_subtask(sub.recv_multipart(copy=False), io.acks)
        if pirate.socket in events:
            reply = pirate.on_readable()
            if reply is not None:
                self._carry_out(self.session.on_reply(reply, time.monotonic()), io, time.monotonic())
        now = time.monotonic()
        lost = pirate.check(now)
        if lost is not None and lost.refused:
            self.session.on_handshake_refused()
        elif lost is not None and len(self.heads) > 1 and lost.failures >= HEAD_PATIENCE:
            self._next_head(io, now)
        self._carry_out(self.session.due(now), io, now)

    def _carry_out(self, commands: list[Command], io: MainSockets, now: float) -> None:
        """Do what the session decided."""
        for command in commands:
            if isinstance(command, SendRegister):
                if command.again:
                    log.warning("the head does not know this provider (restarted?); registering again")
                    self._forget_all()
                io.pirate.send(self.register_frames(), now)
            elif isinstance(command, SendHeartbeat):
                io.pirate.send(self.heartbeat_frames(), now)
            elif isinstance(command, Registered):
                self._on_registered(command, now)
            elif isinstance(command, RenewIdentity):
                log.warning("the head binds this provider id to another key; registering with a new id")
                io.sub.setsockopt(zmq.UNSUBSCRIBE, command.old_id.encode())
                io.sub.setsockopt(zmq.SUBSCRIBE, command.new_id.encode())
            elif isinstance(command, WaitToRegister):
                log.error("head refused a request: %s: %s; retrying in %.0fs", command.code, command.message,
                          command.retry_in_s)
            elif isinstance(command, Reconnect):
                self._reconnect(io)

    def _on_registered(self, registered: Registered, now: float) -> None:
        shared = None
        if registered.state_dir is not None:
            shared = SharedFiles.probe(registered.state_dir, registered.incarnation, self.provider_id)
        self.shared = shared
        self.blobs.use_shared(shared)
        if shared is not None:
            self.session.on_shared_files(now)
        log.info("registered with head %s%s", registered.incarnation[:8],
                 " (shares its state dir)" if shared else "", extra={"provider_id": self.provider_id})

    def _next_head(self, io: MainSockets, now: float) -> None:
        """The head in use did not answer ``HEAD_PATIENCE`` times in a row: the next of ``--head`` (a standby
        may have taken over; a standby binds no ZeroMQ port, so it never answers). Every connection moves
        there, and the request waiting for a reply goes to it; the new head does not know this provider, says
        so, and it registers again."""
        self.head = self.heads[(self.heads.index(self.head) + 1) % len(self.heads)]
        self.device.head_host = self.head
        log.warning("trying head %s", self.head, extra={"provider_id": self.provider_id})
        pending = io.pirate.request
        io.pirate.close()
        io.pirate = self._pirate(self.cfg.request_timeout)
        if pending is not None:
            io.pirate.send(pending, now)
        self._reconnect(io)

    def _reconnect(self, io: MainSockets) -> None:
        # a refused handshake (our key was not allowed then) is not retried by libzmq, and a head that
        # does not see our subscription sends us no subtasks: the connections start over
        log.info("opening the task and result connections anew", extra={"provider_id": self.provider_id})
        io.sub.close(linger=0)
        io.acks.close(linger=0)
        io.sub, io.acks = self._sub(), self._push()
        self.push_generation += 1

    def _shut_down(self, io: MainSockets, compute: threading.Thread) -> None:
        self.head_blobs.close_thread_socket()
        self._leave(io.pirate)
        self.work.put(None)
        compute.join(timeout=5)
        io.sub.close(linger=0)
        io.acks.close(linger=0)
        self.ctx.term()

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

    def _on_subtask(self, frames: list[Any], acks: zmq.Socket) -> None:
        if frames[0].bytes != self.topic:
            return
        try:
            msg = protocol.decode(frames[1:], expect=protocol.TASK_CHANNEL_TYPES)
        except DcfError as exc:
            log.warning("bad subtask message: %s", exc.message)
            return
        if msg.type == "cancel":
            self._on_cancel(msg, acks)
            return
        slot = Slot(msg)
        key = slot.key
        try:
            tasks.get(msg["task_type"])
        except DcfError as exc:
            _send_or_drop(acks, protocol.encode("failed", {**self._key_fields(msg), "error": exc.message,
                                                           "retryable": True}))
            return
        with self.lock:
            if key in self.in_hand:  # re-sent because an ack was lost: the first copy is enough
                _send_or_drop(acks, protocol.encode("ack", self._key_fields(msg)))
                return
            idle = not self.in_hand and self.running is None
            self.in_hand[key] = slot
        if idle and self._is_quick(msg):
            # A few milliseconds of work while the compute thread waits: run it here and save two
            # thread hand-offs (training steps). Heartbeats wait at most INLINE_SECONDS. Its result,
            # sent at once, is its ack (PROTOCOL.md 8.3): one message to the head, not two.
            answer = self._execute(slot)
            if answer is not None:
                _send_or_drop(acks, answer)
            with self.lock:
                if self.in_hand.get(key) is slot:
                    del self.in_hand[key]
            return
        _send_or_drop(acks, protocol.encode("ack", self._key_fields(msg)))
        self.work.put(slot)

    def _on_cancel(self, msg: protocol.Message, acks: zmq.Socket) -> None:
        """The head cancelled a job (or one subtask of it: another copy won): queued subtasks of it are
        dropped and answered ``cancelled`` now; the running one stops at its next block and the compute
        thread answers. A re-sent copy that comes after this is a new subtask."""
        job_id, only = msg["job_id"], msg.get("subtask")
        with self.lock:
            hit = [s for k, s in self.in_hand.items() if k[0] == job_id and (only is None or k[1] == only)]
            for slot in hit:
                slot.cancelled = True
                del self.in_hand[slot.key]
            queued = [s for s in hit if s is not self.running]
        for slot in queued:
            _send_or_drop(acks, protocol.encode("cancelled", self._key_fields(slot.msg)))
        if hit:
            log.info("cancelled by the head: %d queued subtasks dropped%s", len(queued),
                     ", the running one stops" if len(queued) < len(hit) else "", extra={"job_id": job_id})

    def _forget_all(self) -> None:
        """The head no longer knows this provider: it re-queued every subtask the provider held (or it
        restarted, and they are of its old epoch). They are dropped, the running one stopped at its next
        block, none answered: a stale one must not hold the compute thread (a training group's member
        waiting for peers that will never come would hold it for the collective timeout)."""
        with self.lock:
            held = list(self.in_hand.values())
            if self.running is not None and self.running not in held:
                held.append(self.running)
            for slot in held:
                slot.forgotten = True
            self.in_hand.clear()
        if held:
            log.warning("dropped the %d subtasks this provider held: the head re-queued them", len(held),
                        extra={"provider_id": self.provider_id})

    def _is_quick(self, msg: protocol.Message) -> bool:
        if self.cfg.delay:  # a simulated slow device must not hold up heartbeats
            return False
        cost = msg.get("cost")
        return isinstance(cost, (int, float)) and cost / (self.gflops * 1e9) < INLINE_SECONDS

    def _key_fields(self, msg: protocol.Message) -> dict[str, Any]:
        return {"job_id": msg["job_id"], "subtask": msg["subtask"], "attempt": msg["attempt"],
                "epoch": msg["epoch"], "provider_id": self.provider_id}

    def _leave(self, pirate: LazyPirate) -> None:
        """Unregister (one try, one second) if registered."""
        pirate.close()
        if not self.session.registered:
            return
        farewell = self._pirate(1.0)
        farewell.send(protocol.encode("unregister", {"provider_id": self.provider_id}), time.monotonic())
        if farewell.socket.poll(1000):
            farewell.on_readable()
        farewell.close()

    # ---- compute thread -------------------------------------------------------------------
    def _compute_loop(self) -> None:
        out = ComputePush(self)
        try:
            while True:
                slot = self.work.get()
                if slot is None:
                    return
                with self.lock:
                    if slot.dropped:  # dropped while queued (a cancel was answered)
                        continue
                    self.running = slot
                frames = self._execute(slot, out.progress(slot))
                with self.lock:
                    self.running = None
                    if self.in_hand.get(slot.key) is slot:
                        del self.in_hand[slot.key]
                if frames is not None:
                    out.send(frames)
        finally:
            out.close()
            self.head_blobs.close_thread_socket()

    def _execute(self, slot: Slot, report: Callable[[int, int], None] | None = None) -> list[Any] | None:
        """Run one subtask: the frames of its ``result``, ``failed`` or (stopped by a cancel) ``cancelled``;
        None when it was stopped because this provider is shutting down (its unregister re-queues it)."""
        msg = slot.msg
        fields = self._key_fields(msg)
        ctx = {"job_id": msg["job_id"], "subtask": msg["subtask"], "attempt": msg["attempt"]}
        if self.cfg.delay:
            time.sleep(self.cfg.delay)
        t0 = time.perf_counter()
        shared = msg.get("shared")
        device = SubtaskDevice(self.device, lambda: slot.dropped or self.stopping.is_set(), report)
        try:
            if slot.dropped:
                raise SubtaskCancelled("cancelled before it started")
            task = tasks.get(msg["task_type"])
            task.check_params(msg["params"])
            if shared is not None:
                outputs = self._run_shared(task, msg, shared, device)
            else:
                outputs = task.run(msg["params"], msg.arrays, device)
        except SubtaskCancelled:
            if slot.forgotten or not slot.cancelled:  # forgotten, or this provider is shutting down
                return None
            log.info("subtask stopped after %.3fs: its job was cancelled", time.perf_counter() - t0, extra=ctx)
            return protocol.encode("cancelled", fields)
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

    def _run_shared(self, task: tasks.TaskType, msg: protocol.Message, shared: dict[str, Any],
                    device: SubtaskDevice) -> list[np.ndarray]:
        files = self.shared
        if files is None or msg["epoch"] != files.incarnation:
            raise TaskError("subtask by reference, but this provider does not share the head's state dir")
        blob_ids, names = shared.get("inputs"), shared.get("outputs")
        if not isinstance(blob_ids, dict) or not isinstance(names, list):
            raise TaskError("malformed 'shared' field")
        if not isinstance(task, tasks.SplitTask):
            raise TaskError(f"task type {task.name} has no subtasks by reference")
        arrays = task.subtask_inputs(msg["params"], files.inputs(blob_ids))
        outputs = files.outputs(msg["job_id"], names, msg["epoch"])
        return task.run_into(msg["params"], arrays, outputs, device)


class ComputePush:
    """The compute thread's PUSH to the head: results (retried until a connection takes them) and progress
    reports (dropped when none does: the next one says more)."""

    def __init__(self, node: ProviderNode) -> None:
        self.node = node
        self.generation = node.push_generation
        self.sock = node._push()

    def _current(self) -> zmq.Socket:
        if self.generation != self.node.push_generation:  # the main thread started its sockets over
            self.sock.close(linger=0)
            self.sock, self.generation = self.node._push(), self.node.push_generation
        return self.sock

    def send(self, frames: list[Any]) -> None:
        while not self.node.stopping.is_set():
            try:  # never block for good: a PUSH whose connection was refused has nowhere to queue
                self._current().send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
                return
            except zmq.Again:
                time.sleep(0.05)

    def progress(self, slot: Slot) -> Callable[[int, int], None]:
        fields = self.node._key_fields(slot.msg)

        def report(done: int, total: int) -> None:
            with contextlib.suppress(zmq.Again):
                self._current().send_multipart(protocol.encode("progress", {**fields, "done": done, "total": total}),
                                               copy=False, flags=zmq.NOBLOCK)
        return report

    def close(self) -> None:
        self.sock.close(linger=2000)


def _send_or_drop(sock: zmq.Socket, frames: list[Any]) -> None:
    """Send from the main loop without ever blocking it. A PUSH with no connection to queue on (its
    handshake was refused) drops the message: the head's ack timeout or deadline sends the subtask again."""
    try:
        sock.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
    except zmq.Again:
        log.warning("no connection to the head's result socket: message dropped (the head will re-send)")
