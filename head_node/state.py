"""The head's state machine: providers, jobs, subtasks. No I/O, no clock, no threads.

Every change goes through a method that takes the current time ``now`` and returns
a list of actions for the I/O layer (head_node/server.py) to carry out: send a
subtask, finish or fail a job. Being pure, it is unit-tested without sockets.

Reliability rules held here:
  * a provider is *ready* only when registered, subscribed to its topic (the head saw
    the XPUB subscription: no slow-joiner loss) and alive (heartbeat within 3 intervals);
  * a subtask sent but not acknowledged within ``ack_timeout`` is sent again;
  * a subtask not finished by its deadline, or whose provider died, goes to another;
  * a result is accepted once per subtask, only for an attempt that was issued in this
    head epoch; later or duplicate results are ignored (idempotent).

Speed learning: each accepted result of a big enough subtask refines its provider's throughput
for that task type (the registered benchmark is the prior), and later splits, provider choices
and deadlines use it. The time learned from is the *service time the head observes*, not only
the compute time the provider reports (``elapsed_s``): from when the head sent that attempt, or,
if the provider was still busy then, from when the head heard it finish its previous subtask
(a provider runs its subtasks one at a time, in the order sent), until the result was received.
It includes sending the operands and receiving the result, so a provider behind a slow link gets
a smaller share of later jobs; subtasks queued behind each other are not charged for the wait.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from common import tasks
from common.errors import Conflict, DcfError, NotFound
from common.tasks import ArrayMeta, SubtaskPlan, Worker

#: subtasks of at least this many flops update a provider's measured throughput
MEASURABLE_FLOPS = 2e8
#: weight of the newest measurement in that running average
SPEED_WEIGHT = 0.5
#: bounds of a believable throughput (a bogus elapsed_s must not break the splits)
MIN_GFLOPS, MAX_GFLOPS = 1e-3, 1e7


def service_seconds(reported: float, sent_at: float, free_at: float, now: float) -> float:
    """Seconds one subtask cost its provider, as the head saw it: from ``sent_at`` (when the head
    sent this attempt) or ``free_at`` (when it last heard the provider finish a subtask), whichever
    is later, to ``now`` (when the result arrived); transfers included, queueing behind earlier
    subtasks not. Never less than the compute time the provider ``reported``, which in turn may not
    exceed the time since the attempt was sent (a bogus ``elapsed_s`` is capped by the head's own
    clock). 0 when nothing believable is known (the caller then learns nothing)."""
    reported = reported if math.isfinite(reported) and reported > 0 else 0.0
    window = now - sent_at
    if not (math.isfinite(window) and window > 0):  # the clock stepped back: trust the provider alone
        return reported
    observed = now - max(sent_at, free_at)
    if not (math.isfinite(observed) and observed > 0):
        observed = 0.0
    return max(min(reported, window), observed)


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


class SubState(str, enum.Enum):
    PENDING = "pending"  # waiting for a provider
    SENT = "sent"  # published, not yet acknowledged
    RUNNING = "running"  # acknowledged by the provider
    DONE = "done"


@dataclass
class ProviderInfo:
    provider_id: str
    name: str
    host: str
    os: str
    device_kind: str
    device_name: str
    memory_bytes: int
    cores: int
    task_types: frozenset[str]
    dtypes: frozenset[str]
    version: str
    gflops: float

    def worker(self, gflops: float | None = None) -> Worker:
        return Worker(self.provider_id, gflops or self.gflops, self.memory_bytes, self.device_kind, self.dtypes)


@dataclass
class Provider:
    info: ProviderInfo
    registered_at: float
    last_seen: float
    subscribed: bool = False
    alive: bool = True
    local: bool = False  # shares the head's state dir: subtasks go by file reference
    draining: bool = False  # finishes what it has, gets nothing new
    assigned: set[tuple[str, int]] = field(default_factory=set)
    subtasks_done: int = 0
    flops_done: float = 0.0
    queued_on_provider: int = 0
    #: throughput learned from finished subtasks, per task type (the benchmark is the prior)
    speed: dict[str, float] = field(default_factory=dict)
    #: when the head last heard this provider finish a subtask (a result, accepted or not, or a
    #: failure): a subtask sent while the provider was busy starts about then (FIFO)
    last_result_at: float = 0.0

    @property
    def ready(self) -> bool:
        return self.alive and self.subscribed and not self.draining

    @property
    def state(self) -> str:
        if not self.alive:
            return "dead"
        if self.draining:
            return "draining"
        return "ready" if self.subscribed else "connecting"

    def gflops(self, task_type: str) -> float:
        return self.speed.get(task_type, self.info.gflops)

    def worker(self, task_type: str) -> Worker:
        return self.info.worker(self.gflops(task_type))

    def learn(self, task_type: str, flops: float, elapsed: float) -> None:
        """Fold one finished subtask into the throughput estimate for its task type: ``elapsed``
        is the seconds it cost this provider end to end (``service_seconds``), not only compute."""
        if flops < MEASURABLE_FLOPS or elapsed <= 0:
            return
        measured = min(MAX_GFLOPS, max(MIN_GFLOPS, flops / elapsed / 1e9))
        self.speed[task_type] = (1 - SPEED_WEIGHT) * self.gflops(task_type) + SPEED_WEIGHT * measured

    def load(self, jobs: Mapping[str, Job]) -> float:
        """Seconds of work assigned and not yet finished, at the measured throughput."""
        return sum(jobs[j].subtasks[i].cost / (self.gflops(jobs[j].task_type) * 1e9)
                   for j, i in self.assigned if j in jobs)


@dataclass
class Subtask:
    index: int
    params: dict[str, Any]
    cost: float
    state: SubState = SubState.PENDING
    attempt: int = 0
    provider_id: str | None = None
    sent_at: float = 0.0  # of the latest attempt
    deadline: float = 0.0
    done_by: str | None = None
    tried: list[str] = field(default_factory=list)  # provider of attempt k is tried[k - 1]
    sent: list[float] = field(default_factory=list)  # when attempt k was sent: sent[k - 1]
    strikes: int = 0  # failures, missed acks and missed deadlines (provider deaths do not count)
    acked_at: float = 0.0
    straggle_at: float = 0.0  # running past this, it is a straggler: flagged once, copied elsewhere
    straggling: bool = False


class Planner(Protocol):
    """Hands out a job's subtasks. A split/merge task (matmul) plans once; a multi-round task
    (training) plans each step after the results of the previous one are merged."""

    finished: bool

    def plan(self, workers: Sequence[Worker], outstanding: int) -> list[SubtaskPlan]:
        """New subtasks for these workers, given how many are still out ([] = nothing now)."""
        ...


class SplitOnce:
    def __init__(self, task_type: str, params: dict[str, Any], inputs: dict[str, ArrayMeta]) -> None:
        self.task = tasks.get(task_type)
        self.params = params
        self.inputs = inputs
        self.finished = False

    def plan(self, workers: Sequence[Worker], outstanding: int) -> list[SubtaskPlan]:
        if self.finished:
            return []
        plans = self.task.split(self.params, self.inputs, workers)
        self.finished = True
        return plans


@dataclass
class Job:
    job_id: str
    task_type: str
    params: dict[str, Any]
    inputs: dict[str, ArrayMeta]
    outputs: dict[str, ArrayMeta]
    nodes: int | None
    created_at: float
    state: JobState = JobState.QUEUED
    subtasks: list[Subtask] = field(default_factory=list)
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    waiting: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    planner: Planner | None = None  # None: the task's split, once (SplitOnce)

    done_count: int = 0  # subtasks DONE (a subtask never leaves DONE)

    def shares(self) -> dict[str, float]:
        """provider id -> fraction of the job's work (by cost) it computed."""
        total = sum(s.cost for s in self.subtasks) or 1.0
        out: dict[str, float] = {}
        for s in self.subtasks:
            if s.done_by:
                out[s.done_by] = out.get(s.done_by, 0.0) + s.cost / total
        return out


