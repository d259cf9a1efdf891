"""What the head's state machine holds: providers, jobs and their subtasks (plain data)."""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from common.jobs import JobState, Progress
from common.protocol import ProviderHello
from common.tasks import ArrayMeta, Planner, ProviderSpec

log = logging.getLogger("dcf.head")

#: what a provider said of itself when it registered (checked by the wire module)
ProviderInfo = ProviderHello

#: subtasks of at least this many flops update a provider's measured throughput
MEASURABLE_FLOPS = 2e8
#: weight of the newest measurement in that running average
SPEED_WEIGHT = 0.5
#: bounds of a believable throughput (a bogus elapsed_s must not break the splits)
MIN_GFLOPS, MAX_GFLOPS = 1e-3, 1e7
#: how far a provider's own claim of speed (its benchmark) is believed before a measurement: at most this many
#: times the fastest other provider's known speed (``ClusterState._claim_caps``); a first measurement this many
#: times below the claim replaces it instead of being averaged with it
CLAIM_TRUST = 4.0

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


class SubState(str, enum.Enum):
    PENDING = "pending"  # waiting for a provider
    SENT = "sent"  # published, not yet acknowledged
    RUNNING = "running"  # acknowledged by the provider
    DONE = "done"
    ABANDONED = "abandoned"  # a member of a collective group that lost a member: stopped, never merged

    @property
    def settled(self) -> bool:
        """Done or abandoned: no longer out, and never out again."""
        return self in (SubState.DONE, SubState.ABANDONED)


class Assignments:
    """The (job id, subtask index) pairs out on one provider, each with the seconds of work it was
    reckoned at when sent, and their sum kept as they come and go (no pass over them to ask it)."""

    def __init__(self) -> None:
        self._seconds: dict[tuple[str, int], float] = {}
        self.seconds = 0.0

    def add(self, key: tuple[str, int], seconds: float = 0.0) -> None:
        self.discard(key)
        self._seconds[key] = seconds
        self.seconds += seconds

    def discard(self, key: tuple[str, int]) -> None:
        gone = self._seconds.pop(key, None)
        if gone is not None:
            self.seconds = max(0.0, self.seconds - gone) if self._seconds else 0.0

    def clear(self) -> None:
        self._seconds.clear()
        self.seconds = 0.0

    def __contains__(self, key: object) -> bool:
        return key in self._seconds

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return iter(list(self._seconds))

    def __len__(self) -> int:
        return len(self._seconds)

    def __bool__(self) -> bool:
        return bool(self._seconds)


@dataclass
class Stopping:
    """A subtask of an ended job (or a beaten copy) the provider was told to stop: it stays in the
    provider's assignments until the provider says it stopped (``cancelled``, a late result or failure, or
    a heartbeat that no longer lists it), or until ``until`` (a provider that ignores the cancel)."""

    since: float
    until: float
    told: float  # when the cancel was last sent (a heartbeat that still lists it sends it again)


@dataclass(frozen=True)
class Lag:
    """A straggler of a provider that has finished nothing since: which (job id, subtask index), when it
    had it (its ack), when it was flagged, and what it costs (to learn the provider's speed from, if it
    turns out stuck)."""

    key: tuple[str, int]
    since: float
    flagged: float
    cost: float
    task_type: str


