"""The head: wires the transport (head_node/transport.py), the state machine (state.py), the job
lifecycle (lifecycle.py) and the views (views.py) in one asyncio event loop; the HTTP routers
(head_node/http/) call its facade. Nothing else changes state, and only ``apply`` changes it:
one stimulus in, its actions carried out here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from common import config, layout, protocol, security
from common.arrays import from_bytes
from common.errors import Conflict, DcfError, NotFound, ProtocolError, UnknownProvider, ValidationError, WrongResult
from common.jobs import TERMINAL_NAMES, JobRecord, JobState
from common.protocol import check_id
from common.protocol.batch import JobSpec

from . import quarantine, views
from . import state as st
from . import stimuli as sm
from .entities import Provider
from .events import EventBus
from .jobqueue import AmqpQueue, EmbeddedQueue, JobQueue
from .leader import Leadership
from .lifecycle import ActiveJob, Lifecycle
from .store import BlobStore, JobStore, Outcome
from .transport import Transport
from .uploads import UnusedBlobs

log = logging.getLogger("dcf.head")
#: the queued jobs a snapshot describes in full, the oldest (the rest are counted in ``live_counts``):
#: the sampler takes one a second, and 4000 never-run jobs' views took 65% of its core
SNAPSHOT_QUEUED = 100


class Head:
    def __init__(self, cfg: config.HeadSettings) -> None:
        self.cfg = cfg
        self.root = Path(cfg.state_dir)
        self.root.mkdir(parents=True, exist_ok=True)
        self.incarnation = uuid.uuid4().hex  # this head process's run id: results of earlier runs are stale
        # --verify-rate: which subtasks are verified is keyed by a secret no provider sees (drawn anew each run)
        verification = st.Verification(cfg.verify_rate, os.urandom(32))
        self.state = st.ClusterState(self.incarnation, st.Timing.of(cfg), verification)
        self.state.quarantine.update(quarantine.load(self.root))
        self.blobs = BlobStore(self.root)
        self.store = JobStore(self.root / "jobs.sqlite3", fsync=cfg.fsync)
        self.uploads = UnusedBlobs(self.blobs, self.store, cfg.blob_ttl, cfg.max_unused_bytes)
        self.queue: JobQueue = (AmqpQueue(cfg.amqp_url, self.store, security.queue_key(self.root),
                                          queue_name=cfg.amqp_queue, republish_after=cfg.amqp_republish_after,
                                          queue_type=cfg.amqp_queue_type)
                                if cfg.amqp_url else EmbeddedQueue(self.store))
        self.events = EventBus()
        if isinstance(self.queue, AmqpQueue):
            self.events.sinks.append(self.queue.publish_event)
            self.queue.on_state = self._queue_state
            self.queue.on_republish = self._republished
        self.jobs = Lifecycle(cfg, self.root, self.incarnation, self.blobs, self.store, self.queue, self.events,
                              self.apply, self.state.ready_for)
        self.keys = security.server_keys(cfg)  # None: CURVE off (ConfigError on bad key files)
        self.transport = Transport(cfg, self.keys, known=lambda pid: pid in self.state.providers)
        self.zap: Any = None
        #: the broker's leader lock this head holds (with --amqp-url; head_node/leader.py): no dispatch without it
        self.leadership: Leadership | None = None
        #: why this head stopped serving as the active head (its lock lost); None while it serves
        self.fenced: str | None = None
        self.stopping = asyncio.Event()
        self.started_at = time.time()  # shown; the uptime is counted on the monotonic clock
        self._started_t = time.monotonic()
        self.counters = {"bytes_out": 0, "bytes_in": 0}
        #: (task type, final state, seconds from creation to end) of recently finished jobs
        self.finished: deque[tuple[str, str, float]] = deque(maxlen=10_000)
        #: the two replies a heartbeat can get, encoded once (500 providers at 1 s: 500 a second)
        self._heartbeat_acks = {sub: protocol.encode("heartbeat_ack", {"epoch": self.incarnation, "subscribed": sub})
                                for sub in (False, True)}
        #: the same, asking the provider to open its task and result connections anew (sm.AskReconnect)
        self._reconnect_acks = {sub: protocol.encode("heartbeat_ack", {"epoch": self.incarnation, "subscribed": sub,
                                                                       "reconnect": True})
                                for sub in (False, True)}
        self._tasks: list[asyncio.Task[Any]] = []
        #: job id -> when its last ``job.progress`` event from a provider's report went out (at most 4 a second)
        self._progress_told: dict[str, float] = {}

    # ---- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        self.store.group_commit(asyncio.get_running_loop().call_soon)  # one commit per loop turn
        self._start_security()
        self.transport.start(self)
        (self.root / layout.MARKER).write_text(self.incarnation)
        self.uploads.sweep(time.time())
        self._tasks.append(asyncio.create_task(self._sweep_uploads()))
        if isinstance(self.queue, AmqpQueue):  # the API serves (and refuses jobs) while RabbitMQ is away
            self._tasks.append(asyncio.create_task(self.queue.start(self.jobs.deliver)))
        else:
            await self.queue.start(self.jobs.deliver)
        log.info("head %s up: registration %d, tasks %d, results %d, store %s, state dir %s",
                 self.incarnation[:8], self.cfg.registration_port, self.cfg.task_port, self.cfg.result_port,
                 self.queue.name, self.root)

    def _start_security(self) -> None:
        """With CURVE keys: the ZAP handler is bound before any socket, so no handshake skips it."""
        if self.keys is None:
            if self.cfg.host not in ("127.0.0.1", "::1", "localhost"):
                log.warning("ZeroMQ ports on %s are open to anyone who can reach them: CURVE is off (see "
                            "`dcf keys generate`, --curve-secret-key, --curve-allow)", self.cfg.host)
            return
        from .zap import ZapHandler

        self.zap = ZapHandler(self.transport.ctx, self.keys.allow_dir)
        self.zap.start()
        log.info("CURVE on: ZeroMQ traffic encrypted; providers allowed from %s (%d keys)",
                 self.keys.allow_dir, len(self.zap.allow.keys))

    def fence(self, why: str) -> None:
        """The leader lock is lost: stop serving at once (no dispatch: ``_dispatch``; the API refuses jobs while
        the queue is away, and ``/v1/health`` says ``fenced``); ``__main__`` then starts this process again as a
        standby."""
        self.fenced = why
        self.stopping.set()
        # no more deliveries or submissions (what it held unacked goes back to the broker for the next head)
        closing = asyncio.ensure_future(self.queue.close())
        closing.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.queue.close()
        if self.zap is not None:
            self.zap.stop()
        await self.transport.stop()
        self.store.close()
        if self.leadership is not None:
            await self.leadership.close()  # last: a standby takes over once this head has let go of everything

    async def _sweep_uploads(self) -> None:
        """Unused uploads past ``--blob-ttl`` go (uploads.UnusedBlobs), until the head stops."""
        while True:
            await asyncio.sleep(self.uploads.interval)
            try:
                self.uploads.sweep(time.time())
            except OSError as exc:  # the state dir unreadable for a moment: the next sweep tries again
                log.warning("could not sweep unused uploads: %s", exc)

    def admit_upload(self, nbytes: int) -> None:
        """NoSpace unless an upload of ``nbytes`` keeps the unused uploads within ``--max-unused-bytes``."""
        self.uploads.admit(nbytes, time.time())

    def _queue_state(self, connected: bool) -> None:
        """The broker went away or came back: an event (dashboard alert, `dcf.events` once back)."""
        self.events.emit("queue.restored" if connected else "queue.lost", queue=self.queue.name)

    def _republished(self, job_ids: list[str]) -> None:
        """Accepted jobs the queue never delivered back were published again: one event each."""
        for job_id in job_ids:
            self.events.emit("job.republished", job_id=job_id, queue=self.queue.name)

    # ---- the one way state changes ------------------------------------------------------------
    def apply(self, stimulus: sm.Stimulus) -> list[sm.Action]:
        """Hand one stimulus to the state machine, carry out its actions; return them. Its clock is the
        monotonic one (every timer); the wall clock only stamps what users see (PROTOCOL.md 8.6)."""
        actions = self.state.handle(stimulus, time.monotonic(), time.time())
        self._run(actions)
        return actions

    def _run(self, actions: list[sm.Action]) -> None:
        for action in actions:
            try:
                self._carry_out(action)
            except Exception:  # one action's failure must not skip the others
                log.exception("could not carry out %s", type(action).__name__)

    def _carry_out(self, action: sm.Action) -> None:
        if isinstance(action, sm.Dispatch):
            self._dispatch(action)
        elif isinstance(action, sm.JobStarted):
            self._started(action.job_id)
        elif isinstance(action, sm.JobFinished | sm.JobFailed | sm.JobCancelled):
            self._closed(self.state.jobs[action.job_id])
        elif isinstance(action, sm.PlannerEffects):
            self.jobs.carry_out(self.state.jobs[action.job_id], action.effects)
        elif isinstance(action, sm.Straggler):
            self._straggler(action)
        elif isinstance(action, sm.ProviderLost):
            self._lost(action)
        elif isinstance(action, sm.StopSubtasks):
            self._stop_subtasks(action)
        elif isinstance(action, sm.GroupAbandoned):
            self._group_abandoned(action)
        elif isinstance(action, sm.ProviderUnhealthy | sm.ProviderStuck | sm.ProviderHealthy):
            self._health(action)
        elif isinstance(action, sm.ProviderQuarantined):
            self._quarantined(action)
        elif isinstance(action, sm.ResultDisagreed):
            self._disagreed(action)

    def _started(self, job_id: str) -> None:
        job = self.state.jobs[job_id]  # its row stays queued: the scheduler holds it (list_jobs)
        log.debug("job started with %d subtasks", len(job.subtasks), extra={"job_id": job_id})
        self.events.emit("job.started", job_id=job_id, subtasks=len(job.subtasks), **job.progress().to_dict())

    def _stop_subtasks(self, a: sm.StopSubtasks) -> None:
        """``cancel`` to the provider (PROTOCOL.md 5.2): it drops what it queued of the job and stops what
        runs at its next block; the subtasks stay assigned to it until it says so."""
        fields: dict[str, Any] = {"job_id": a.job_id, "epoch": self.incarnation}
        if a.subtask is not None:
            fields["subtask"] = a.subtask
        self.transport.publish(protocol.encode("cancel", fields, topic=a.provider_id.encode()))
        log.debug("told to stop %s", "its subtasks" if a.subtask is None else f"subtask {a.subtask}",
                  extra={"job_id": a.job_id, "provider_id": a.provider_id})

    def _closed(self, job: st.Job) -> None:
        self._progress_told.pop(job.job_id, None)
        self.jobs.close(job, views.provider_names(self.state.providers))
        if job.finished_at:
            self.finished.append((job.task_type, job.state.value, job.finished_at - job.created_at))

    def _straggler(self, a: sm.Straggler) -> None:
        log.warning("straggler: subtask running %.1fs%s", a.seconds,
                    f"; speculative copy on {a.copied_to[:8]}" if a.copied_to else "",
                    extra={"job_id": a.job_id, "subtask": a.subtask, "provider_id": a.provider_id})
        self.events.emit("straggler", job_id=a.job_id, subtask=a.subtask, provider_id=a.provider_id,
                         seconds=a.seconds, copied_to=a.copied_to)

    def _group_abandoned(self, a: sm.GroupAbandoned) -> None:
        log.warning("collective group %s abandoned: %s; its work is planned again", a.group, a.why,
                    extra={"job_id": a.job_id})
        self.events.emit("job.regroup", job_id=a.job_id, group=a.group, why=a.why)

    def _health(self, a: sm.ProviderUnhealthy | sm.ProviderStuck | sm.ProviderHealthy) -> None:
        """A provider given no new work (its results do not come, or its compute is stuck), or given work
        again: logged and an event (``node.unhealthy``, ``node.stuck``, ``node.healthy``)."""
        prov = self.state.providers.get(a.provider_id)
        name = prov.info.name if prov else ""
        extra = {"provider_id": a.provider_id}
        if isinstance(a, sm.ProviderUnhealthy):
            log.warning("provider unhealthy: %d acks missed in a row and nothing heard on the result channel; "
                        "no new work for %.0fs, asked to reconnect", a.missed_acks, a.retry_in, extra=extra)
            self.events.emit("node.unhealthy", provider_id=a.provider_id, name=name, reason="acks_missing",
                             missed_acks=a.missed_acks, retry_in_s=round(a.retry_in, 3))
        elif isinstance(a, sm.ProviderStuck):
            log.warning("provider stuck: a straggler held %.1fs and nothing finished, %d queued behind it; "
                        "no new work until it finishes something", a.seconds, a.queued, extra=extra)
            self.events.emit("node.stuck", provider_id=a.provider_id, name=name, seconds=a.seconds,
                             queued=a.queued)
        else:
            log.info("provider no longer %s: it gets work again", a.was, extra=extra)
            self.events.emit("node.healthy", provider_id=a.provider_id, name=name, was=a.was)

    def _quarantined(self, a: sm.ProviderQuarantined) -> None:
        prov = self.state.providers.get(a.provider_id)
        log.error("provider quarantined: %s; %d subtasks taken back; it gets no work until `dcf clear %s`",
                  a.reason, a.taken_back, a.provider_id[:8], extra={"provider_id": a.provider_id, "job_id": a.job_id})
        self.events.emit("node.quarantined", provider_id=a.provider_id, name=prov.info.name if prov else "",
                         job_id=a.job_id, subtask=a.subtask, reason=a.reason, taken_back=a.taken_back)
        self._save_quarantine()
        for act in self.jobs.active.values():  # its held results witness nothing any more (the state machine's rule)
            for held in act.held.values():
                held.pop(a.provider_id, None)

    def _disagreed(self, a: sm.ResultDisagreed) -> None:
        """A result of a subtask being verified agreed with none held of it: another provider decides."""
        log.warning("results disagree (--verify-rate): %s; another provider decides", a.why,
                    extra={"job_id": a.job_id, "subtask": a.subtask, "provider_id": a.provider_id})
        self.events.emit("job.disagreement", job_id=a.job_id, subtask=a.subtask, provider_id=a.provider_id,
                         witnesses=list(a.witnesses), why=a.why)

    def _save_quarantine(self) -> None:
        try:
            quarantine.save(self.root, self.state.quarantine, self.cfg.fsync)
        except OSError as exc:  # the live list holds; a restart would forget this entry
            log.error("could not store the quarantine list: %s", exc)

    def _lost(self, a: sm.ProviderLost) -> None:
        prov = self.state.providers.get(a.provider_id)
        name = prov.info.name if prov else ""
        if a.reason == sm.LEFT:  # a clean exit (unregister): news, not an alarm
            log.info("provider left; %d subtasks re-queued", a.requeued, extra={"provider_id": a.provider_id})
            self.events.emit("node.left", provider_id=a.provider_id, name=name, requeued=a.requeued)
            return
        log.warning("provider lost; %d subtasks re-queued", a.requeued, extra={"provider_id": a.provider_id})
        self.events.emit("node.lost", provider_id=a.provider_id, name=name, requeued=a.requeued, reason=a.reason)

    def _dispatch(self, d: sm.Dispatch) -> None:
        if self.leadership is not None and not self.leadership.valid(time.monotonic()):
            # fenced, or not holding the leader lock yet: a standby may be active; the ack timeout resends it
            log.debug("dispatch held back: this head does not hold a fresh leader lock",
                      extra={"job_id": d.job_id, "subtask": d.subtask})
            return
        job = self.state.jobs.get(d.job_id)
        act = self.jobs.active.get(d.job_id)
        if job is None or act is None or job.state.terminal:  # it ended earlier in this batch of actions
            return
        sub = job.subtasks[d.subtask]
        fields = {"job_id": d.job_id, "subtask": d.subtask, "attempt": d.attempt, "epoch": self.incarnation,
                  "task_type": job.task_type, "params": sub.params, "cost": float(sub.cost)}
        arrays: list[np.ndarray] = []
        if job.planner.shares_files and act.by_file and self.state.providers[d.provider_id].local and not sub.verify:
            # co-located provider: it maps the operands and writes the result in place (not a subtask being
            # verified: its result must come back as arrays, to be held or compared before it is merged)
            fields["shared"] = {"inputs": act.record.blob_ids(), "outputs": sorted(job.outputs)}
            act.by_reference.add((d.subtask, d.attempt))
        else:
            try:
                arrays = job.planner.subtask_inputs(sub.params)
            except Exception as exc:  # a task type's bug fails its job
                self.apply(sm.JobFailRequested(job.job_id, _bug(job, "could not give a subtask its inputs", exc)))
                return
        nbytes = sum(a.nbytes for a in arrays)
        act.bytes_out += nbytes
        self.counters["bytes_out"] += nbytes
        self.transport.publish(protocol.encode("subtask", fields, arrays, topic=d.provider_id.encode()))
        log.debug("dispatched%s", " by reference" if not arrays else "",
                  extra={"job_id": d.job_id, "subtask": d.subtask, "attempt": d.attempt,
                         "provider_id": d.provider_id})

    # ---- transport handlers -------------------------------------------------------------------
    def on_request(self, msg: protocol.Message) -> list[Any]:
        pid = check_id(msg["provider_id"], "provider_id")
        if msg.type == "register":
            return self._register(msg, pid)
        if msg.type == "heartbeat":
            local = self._is_local(pid, msg.get("local_epoch"))
            running = self._held(pid, msg["running"])
            actions = self.apply(sm.HeartbeatReceived(pid, local, running, max(0, msg["queued"])))
            if any(isinstance(a, sm.RegisterAgain) for a in actions):
                return protocol.error_frames(UnknownProvider.code, "register again")
            # subscribed: whether the head sees this provider's SUB (a provider that is told "no" again and
            # again opens its SUB and PUSH connections anew: e.g. one refused while its key was not allowed);
            # reconnect: its acks stopped coming (its result connection may be black-holed): open them anew now
            subscribed = self.state.providers[pid].subscribed
            if any(isinstance(a, sm.AskReconnect) for a in actions):
                log.info("asking the provider to open its task and result connections anew", extra={"provider_id": pid})
                return self._reconnect_acks[subscribed]
            return self._heartbeat_acks[subscribed]
        if msg.type == "fetch":
            return self._fetch(pid, msg)
        if not any(isinstance(a, sm.ProviderLost) for a in self.apply(sm.ProviderLeft(pid))):
            log.info("provider left", extra={"provider_id": pid})  # one the head had already let go
            self.events.emit("node.left", provider_id=pid, name="", requeued=0)
        return protocol.encode("ok")

    def _held(self, pid: str, held: list[Any]) -> frozenset[str] | None:
        """What a heartbeat says the provider holds, when the head needs it (it was told to stop subtasks, or
        it has a straggler: is it still busy?): None otherwise, or when the list may be cut (the reference
        sends at most 64) or is not strings."""
        prov = self.state.providers.get(pid)
        if (prov is None or not (prov.stopping or prov.lag is not None or prov.stuck_since is not None)
                or len(held) >= 64 or not all(isinstance(h, str) for h in held)):
            return None
        return frozenset(held)

    def _register(self, msg: protocol.Message, pid: str) -> list[Any]:
        info = protocol.parse_register(msg)
        self.apply(sm.ProviderRegistered(info, self.transport.provider_keys.get(pid, "")))
        log.info("provider registered: %s (%s, %s, %.1f GFLOP/s)", info.name, info.device_kind,
                 info.device_name, info.gflops, extra={"provider_id": pid})
        self.events.emit("node.registered", provider_id=pid, name=info.name, device=info.device_kind,
                         gflops=round(info.gflops, 2))
        return protocol.encode("registered", {"provider_id": pid, "epoch": self.incarnation,
                                              "heartbeat_interval_s": self.cfg.heartbeat_interval,
                                              "state_dir": str(self.root.resolve())})

    def _fetch(self, pid: str, msg: protocol.Message) -> list[Any]:
        """A registered provider asks for a dataset blob it has not cached (claim-check over REQ-REP)."""
        prov = self.state.providers.get(pid)
        if prov is None:
            return protocol.error_frames(UnknownProvider.code, "register again")
        if not self._holds_blob(prov, msg["blob_id"]):  # knowing a blob's id is not enough to read it
            log.warning("fetch refused: no subtask it holds needs blob %.40s", msg["blob_id"],
                        extra={"provider_id": pid})
            return protocol.error_frames(NotFound.code, f"no blob {msg['blob_id']} for this provider")
        arr = self.blobs.open(msg["blob_id"])  # NotFound / ProtocolError become an error reply
        reply = protocol.blob_reply(msg["blob_id"], arr, msg.get("max_bytes"))
        if len(reply) > 1:  # the blob went (not a too_large error)
            self.counters["bytes_out"] += arr.nbytes
        return reply

    def _holds_blob(self, prov: Provider, blob_id: object) -> bool:
        """Whether a subtask assigned to this provider belongs to a job with this blob among its inputs."""
        if prov.quarantined is not None:
            return False
        for job_id in {job_id for job_id, _ in prov.assigned}:
            act = self.jobs.active.get(job_id)
            if act is not None and blob_id in act.record.blob_ids().values():
                return True
        return False

    def _is_local(self, pid: str, claimed_epoch: object) -> bool:
        """A provider shares the state dir if it says so and wrote its proof file there."""
        if claimed_epoch != self.incarnation:
            return False
        prov = self.state.providers.get(pid)
        if prov is not None and prov.local:
            return True
        proof = layout.locality_proof_path(self.root, pid)
        try:
            ok = proof.read_text().strip() == self.incarnation
        except OSError:
            return False
        proof.unlink(missing_ok=True)
        if ok:
            log.info("provider shares the state dir: subtasks go by file reference", extra={"provider_id": pid})
        return ok

    def on_subscription(self, topic: str, subscribed: bool) -> None:
        log.debug("subscription %s", "on" if subscribed else "off", extra={"provider_id": topic})
        self.apply(sm.SubscriptionChanged(topic, subscribed))

    def on_disconnect(self, provider_id: str) -> None:
        """Its task connection ended: lost after a short grace unless it subscribes again (a reconnect)."""
        log.debug("task connection closed", extra={"provider_id": provider_id})
        self.apply(sm.ProviderDisconnected(provider_id))

    def on_tick(self) -> None:
        self.apply(sm.Tick())

    def on_result(self, msg: protocol.Message) -> None:
        if self.fenced or (self.leadership is not None and not self.leadership.valid(time.monotonic())):
            # no longer (or, on a stale lease, maybe no longer) the active head: nothing is merged or committed;
            # the subtask's deadline sends it again, to this head's provider or the next head's
            return
        pid = check_id(msg["provider_id"], "provider_id")
        key = (msg["job_id"], msg["subtask"], msg["attempt"], msg["epoch"])
        ctx = {"job_id": key[0], "subtask": key[1], "attempt": key[2], "provider_id": pid}
        if msg.type == "ack":
            self.apply(sm.SubtaskAcked(pid, *key))
            return
        if msg.type == "failed":
            log.warning("subtask failed on provider: %.300s", msg["error"], extra=ctx)
            self.apply(sm.SubtaskFailed(pid, *key, msg["error"][:500], msg["retryable"]))
            return
        if msg.type == "progress":
            self._on_progress(msg, pid, key)
            return
        if msg.type == "cancelled":
            log.debug("subtask stopped on the provider", extra=ctx)
            self.apply(sm.SubtaskCancelled(pid, *key))
            return
        job = self.state.jobs.get(key[0])
        act = self.jobs.active.get(key[0])
        if job is None or act is None or not 0 <= key[1] < len(job.subtasks):
            # the state machine counts it ignored, and frees a provider told to stop it (a cancelled job's
            # last block finished before the cancel arrived): `assigned` drops now, not at a later heartbeat
            log.info("ignored result for an unknown or finished job", extra=ctx)
            self.apply(sm.ResultReceived(pid, *key, elapsed=0.0))
            return
        params = job.subtasks[key[1]].params
        try:
            if msg.get("in_place"):
                if (key[1], key[2]) not in act.by_reference or msg.arrays:
                    raise ValidationError("in-place result for a subtask that was not sent by reference")
                if job.planner.checks_in_place:  # it reads the block from the output file
                    job.planner.check_result(params, [])
            else:
                job.planner.check_result(params, msg.arrays)
        except WrongResult as exc:  # the right shape, the wrong numbers: its provider is not trusted again
            log.warning("wrong result: %s", exc.message, extra=ctx)
            self.apply(sm.WrongResultCaught(pid, *key, exc.message))
            return
        except ValidationError as exc:
            log.warning("invalid result: %s", exc.message, extra=ctx)
            self.apply(sm.SubtaskFailed(pid, *key, f"invalid result: {exc.message}", True))
            return
        except Exception as exc:  # a task type's bug in check_result fails its job
            self.apply(sm.JobFailRequested(job.job_id, _bug(job, "could not check a result", exc)))
            return
        now = time.monotonic()  # the state machine's clock, and the planner's
        actions = self.state.handle(sm.ResultReceived(pid, *key, elapsed=float(msg["elapsed_s"])), now, time.time())
        verdict = self._result_actions(actions)  # e.g. stop a beaten copy
        if isinstance(verdict, sm.CompareResult):
            compared = self._compare(job, act, verdict, params, msg.arrays)
            if compared is None:
                return
            verdict = self._result_actions(self.state.handle(compared, now, time.time()))
        elif verdict is None:
            log.info("ignored late or duplicate result", extra=ctx)
        if isinstance(verdict, sm.HoldResult):
            act.held.setdefault(verdict.subtask, {})[verdict.provider_id] = msg.arrays
            log.debug("result held until another provider's agrees (--verify-rate)", extra=ctx)
        elif isinstance(verdict, sm.MergeResult):
            act.held.pop(verdict.subtask, None)
            self._merge(job, act, params, msg, now, ctx)

    def _result_actions(self, actions: list[sm.Action]) -> sm.MergeResult | sm.HoldResult | sm.CompareResult | None:
        """Carry out what the state machine answered a result with, but what to do with the result itself: that
        is returned (merge, hold or compare it; None: ignore it)."""
        verdicts = (sm.MergeResult, sm.HoldResult, sm.CompareResult)
        self._run([a for a in actions if not isinstance(a, verdicts)])
        return next((a for a in actions if isinstance(a, verdicts)), None)

    def _compare(self, job: st.Job, act: ActiveJob, a: sm.CompareResult, params: dict[str, Any],
                 arrays: list[np.ndarray]) -> sm.ResultsCompared | None:
        """This result against each held one of its subtask (the planner's ``compare``); None if the planner failed
        (its job fails)."""
        held = act.held.get(a.subtask, {})
        verdicts: list[tuple[str, str | None]] = []
        try:
            for witness in a.witnesses:
                if witness in held:
                    verdicts.append((witness, job.planner.compare(params, held[witness], arrays)))
        except DcfError as exc:  # the planner gives up on the job
            self.apply(sm.JobFailRequested(job.job_id, exc.message))
            return None
        except Exception as exc:  # a task type's bug in compare fails its job
            self.apply(sm.JobFailRequested(job.job_id, _bug(job, "could not compare two results", exc)))
            return None
        for witness, why in verdicts:  # a disagreement is logged (a warning) by the state machine's answer
            log.debug("result %s %s's (--verify-rate)%s", "agrees with" if why is None else "disagrees with",
                      witness[:8], f": {why}" if why else "",
                      extra={"job_id": a.job_id, "subtask": a.subtask, "provider_id": a.provider_id})
        return sm.ResultsCompared(a.provider_id, a.job_id, a.subtask, a.attempt, tuple(verdicts))

    def _on_progress(self, msg: protocol.Message, pid: str, key: tuple[str, int, int, str]) -> None:
        """How far a running subtask got (optional message): the job's progress and the provider's flops."""
        done, total = msg["done"], msg["total"]
        if total < 1 or done > total:
            raise ProtocolError(f"progress: done {done} of total {total}: need 0 <= done <= total, total >= 1")
        self.apply(sm.SubtaskProgress(pid, *key, done=done, total=total))
        job = self.state.jobs.get(key[0])
        now = time.monotonic()
        if job is None or job.state is not st.JobState.RUNNING or now - self._progress_told.get(key[0], 0.0) < 0.25:
            return
        self._progress_told[key[0]] = now
        self.events.emit("job.progress", job_id=key[0], **job.progress().to_dict(), provider_id=pid)

    def _merge(self, job: st.Job, act: Any, params: dict[str, Any], msg: protocol.Message, now: float,
               ctx: dict[str, Any]) -> None:
        # this attempt is over; attempts still out by reference make the commit copy the output file
        act.by_reference.discard((msg["subtask"], msg["attempt"]))
        try:
            job.planner.merge(params, msg.arrays, now)
        except DcfError as exc:  # the planner refuses the result (e.g. training diverged): the job fails
            log.warning("could not merge a result: %s", exc.message, extra=ctx)
            self.apply(sm.JobFailRequested(job.job_id, exc.message))
            return
        except Exception as exc:  # a task type's bug in merge
            self.apply(sm.JobFailRequested(job.job_id, _bug(job, "could not merge a result", exc)))
            return
        nbytes = sum(a.nbytes for a in msg.arrays)
        act.bytes_in += nbytes
        self.counters["bytes_in"] += nbytes
        stats = msg["stats"]
        if isinstance(stats.get("nonfinite"), int):
            act.nonfinite += stats["nonfinite"]
        progress = job.progress()
        if progress.done < progress.total:  # the last one is told by job.done
            self.events.emit("job.progress", job_id=job.job_id, **progress.to_dict(), provider_id=ctx["provider_id"])
        self.apply(sm.ResultMerged(job.job_id))

    # ---- the facade the HTTP routers use --------------------------------------------------------
    async def submit(self, spec: JobSpec) -> str:
        return await self.jobs.submit(spec)

    async def submit_many(self, specs: list[JobSpec], wait: float) -> list[dict[str, Any]]:
        """Accept every job or none; with ``wait``, their outcomes once all ended (or it passed)."""
        job_ids = await self.jobs.submit_many(specs)
        if wait <= 0:
            return [{"job_id": j, "state": JobState.QUEUED.value, "error": None} for j in job_ids]
        return await self.gather(job_ids, wait, forget=False)

    async def gather(self, job_ids: list[str], wait: float, forget: bool) -> list[dict[str, Any]]:
        """The outcomes of jobs (small results inline) once all ended or ``wait`` passed, in order;
        ``forget``: the ended ones are deleted once their outcome is read."""
        held = [j for j in job_ids if j in self.state.jobs]  # the scheduler holds them: not stored yet
        rows = self.store.outcomes([j for j in job_ids if j not in self.state.jobs])
        unknown = next((j for j in job_ids if j not in rows and j not in self.state.jobs), None)
        if unknown is not None:
            raise NotFound(f"no job {unknown}")  # before any wait
        pending = held + [j for j, row in rows.items() if row.state not in TERMINAL_NAMES]
        if pending and wait > 0:
            events = [self.jobs.waiters.setdefault(j, asyncio.Event()) for j in pending]
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), wait)
            rows.update(self.store.outcomes([j for j in pending if j not in self.state.jobs]))
        outcomes = [self._outcome(j, rows.get(j)) for j in job_ids]
        if forget:  # not a done job whose outputs are files: the client fetches them first (then deletes it)
            self._forget([j for j in dict.fromkeys(job_ids) if j not in self.state.jobs and j in rows
                          and rows[j].state in TERMINAL_NAMES
                          and (rows[j].state != JobState.DONE.value or rows[j].results_packed)], rows)
        return outcomes

    def _outcome(self, job_id: str, row: Outcome | None) -> dict[str, Any]:
        job = self.state.jobs.get(job_id)
        if job is not None or row is None:  # the scheduler holds it: its outcome is not stored yet
            state = JobState.RUNNING if job is None or job.state.terminal else job.state
            return {"job_id": job_id, "state": state.value, "error": None}
        out: dict[str, Any] = {"job_id": job_id, "state": row.state, "error": row.error}
        if row.state != JobState.DONE.value:
            return out
        outputs, results = row.outputs(), row.results()
        if results:
            out["results"] = {name: from_bytes(outputs[name], data) for name, data in results.items()}
        else:  # too large to travel inline: GET /v1/jobs/{id}/result?name=...
            out["outputs"] = [*outputs, *row.files()]
        return out

    def _forget(self, job_ids: list[str], rows: dict[str, Outcome]) -> None:
        """Delete ended jobs at once (one transaction); blob files only for jobs that had some."""
        for job_id in job_ids:
            self.events.forget_job(job_id)
            row = rows[job_id]
            if row.has_blobs or not row.results_packed or row.files():
                self._delete_files(job_id, self._record(job_id))
        self.store.delete_many(job_ids)

    def cancel(self, job_id: str) -> dict[str, Any]:
        if job_id not in self.state.jobs:
            raise Conflict(f"job {job_id} is already {self._record(job_id).state.value}")
        self.apply(sm.CancelRequested(job_id))
        return self.job_view(job_id)

    async def delete(self, job_id: str) -> None:
        job = self.state.jobs.get(job_id)
        if job is not None and not job.state.terminal:
            raise Conflict(f"job {job_id} is {job.state.value}; cancel it first")
        record = self._record(job_id)
        self.apply(sm.JobForgotten(job_id, deleted=True))
        self.events.forget_job(job_id)
        self._delete_files(job_id, record)
        self.store.delete(job_id)

    def _delete_files(self, job_id: str, record: JobRecord) -> None:
        """A forgotten job's output files, and its input blobs no other job uses."""
        self.blobs.delete_job(job_id)
        for blob in record.blob_ids().values():
            if not self.store.blob_in_use(blob, job_id):
                self.blobs.delete_blob(blob)

    def _record(self, job_id: str) -> JobRecord:
        row = self.store.get(job_id) if protocol.ID_RE.fullmatch(job_id) else None
        if row is None:
            raise NotFound(f"no job {job_id}")
        return JobRecord.from_row(row)

    def job_view(self, job_id: str) -> dict[str, Any]:
        job = self.state.jobs.get(job_id)
        if job is not None:
            view = self._live_view(job, views.provider_names(self.state.providers))
        else:
            view = self._record(job_id).view()
        return views.with_queue_state(view, self.queue.is_connected)

    def _live_view(self, job: st.Job, names: dict[str, str]) -> dict[str, Any]:
        return views.live_job_view(self.jobs.live_record(job), job, names)

    def list_jobs(self, state: str | None, limit: int) -> list[dict[str, Any]]:
        """Newest first. The store keeps a job's row ``queued`` until it ends (a running job is not
        written down: the scheduler holds it), so for an active state the live jobs decide."""
        names = views.provider_names(self.state.providers)
        rows = self.store.list(None if state == JobState.RUNNING.value else state, limit)
        jobs: dict[str, dict[str, Any]] = {}
        for row in rows:
            job = self.state.jobs.get(row["job_id"])
            view = self._live_view(job, names) if job is not None else JobRecord.from_row(row).view()
            if state is None or view["state"] == state:
                jobs[view["job_id"]] = view
        if state in (JobState.RUNNING.value, JobState.QUEUED.value):
            for job in self.state.jobs.values():
                if job.state.value == state and job.job_id not in jobs:
                    jobs[job.job_id] = self._live_view(job, names)
        ordered = sorted(jobs.values(), key=lambda v: v["created_at"], reverse=True)[:limit]
        return [views.with_queue_state(v, self.queue.is_connected) for v in ordered]

    async def wait(self, job_id: str, timeout: float) -> dict[str, Any]:
        view = self.job_view(job_id)
        if view["state"] in TERMINAL_NAMES or timeout <= 0:
            return view
        event = self.jobs.waiters.setdefault(job_id, asyncio.Event())
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)
        return self.job_view(job_id)

    def result_file(self, job_id: str, name: str | None) -> Path | np.ndarray:
        """A finished job's output: its file, or (a small output kept in the job's row) the array."""
        view = self.job_view(job_id)
        if view["state"] != "done":
            raise Conflict(f"job {job_id} is {view['state']}; its result is not available")
        files = view["stats"].get("files") or []
        name = name or (next(iter(view["outputs"])) if view["outputs"] else (files[0] if files else ""))
        if name in files:
            path = layout.job_dir(self.root, job_id) / name
        elif name in view["outputs"]:
            row = self.store.get(job_id) or {}
            if name in (row.get("results") or {}):
                return from_bytes(view["outputs"][name], row["results"][name])
            path = self.blobs.output_path(job_id, name)
        else:
            raise NotFound(f"job {job_id} has no output {name!r}")
        if not path.exists():
            raise NotFound(f"result {name!r} of job {job_id} is missing from the state dir")
        return path

    def drain(self, provider_id: str, draining: bool = True) -> dict[str, Any]:
        """A draining provider finishes what it has and is given nothing new."""
        self.apply(sm.DrainRequested(provider_id, draining))
        self.events.emit("node.draining" if draining else "node.undrained", provider_id=provider_id)
        return self.node_view(provider_id)

    def clear_quarantine(self, provider_id: str) -> dict[str, Any]:
        """An operator trusts a quarantined provider again: it gets work from now on."""
        self.apply(sm.QuarantineCleared(provider_id))
        self._save_quarantine()
        log.warning("provider cleared of quarantine by an operator", extra={"provider_id": provider_id})
        self.events.emit("node.cleared", provider_id=provider_id)
        return self.node_view(provider_id)

    def nodes(self) -> list[dict[str, Any]]:
        return views.provider_rows(self.state.providers, time.monotonic())

    def node_view(self, provider_id: str) -> dict[str, Any]:
        prov = self.state.providers.get(provider_id)
        if prov is None:
            raise NotFound(f"no provider {provider_id}")
        return views.provider_row(prov, time.monotonic())

    def snapshot(self) -> dict[str, Any]:
        """Everything the dashboard and /metrics show, in one read-only dict."""
        now, clock = time.time(), time.monotonic()  # shown, and what the state machine's times are on
        names = views.provider_names(self.state.providers)
        live, counts = [], {JobState.QUEUED.value: 0, JobState.RUNNING.value: 0}
        for job in self.state.jobs.values():  # in the order they came: the oldest queued ones first
            if job.state.terminal:
                continue
            counts[job.state.value] += 1
            if job.state is not JobState.QUEUED or counts[JobState.QUEUED.value] <= SNAPSHOT_QUEUED:
                live.append(self._live_view(job, names))
        return {
            "time": now, "epoch": self.incarnation, "uptime_s": clock - self._started_t, "queue": self.queue.name,
            "queue_connected": self.queue.is_connected,
            "nodes": views.provider_rows(self.state.providers, clock), "jobs": live, "live_counts": counts,
            "counters": {**self.state.counters, **self.counters, "bad_messages": self.transport.bad_messages,
                         "subscriptions_refused": self.transport.refused_subscriptions,
                         **({"curve_refused": self.zap.denied} if self.zap is not None else {})},
            "finished": list(self.finished),
        }


def _bug(job: st.Job, what: str, exc: Exception) -> str:
    log.error("task type %s %s", job.task_type, what, exc_info=exc, extra={"job_id": job.job_id})
    return f"task type {job.task_type} {what}: {type(exc).__name__}: {exc}"