# ---- actions for the I/O layer -------------------------------------------------------------
@dataclass(frozen=True)
class Dispatch:
    provider_id: str
    job_id: str
    subtask: int
    attempt: int


@dataclass(frozen=True)
class JobStarted:
    job_id: str


@dataclass(frozen=True)
class JobFinished:
    job_id: str


@dataclass(frozen=True)
class JobFailed:
    job_id: str
    error: str


@dataclass(frozen=True)
class Straggler:
    job_id: str
    subtask: int
    provider_id: str
    seconds: float
    copied_to: str | None  # the provider running a speculative copy, if one was free


@dataclass(frozen=True)
class ProviderLost:
    provider_id: str
    requeued: int


Action = Dispatch | JobStarted | JobFinished | JobFailed | ProviderLost | Straggler


@dataclass(frozen=True)
class Timing:
    heartbeat_interval: float = 5.0
    missed_heartbeats: int = 3
    ack_timeout: float = 10.0
    min_deadline: float = 60.0
    deadline_factor: float = 10.0
    max_attempts: int = 5
    straggler_factor: float = 3.0  # running 3x longer than its provider's queue predicts...
    straggler_min: float = 2.0  # ...and at least this many seconds: a straggler
    forget_after: float = 600.0  # a provider dead this long leaves the provider table

    @property
    def dead_after(self) -> float:
        return self.heartbeat_interval * self.missed_heartbeats