@dataclass
class Provider:
    info: ProviderInfo
    last_seen: float
    subscribed: bool = False
    alive: bool = True
    local: bool = False  # shares the head's state dir: subtasks go by file reference
    draining: bool = False  # finishes what it has, gets nothing new
    #: when its task connection closed (XPUB unsubscribe) while it was alive; None while connected. Not
    #: subscribed again within the disconnect grace, it is declared lost
    disconnected_at: float | None = None
    assigned: Assignments = field(default_factory=lambda: Assignments())
    #: (job id, subtask index) of ``assigned`` it was told to stop
    stopping: dict[tuple[str, int], Stopping] = field(default_factory=dict)
    subtasks_done: int = 0
    flops_done: float = 0.0
    #: throughput learned from finished subtasks, per task type (the benchmark is the prior)
    speed: dict[str, float] = field(default_factory=dict)
    #: when the head last heard this provider finish a subtask (a result, accepted or not, or a
    #: failure): a subtask sent while the provider was busy starts about then (FIFO)
    last_result_at: float = 0.0
    #: the task type whose throughput was learned last (what the provider table shows)
    last_learned: str | None = None
    #: when the head last heard from it on the result channel (an ack, result, failure, progress or
    #: cancelled of this head's run): a missed ack counts against the channel only if nothing came since
    last_report_at: float = 0.0
    #: acks missed in a row with nothing heard on the result channel meanwhile (reset by any report)
    missed_acks: int = 0
    #: its result channel looks black-holed (``Timing.unhealthy_after`` missed acks): no new work until
    #: ``retry_at``, then one subtask on probation; any report from it makes it healthy again
    unhealthy: bool = False
    probation: bool = False  # tried again after being unhealthy: one subtask at a time until it reports
    retry_at: float = 0.0
    retry_wait: float = 0.0  # the last wait before a probation (doubles each time it fails again)
    #: the next heartbeat reply asks it to open its task and result connections anew (``reconnect``)
    reconnect_due: bool = False
    #: its wait is over: 1, asked to reconnect once more (so the probe goes over fresh connections);
    #: 2, that reply went out; its next heartbeat (it reconnected before sending it) starts the probation
    probe_stage: int = 0
    #: its oldest straggler while it finishes nothing (cleared by a result, failure or cancelled)
    lag: Lag | None = None
    #: when it became stuck: a straggler and nothing finished for twice as long as it took to flag it (at
    #: least ``Timing.stuck_min``), while its heartbeats say it still holds work. No new work until it
    #: finishes something or says it holds nothing
    stuck_since: float | None = None
    #: why it is quarantined (it sent a wrong result: ``ClusterState.quarantine``); None: trusted. No work, its
    #: results ignored, until an operator clears it
    quarantined: str | None = None
    #: the CURVE public key it registered with ("" without CURVE)
    key: str = ""
    #: subtasks waiting in its local queue, as its last heartbeat said
    queued: int = 0
    #: entries of its last heartbeat's ``running`` (queued or running), where the head read it; None: not read
    held: int | None = None
    #: task type -> the last ``spec`` made for it, reused while the speed it counts is the same (``info`` is fixed:
    #: a registration makes a new Provider). A scheduling pass asks for every ready provider's spec, per job
    _specs: dict[str, ProviderSpec] = field(default_factory=dict, repr=False, compare=False)

    @property
    def ready(self) -> bool:
        return (self.alive and self.subscribed and not self.draining and not self.unhealthy
                and self.stuck_since is None and self.quarantined is None)

    @property
    def state(self) -> str:
        if not self.alive:
            return "dead"
        if self.quarantined is not None:
            return "quarantined"
        if self.draining:
            return "draining"
        if self.unhealthy:
            return "unhealthy"
        if self.stuck_since is not None:
            return "stuck"
        return "ready" if self.subscribed else "connecting"

    def gflops(self, task_type: str) -> float:
        return self.speed.get(task_type, self.info.gflops)

    def measured(self, task_type: str) -> bool:
        """Whether its speed for this task type was learned (not only its own claim)."""
        return task_type in self.speed

    def spec(self, task_type: str, cap: float | None = None) -> ProviderSpec:
        """What a planner sees of it; ``cap``: the most its speed may count for (an unmeasured claim)."""
        info = self.info
        speed = self.gflops(task_type) if cap is None else min(cap, self.gflops(task_type))
        made = self._specs.get(task_type)
        if made is not None and made.gflops == speed:  # its info is fixed: a registration makes a new Provider
            return made
        made = self._specs[task_type] = ProviderSpec(info.provider_id, speed, info.memory_bytes, info.device_kind,
                                                     info.dtypes, info.datasets, info.collectives)
        return made

    def learn(self, task_type: str, flops: float, elapsed: float) -> None:
        """Fold one finished subtask into the throughput estimate for its task type: ``elapsed``
        is the seconds it cost this provider end to end (``service_seconds``), not only compute."""
        if flops < MEASURABLE_FLOPS or elapsed <= 0:
            return
        measured = min(MAX_GFLOPS, max(MIN_GFLOPS, flops / elapsed / 1e9))
        if not self.measured(task_type) and measured * CLAIM_TRUST < self.info.gflops:  # its claim: not believed
            self.speed[task_type] = measured
        else:
            self.speed[task_type] = (1 - SPEED_WEIGHT) * self.gflops(task_type) + SPEED_WEIGHT * measured
        self.last_learned = task_type

    def load(self) -> float:
        """Seconds of work assigned and not yet finished, at the throughput known when it was sent."""
        return self.assigned.seconds


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
    #: the provider it straggled on: while the current attempt is still that one (no idle provider took a
    #: copy when it was flagged), a copy is tried again on every tick
    straggled_on: str | None = None
    #: provider id -> the fraction of this subtask it reported done (its flops are counted as it goes)
    reported: dict[str, float] = field(default_factory=dict)
    group: str | None = None  # members of one collective (``SubtaskPlan.group``): they live and die together
    unfit_since: float | None = None  # pending, and no ready provider could take it, since then
    #: selected for verification (``--verify-rate``): its result is merged only once two providers' results agree
    verify: bool = False
    #: the providers whose results of it the head holds (not merged: they did not agree), in the order they came;
    #: it is never sent to one of them again
    witnesses: list[str] = field(default_factory=list)
    #: the provider whose result the head is comparing with the witnesses' (between ``CompareResult`` and
    #: ``ResultsCompared``, within one call of the I/O layer): it is not sent anywhere meanwhile
    comparing: str | None = None


