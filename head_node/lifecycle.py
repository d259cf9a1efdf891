"""A job's life on the head, around the state machine: accept (validate, store, publish durably),
deliver (from the queue into the scheduler, with its planner), close (store the outcome, then ack
the queue message), and the files a planner asks for. It never names a task type: the task's
interface (common/tasks) says what to import, how to validate and how to plan.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import logging
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from common import config, layout, tasks
from common.arrays import from_bytes
from common.errors import Conflict, DcfError, HeadUnreachable, TooManyJobs, ValidationError
from common.jobs import JobRecord, JobState
from common.protocol.batch import MAX_INLINE_BYTES, JobSpec
from common.tasks import ArrayMeta, Effect, JobContext, Metrics, ProviderSpec, SaveFile

from .entities import Job
from .events import EventBus
from .jobqueue import Ack, JobQueue
from .rendezvous import Rendezvous
from .stimuli import Action, JobAdded, JobForgotten
from .store import BlobStore, JobStore, replace_file

log = logging.getLogger("dcf.head")
#: the ready providers eligible for a job of (task type, params, inputs): ``ClusterState.ready_for``
ReadyFor = Callable[[str, Mapping[str, Any], Mapping[str, ArrayMeta]], Sequence[ProviderSpec]]
#: the longest a retried submission waits for the first one with its idempotency key to be accepted
REPLAY_WAIT_S = 30.0


@dataclass
class ActiveJob:
    """What the I/O layer holds for a delivered job: its record, open arrays and queue ack."""

    record: JobRecord
    operands: dict[str, np.ndarray]
    results: dict[str, np.ndarray]
    ack: Ack
    by_reference: set[tuple[int, int]] = field(default_factory=set)  # (subtask, attempt) sent by file reference
    nonfinite: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    #: the outputs are small: held in memory and stored in the job's row, not in files
    inline_outputs: bool = False
    #: results held to verify subtasks (``--verify-rate``, ``HoldResult``): subtask index -> provider id -> its
    #: arrays; dropped once the subtask's result is merged, and with the job. Memory only: a restarted head plans
    #: (or sends) the subtasks again and verifies them anew
    held: dict[int, dict[str, list[np.ndarray]]] = field(default_factory=dict)

    @property
    def by_file(self) -> bool:
        """Whether a co-located provider may take this job's subtasks by file reference: every input
        is a blob file and every output a file."""
        return not self.record.inline and not self.inline_outputs

    def live_stats(self) -> dict[str, Any]:
        return {"result_nonfinite": self.nonfinite, "bytes_out": self.bytes_out, "bytes_in": self.bytes_in}


class Lifecycle:
    def __init__(self, cfg: config.HeadSettings, root: Path, incarnation: str, blobs: BlobStore, store: JobStore,
                 queue: JobQueue, events: EventBus, apply: Callable[[Any], list[Action]],
                 ready_for: ReadyFor) -> None:
        self.cfg = cfg
        self.root = root
        self.incarnation = incarnation
        self.blobs = blobs
        self.store = store
        self.queue = queue
        self.events = events
        self.apply = apply  # hand a stimulus to the state machine and carry out its actions
        self.ready_for = ready_for  # the ready providers a job would go to (the state machine's query)
        self.active: dict[str, ActiveJob] = {}
        #: submissions waiting for the broker's confirm -> a delivery of theirs that came first
        self.parked: dict[str, tuple[dict[str, Any], Ack] | None] = {}
        #: module -> its import on a thread (slow imports of a task type's head side, e.g. torch)
        self.imports: dict[str, asyncio.Future[tuple[str, str] | None]] = {}
        self.waiters: dict[str, asyncio.Event] = {}
        self.rendezvous = Rendezvous(cfg.host, cfg.rendezvous_port)  # started by the first job that needs it

    # ---- accept ---------------------------------------------------------------------------
    async def submit(self, spec: JobSpec) -> str:
        """Validate a job, persist it, publish it durably; only then return its id."""
        return (await self.submit_many([spec]))[0]

    async def submit_many(self, specs: Sequence[JobSpec]) -> list[str]:
        """Validate every job, persist them, publish them durably; only then return their ids. All or
        nothing: one bad spec, or a queue that does not confirm them all, and none is accepted."""
        replayed = await self._replayed(specs)  # idempotency keys: a retry is its first job, not a new one
        await self._head_imports({s.type for s in specs})
        records = []
        for i, spec in enumerate(specs):
            if i in replayed:
                continue
            try:
                records.append(self.make_record(spec))
            except DcfError as exc:
                if len(specs) > 1:
                    exc.args = (f"jobs[{i}]: {exc.message}",)
                raise
        if not records:
            return [replayed[i] for i in range(len(specs))]
        self._room_for(len(records))
        messages = [r.message() for r in records]
        ids = [r.job_id for r in records]
        self.store.insert_many(messages, accepted=False,
                               keys=[(s.idempotency_key, s.fingerprint()) if s.idempotency_key else None
                                     for i, s in enumerate(specs) if i not in replayed])
        # the broker may deliver a message before it confirms it: such a delivery waits here
        self.parked.update(dict.fromkeys(ids))
        try:
            await self.queue.publish_many(messages)
            self.store.mark_accepted_many(ids)
            await self._committed()
        except DcfError:
            self._unpublish(ids)
            raise
        for record in records:  # before any event of the job: a parked delivery starts it right below
            log.debug("job accepted: %s", record.type, extra={"job_id": record.job_id})
            self.events.emit("job.accepted", job_id=record.job_id, type=record.type)
        for job_id in ids:
            early = self.parked.pop(job_id, None)
            if early is not None:  # just accepted: neither held nor ended (no look at its row)
                self._enter(*early)
        if replayed:
            fresh = iter(ids)
            return [replayed[i] if i in replayed else next(fresh) for i in range(len(specs))]
        return ids

    async def _head_imports(self, task_types: set[str]) -> None:
        """The head-side modules of these task types imported (on a thread, once): a job is checked against the
        providers with them (``TaskType.cannot_start``). One that fails to import fails its jobs at delivery."""
        pending = []
        for name in task_types:
            if name in tasks.names():
                pending += [self._import(m) for m in tasks.get(name).head_imports if m in self.imports or _installed(m)]
        if pending:
            await asyncio.gather(*(asyncio.shield(f) for f in pending))

    def _room_for(self, count: int) -> None:
        """TooManyJobs unless the head may hold ``count`` more unfinished jobs (``--max-jobs``): each
        costs memory (its planner, inline operands) and a share of every scheduling pass."""
        held = len(self.active) + len(self.parked)
        if held + count > self.cfg.max_jobs:
            raise TooManyJobs(f"the head holds {held} unfinished jobs and takes at most {self.cfg.max_jobs} "
                              f"(--max-jobs); {count} more were not accepted: try again as jobs finish")

    async def _replayed(self, specs: Sequence[JobSpec]) -> dict[int, str]:
        """Index -> job id of the specs whose idempotency key a stored job was submitted with (a
        retry after a lost reply). A key whose submission is still being accepted is waited for: it
        is then that job, or free again if it was refused. The same key with another spec: 422."""
        keys = {s.idempotency_key: i for i, s in enumerate(specs) if s.idempotency_key}
        if not keys:
            return {}
        deadline = time.monotonic() + REPLAY_WAIT_S
        while True:
            found = self.store.by_idempotency_key(list(keys))
            if all(accepted for _, _, accepted in found.values()):
                break
            if time.monotonic() > deadline:
                raise Conflict("a submission with the same idempotency key is still being accepted; try again")
            await asyncio.sleep(0.02)
        replayed: dict[int, str] = {}
        for key, (job_id, fingerprint, _) in found.items():
            i = keys[key]
            if fingerprint != specs[i].fingerprint():
                where = f"jobs[{i}]: " if len(specs) > 1 else ""
                raise ValidationError(f"{where}idempotency key {key!r} was used for another submission (job "
                                      f"{job_id}); use a new key for a new job")
            log.info("submission retried with its idempotency key: the job it made is the answer",
                     extra={"job_id": job_id})
            replayed[i] = job_id
        return replayed

    def _unpublish(self, ids: list[str]) -> None:
        """Not accepted: no row is left, and a tombstone drops a message the broker got after all (a
        lost publisher confirm). The operands stay: the client may submit again."""
        self.store.delete_many(ids)
        for job_id in ids:
            early = self.parked.pop(job_id, None)
            if early is not None:
                asyncio.ensure_future(early[1]())  # delivered although refused: acked, never run

    async def _committed(self) -> None:
        """Wait for the group commit of what was written so far; HeadUnreachable if it failed."""
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

        def settle(ok: bool) -> None:
            if not done.done():
                done.set_result(ok)

        self.store.after_commit(settle)
        if not await done:
            raise HeadUnreachable("the head could not write the job store; try again")

    def make_record(self, spec: JobSpec) -> JobRecord:
        task = tasks.get(spec.type)
        absent = next((m for m in task.head_imports if not _installed(m)), None)
        if absent is not None:  # refused at once, not accepted and then failed
            why = needs_on_head(task, absent)
            log.warning("refused a %s job: %s", task.name, why)
            raise ValidationError(why)
        names = {**spec.blobs, **spec.inline}
        needed = task.needed_inputs(spec.params)
        missing = [n for n in needed if n not in names]
        extra = [n for n in names if n not in needed]
        if missing or extra:
            raise ValidationError(f"{task.name} takes inputs {list(needed)}; missing {missing}, "
                                  f"unexpected {extra}")
        metas = {name: self.blobs.meta(blob_id) for name, blob_id in spec.blobs.items()}
        metas.update({name: ArrayMeta.of(arr) for name, arr in spec.inline.items()})
        outputs = validate(task, spec.params, metas)
        self._check_start(task, spec.params, metas)
        inputs = {n: ({"blob": spec.blobs[n]} if n in spec.blobs else {}) | metas[n].to_dict() for n in names}
        return JobRecord(job_id=uuid.uuid4().hex, type=task.name, params=spec.params, inputs=inputs,
                         outputs={n: m.to_dict() for n, m in outputs.items()}, nodes=spec.nodes,
                         created_at=time.time(), inline={n: a.tobytes() for n, a in spec.inline.items()})

    def _check_start(self, task: tasks.TaskType, params: Mapping[str, Any], metas: Mapping[str, ArrayMeta]) -> None:
        """ValidationError (422) when the job cannot start on the providers ready now because of who they are
        (``TaskType.cannot_start``, e.g. an allreduce job none of them can join). A plugin's check that breaks
        is logged and the job accepted: its planner decides when it runs."""
        if type(task).cannot_start is tasks.TaskType.cannot_start:  # no check: no look at the providers
            return
        try:
            why = task.cannot_start(params, metas, self.ready_for(task.name, params, metas))
        except DcfError:
            raise
        except Exception:
            log.exception("task type %s could not check a job against the providers; accepted", task.name)
            return
        if why:
            log.warning("refused a %s job: %s", task.name, why)
            raise ValidationError(why)

    # ---- deliver --------------------------------------------------------------------------
    def deliver(self, message: dict[str, Any], ack: Ack) -> None:
        """A job from the durable queue (new, recovered or redelivered) enters the scheduler."""
        job_id = message["job_id"]
        if job_id in self.parked:  # its submission is still waiting for the broker's confirm
            self.parked[job_id] = (message, ack)
            return
        if job_id in self.active:
            self.active[job_id].ack = ack  # redelivery after a broker reconnect: the new tag counts
            return
        row = self.store.get(job_id)
        if row is not None and JobState(row["state"]).terminal:
            asyncio.ensure_future(ack())
            return
        self._enter(message, ack)

    def _enter(self, message: dict[str, Any], ack: Ack) -> None:
        """A delivered job that is not held yet nor ended (``deliver`` looked; a job this head has just accepted
        is neither) enters the scheduler, once the modules its task type needs on the head are imported."""
        job_id = message["job_id"]
        try:
            task = tasks.get(message["type"])
        except DcfError as exc:
            self._refuse(job_id, exc.message, ack)
            return
        pending = [self._import(m) for m in task.head_imports]
        if pending:  # slow imports run once, on a thread; deliveries waiting for them keep their order
            asyncio.ensure_future(self._deliver_after(pending, message, ack))
            return
        self._open(task, message, ack)

    def _import(self, module: str) -> asyncio.Future[tuple[str, str] | None]:
        if module not in self.imports:
            self.imports[module] = asyncio.ensure_future(asyncio.to_thread(_import_module, module))
        return self.imports[module]

    async def _deliver_after(self, pending: Sequence[asyncio.Future[tuple[str, str] | None]], message: dict[str, Any],
                             ack: Ack) -> None:
        errors = [e for e in await asyncio.gather(*(asyncio.shield(f) for f in pending)) if e]
        if errors:
            module, why = errors[0]
            self._refuse(message["job_id"], needs_on_head(tasks.get(message["type"]), module, why), ack)
            return
        act = self.active.get(message["job_id"])
        if act is not None:  # redelivered while it waited: the newest delivery's ack counts
            act.ack = ack
            return
        self._open(tasks.get(message["type"]), message, ack)

    def _open(self, task: tasks.TaskType, message: dict[str, Any], ack: Ack) -> None:
        record = JobRecord.from_message(message)
        try:
            job, act = self._build(task, record, ack)
        except (DcfError, OSError, ValueError, ImportError) as exc:
            self._refuse(record.job_id, exc.message if isinstance(exc, DcfError) else f"{type(exc).__name__}: {exc}",
                         ack)
            return
        except Exception as exc:  # a plugin's planner failed to build: its job fails, the head goes on
            log.exception("could not build the job's planner", extra={"job_id": record.job_id})
            self._refuse(record.job_id, f"task type {task.name} could not start the job: {type(exc).__name__}: "
                                        f"{exc}", ack)
            return
        self.active[record.job_id] = act
        if message.get("state") not in (None, JobState.QUEUED.value):  # a row recovered mid-run
            self.store.update(record.job_id, state=JobState.QUEUED.value)
        self.apply(JobAdded(job))

    def _build(self, task: tasks.TaskType, record: JobRecord, ack: Ack) -> tuple[Job, ActiveJob]:
        blob_ids = record.blob_ids()
        operands = {name: self.blobs.open(blob) for name, blob in blob_ids.items()}
        operands.update({name: from_bytes(record.inputs[name], data) for name, data in record.inline.items()})
        metas = {name: ArrayMeta.of(arr) for name, arr in operands.items()}
        outputs = validate(task, record.params, metas)
        # a small job (no input file, small outputs) stays off the disk: outputs in memory now, in its
        # row when done; one with input files keeps output files, for co-located providers to share
        inline_outputs = not blob_ids and sum(m.nbytes for m in outputs.values()) <= MAX_INLINE_BYTES
        if inline_outputs:
            results = {name: np.zeros(m.shape, dtype=m.dtype) for name, m in outputs.items()}
        else:
            results = self.blobs.create_outputs(record.job_id, outputs, self.incarnation)
        ctx = JobContext(job_id=record.job_id, params=record.params, inputs=metas, outputs=outputs,
                         operands=operands, blob_ids=blob_ids, results=results,
                         job_dir=layout.job_dir(self.root, record.job_id), options=self._services(task))
        job = Job(record.job_id, task.name, record.params, metas, outputs, record.nodes,
                  created_at=record.created_at, planner=task.planner(ctx))
        return job, ActiveJob(record, operands, results, ack, inline_outputs=inline_outputs)

    def _services(self, task: tasks.TaskType) -> dict[str, Any]:
        """What the head runs for the task's jobs (``TaskType.head_services``), started on first use."""
        return {"rendezvous": self.rendezvous.options()} if "rendezvous" in task.head_services else {}

    def _refuse(self, job_id: str, error: str, ack: Ack) -> None:
        """A delivered job that cannot run fails visibly; its message is acked (never retried)."""
        log.error("job cannot run: %s", error, extra={"job_id": job_id})
        self.store.update(job_id, state=JobState.FAILED.value, error=error, finished_at=time.time())
        self.events.emit("job.failed", job_id=job_id, error=error)
        self.store.after_commit(lambda ok: self._closed(job_id, ack, ok))

    # ---- effects and close ------------------------------------------------------------------
    def carry_out(self, job: Job, effects: Sequence[Effect]) -> None:
        """What a planner asked for: files written atomically, metrics as job events."""
        for effect in effects:
            if isinstance(effect, Metrics):
                self.events.emit("job.metrics", job_id=job.job_id, scope=effect.scope, **effect.values)
            elif isinstance(effect, SaveFile):
                try:
                    self.save(job.job_id, effect)
                except OSError as exc:  # a checkpoint: training goes on, the next boundary tries again
                    log.error("could not write %s: %s", effect.name, exc, extra={"job_id": job.job_id})
        job.stats.update(job.summary())

    def save(self, job_id: str, effect: SaveFile) -> None:
        job_dir = layout.job_dir(self.root, job_id)
        job_dir.mkdir(parents=True, exist_ok=True)
        tmp = job_dir / f".{effect.name}.part"
        tmp.write_bytes(effect.data)
        replace_file(tmp, job_dir / effect.name, self.cfg.fsync)
        log.info("wrote %s", effect.name, extra={"job_id": job_id})

    def close(self, job: Job, names: dict[str, str]) -> None:
        """The job ended (done, failed or cancelled): keep its outputs, store the outcome, then ack."""
        act = self.active.pop(job.job_id, None)
        # the progress as it stands: a cancelled job keeps what it had done (rows reported included)
        stats = {**job.stats, **job.summary(), "progress": job.progress().to_dict(),
                 "shares": {names.get(p, p): round(f, 4) for p, f in job.shares().items()}}
        if act is not None:
            stats.update(act.live_stats())
        if job.started_t is not None and job.finished_t is not None:  # the monotonic clock: a step moves neither
            stats["compute_s"] = round(job.finished_t - job.started_t, 4)
        job.stats = stats
        inline: dict[str, bytes] = {}
        if job.state is JobState.DONE and act is not None:
            inline = self._keep_outputs(job, act, stats)
        self.store.update(job.job_id, state=job.state.value, started_at=job.started_at, finished_at=job.finished_at,
                          error=job.error, stats=stats, **({"results": inline} if inline else {}))
        outcome = job.state.value
        # a job done is an event (job.done), not news for the log: a head doing 2,000 jobs a second logs none
        log.log(logging.DEBUG if outcome == "done" else logging.INFO, "job %s%s", outcome,
                f": {job.error}" if job.error and outcome != "done" else "", extra={"job_id": job.job_id})
        self.events.emit(f"job.{outcome}", job_id=job.job_id, error=job.error, seconds=stats.get("compute_s"),
                         **stats["progress"])  # the job's progress as it ended (a cancelled one: not 100%)
        # only once the outcome is committed: the queue forgets the job, its waiters hear of it
        self.store.after_commit(lambda ok: self._closed(job.job_id, act.ack if act is not None else None, ok))

    def _closed(self, job_id: str, ack: Ack | None, stored: bool) -> None:
        if not stored:  # not acked: the queue delivers the job again after a restart
            log.error("the outcome of the job was not stored", extra={"job_id": job_id})
        elif ack is not None:
            asyncio.ensure_future(ack())
        self.apply(JobForgotten(job_id))  # the scheduler lets it go: its row is the job from now on
        event = self.waiters.pop(job_id, None)
        if event is not None:
            event.set()

    def _keep_outputs(self, job: Job, act: ActiveJob, stats: dict[str, Any]) -> dict[str, bytes]:
        """Files the planner writes at the end, and the outputs: committed files, or (small ones) the
        bytes to store in the job's row, returned."""
        try:
            files = job.planner.finish(job.finished_t or 0.0)  # the clock the planner's other times are on
            for f in files:
                self.save(job.job_id, f)
            if files:
                stats["files"] = [f.name for f in files]
            if act.inline_outputs:
                return {name: np.ascontiguousarray(arr).tobytes() for name, arr in act.results.items()}
            self.blobs.commit_outputs(job.job_id, act.results, self.incarnation, self.cfg.fsync,
                                      copy=bool(act.by_reference))
        except Exception as exc:  # disk full, a plugin's bug...: the job fails visibly, the head goes on
            log.exception("could not store the result", extra={"job_id": job.job_id})
            job.state, job.error = JobState.FAILED, f"could not store result: {exc}"
        return {}

    def live_record(self, job: Job) -> JobRecord:
        """The record of a job the scheduler holds, with its live state."""
        act = self.active.get(job.job_id)
        base = act.record if act is not None else JobRecord(
            job.job_id, job.task_type, job.params, {k: m.to_dict() for k, m in job.inputs.items()},
            {k: m.to_dict() for k, m in job.outputs.items()}, job.nodes, job.created_at)
        stats = {**job.stats, **job.verification(), **(act.live_stats() if act is not None else {})}
        return replace(base, state=job.state, started_at=job.started_at, finished_at=job.finished_at,
                       error=job.error, stats=stats)