class ClusterState:
    def __init__(self, epoch: str, timing: Timing | None = None) -> None:
        self.epoch = epoch
        self.timing = timing or Timing()
        self.providers: dict[str, Provider] = {}
        self.jobs: dict[str, Job] = {}
        self.subscribed_topics: set[str] = set()
        self.counters: dict[str, int] = {
            "subtasks_dispatched": 0, "subtasks_completed": 0, "subtasks_failed": 0,
            "subtasks_retried": 0, "subtasks_speculative": 0, "results_ignored": 0, "providers_lost": 0,
        }

    # ---- providers ---------------------------------------------------------------------
    def register(self, info: ProviderInfo, now: float) -> list[Action]:
        old = self.providers.get(info.provider_id)
        prov = Provider(info, registered_at=now, last_seen=now,
                        subscribed=info.provider_id in self.subscribed_topics)
        if old is not None:
            prov.draining = old.draining
            prov.assigned = old.assigned
            prov.subtasks_done = old.subtasks_done
            prov.flops_done = old.flops_done
            prov.last_result_at = old.last_result_at
        self.providers[info.provider_id] = prov
        return self.schedule(now)

    def heartbeat(self, provider_id: str, now: float, queued: int = 0, local: bool = False) -> bool:
        """False if the provider is unknown (it must register again)."""
        prov = self.providers.get(provider_id)
        if prov is None or not prov.alive:
            return False
        prov.last_seen = now
        prov.queued_on_provider = queued
        prov.local = local
        return True

    def subscription(self, topic: str, subscribed: bool, now: float) -> list[Action]:
        if subscribed:
            self.subscribed_topics.add(topic)
        else:
            self.subscribed_topics.discard(topic)
        prov = self.providers.get(topic)
        if prov is None:
            return []
        prov.subscribed = subscribed
        return self.schedule(now) if subscribed else []

    def drain(self, provider_id: str, draining: bool = True) -> Provider:
        prov = self.providers.get(provider_id)
        if prov is None:
            raise NotFound(f"no provider {provider_id}")
        prov.draining = draining
        return prov

    def unregister(self, provider_id: str, now: float) -> list[Action]:
        prov = self.providers.get(provider_id)
        if prov is None:
            return []
        actions = self._lose(provider_id) if prov.alive else []
        del self.providers[provider_id]
        return actions + self.schedule(now)

    def _lose(self, provider_id: str) -> list[Action]:
        prov = self.providers[provider_id]
        prov.alive = False
        requeued = 0
        for job_id, index in sorted(prov.assigned):
            job = self.jobs.get(job_id)
            if job is None or job.state is not JobState.RUNNING:
                continue
            sub = job.subtasks[index]
            if sub.state is not SubState.DONE and sub.provider_id == provider_id:
                self._requeue(sub)
                requeued += 1
        prov.assigned.clear()
        self.counters["providers_lost"] += 1
        return [ProviderLost(provider_id, requeued)]

    def _requeue(self, sub: Subtask) -> None:
        sub.state = SubState.PENDING
        sub.provider_id = None
        self.counters["subtasks_retried"] += 1

    # ---- jobs --------------------------------------------------------------------------
    def add_job(self, job: Job, now: float) -> list[Action]:
        if job.job_id in self.jobs:
            return []
        self.jobs[job.job_id] = job
        return self.schedule(now)

    def cancel(self, job_id: str, now: float) -> Job:
        job = self.get_job(job_id)
        if job.state.terminal:
            raise Conflict(f"job {job_id} is already {job.state.value}")
        self._finish(job, JobState.CANCELLED, now, "cancelled by user")
        return job

    def fail_job(self, job_id: str, error: str, now: float) -> list[Action]:
        job = self.jobs.get(job_id)
        if job is None or job.state.terminal:
            return []
        return self._fail(job, now, error)

    def get_job(self, job_id: str) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id}")
        return job

    def forget(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)

    def _finish(self, job: Job, state: JobState, now: float, error: str | None = None) -> None:
        job.state = state
        job.finished_at = now
        job.error = error
        for sub in job.subtasks:
            if sub.provider_id and sub.provider_id in self.providers:
                self.providers[sub.provider_id].assigned.discard((job.job_id, sub.index))

    # ---- subtask lifecycle ---------------------------------------------------------------
    def _live_subtask(self, job_id: str, index: int, attempt: int, epoch: str) -> Subtask | None:
        if epoch != self.epoch:
            return None
        job = self.jobs.get(job_id)
        if job is None or job.state is not JobState.RUNNING or not 0 <= index < len(job.subtasks):
            return None
        sub = job.subtasks[index]
        if sub.state is SubState.DONE or not 1 <= attempt <= sub.attempt:
            return None
        return sub

    def acked(self, provider_id: str, job_id: str, index: int, attempt: int, epoch: str,
              now: float) -> None:
        sub = self._live_subtask(job_id, index, attempt, epoch)
        if sub is None or sub.provider_id != provider_id or sub.attempt != attempt:
            return
        if sub.state is SubState.SENT:
            sub.state = SubState.RUNNING
            prov = self.providers.get(provider_id)
            # the provider's load includes this subtask and everything queued before it
            load = prov.load(self.jobs) if prov else 0.0
            sub.deadline = now + max(self.timing.min_deadline, self.timing.deadline_factor * load)
            sub.acked_at = now
            sub.straggle_at = now + max(self.timing.straggler_min, self.timing.straggler_factor * load)

    def _finished_work(self, provider_id: str, job_id: str, index: int, attempt: int, epoch: str,
                       now: float) -> None:
        """The provider says it is done with an attempt it was really sent (this epoch), whether or
        not the head still wants the outcome: whatever it runs next starts about now."""
        job = self.jobs.get(job_id)
        prov = self.providers.get(provider_id)
        if epoch != self.epoch or job is None or prov is None or not 0 <= index < len(job.subtasks):
            return
        sub = job.subtasks[index]
        if 1 <= attempt <= len(sub.tried) and sub.tried[attempt - 1] == provider_id:
            prov.last_result_at = max(prov.last_result_at, now)

    def result(self, provider_id: str, job_id: str, index: int, attempt: int, epoch: str,
               now: float, elapsed: float = 0.0) -> bool:
        """True if this result is the one to merge; False if late, duplicate or unknown.

        ``elapsed`` is the compute time the provider reports; an accepted result teaches the head
        the provider's speed from the service time it observed (``service_seconds``), measured from
        when *this* attempt was sent (a speculative copy or a re-send elsewhere has its own time)."""
        prov = self.providers.get(provider_id)
        free_at = prov.last_result_at if prov is not None else 0.0  # before this result moves it
        self._finished_work(provider_id, job_id, index, attempt, epoch, now)
        sub = self._live_subtask(job_id, index, attempt, epoch)
        if sub is None or sub.tried[attempt - 1] != provider_id:
            self.counters["results_ignored"] += 1
            return False
        for pid in set(sub.tried):  # a speculative copy may be out on another provider
            if pid in self.providers:
                self.providers[pid].assigned.discard((job_id, index))
        sub.state = SubState.DONE
        self.jobs[job_id].done_count += 1
        sub.done_by = provider_id
        if prov is not None:
            prov.subtasks_done += 1
            prov.flops_done += sub.cost
            sent_at = sub.sent[attempt - 1] if attempt <= len(sub.sent) else sub.sent_at
            seconds = service_seconds(elapsed, sent_at, free_at, now)
            prov.learn(self.jobs[job_id].task_type, sub.cost, seconds)  # the next split uses it
        self.counters["subtasks_completed"] += 1
        return True

    def merged(self, job_id: str, now: float) -> list[Action]:
        """Call after a result accepted by ``result`` was merged into the outputs."""
        job = self.jobs[job_id]
        if job.state is not JobState.RUNNING:
            return []
        return self._advance(job, now)

    def _advance(self, job: Job, now: float) -> list[Action]:
        """Ask the job's planner for more work; finish the job when it has none and nothing is out."""
        assert job.planner is not None
        actions: list[Action] = []
        outstanding = len(job.subtasks) - job.done_count
        if not job.planner.finished:
            workers, why = self.eligible_workers(job)
            job.waiting = why
            if workers:
                try:
                    plans = job.planner.plan(workers[: job.nodes] if job.nodes else workers, outstanding)
                except DcfError as exc:
                    return self._fail(job, now, exc.message)
                except Exception as exc:  # a plugin's bug fails its job, not the scheduler
                    return self._fail(job, now, f"task type {job.task_type} could not plan the job: "
                                                f"{type(exc).__name__}: {exc}")
                actions += self._add_subtasks(job, plans, now)
                outstanding += len(plans)
        if outstanding == 0 and job.planner.finished:
            self._finish(job, JobState.DONE, now)
            actions.append(JobFinished(job.job_id))
        return actions

    def _add_subtasks(self, job: Job, plans: Sequence[SubtaskPlan], now: float) -> list[Action]:
        actions: list[Action] = []
        for p in plans:
            sub = Subtask(len(job.subtasks), p.params, p.cost)
            job.subtasks.append(sub)
            actions.append(self._send(job, sub, p.provider_id, now))
        return actions

    def failed(self, provider_id: str, job_id: str, index: int, attempt: int, epoch: str,
               error: str, retryable: bool, now: float) -> list[Action]:
        self._finished_work(provider_id, job_id, index, attempt, epoch, now)
        sub = self._live_subtask(job_id, index, attempt, epoch)
        if (sub is None or sub.attempt != attempt or sub.tried[attempt - 1] != provider_id
                or sub.state is SubState.PENDING):
            return []
        self.counters["subtasks_failed"] += 1
        job = self.jobs[job_id]
        if not retryable:
            return self._fail(job, now, f"subtask {index} failed on provider {provider_id[:8]}: {error}")
        return self._strike(job, sub, now, f"failed on provider {provider_id[:8]}: {error}") + self.schedule(now)

    def _strike(self, job: Job, sub: Subtask, now: float, why: str) -> list[Action]:
        """Take a subtask back after a failure, a missed ack or a missed deadline; fail the job
        once it has struck out ``max_attempts`` times (so nothing is retried forever)."""
        self._release(job, sub)
        sub.strikes += 1
        if sub.strikes >= self.timing.max_attempts:
            return self._fail(job, now, f"subtask {sub.index} gave up after {sub.strikes} tries; last: {why}")
        return []

    def _fail(self, job: Job, now: float, error: str) -> list[Action]:
        self._finish(job, JobState.FAILED, now, error)
        return [JobFailed(job.job_id, error)]

    # ---- time ----------------------------------------------------------------------------
    def tick(self, now: float) -> list[Action]:
        actions: list[Action] = []
        for pid, prov in list(self.providers.items()):
            if prov.alive and now - prov.last_seen > self.timing.dead_after:
                actions += self._lose(pid)
            elif not prov.alive and now - prov.last_seen > self.timing.forget_after:
                del self.providers[pid]  # bounded table; a late register brings it back
        for job in self.jobs.values():
            if job.state is not JobState.RUNNING:
                continue
            for sub in job.subtasks:
                if job.state is not JobState.RUNNING:
                    break
                if sub.state is SubState.SENT and now - sub.sent_at > self.timing.ack_timeout:
                    actions += self._strike(job, sub, now, "not acknowledged in time")
                elif sub.state is SubState.RUNNING and now > sub.deadline:
                    actions += self._strike(job, sub, now, "deadline passed")
                elif sub.state is SubState.RUNNING and not sub.straggling and now > sub.straggle_at:
                    actions += self._straggler(job, sub, now)
        return actions + self.schedule(now)

    def _straggler(self, job: Job, sub: Subtask, now: float) -> list[Action]:
        """Flag a straggler once and run a speculative copy on an idle provider, if there is one;
        the first result of either attempt is taken, the other is ignored."""
        sub.straggling = True
        slow = sub.provider_id or ""
        workers, _ = self.eligible_workers(job)
        task = tasks.get(job.task_type)
        idle = [w for w in workers if w.provider_id != slow and not self.providers[w.provider_id].assigned
                and task.fits(w, sub.params, job.inputs)]
        actions: list[Action] = []
        copy_to = None
        if idle:
            copy_to = max(idle, key=lambda w: w.gflops).provider_id
            self.counters["subtasks_speculative"] += 1
            actions.append(self._send(job, sub, copy_to, now))
        return [Straggler(job.job_id, sub.index, slow, round(now - sub.acked_at, 3), copy_to), *actions]

    def _release(self, job: Job, sub: Subtask) -> None:
        if sub.provider_id in self.providers:
            self.providers[sub.provider_id].assigned.discard((job.job_id, sub.index))
        if sub.state is not SubState.PENDING:
            self._requeue(sub)

    # ---- scheduling ----------------------------------------------------------------------
    def eligible_workers(self, job: Job) -> tuple[list[Worker], str | None]:
        task = tasks.get(job.task_type)
        workers: list[Worker] = []
        reasons: list[str] = []
        for prov in self.providers.values():
            if not prov.ready:
                continue
            if job.task_type not in prov.info.task_types:
                reasons.append(f"{prov.info.name} lacks task type {job.task_type}")
                continue
            worker = prov.worker(job.task_type)
            why = task.eligible(worker, job.params, job.inputs)
            if why:
                reasons.append(why)
                continue
            workers.append(worker)
        workers.sort(key=lambda w: w.gflops, reverse=True)
        if workers:
            return workers, None
        if not reasons:
            return [], "waiting for providers: none is connected"
        return [], "waiting for a suitable provider: " + "; ".join(sorted(set(reasons)))

    def schedule(self, now: float) -> list[Action]:
        actions: list[Action] = []
        for job in sorted(self.jobs.values(), key=lambda j: j.created_at):
            if job.state is JobState.QUEUED:
                actions += self._start(job, now)
            if job.state is JobState.RUNNING:
                actions += self._assign_pending(job, now)
                if job.done_count == len(job.subtasks):  # a planner that had no workers last time
                    actions += self._advance(job, now)
        return actions

    def _start(self, job: Job, now: float) -> list[Action]:
        workers, why = self.eligible_workers(job)
        job.waiting = why
        if not workers:
            return []
        if job.planner is None:
            job.planner = SplitOnce(job.task_type, job.params, job.inputs)
        job.state = JobState.RUNNING
        job.started_at = now
        actions = self._advance(job, now)
        if job.state is JobState.FAILED:
            return actions
        return [JobStarted(job.job_id), *actions]

    def _assign_pending(self, job: Job, now: float) -> list[Action]:
        pending = [s for s in job.subtasks if s.state is SubState.PENDING]
        if not pending:
            return []
        workers, why = self.eligible_workers(job)
        if job.nodes:  # keep to the providers the job already uses once it has its cap
            used = {p for s in job.subtasks for p in (s.provider_id, s.done_by) if p}
            in_use = [w for w in workers if w.provider_id in used]
            if len(used) >= job.nodes and in_use:
                workers = in_use
        task = tasks.get(job.task_type)
        actions: list[Action] = []
        for sub in pending:
            fit = [w for w in workers if task.fits(w, sub.params, job.inputs)]
            if not fit:
                job.waiting = why or "waiting for a provider with enough memory for a subtask"
                continue
            fresh = [w for w in fit if w.provider_id not in sub.tried[-1:]] or fit
            best = min(fresh, key=lambda w: (self.providers[w.provider_id].load(self.jobs)
                                             + sub.cost / (w.gflops * 1e9)))
            actions.append(self._send(job, sub, best.provider_id, now))
        if actions:
            job.waiting = None
        return actions

    def _send(self, job: Job, sub: Subtask, provider_id: str, now: float) -> Dispatch:
        sub.state = SubState.SENT
        sub.attempt += 1
        sub.provider_id = provider_id
        sub.sent_at = now
        sub.tried.append(provider_id)
        sub.sent.append(now)
        self.providers[provider_id].assigned.add((job.job_id, sub.index))
        self.counters["subtasks_dispatched"] += 1
        return Dispatch(provider_id, job.job_id, sub.index, sub.attempt)

    # ---- views ---------------------------------------------------------------------------
    def provider_rows(self, now: float) -> list[dict[str, Any]]:
        rows = []
        for prov in self.providers.values():
            info = prov.info
            state = prov.state
            rows.append({
                "provider_id": info.provider_id, "name": info.name, "host": info.host, "os": info.os,
                "device": info.device_kind, "device_name": info.device_name,
                "memory_bytes": info.memory_bytes, "cores": info.cores,
                "gflops": round(prov.gflops("matmul"), 2), "benchmark_gflops": round(info.gflops, 2),
                "task_types": sorted(info.task_types), "dtypes": sorted(info.dtypes),
                "version": info.version, "state": state, "shares_state_dir": prov.local,
                "assigned": len(prov.assigned),
                "subtasks_done": prov.subtasks_done, "last_heartbeat_s": round(now - prov.last_seen, 3),
            })
        return rows


def job_view(job: Job, names: Mapping[str, str] | None = None) -> dict[str, Any]:
    names = names or {}
    total = len(job.subtasks)
    return {
        "job_id": job.job_id, "type": job.task_type, "state": job.state.value,
        "params": job.params, "inputs": {k: v.to_dict() for k, v in job.inputs.items()},
        "outputs": {k: v.to_dict() for k, v in job.outputs.items()},
        "nodes": job.nodes, "created_at": job.created_at, "started_at": job.started_at,
        "finished_at": job.finished_at, "error": job.error, "waiting": job.waiting,
        "progress": {"done": job.done_count, "total": total},
        "shares": {names.get(pid, pid): round(f, 4) for pid, f in job.shares().items()},
        "stats": job.stats,
    }


def terminal_states() -> Iterable[str]:
    return [s.value for s in JobState if s.terminal]