@dataclass
class Job:
    job_id: str
    task_type: str
    params: dict[str, Any]
    inputs: dict[str, ArrayMeta]
    outputs: dict[str, ArrayMeta]
    nodes: int | None
    created_at: float
    planner: Planner  # built by the head when the job is delivered (TaskType.planner)
    state: JobState = JobState.QUEUED
    subtasks: list[Subtask] = field(default_factory=list)
    started_at: float | None = None  # wall clock (shown to users, stored in its row)
    finished_at: float | None = None  # wall clock
    #: the same two moments on the state machine's (monotonic) clock: durations, and what planners get
    started_t: float | None = None
    finished_t: float | None = None
    error: str | None = None
    waiting: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    done_count: int = 0  # subtasks settled: DONE or ABANDONED (neither is ever left)
    selected: int = 0  # subtasks selected for verification (``--verify-rate``)
    verified: int = 0  # of those, the ones whose result two providers agreed on
    disagreements: int = 0  # results that agreed with none of the results held of their subtask
    #: subtask index -> units of progress its providers reported of it while it runs (not yet merged)
    partial: dict[int, float] = field(default_factory=dict)

    def progress(self) -> Progress:
        """The job's one progress: its planner's count of merged results plus what providers reported
        of running subtasks, in the planner's unit. A task type's bug there falls back to subtasks."""
        try:
            done, total = self.planner.progress()
            done, total = int(done), int(total)
            if self.partial:
                done = min(total, done + int(sum(self.partial.values())))
            return Progress(done, total, str(self.planner.progress_unit))
        except Exception:
            log.exception("the planner's progress failed", extra={"job_id": self.job_id})
            return Progress(self.done_count, len(self.subtasks), "subtasks")

    def summary(self) -> dict[str, Any]:
        """The planner's stats, and those of its verification (``verification``); a task type's bug there loses the
        planner's stats, never the job's outcome."""
        try:
            return {**self.planner.summary(), **self.verification()}
        except Exception:
            log.exception("the planner's summary failed", extra={"job_id": self.job_id})
            return self.verification()

    def verification(self) -> dict[str, Any]:
        """``{"verify": ...}`` for a job with subtasks selected by ``--verify-rate``: how many were (``selected``),
        how many were verified (two providers agreed), and how many results agreed with no other; else {}."""
        if not self.selected:
            return {}
        return {"verify": {"method": "replicas", "selected": self.selected, "verified": self.verified,
                           "disagreements": self.disagreements}}

    def shares(self) -> dict[str, float]:
        """provider id -> fraction of the job's work (by cost) it computed."""
        total = sum(s.cost for s in self.subtasks) or 1.0
        out: dict[str, float] = {}
        for s in self.subtasks:
            if s.done_by:
                out[s.done_by] = out.get(s.done_by, 0.0) + s.cost / total
        return out