def validate(task: tasks.TaskType, params: dict[str, Any], metas: dict[str, ArrayMeta]) -> dict[str, ArrayMeta]:
    """task.validate, with a plugin's unexpected exception turned into a clear 4xx."""
    try:
        return task.validate(params, metas)
    except DcfError:
        raise
    except Exception as exc:
        raise ValidationError(f"task type {task.name} rejected the job: {type(exc).__name__}: {exc}") from None


#: held while a task type's head-side module is imported (on a thread)
_IMPORTING = threading.Lock()


def _import_module(module: str) -> tuple[str, str] | None:
    """On a thread: import a module; None if it worked, else (module, why not) (a broken install may raise
    anything)."""
    try:
        with _IMPORTING:  # one at a time: torch and torch.distributed imported at once on two threads abort
            importlib.import_module(module)
    except BaseException as exc:
        return module, f"{type(exc).__name__}: {exc}"[:300]
    return None


def _installed(module: str) -> bool:
    """Whether ``module`` can be found (not imported: that is done once, on a thread, at delivery)."""
    if module in sys.modules:
        return True
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def needs_on_head(task: tasks.TaskType, module: str, why: str = "") -> str:
    """The one line that says a task type's head side lacks a module, and how to install it."""
    if isinstance(why, str) and why and not why.startswith(("ModuleNotFoundError", "ImportError")):
        return f"the {task.name} task needs {module} on the head, and importing it failed: {why}"
    hint = f"pip install 'dcf[{task.head_extra}]'" if task.head_extra else f"pip install {module}"
    return f"the {task.name} task needs {module} on the head: {hint}"
