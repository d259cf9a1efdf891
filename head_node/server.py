"""The head's I/O layer: one asyncio event loop owns the ZeroMQ sockets, the HTTP server,
the job queue and the state machine (head_node/state.py). Nothing else changes state.

Sockets (all bound by the head):
  ROUTER  registration_port  register / heartbeat / unregister; every request gets a reply
  XPUB    task_port          subtasks, topic = provider id; subscriptions mark providers ready
  PULL    result_port        ack / result / failed from providers
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import time
import uuid
from argparse import Namespace
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import zmq
import zmq.asyncio

from common import layout, protocol, security, tasks
from common.errors import Conflict, DcfError, NotFound, ProtocolError, Unauthorized, ValidationError
from common.protocol import check_id
from common.tasks import ArrayMeta

from . import state as st
from .events import EventBus
from .jobqueue import Ack, AmqpQueue, EmbeddedQueue, JobQueue
from .store import BlobStore, JobStore

log = logging.getLogger("dcf.head")

#: frames below this size are copied when sent: zero-copy tracking costs more than copying them
COPY_THRESHOLD = 1 << 20
QUEUE_DOWN = ("RabbitMQ unreachable: the head is reconnecting (the job stays accepted: it goes on or "
              "waits; its outcome is kept and acknowledged once the broker is back)")
#: with CURVE, at most this many provider ids bound to keys
MAX_PROVIDER_KEYS = 10_000
PROVIDER_TYPES = ("register", "heartbeat", "unregister", "fetch")
RESULT_TYPES = ("ack", "result", "failed")


class ActiveJob:
    """What the I/O layer holds for a running job: its open operands, outputs and queue ack."""

    def __init__(self, blob_ids: dict[str, str], operands: dict[str, np.ndarray],
                 outputs: dict[str, np.ndarray], ack: Ack) -> None:
        self.blob_ids = blob_ids
        self.operands = operands
        self.outputs = outputs
        self.ack = ack
        self.by_reference: set[tuple[int, int]] = set()  # (subtask, attempt) sent by file reference
        self.trainer: Any = None  # head_node.training.Trainer for train jobs: plans rounds, merges
        self.nonfinite = 0
        self.bytes_out = 0
        self.bytes_in = 0


class Head:
    def __init__(self, cfg: Namespace) -> None:
        self.cfg = cfg
        self.root = Path(cfg.state_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.epoch = uuid.uuid4().hex
        self.state = st.ClusterState(self.epoch, st.Timing(
            heartbeat_interval=cfg.heartbeat_interval, ack_timeout=cfg.ack_timeout,
            min_deadline=cfg.min_deadline, max_attempts=cfg.max_attempts))
        self.blobs = BlobStore(self.root)
        self.store = JobStore(self.root / "jobs.sqlite3", fsync=cfg.fsync)
        self.queue: JobQueue = (AmqpQueue(cfg.amqp_url, self.store, queue_name=cfg.amqp_queue) if cfg.amqp_url
                                else EmbeddedQueue(self.store))
        self.active: dict[str, ActiveJob] = {}
        self.events = EventBus()
        if isinstance(self.queue, AmqpQueue):
            self.events.sinks.append(self.queue.publish_event)
            self.queue.on_state = self._queue_state
        self.waiters: dict[str, asyncio.Event] = {}
        #: submissions waiting for the broker's confirm -> a delivery of theirs that came first
        self.parked: dict[str, tuple[dict[str, Any], Ack] | None] = {}
        self.torch_import: asyncio.Future[None] | None = None
        self.torch_ready = False
        self.ctx = zmq.asyncio.Context()
        self.keys = security.server_keys(cfg)  # None: CURVE off (ConfigError on bad key files)
        self.zap: Any = None
        #: with CURVE: provider id -> the public key it registered with; its later messages must carry it
        self.provider_keys: dict[str, str] = {}
        self.stopping = asyncio.Event()
        self.started_at = time.time()
        self.counters = {"bytes_out": 0, "bytes_in": 0, "bad_messages": 0}
        #: (task type, final state, seconds from creation to end) of recently finished jobs
        self.finished: deque[tuple[str, str, float]] = deque(maxlen=10_000)
        self._tasks: list[asyncio.Task[Any]] = []

    # ---- lifecycle ------------------------------------------------------------------------
    def _bind(self, kind: int, port: int, max_msg: int = protocol.DEFAULT_MAX_MESSAGE_BYTES) -> zmq.asyncio.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, max_msg)  # before bind: libzmq applies it to new connections
        security.secure_server(sock, self.keys)
        sock.bind(f"tcp://{self.cfg.host}:{port}")
        return sock

    async def start(self) -> None:
        self._start_security()
        self.router = self._bind(zmq.ROUTER, self.cfg.registration_port, max_msg=1 << 20)
        self.router.copy_threshold = COPY_THRESHOLD
        self.xpub = self.ctx.socket(zmq.XPUB)
        self.xpub.setsockopt(zmq.LINGER, 0)
        # VERBOSE: every subscribe comes up, an unsubscribe only when the topic's last subscriber
        # leaves (VERBOSER would let any subscriber's unsubscribe mark a provider not ready)
        self.xpub.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.xpub.setsockopt(zmq.SNDHWM, 100_000)
        self.xpub.copy_threshold = COPY_THRESHOLD
        security.secure_server(self.xpub, self.keys)
        self.xpub.bind(f"tcp://{self.cfg.host}:{self.cfg.task_port}")
        self.pull = self._bind(zmq.PULL, self.cfg.result_port)
        self.pull.setsockopt(zmq.RCVHWM, 100_000)
        for coro in (self._router_loop(), self._xpub_loop(), self._pull_loop(), self._tick_loop()):
            self._tasks.append(asyncio.create_task(coro))
        (self.root / layout.MARKER).write_text(self.epoch)
        if isinstance(self.queue, AmqpQueue):  # the API serves (and refuses jobs) while RabbitMQ is away
            self._tasks.append(asyncio.create_task(self.queue.start(self._deliver)))
        else:
            await self.queue.start(self._deliver)
        log.info("head %s up: registration %d, tasks %d, results %d, store %s, state dir %s",
                 self.epoch[:8], self.cfg.registration_port, self.cfg.task_port, self.cfg.result_port,
                 self.queue.name, self.root)

    def _start_security(self) -> None:
        """With CURVE keys: the ZAP handler is bound before any socket, so no handshake skips it."""
        if self.keys is None:
            if self.cfg.host not in ("127.0.0.1", "::1", "localhost"):
                log.warning("ZeroMQ ports on %s are open to anyone who can reach them: CURVE is off (see "
                            "`dcf keys generate`, --curve-secret-key, --curve-allow)", self.cfg.host)
            return
        from .zap import ZapHandler

        self.zap = ZapHandler(self.ctx, self.keys.allow_dir)
        self.zap.start()
        log.info("CURVE on: ZeroMQ traffic encrypted; providers allowed from %s (%d keys)",
                 self.keys.allow_dir, len(self.zap.allow.keys))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.queue.close()
        if self.zap is not None:
            self.zap.stop()
        self.ctx.destroy(linger=0)
        self.store.close()

    def _queue_state(self, connected: bool) -> None:
        """The broker went away or came back: an event (dashboard alert, `dcf.events` once back)."""
        self.events.emit("queue.restored" if connected else "queue.lost", queue=self.queue.name)

    # ---- jobs -----------------------------------------------------------------------------
    async def submit(self, spec: dict[str, Any]) -> str:
        """Validate a job, persist it, publish it durably; only then return its id."""
        record = self.make_record(spec)
        job_id = record["job_id"]
        self.store.insert(record, accepted=False)
        # the broker may deliver the message before it confirms it: such a delivery waits here
        self.parked[job_id] = None
        try:
            await self.queue.publish(record)
        except DcfError:
            # not accepted: no row is left, and a tombstone drops the message if the broker got it
            # after all (a lost publisher confirm). The operands stay: the client may submit again.
            self.store.delete(job_id)
            early = self.parked.pop(job_id, None)
            if early is not None:
                asyncio.ensure_future(early[1]())  # delivered although refused: acked, never run
            raise
        early = self.parked.pop(job_id, None)
        if early is not None:
            self._deliver(*early)
        self.store.mark_accepted(job_id)
        log.info("job accepted: %s", record["type"], extra={"job_id": record["job_id"]})
        self.events.emit("job.accepted", job_id=record["job_id"], type=record["type"])
        return record["job_id"]

    def make_record(self, spec: dict[str, Any]) -> dict[str, Any]:
        task = tasks.get(spec["type"])
        blob_ids = spec.get("inputs") or {}
        missing = [n for n in task.inputs if n not in blob_ids]
        extra = [n for n in blob_ids if n not in task.inputs]
        if missing or extra:
            raise ValidationError(f"{task.name} takes inputs {list(task.inputs)}; missing {missing}, "
                                  f"unexpected {extra}")
        metas = {name: self.blobs.meta(blob_id) for name, blob_id in blob_ids.items()}
        outputs = _validate(task, spec.get("params") or {}, metas)
        return {
            "job_id": uuid.uuid4().hex, "type": task.name, "params": spec.get("params") or {},
            "inputs": {n: {"blob": b, **metas[n].to_dict()} for n, b in blob_ids.items()},
            "outputs": {n: m.to_dict() for n, m in outputs.items()},
            "nodes": spec.get("nodes"), "created_at": time.time(),
        }

    def _deliver(self, record: dict[str, Any], ack: Ack) -> None:
        """A job from the durable queue (new, recovered or redelivered) enters the scheduler."""
        job_id = record["job_id"]
        if job_id in self.parked:  # its submission is still waiting for the broker's confirm
            self.parked[job_id] = (record, ack)
            return
        if job_id in self.active:
            self.active[job_id].ack = ack  # redelivery after a broker reconnect: the new tag counts
            return
        row = self.store.get(job_id)
        if row is not None and row["state"] in st.terminal_states():
            asyncio.ensure_future(ack())
            return
        if record["type"] == "train" and not self.torch_ready:
            # importing torch takes seconds: once, on a thread, so that heartbeats, results and the API go
            # on; every training delivery waits for that one import, in delivery order
            if self.torch_import is None:
                self.torch_import = asyncio.ensure_future(asyncio.to_thread(_import_torch))
            asyncio.ensure_future(self._deliver_after_torch(record, ack))
            return
        blob_ids = {name: ref["blob"] for name, ref in record["inputs"].items()}
        try:
            job, operands = self._open_job(record)
            outputs = self.blobs.create_outputs(job_id, job.outputs, self.epoch)
            trainer = self._trainer(job, blob_ids, operands) if job.task_type == "train" else None
        except (DcfError, OSError, ValueError, ImportError) as exc:
            msg = exc.message if isinstance(exc, DcfError) else f"{type(exc).__name__}: {exc}"
            log.error("job cannot run: %s", msg, extra={"job_id": job_id})
            self.store.update(job_id, state="failed", error=msg, finished_at=time.time())
            self.events.emit("job.failed", job_id=job_id, error=msg)
            asyncio.ensure_future(ack())
            return
        self.active[job_id] = ActiveJob(blob_ids, operands, outputs, ack)
        if trainer is not None:
            self.active[job_id].trainer = trainer
            job.planner = trainer
        self.store.update(job_id, state="queued")
        self._run(self.state.add_job(job, time.time()))

    async def _deliver_after_torch(self, record: dict[str, Any], ack: Ack) -> None:
        assert self.torch_import is not None
        await asyncio.shield(self.torch_import)  # never raises: _import_torch reports, _trainer fails the job
        self.torch_ready = True
        self._deliver(record, ack)

    def _trainer(self, job: st.Job, blob_ids: dict[str, str], operands: dict[str, np.ndarray]) -> Any:
        if TORCH_IMPORT_ERROR:
            raise DcfError(f"training needs a working torch on the head ({TORCH_IMPORT_ERROR})")
        try:
            import torch

            from .training import Trainer
        except ImportError as exc:
            raise DcfError(f"training needs torch on the head ({exc})") from None
        torch.set_num_threads(1)  # the optimizer step is small; keep the cores for the providers
        return Trainer(job.job_id, job.params, blob_ids, operands, layout.job_dir(self.root, job.job_id),
                       fsync=self.cfg.fsync)

    def _open_job(self, record: dict[str, Any]) -> tuple[st.Job, dict[str, np.ndarray]]:
        task = tasks.get(record["type"])
        operands, metas = {}, {}
        for name, ref in record["inputs"].items():
            operands[name] = self.blobs.open(ref["blob"])
            metas[name] = ArrayMeta.of(operands[name])
        outputs = _validate(task, record["params"], metas)
        job = st.Job(record["job_id"], task.name, record["params"], metas, outputs,
                     record.get("nodes"), created_at=record["created_at"])
        return job, operands

    def cancel(self, job_id: str) -> dict[str, Any]:
        job = self.state.jobs.get(job_id)
        if job is None:
            row = self._row(job_id)
            raise Conflict(f"job {job_id} is already {row['state']}")
        self.state.cancel(job_id, time.time())
        self._close_job(job, "cancelled")
        return self.job_view(job_id)

    async def delete(self, job_id: str) -> None:
        job = self.state.jobs.get(job_id)
        if job is not None and not job.state.terminal:
            raise Conflict(f"job {job_id} is {job.state.value}; cancel it first")
        row = self._row(job_id)
        self.state.forget(job_id)
        self.events.forget_job(job_id)
        self.blobs.delete_job(job_id)
        self.store.delete(job_id)
        for ref in row["inputs"].values():
            if not self.store.blob_in_use(ref["blob"], job_id):
                self.blobs.delete_blob(ref["blob"])

    def _row(self, job_id: str) -> dict[str, Any]:
        row = self.store.get(job_id) if _is_id(job_id) else None
        if row is None:
            raise NotFound(f"no job {job_id}")
        return row

    def job_view(self, job_id: str) -> dict[str, Any]:
        view = self._job_view(job_id)
        if not self.queue.is_connected and view["state"] in ("queued", "running"):
            view["waiting"] = QUEUE_DOWN + (f"; {view['waiting']}" if view.get("waiting") else "")
        return view

    def _job_view(self, job_id: str) -> dict[str, Any]:
        job = self.state.jobs.get(job_id)
        if job is not None:
            view = st.job_view(job, self._names())
            view["stats"] = {**job.stats, **self._live_stats(job_id)}
            act = self.active.get(job_id)
            if act is not None and act.trainer is not None:
                done, total = act.trainer.progress()
                view["progress"] = {"done": done, "total": total}
            elif "progress" in job.stats:
                view["progress"] = job.stats["progress"]
            return view
        row = self._row(job_id)
        stats = row["stats"] or {}
        return {
            "job_id": job_id, "type": row["type"], "state": row["state"], "params": row["params"],
            "inputs": {k: {"dtype": v["dtype"], "shape": v["shape"]} for k, v in row["inputs"].items()},
            "outputs": row["outputs"], "nodes": row["nodes"], "created_at": row["created_at"],
            "started_at": row["started_at"], "finished_at": row["finished_at"], "error": row["error"],
            "waiting": None if row["state"] != "queued" else "waiting for the head to schedule it",
            "progress": stats.get("progress", {"done": 0, "total": 0}),
            "shares": stats.get("shares", {}), "stats": stats,
        }

    def drain(self, provider_id: str, draining: bool = True) -> dict[str, Any]:
        """A draining provider finishes what it has and is given nothing new."""
        self.state.drain(provider_id, draining)
        self.events.emit("node.draining" if draining else "node.undrained", provider_id=provider_id)
        if not draining:
            self._run(self.state.schedule(time.time()))
        return self.node_view(provider_id)

    def node_view(self, provider_id: str) -> dict[str, Any]:
        for row in self.state.provider_rows(time.time()):
            if row["provider_id"] == provider_id:
                return row
        raise NotFound(f"no provider {provider_id}")

    def snapshot(self) -> dict[str, Any]:
        """Everything the dashboard and /metrics show, in one read-only dict."""
        now = time.time()
        names = self._names()
        live = [st.job_view(j, names) for j in self.state.jobs.values() if not j.state.terminal]
        return {
            "time": now, "epoch": self.epoch, "uptime_s": now - self.started_at, "queue": self.queue.name,
            "queue_connected": self.queue.is_connected,
            "nodes": self.state.provider_rows(now), "jobs": live,
            "counters": {**self.state.counters, **self.counters,
                         **({"curve_refused": self.zap.denied} if self.zap is not None else {})},
            "finished": list(self.finished),
        }

    def _live_stats(self, job_id: str) -> dict[str, Any]:
        act = self.active.get(job_id)
        if act is None:
            return {}
        return {"result_nonfinite": act.nonfinite, "bytes_out": act.bytes_out, "bytes_in": act.bytes_in}

    def _names(self) -> dict[str, str]:
        return {pid: p.info.name for pid, p in self.state.providers.items()}

    def list_jobs(self, state: str | None, limit: int) -> list[dict[str, Any]]:
        out = []
        for row in self.store.list(state, limit):
            live = self.state.jobs.get(row["job_id"])
            if live is not None:
                out.append(st.job_view(live, self._names()))
            else:
                out.append(self.job_view(row["job_id"]))
        return out

    async def wait(self, job_id: str, timeout: float) -> dict[str, Any]:
        view = self.job_view(job_id)
        if view["state"] in st.terminal_states() or timeout <= 0:
            return view
        event = self.waiters.setdefault(job_id, asyncio.Event())
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)
        return self.job_view(job_id)

    def result_path(self, job_id: str, name: str | None) -> Path:
        view = self.job_view(job_id)
        if view["state"] != "done":
            raise Conflict(f"job {job_id} is {view['state']}; its result is not available")
        files = view["stats"].get("files") or []
        name = name or (next(iter(view["outputs"])) if view["outputs"] else (files[0] if files else ""))
        if name in files:
            path = layout.job_dir(self.root, job_id) / name
        elif name in view["outputs"]:
            path = self.blobs.output_path(job_id, name)
        else:
            raise NotFound(f"job {job_id} has no output {name!r}")
        if not path.exists():
            raise NotFound(f"result {name!r} of job {job_id} is missing from the state dir")
        return path

    # ---- actions --------------------------------------------------------------------------
    def _run(self, actions: list[st.Action]) -> None:
        for action in actions:
            if isinstance(action, st.Dispatch):
                self._dispatch(action)
            elif isinstance(action, st.JobStarted):
                job = self.state.jobs[action.job_id]
                self.store.update(action.job_id, state="running", started_at=job.started_at)
                log.info("job started with %d subtasks", len(job.subtasks), extra={"job_id": action.job_id})
                self.events.emit("job.started", job_id=action.job_id, subtasks=len(job.subtasks))
            elif isinstance(action, st.JobFinished):
                self._close_job(self.state.jobs[action.job_id], "done")
            elif isinstance(action, st.JobFailed):
                self._close_job(self.state.jobs[action.job_id], "failed")
            elif isinstance(action, st.Straggler):
                log.warning("straggler: subtask running %.1fs%s", action.seconds,
                            f"; speculative copy on {action.copied_to[:8]}" if action.copied_to else "",
                            extra={"job_id": action.job_id, "subtask": action.subtask,
                                   "provider_id": action.provider_id})
                self.events.emit("straggler", job_id=action.job_id, subtask=action.subtask,
                                 provider_id=action.provider_id, seconds=action.seconds,
                                 copied_to=action.copied_to)
            elif isinstance(action, st.ProviderLost):
                log.warning("provider lost; %d subtasks re-queued", action.requeued,
                            extra={"provider_id": action.provider_id})
                prov = self.state.providers.get(action.provider_id)
                self.events.emit("node.lost", provider_id=action.provider_id,
                                 name=prov.info.name if prov else "", requeued=action.requeued)

    def _dispatch(self, d: st.Dispatch) -> None:
        job = self.state.jobs[d.job_id]
        act = self.active[d.job_id]
        sub = job.subtasks[d.subtask]
        fields = {"job_id": d.job_id, "subtask": d.subtask, "attempt": d.attempt, "epoch": self.epoch,
                  "task_type": job.task_type, "params": sub.params, "cost": float(sub.cost)}
        if act.trainer is not None:
            arrays = act.trainer.subtask_inputs(sub.params)
        elif self.state.providers[d.provider_id].local:
            # co-located provider: it maps the operands and writes the result in place
            fields["shared"] = {"inputs": act.blob_ids, "outputs": sorted(job.outputs)}
            act.by_reference.add((d.subtask, d.attempt))
            arrays: list[np.ndarray] = []
        else:
            arrays = tasks.get(job.task_type).subtask_inputs(sub.params, act.operands)
        frames = protocol.encode("subtask", fields, arrays, topic=d.provider_id.encode())
        nbytes = sum(a.nbytes for a in arrays)
        act.bytes_out += nbytes
        self.counters["bytes_out"] += nbytes
        # PUB never blocks: past the high-water mark it drops, and the ack timeout re-sends.
        sent = self.xpub.send_multipart(frames, copy=False)
        sent.add_done_callback(_log_send_error)
        log.debug("dispatched%s", " by reference" if not arrays else "",
                  extra={"job_id": d.job_id, "subtask": d.subtask, "attempt": d.attempt,
                         "provider_id": d.provider_id})

    def _close_job(self, job: st.Job, outcome: str) -> None:
        act = self.active.pop(job.job_id, None)
        stats = {**job.stats, "progress": {"done": job.done_count, "total": len(job.subtasks)},
                 "shares": {self._names().get(p, p): round(f, 4) for p, f in job.shares().items()}}
        if act is not None:
            stats.update(result_nonfinite=act.nonfinite, bytes_out=act.bytes_out, bytes_in=act.bytes_in)
        if job.started_at and job.finished_at:
            stats["compute_s"] = round(job.finished_at - job.started_at, 4)
        job.stats = stats
        try:
            if outcome == "done" and act is not None and act.trainer is not None:
                stats["training"] = act.trainer.summary()
                stats["files"] = act.trainer.write_outputs(job.started_at)
                stats["progress"] = {"done": act.trainer.global_step, "total": act.trainer.total_steps}
            elif outcome == "done" and act is not None:
                self.blobs.commit_outputs(job.job_id, act.outputs, self.epoch, self.cfg.fsync,
                                          copy=bool(act.by_reference))
        except Exception as exc:  # disk full, a plugin's bug...: the job fails visibly, the head goes on
            log.exception("could not store the result", extra={"job_id": job.job_id})
            job.state, job.error, outcome = st.JobState.FAILED, f"could not store result: {exc}", "failed"
        self.store.update(job.job_id, state=job.state.value, finished_at=job.finished_at,
                          error=job.error, stats=stats)
        if act is not None:
            asyncio.ensure_future(act.ack())  # only after the outcome is stored
        log.info("job %s%s", outcome, f": {job.error}" if job.error and outcome != "done" else "",
                 extra={"job_id": job.job_id})
        self.events.emit(f"job.{job.state.value}", job_id=job.job_id, error=job.error,
                         seconds=stats.get("compute_s"))
        if job.finished_at:
            self.finished.append((job.task_type, job.state.value, job.finished_at - job.created_at))
        event = self.waiters.pop(job.job_id, None)
        if event is not None:
            event.set()

    # ---- sockets --------------------------------------------------------------------------
    @staticmethod
    async def _recv(sock: zmq.asyncio.Socket) -> list[zmq.Frame] | None:
        """The next message, or None after a receive error: a socket loop must never die of one."""
        try:
            return await sock.recv_multipart(copy=False)
        except zmq.Again:  # readable without a message (seen right after CURVE handshakes): wait again
            return None
        except zmq.ZMQError as exc:
            log.error("receive failed on a head socket: %s", exc)
            await asyncio.sleep(0.1)
            return None

    async def _router_loop(self) -> None:
        while True:
            frames = await self._recv(self.router)
            if frames is None:
                continue
            if len(frames) < 3 or frames[1].bytes != b"":
                self.counters["bad_messages"] += 1
                log.warning("dropped a registration message without a REQ envelope",
                            extra={"peer": frames[0].bytes.hex()[:16]})
                continue
            envelope = [frames[0].bytes, b""]
            peer = frames[0].bytes.hex()[:16]
            try:
                msg = protocol.decode(frames[2:], max_bytes=0, expect=PROVIDER_TYPES)
                self._check_key(msg, frames[2], register=msg.type == "register")
                reply = self._on_provider_request(msg)
            except DcfError as exc:
                self.counters["bad_messages"] += 1
                log.warning("bad request from provider: %s", exc.message, extra={"peer": peer})
                reply = protocol.error_frames(exc.code, exc.message)
            except Exception as exc:  # never let one message stop the loop
                log.exception("error handling a provider request", extra={"peer": peer})
                reply = protocol.error_frames("internal", f"{type(exc).__name__}")
            try:
                await self.router.send_multipart(envelope + reply, copy=False)
            except zmq.ZMQError as exc:  # the provider's Lazy Pirate asks again
                log.warning("could not reply to a provider: %s", exc, extra={"peer": peer})

    def _check_key(self, msg: protocol.Message, frame: zmq.Frame, register: bool = False) -> None:
        """With CURVE, a provider id belongs to the key it first registered with: another allowed
        key cannot heartbeat, unregister or send results in its name."""
        if self.keys is None:
            return
        key = _user_id(frame)
        pid = check_id(msg["provider_id"], "provider_id")
        owner = self.provider_keys.get(pid)
        if owner is None and register and key:
            if len(self.provider_keys) >= MAX_PROVIDER_KEYS:  # bounded: forget ids the state forgot
                self.provider_keys = {p: k for p, k in self.provider_keys.items() if p in self.state.providers}
                if len(self.provider_keys) >= MAX_PROVIDER_KEYS:
                    raise Conflict("too many providers are registered")
            self.provider_keys[pid] = key
            return
        if owner is None:
            raise DcfError("register again", code="unknown_provider")
        if owner != key:
            raise Unauthorized(f"provider {pid[:8]} is not registered with this CURVE key")

    def _on_provider_request(self, msg: protocol.Message) -> list[Any]:
        now = time.time()
        pid = check_id(msg["provider_id"], "provider_id")
        if msg.type == "register":
            info = _provider_info(msg)
            self._run(self.state.register(info, now))
            log.info("provider registered: %s (%s, %s, %.1f GFLOP/s)", info.name, info.device_kind,
                     info.device_name, info.gflops, extra={"provider_id": pid})
            self.events.emit("node.registered", provider_id=pid, name=info.name, device=info.device_kind,
                             gflops=round(info.gflops, 2))
            return protocol.encode("registered", {"provider_id": pid, "epoch": self.epoch,
                                                  "heartbeat_interval_s": self.cfg.heartbeat_interval,
                                                  "state_dir": str(self.root.resolve())})
        if msg.type == "heartbeat":
            local = self._is_local(pid, msg.get("local_epoch"))
            if not self.state.heartbeat(pid, now, msg["queued"], local):
                return protocol.error_frames("unknown_provider", "register again")
            # subscribed: whether the head sees this provider's SUB (a provider that is told "no" again and
            # again opens its SUB and PUSH connections anew: e.g. one refused while its key was not allowed)
            return protocol.encode("heartbeat_ack", {"epoch": self.epoch,
                                                     "subscribed": self.state.providers[pid].subscribed})
        if msg.type == "fetch":
            return self._fetch(pid, msg["blob_id"])
        self._run(self.state.unregister(pid, now))
        log.info("provider left", extra={"provider_id": pid})
        self.events.emit("node.left", provider_id=pid)
        return protocol.encode("ok")

    def _fetch(self, pid: str, blob_id: str) -> list[Any]:
        """A registered provider asks for a dataset blob it has not cached (claim-check over REQ-REP)."""
        if pid not in self.state.providers:
            return protocol.error_frames("unknown_provider", "register again")
        arr = self.blobs.open(blob_id)  # NotFound / ProtocolError become an error reply
        self.counters["bytes_out"] += arr.nbytes
        return protocol.encode("blob", {"blob_id": blob_id}, [arr])

    def _is_local(self, pid: str, claimed_epoch: object) -> bool:
        """A provider shares the state dir if it says so and wrote its proof file there."""
        if claimed_epoch != self.epoch:
            return False
        prov = self.state.providers.get(pid)
        if prov is not None and prov.local:
            return True
        proof = layout.locality_proof_path(self.root, pid)
        try:
            ok = proof.read_text().strip() == self.epoch
        except OSError:
            return False
        proof.unlink(missing_ok=True)
        if ok:
            log.info("provider shares the state dir: subtasks go by file reference", extra={"provider_id": pid})
        return ok

    async def _xpub_loop(self) -> None:
        while True:
            frames = await self._recv(self.xpub)
            if not frames:
                continue
            try:
                self._on_subscription(frames[0].bytes)
            except Exception:
                log.exception("error handling a subscription")

    def _on_subscription(self, frame: bytes) -> None:
        if not frame or frame[0] not in (0, 1):
            return
        topic = frame[1:].decode("ascii", "replace")
        if not protocol.ID_RE.fullmatch(topic):
            return
        subscribed = frame[0] == 1
        log.debug("subscription %s", "on" if subscribed else "off", extra={"provider_id": topic})
        self._run(self.state.subscription(topic, subscribed, time.time()))

    async def _pull_loop(self) -> None:
        while True:
            frames = await self._recv(self.pull)
            if frames is None:
                continue
            try:
                msg = protocol.decode(frames, expect=RESULT_TYPES)
                self._check_key(msg, frames[0])
                self._on_result(msg)
            except DcfError as exc:
                self.counters["bad_messages"] += 1
                log.warning("bad message on the result socket: %s", exc.message,
                            extra={"peer": _user_id(frames[0]) or "-"})
            except Exception:
                log.exception("error handling a result message")

    def _on_result(self, msg: protocol.Message) -> None:
        now = time.time()
        pid = check_id(msg["provider_id"], "provider_id")
        key = (msg["job_id"], msg["subtask"], msg["attempt"], msg["epoch"])
        ctx = {"job_id": key[0], "subtask": key[1], "attempt": key[2], "provider_id": pid}
        if msg.type == "ack":
            self.state.acked(pid, *key, now)
            return
        act = self.active.get(key[0])
        if msg.type == "failed":
            log.warning("subtask failed on provider: %.300s", msg["error"], extra=ctx)
            self._run(self.state.failed(pid, *key, msg["error"][:500], msg["retryable"], now))
            return
        job = self.state.jobs.get(key[0])
        if job is None or act is None or not 0 <= key[1] < len(job.subtasks):
            self.state.counters["results_ignored"] += 1
            log.info("ignored result for an unknown or finished job", extra=ctx)
            return
        task = tasks.get(job.task_type)
        in_place = bool(msg.get("in_place"))
        try:
            if in_place:
                if (key[1], key[2]) not in act.by_reference or msg.arrays:
                    raise ValidationError("in-place result for a subtask that was not sent by reference")
            else:
                task.check_result(job.subtasks[key[1]].params, job.outputs, msg.arrays)
        except ValidationError as exc:
            log.warning("invalid result: %s", exc.message, extra=ctx)
            self._run(self.state.failed(pid, *key, f"invalid result: {exc.message}", True, now))
            return
        if not self.state.result(pid, *key, now, elapsed=float(msg["elapsed_s"])):
            log.info("ignored late or duplicate result", extra=ctx)
            return
        # this attempt is over; attempts still out by reference make the commit copy the output file
        act.by_reference.discard((key[1], key[2]))
        if act.trainer is not None:
            try:
                act.trainer.merge(job.subtasks[key[1]].params, msg.arrays)
            except DcfError as exc:
                self._run(self.state.fail_job(key[0], exc.message, now))
                return
        elif not in_place:
            task.merge(job.subtasks[key[1]].params, msg.arrays, act.outputs)
        nbytes = sum(a.nbytes for a in msg.arrays)
        act.bytes_in += nbytes
        self.counters["bytes_in"] += nbytes
        stats = msg["stats"]
        if isinstance(stats.get("nonfinite"), int):
            act.nonfinite += stats["nonfinite"]
        log.debug("result merged", extra=ctx)
        if act.trainer is None:
            self.events.emit("job.progress", job_id=key[0], done=job.done_count, total=len(job.subtasks),
                             provider_id=pid)
        self._run(self.state.merged(key[0], now))
        if act.trainer is not None:
            self._training_effects(job, act.trainer)

    def _training_effects(self, job: st.Job, trainer: Any) -> None:
        """After a training result: new metrics become job events and job stats."""
        for event in trainer.events:
            kind = event.pop("kind")
            self.events.emit("job.metrics", job_id=job.job_id, scope=kind, **event)
        trainer.events.clear()
        job.stats["training"] = trainer.summary()

    async def _tick_loop(self) -> None:
        period = min(0.25, self.cfg.heartbeat_interval / 4)
        while True:
            await asyncio.sleep(period)
            try:
                self._run(self.state.tick(time.time()))
            except Exception:
                log.exception("error in the scheduler tick")


#: why torch could not be imported on the head ("" if it could, or was not tried)
TORCH_IMPORT_ERROR = ""


def _import_torch() -> None:
    """On a thread: import torch once; any failure is kept for the training jobs to report."""
    global TORCH_IMPORT_ERROR
    try:
        importlib.import_module("torch")
    except BaseException as exc:  # a broken install may raise anything (OSError: libcudnn..., ...)
        TORCH_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"[:300]


def _user_id(frame: zmq.Frame) -> str:
    """The CURVE public key (Z85) the ZAP handler gave this message's connection; "" if none."""
    try:
        return str(frame.get("User-Id") or "")
    except (zmq.ZMQError, AttributeError):
        return ""


def _is_id(value: str) -> bool:
    return bool(protocol.ID_RE.fullmatch(value))


def _provider_info(msg: protocol.Message) -> st.ProviderInfo:
    def strs(name: str) -> frozenset[str]:
        values = msg[name]
        if not all(isinstance(v, str) for v in values) or len(values) > 64:
            raise ProtocolError(f"register: {name} must be a list of strings")
        return frozenset(values)

    gflops = float(msg["gflops"])
    if not 0 < gflops < 1e7:
        raise ProtocolError("register: gflops must be positive")
    if msg["device_kind"] not in ("cpu", "cuda", "mps"):
        raise ProtocolError("register: device_kind must be cpu, cuda or mps")
    return st.ProviderInfo(
        provider_id=msg["provider_id"], name=msg["name"][:64] or msg["provider_id"][:8],
        host=msg["host"][:128], os=msg["os"][:64], device_kind=msg["device_kind"],
        device_name=msg["device_name"][:128], memory_bytes=msg["memory_bytes"], cores=msg["cores"],
        task_types=strs("task_types"), dtypes=strs("dtypes"), version=msg["version"][:32], gflops=gflops)


def _validate(task: tasks.TaskType, params: dict[str, Any], metas: dict[str, ArrayMeta]) -> dict[str, ArrayMeta]:
    """task.validate, with a plugin's unexpected exception turned into a clear 4xx."""
    try:
        return task.validate(params, metas)
    except DcfError:
        raise
    except Exception as exc:
        raise ValidationError(f"task type {task.name} rejected the job: {type(exc).__name__}: {exc}") from None


def _log_send_error(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.warning("subtask send failed: %s; the ack timeout will re-send it", fut.exception())
