"""The head's state machine: providers, jobs, subtasks. No I/O, no clock, no threads.

Time comes in with each stimulus: ``now`` on a monotonic clock (every timer: heartbeats, the disconnect
grace, ack timeouts, deadlines, stragglers, learned speeds; a step of the wall clock moves none of them),
and ``wall``, the wall clock at the same moment, only stamped on what users see (a job's ``started_at`` and
``finished_at``).

Every change goes through ``ClusterState.handle(stimulus, now)``, which returns the actions
(head_node/stimuli.py) for the I/O layer to carry out: send a subtask, merge a result, finish or
fail a job, write what a planner asked for. It never names a task type: every job is driven by its
planner (common/tasks/base.py). Being pure, it is unit-tested without sockets.

Reliability rules held here:
  * a provider is *ready* only when registered, subscribed to its topic (the head saw
    the XPUB subscription: no slow-joiner loss) and alive (heartbeat within 3 intervals);
  * a provider is *lost* (its unfinished subtasks re-queued, no strike) when it is silent for 3
    heartbeat intervals (hung, cut off), or when its task connection closed (``ProviderDisconnected``:
    the process died, the link broke) and it did not subscribe again within ``disconnect_grace``
    (a reconnect, or a provider reopening its sockets, does);
  * a subtask sent but not acknowledged within ``ack_timeout`` is sent again; a provider that misses
    ``unhealthy_after`` acks in a row with nothing heard from it on the result channel (its results
    cannot reach the head while its heartbeats can) is *unhealthy*: no new work, its next heartbeat reply
    asks it to open its connections anew, and after a wait (doubling) it gets one subtask on probation;
    any report from it on the result channel makes it healthy again;
  * a provider with a straggler that has finished nothing since (its compute looks stuck while its
    heartbeats go on) is *stuck*: no new work, its subtasks are copied to idle providers, its speed is
    learned from how long the straggler has run, until it finishes something or says it holds nothing;
  * a subtask not finished by its deadline, or whose provider died, goes to another;
  * a result is accepted once per subtask, only for an attempt that was issued in this
    head incarnation (run); later or duplicate results are ignored (idempotent);
  * a provider that sends a wrong result (one that fails its planner's check of its values: ``WrongResult``,
    ``WrongResultCaught``) is *quarantined*: no more work, what it holds is taken back (told to stop, run
    elsewhere, no strike), its later results are ignored, and it stays so (by id, and by CURVE key) until
    an operator clears it (``QuarantineCleared``), also across its re-registrations;
  * an unmeasured provider's own claim of speed counts for at most ``CLAIM_TRUST`` (4) times the fastest
    other provider's known speed (``_claim_caps``), and a first measurement that far below the claim
    replaces it (``Provider.learn``): a false claim takes one job's share, not every job's;
  * the members of a collective group (``SubtaskPlan.group``: one torch.distributed process group) are
    never moved or copied: when one is lost, fails or misses its ack or deadline, every member is
    stopped and settled as ABANDONED, and the planner plans that work again (``Planner.abandoned``);
  * with ``--verify-rate p`` (``Verification``), a fraction p of the subtasks without a check of their values
    (``Planner.checks_values`` False, no group) is selected, unpredictably to providers, when planned. Such a
    subtask's first result is held, not merged (``HoldResult``: the I/O layer keeps its arrays), and the subtask
    goes to another provider, never to one whose result is held (its *witnesses*); the next result is compared
    with the held ones (``CompareResult``, then ``ResultsCompared``): agreeing with one, it is merged, and every
    witness it disagreed with, outvoted two to one, is quarantined; agreeing with none, it is held too and a
    further provider decides, up to ``MAX_WITNESSES`` results, when the job fails. A job never merges a result
    of such a subtask that no second provider agreed with; it waits (and says so) for a provider to check it.

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

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from functools import partial
from typing import Any

from common import config, tasks
from common.errors import Conflict, DcfError, NotFound
from common.jobs import JobState
from common.tasks import ArrayMeta, ProviderSpec, SubtaskPlan

from .entities import CLAIM_TRUST, Job, Lag, Provider, ProviderInfo, Stopping, SubState, Subtask, service_seconds
from .stimuli import (
    DISCONNECTED,
    LEFT,
    SILENT,
    Action,
    AskReconnect,
    CancelRequested,
    CompareResult,
    Dispatch,
    DrainRequested,
    GroupAbandoned,
    HeartbeatReceived,
    HoldResult,
    JobAdded,
    JobCancelled,
    JobFailed,
    JobFailRequested,
    JobFinished,
    JobForgotten,
    JobStarted,
    MergeResult,
    PlannerEffects,
    ProviderDisconnected,
    ProviderHealthy,
    ProviderLeft,
    ProviderLost,
    ProviderQuarantined,
    ProviderRegistered,
    ProviderStuck,
    ProviderUnhealthy,
    QuarantineCleared,
    RegisterAgain,
    Reschedule,
    ResultDisagreed,
    ResultMerged,
    ResultReceived,
    ResultsCompared,
    Stimulus,
    StopSubtasks,
    Straggler,
    SubscriptionChanged,
    SubtaskAcked,
    SubtaskCancelled,
    SubtaskFailed,
    SubtaskProgress,
    SubtaskReport,
    Tick,
    WrongResultCaught,
)

__all__ = ["Action", "ClusterState", "Dispatch", "Job", "JobFailed", "JobFinished", "JobStarted", "JobState",
           "ProviderInfo", "ProviderLost", "SubState", "Subtask", "Timing", "Verification", "service_seconds"]


#: quarantine entries kept (``ClusterState.quarantine``): the oldest go first
MAX_QUARANTINED = 10_000
#: results of one verified subtask held, no two agreeing, before its job fails (``--verify-rate``)
MAX_WITNESSES = 4


def _head_default(name: str) -> Any:
    """The head option table's default (common/config.py states each default once)."""
    return config.option(config.HEAD_OPTIONS, name).default


@dataclass(frozen=True)
class Timing:
    heartbeat_interval: float = _head_default("heartbeat_interval")
    missed_heartbeats: int = config.MISSED_HEARTBEATS
    ack_timeout: float = _head_default("ack_timeout")
    min_deadline: float = _head_default("min_deadline")
    deadline_factor: float = 10.0
    max_attempts: int = _head_default("max_attempts")
    straggler_factor: float = 3.0  # running 3x longer than its provider's queue predicts...
    straggler_min: float = 2.0  # ...and at least this many seconds: a straggler
    forget_after: float = 600.0  # a provider dead this long leaves the provider table
    disconnect_grace: float = config.DISCONNECT_GRACE  # task connection closed this long: lost
    unhealthy_after: int = 2  # acks missed in a row, nothing heard on the result channel: unhealthy
    retry_max: float = 120.0  # the longest wait of an unhealthy provider before its probation
    stuck_min: float = 5.0  # a straggler's provider finished nothing this long (at least): stuck
    #: ticks come several times a heartbeat interval (the head's tick loop): one that came later than an interval
    #: is the head's own pause (``ClusterState._catching_up``). Off where time jumps from tick to tick (tests)
    detect_pauses: bool = False

    @property
    def dead_after(self) -> float:
        return self.heartbeat_interval * self.missed_heartbeats

    @classmethod
    def of(cls, settings: config.HeadSettings) -> Timing:
        """From the head's settings: every field the settings have (same names) is taken from them."""
        return cls(**{f.name: getattr(settings, f.name) for f in fields(cls) if hasattr(settings, f.name)},
                   detect_pauses=True)


@dataclass(frozen=True)
class Verification:
    """``--verify-rate``: the fraction of the subtasks without a check of their values that also run on a second
    provider, and the head's secret that picks them. A subtask (job id, index) is selected iff
    ``blake2b(job id:index, key=secret) / 2**64 < rate``: a pure function (a test replays it), and unpredictable
    to a provider, which never sees the secret (the head draws it from the OS at start)."""

    rate: float = _head_default("verify_rate")
    secret: bytes = b""

    def selects(self, job_id: str, index: int) -> bool:
        if self.rate <= 0.0:
            return False
        if self.rate >= 1.0:
            return True
        digest = hashlib.blake2b(f"{job_id}:{index}".encode(), key=self.secret, digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2**64 < self.rate


class ClusterState:
    def __init__(self, incarnation: str, timing: Timing | None = None,
                 verification: Verification | None = None) -> None:
        self.incarnation = incarnation
        self.timing = timing or Timing()
        self.verification = verification or Verification()
        self.providers: dict[str, Provider] = {}
        self.jobs: dict[str, Job] = {}
        self.subscribed_topics: set[str] = set()
        #: providers caught sending wrong results: "id:<provider id>" and "key:<CURVE key>" -> why. It outlives
        #: the provider's registrations (and the head: the I/O layer stores and reloads it)
        self.quarantine: dict[str, str] = {}
        self._wall = 0.0  # the wall clock of the stimulus being handled (``handle``)
        self.counters: dict[str, int] = {
            "subtasks_dispatched": 0, "subtasks_completed": 0, "subtasks_failed": 0,
            "subtasks_retried": 0, "subtasks_speculative": 0, "results_ignored": 0, "providers_lost": 0,
            "subtasks_stopped": 0,  # stopped by their provider after a cancel (``cancelled``), not finished
            "groups_abandoned": 0,  # collective groups that lost a member (their work is planned again)
            "providers_unhealthy": 0,  # marked unhealthy: acks missed in a row, result channel silent
            "providers_stuck": 0,  # marked stuck: a straggler, nothing finished since
            "providers_quarantined": 0,  # caught sending a wrong result: no work until an operator clears it
            "results_wrong": 0,  # results that failed their planner's check of their values
            "results_verified": 0,  # subtasks selected by --verify-rate whose result two providers agreed on
            "results_disagreed": 0,  # results of such a subtask that agreed with none held of it
            "results_outvoted": 0,  # held results that two agreeing providers outvoted (their providers quarantined)
            "head_pauses": 0,  # ticks that came more than a heartbeat interval late (``_catching_up``)
        }
        self._last_tick: float | None = None  # the time of the last tick, and the end of a catch-up after a pause
        self._catch_up_until = 0.0
        self._judged_since_pause = True

    # ---- the one entry -------------------------------------------------------------------
    def handle(self, stimulus: Stimulus, now: float, wall: float | None = None) -> list[Action]:
        """Apply one stimulus at time ``now`` (a monotonic clock: every timer runs on it); ``wall`` is the
        wall clock at that moment (default ``now``), only stamped on a job's ``started_at`` and
        ``finished_at``. Return what the I/O layer must do. Requests that cannot be granted (cancel a
        finished job, drain an unknown provider) raise a DcfError."""
        self._wall = now if wall is None else wall
        handler: Callable[[Any, float], list[Action]] = getattr(self, _HANDLERS[type(stimulus)])
        return handler(stimulus, now)

    # ---- providers ---------------------------------------------------------------------
    def _on_registered(self, ev: ProviderRegistered, now: float) -> list[Action]:
        info = ev.info
        old = self.providers.get(info.provider_id)
        prov = Provider(info, last_seen=now,
                        subscribed=info.provider_id in self.subscribed_topics, key=ev.key)
        prov.quarantined = self._quarantined_as(info.provider_id, ev.key)
        if old is not None:
            prov.draining = old.draining
            prov.assigned = old.assigned
            prov.stopping = old.stopping
            prov.subtasks_done = old.subtasks_done
            prov.flops_done = old.flops_done
            prov.last_result_at = old.last_result_at
            if old.alive:  # registering says nothing of its result channel or its compute
                for name in ("last_report_at", "missed_acks", "unhealthy", "probation", "retry_at", "retry_wait",
                             "reconnect_due", "probe_stage", "lag", "stuck_since", "queued", "held"):
                    setattr(prov, name, getattr(old, name))
        self.providers[info.provider_id] = prov
        return self._schedule(now)

    def _on_heartbeat(self, ev: HeartbeatReceived, now: float) -> list[Action]:
        prov = self.providers.get(ev.provider_id)
        if prov is None or not prov.alive:
            return [RegisterAgain(ev.provider_id)]
        prov.last_seen = now
        prov.local = ev.local
        actions: list[Action] = []
        if ev.queued is not None:
            prov.queued = ev.queued
        prov.held = None if ev.running is None else len(ev.running)
        if prov.unhealthy and prov.probe_stage == 2:  # it opened its connections anew after our last reply
            prov.unhealthy, prov.probation, prov.probe_stage = False, True, 0
        if prov.reconnect_due:
            prov.reconnect_due = False
            actions.append(AskReconnect(prov.info.provider_id))
            if prov.probe_stage == 1:
                prov.probe_stage = 2
        if ev.running is not None and prov.stopping:
            actions += self._reconcile(prov, ev.running, now)
        if prov.stuck_since is not None and ev.running is not None and not ev.running and ev.queued == 0:
            actions += self._unstuck(prov)  # it says it holds nothing: whatever it ran has ended
        return actions

    def _reconcile(self, prov: Provider, running: frozenset[str], now: float) -> list[Action]:
        """A heartbeat lists what the provider holds: a subtask it was told to stop and no longer lists has
        stopped (a heartbeat sent before the cancel arrived does not count: only one a heartbeat interval
        later); one it still lists is told again (the cancel may have been lost, PUB drops)."""
        actions: list[Action] = []
        wait = self.timing.heartbeat_interval
        for key, stop in list(prov.stopping.items()):
            if f"{key[0]}:{key[1]}" in running:
                if now - stop.told >= wait:
                    stop.told = now
                    actions.append(StopSubtasks(prov.info.provider_id, key[0], key[1]))
            elif now - stop.since >= wait:
                self._stopped(prov, key)
        return actions

    def _stop(self, provider_id: str, job: Job, sub: Subtask, now: float) -> bool:
        """Mark the provider's copy of ``sub`` as being stopped (it stays assigned until it stops); False if
        the provider holds none."""
        prov = self.providers.get(provider_id)
        key = (job.job_id, sub.index)
        if prov is None or key not in prov.assigned:
            return False
        if not prov.alive:
            prov.assigned.discard(key)
            return False
        grace = max(self.timing.ack_timeout, self.timing.dead_after)
        until = max(now + grace, sub.deadline if sub.state is SubState.RUNNING else 0.0)
        prov.stopping[key] = Stopping(since=now, until=until, told=now)
        return True

    @staticmethod
    def _stopped(prov: Provider, key: tuple[str, int]) -> bool:
        """The provider no longer holds a subtask it was told to stop: it is free of it."""
        if prov.stopping.pop(key, None) is None:
            return False
        prov.assigned.discard(key)
        return True

    def _heard(self, ev: SubtaskReport, now: float, finished: bool = False) -> list[Action]:
        """Word from a provider on the result channel (of this head's run): the channel works, so an
        unhealthy provider is healthy again; ``finished``: it finished (or stopped) a subtask, so its
        compute is not stuck."""
        prov = self.providers.get(ev.provider_id)
        if prov is None or not prov.alive or ev.incarnation != self.incarnation:
            return []
        prov.last_report_at = now
        prov.missed_acks = 0
        actions: list[Action] = []
        if prov.unhealthy or prov.probation:
            prov.unhealthy = prov.probation = prov.reconnect_due = False
            prov.retry_wait, prov.probe_stage = 0.0, 0
            actions.append(ProviderHealthy(ev.provider_id, "unhealthy"))
        if finished:
            prov.lag = None
            if prov.stuck_since is not None:
                actions += self._unstuck(prov)
        return actions

    @staticmethod
    def _unstuck(prov: Provider) -> list[Action]:
        prov.stuck_since = None
        prov.lag = None
        return [ProviderHealthy(prov.info.provider_id, "stuck")]

    def _check_stuck(self, prov: Provider, now: float) -> list[Action]:
        """A provider with a straggler that has finished nothing for twice as long as it took to flag it
        (at least ``stuck_min``), and whose last heartbeat says it still holds work, is stuck: it gets no
        new work, what it holds is copied to idle providers, and it is taken to be no faster than the
        straggler's cost over the time it has held it."""
        lag = prov.lag
        if lag is None or prov.stuck_since is not None or prov.last_result_at > lag.since:
            return []
        waited = now - lag.since
        if waited < max(self.timing.stuck_min, 2 * (lag.flagged - lag.since)) or not (prov.held or prov.queued):
            return []
        prov.stuck_since = now
        self.counters["providers_stuck"] += 1
        prov.learn(lag.task_type, lag.cost, waited)
        return [ProviderStuck(prov.info.provider_id, round(waited, 3), prov.queued)]

    def _report_stopped(self, ev: SubtaskReport) -> bool:
        """Any word from a provider about a subtask it was told to stop (cancelled, a result, a failure)
        means it no longer holds it."""
        prov = self.providers.get(ev.provider_id)
        if prov is None or not prov.stopping or ev.incarnation != self.incarnation:
            return False
        return self._stopped(prov, (ev.job_id, ev.subtask))

    def _on_subscription(self, ev: SubscriptionChanged, now: float) -> list[Action]:
        topic, subscribed = ev.topic, ev.subscribed
        if subscribed:
            self.subscribed_topics.add(topic)
        else:
            self.subscribed_topics.discard(topic)
        prov = self.providers.get(topic)
        if prov is None:
            return []
        prov.subscribed = subscribed
        if subscribed:
            prov.disconnected_at = None  # it came back (a reconnect): nothing is lost
        return self._schedule(now) if subscribed else []

    def _on_disconnected(self, ev: ProviderDisconnected, now: float) -> list[Action]:
        """Its task connection closed: not ready now; lost on the first tick past the grace unless it
        subscribes again first (``_on_tick``). Re-registering also clears it: only a live process does."""
        self.subscribed_topics.discard(ev.provider_id)
        prov = self.providers.get(ev.provider_id)
        if prov is None:
            return []
        prov.subscribed = False
        if prov.alive and prov.disconnected_at is None:
            prov.disconnected_at = now
        return []

    def _quarantined_as(self, provider_id: str, key: str) -> str | None:
        """Why this provider id or CURVE key is quarantined; None if neither is."""
        return self.quarantine.get(f"id:{provider_id}") or (self.quarantine.get(f"key:{key}") if key else None)

    def _on_wrong(self, ev: WrongResultCaught, now: float) -> list[Action]:
        """A wrong result: its provider is quarantined first (so the subtask, queued again without a strike,
        goes elsewhere), then the attempt is heard as failed."""
        self.counters["results_wrong"] += 1
        prov = self.providers.get(ev.provider_id)
        if prov is None or ev.incarnation != self.incarnation:
            return []
        reason = f"wrong result for job {ev.job_id[:8]} subtask {ev.subtask}: {ev.error}"
        actions = [] if prov.quarantined is not None else self._quarantine(prov, ev.job_id, ev.subtask, reason, now)
        actions += self._on_failed(SubtaskFailed(ev.provider_id, ev.job_id, ev.subtask, ev.attempt, ev.incarnation,
                                                 f"wrong result: {ev.error}", True), now)
        return actions + self._schedule(now)

    def _quarantine(self, prov: Provider, job_id: str, subtask: int, reason: str, now: float) -> list[Action]:
        """No more work for it: what it holds of running jobs is stopped and queued again (no strike: the
        subtask is not at fault) and will be run by others, and no result of it held to verify a subtask counts
        any more; it stays quarantined until cleared. ``job_id`` and ``subtask``: where it was caught."""
        pid = prov.info.provider_id
        reason = reason[:300]
        prov.quarantined = reason
        self._mark_quarantined(pid, prov.key, reason)
        actions: list[Action] = []
        taken = 0
        for held_job, index in sorted(prov.assigned):
            job = self.jobs.get(held_job)
            if job is None or job.state is not JobState.RUNNING or (held_job, index) in prov.stopping:
                continue
            sub = job.subtasks[index]
            if self._stop(pid, job, sub, now):
                actions.append(StopSubtasks(pid, held_job, index))
            if sub.provider_id == pid and sub.state in (SubState.SENT, SubState.RUNNING):
                if sub.group is not None:
                    actions += self._abandon(job, sub.group, now, f"member {pid[:8]} quarantined")
                else:
                    self._requeue(job, sub)
                taken += 1
        return [ProviderQuarantined(pid, job_id, subtask, reason, taken), *actions]

    def _quarantine_id(self, provider_id: str, job_id: str, subtask: int, reason: str, now: float) -> list[Action]:
        """Quarantine a provider by id, also one no longer in the provider table (it left after its result was
        held); nothing if it already is."""
        prov = self.providers.get(provider_id)
        if prov is not None:
            return [] if prov.quarantined is not None else self._quarantine(prov, job_id, subtask, reason, now)
        if f"id:{provider_id}" in self.quarantine:
            return []
        self._mark_quarantined(provider_id, "", reason[:300])
        return [ProviderQuarantined(provider_id, job_id, subtask, reason[:300], 0)]

    def _mark_quarantined(self, provider_id: str, key: str, reason: str) -> None:
        """The quarantine list holds it (by id and by CURVE key), and its held results witness nothing."""
        self.quarantine[f"id:{provider_id}"] = reason
        if key:
            self.quarantine[f"key:{key}"] = reason
        while len(self.quarantine) > MAX_QUARANTINED:  # bounded: liars under ever new ids (no CURVE)
            del self.quarantine[next(iter(self.quarantine))]
        self.counters["providers_quarantined"] += 1
        self._drop_witness(provider_id)

    def _drop_witness(self, provider_id: str) -> None:
        """A provider caught lying: its results held to verify subtasks are not believed (a held result is only a
        witness, never merged, so nothing merged needs redoing)."""
        for job in self.jobs.values():
            if job.state is not JobState.RUNNING or not job.selected:
                continue
            for sub in job.subtasks:
                if sub.verify and not sub.state.settled and provider_id in sub.witnesses:
                    sub.witnesses.remove(provider_id)

    def _on_clear(self, ev: QuarantineCleared, now: float) -> list[Action]:
        prov = self.providers.get(ev.provider_id)
        if prov is None:
            raise NotFound(f"no provider {ev.provider_id}")
        if prov.quarantined is None:
            raise Conflict(f"provider {ev.provider_id} is not quarantined")
        prov.quarantined = None
        self.quarantine.pop(f"id:{ev.provider_id}", None)
        if prov.key:
            self.quarantine.pop(f"key:{prov.key}", None)
        return self._schedule(now)

    def _on_drain(self, ev: DrainRequested, now: float) -> list[Action]:
        prov = self.providers.get(ev.provider_id)
        if prov is None:
            raise NotFound(f"no provider {ev.provider_id}")
        prov.draining = ev.draining
        return [] if ev.draining else self._schedule(now)

    def _on_left(self, ev: ProviderLeft, now: float) -> list[Action]:
        provider_id = ev.provider_id
        prov = self.providers.get(provider_id)
        if prov is None:
            return []
        actions = self._lose(provider_id, LEFT, now) if prov.alive else []
        del self.providers[provider_id]
        return actions + self._schedule(now)

    def _lose(self, provider_id: str, reason: str, now: float) -> list[Action]:
        prov = self.providers[provider_id]
        prov.alive = False
        prov.disconnected_at = None
        requeued = 0
        broken: list[tuple[Job, str]] = []  # collective groups it was a member of
        for job_id, index in sorted(prov.assigned):
            job = self.jobs.get(job_id)
            if job is None or job.state is not JobState.RUNNING:
                continue
            sub = job.subtasks[index]
            if sub.state.settled or sub.provider_id != provider_id:
                continue
            if sub.group is not None:
                broken.append((job, sub.group))
            else:
                self._requeue(job, sub)
            requeued += 1
        prov.assigned.clear()
        prov.stopping.clear()
        self.counters["providers_lost"] += 1
        actions: list[Action] = [ProviderLost(provider_id, requeued, reason)]
        for job, group in broken:
            if job.state is JobState.RUNNING:
                actions += self._abandon(job, group, now, f"provider {provider_id[:8]} lost ({reason})")
        return actions

    def _requeue(self, job: Job, sub: Subtask) -> None:
        sub.state = SubState.PENDING
        sub.provider_id = None
        sub.reported.clear()
        job.partial.pop(sub.index, None)
        self.counters["subtasks_retried"] += 1

    # ---- jobs --------------------------------------------------------------------------
    def _on_job_added(self, ev: JobAdded, now: float) -> list[Action]:
        if ev.job.job_id in self.jobs:
            return []
        self.jobs[ev.job.job_id] = ev.job
        # only the new job: what the others could not place, a new job does not free (a pass over
        # every job here would make each submission cost as much as all the jobs in flight)
        return self._guarded(ev.job, now, partial(self._schedule_job, ev.job, now))

    def _on_cancel(self, ev: CancelRequested, now: float) -> list[Action]:
        job = self.jobs.get(ev.job_id)
        if job is None:
            raise NotFound(f"no job {ev.job_id}")
        if job.state.terminal:
            raise Conflict(f"job {ev.job_id} is already {job.state.value}")
        stops = self._finish(job, JobState.CANCELLED, now, "cancelled by user")
        return [*stops, JobCancelled(job.job_id)]

    def _on_fail_requested(self, ev: JobFailRequested, now: float) -> list[Action]:
        job = self.jobs.get(ev.job_id)
        if job is None or job.state.terminal:
            return []
        return self._fail(job, now, ev.error)

    def _on_forgotten(self, ev: JobForgotten, now: float) -> list[Action]:
        self.jobs.pop(ev.job_id, None)
        if not ev.deleted:
            return []
        # deleted: whoever still holds a subtask of it is told once more
        return [StopSubtasks(pid, ev.job_id) for pid, prov in self.providers.items()
                if prov.alive and any(key[0] == ev.job_id for key in prov.stopping)]

    def _finish(self, job: Job, state: JobState, now: float, error: str | None = None) -> list[Action]:
        """The job ended: the providers holding its unfinished subtasks are told to stop them (they stay
        assigned until they did: ``assigned`` tells the truth)."""
        job.state = state
        job.finished_at = self._wall
        job.finished_t = now
        job.error = error
        told: set[str] = set()
        for sub in job.subtasks:
            if sub.state.settled:
                continue
            for pid in dict.fromkeys(sub.tried):
                if self._stop(pid, job, sub, now):
                    told.add(pid)
        return [StopSubtasks(pid, job.job_id) for pid in sorted(told)]

    # ---- subtask lifecycle ---------------------------------------------------------------
    def _live_subtask(self, ev: SubtaskReport) -> Subtask | None:
        """The subtask a report is about, if the head still wants to hear about that attempt."""
        if ev.incarnation != self.incarnation:
            return None
        job = self.jobs.get(ev.job_id)
        if job is None or job.state is not JobState.RUNNING or not 0 <= ev.subtask < len(job.subtasks):
            return None
        sub = job.subtasks[ev.subtask]
        if sub.state.settled or not 1 <= ev.attempt <= sub.attempt:
            return None
        return sub

    def _on_acked(self, ev: SubtaskAcked, now: float) -> list[Action]:
        heard = self._heard(ev, now)
        sub = self._live_subtask(ev)
        if sub is None or sub.provider_id != ev.provider_id or sub.attempt != ev.attempt:
            return heard
        if sub.state is SubState.SENT:
            sub.state = SubState.RUNNING
            prov = self.providers.get(ev.provider_id)
            # the provider's load includes this subtask and everything queued before it
            load = prov.load() if prov else 0.0
            sub.deadline = now + max(self.timing.min_deadline, self.timing.deadline_factor * load)
            sub.acked_at = now
            sub.straggle_at = now + max(self.timing.straggler_min, self.timing.straggler_factor * load)
        return heard

    def _finished_work(self, ev: SubtaskReport, now: float) -> None:
        """The provider says it is done with an attempt it was really sent (this incarnation), whether or
        not the head still wants the outcome: whatever it runs next starts about now."""
        job = self.jobs.get(ev.job_id)
        prov = self.providers.get(ev.provider_id)
        if (ev.incarnation != self.incarnation or job is None or prov is None
                or not 0 <= ev.subtask < len(job.subtasks)):
            return
        tried = job.subtasks[ev.subtask].tried
        if 1 <= ev.attempt <= len(tried) and tried[ev.attempt - 1] == ev.provider_id:
            prov.last_result_at = max(prov.last_result_at, now)

    def _on_result(self, ev: ResultReceived, now: float) -> list[Action]:
        """[MergeResult] if this result is the one to merge; for a subtask being verified (``Subtask.verify``),
        [HoldResult] for its first result and [CompareResult] for the next ones; [] if late, duplicate or unknown.

        ``elapsed`` is the compute time the provider reports; an accepted result teaches the head
        the provider's speed from the service time it observed (``service_seconds``), measured from
        when *this* attempt was sent (a speculative copy or a re-send elsewhere has its own time)."""
        provider_id, job_id, index, attempt = ev.provider_id, ev.job_id, ev.subtask, ev.attempt
        prov = self.providers.get(provider_id)
        free_at = prov.last_result_at if prov is not None else 0.0  # before this result moves it
        heard = self._heard(ev, now, finished=True)
        self._finished_work(ev, now)
        self._report_stopped(ev)
        sub = self._live_subtask(ev)
        if (sub is None or sub.tried[attempt - 1] != provider_id or (prov is not None and prov.quarantined)
                or provider_id in sub.witnesses or sub.comparing is not None):
            self.counters["results_ignored"] += 1  # late, duplicate, from a provider caught wrong, or held already
            return heard
        job = self.jobs[job_id]
        stops = self._took(job, sub, prov, ev, free_at, now)
        if not sub.verify:
            self._done(job, sub, provider_id)
            return [MergeResult(provider_id, job_id, index, attempt), *stops, *heard]
        sub.state, sub.provider_id, sub.straggling = SubState.PENDING, None, False  # held or compared: not merged
        if sub.witnesses:
            sub.comparing = provider_id
            return [CompareResult(provider_id, job_id, index, attempt, tuple(sub.witnesses)), *stops, *heard]
        sub.witnesses.append(provider_id)
        return [HoldResult(provider_id, job_id, index, attempt), *stops, *heard,
                *self._guarded(job, now, partial(self._assign_pending, job, now))]

    def _took(self, job: Job, sub: Subtask, prov: Provider | None, ev: ResultReceived, free_at: float,
              now: float) -> list[Action]:
        """A provider's result of a live attempt was taken (to merge, hold or compare): it is free of the subtask,
        the other copies out are told to stop, and its speed is learned. Returns the stops."""
        provider_id, job_id, index, attempt = ev.provider_id, ev.job_id, ev.subtask, ev.attempt
        stops: list[Action] = []
        for pid in dict.fromkeys(sub.tried):  # a speculative copy may be out on another provider: stop it
            if pid == provider_id:
                if prov is not None:
                    prov.assigned.discard((job_id, index))
            elif self._stop(pid, job, sub, now):
                stops.append(StopSubtasks(pid, job_id, index))
        job.partial.pop(index, None)
        if prov is not None:
            prov.subtasks_done += 1
            prov.flops_done += sub.cost * (1.0 - sub.reported.get(provider_id, 0.0))  # the rest of it
            sent_at = sub.sent[attempt - 1] if attempt <= len(sub.sent) else sub.sent_at
            seconds = service_seconds(ev.elapsed, sent_at, free_at, now)
            prov.learn(job.task_type, sub.cost, seconds)  # the next split uses it
        sub.reported.clear()
        return stops

    def _done(self, job: Job, sub: Subtask, provider_id: str) -> None:
        """The subtask's result from this provider is the one merged."""
        sub.state = SubState.DONE
        job.done_count += 1
        sub.done_by = provider_id
        self.counters["subtasks_completed"] += 1

    def _on_compared(self, ev: ResultsCompared, now: float) -> list[Action]:
        """The I/O layer compared a result with those held of its subtask (``CompareResult``). Agreeing with one,
        it is merged (``MergeResult``); agreeing with none, it is held too (``HoldResult``) and another provider
        decides. Witnesses the I/O layer did not compare (it holds no result of theirs) count for nothing."""
        job = self.jobs.get(ev.job_id)
        if job is None or job.state is not JobState.RUNNING or not 0 <= ev.subtask < len(job.subtasks):
            return []
        sub = job.subtasks[ev.subtask]
        if sub.comparing != ev.provider_id or sub.state.settled:
            return []
        sub.comparing = None
        verdicts = {w: why for w, why in ev.verdicts if w in sub.witnesses}
        sub.witnesses = [w for w in sub.witnesses if w in verdicts]
        agreed = next((w for w, why in verdicts.items() if why is None), None)
        if agreed is None:
            return self._disagreed(job, sub, ev, verdicts, now)
        return self._verified(job, sub, ev, agreed, verdicts, now)

    def _verified(self, job: Job, sub: Subtask, ev: ResultsCompared, agreed: str, verdicts: dict[str, str | None],
                  now: float) -> list[Action]:
        """Two providers agree: the subtask is done with the newer result, and each witness that disagreed with it,
        outvoted two to one, is quarantined."""
        self._done(job, sub, ev.provider_id)
        job.verified += 1
        self.counters["results_verified"] += 1
        actions: list[Action] = [MergeResult(ev.provider_id, ev.job_id, ev.subtask, ev.attempt)]
        outvoted = [(w, why) for w, why in verdicts.items() if why is not None]
        for witness, why in outvoted:
            self.counters["results_outvoted"] += 1
            reason = (f"outvoted for job {ev.job_id[:8]} subtask {ev.subtask}: its result disagrees with those of "
                      f"{self._name(agreed)} and {self._name(ev.provider_id)}, which agree: {why}")
            actions += self._quarantine_id(witness, ev.job_id, ev.subtask, reason, now)
        if outvoted:  # what the outvoted held goes elsewhere; this job ends, if it does, once its result is merged
            actions += self._schedule(now, but=job) + self._guarded(job, now, partial(self._assign_pending, job, now))
        return actions

    def _disagreed(self, job: Job, sub: Subtask, ev: ResultsCompared, verdicts: dict[str, str | None],
                   now: float) -> list[Action]:
        """No result held agrees with this one: it is held too, and the subtask goes to yet another provider; once
        ``MAX_WITNESSES`` results disagree, the job fails."""
        sub.witnesses.append(ev.provider_id)
        job.disagreements += 1
        self.counters["results_disagreed"] += 1
        why = "; ".join(f"against {self._name(w)}'s: {why}" for w, why in verdicts.items())
        told = ResultDisagreed(ev.provider_id, ev.job_id, ev.subtask, tuple(verdicts), why)
        if len(sub.witnesses) >= MAX_WITNESSES:
            names = ", ".join(self._name(w) for w in sub.witnesses)
            return [told, *self._fail(job, now, f"subtask {sub.index}: the results of providers {names} all "
                                                f"disagree (--verify-rate); {why}"[:1000])]
        return [HoldResult(ev.provider_id, ev.job_id, ev.subtask, ev.attempt), told,
                *self._guarded(job, now, partial(self._assign_pending, job, now))]

    def _name(self, provider_id: str) -> str:
        """A provider's name, for messages (its id's first 8 characters once it left)."""
        prov = self.providers.get(provider_id)
        return prov.info.name if prov is not None else provider_id[:8]

    def _on_merged(self, ev: ResultMerged, now: float) -> list[Action]:
        job = self.jobs.get(ev.job_id)
        if job is None or job.state is not JobState.RUNNING:
            return []
        return self._guarded(job, now, partial(self._advance, job, now))

    def _advance(self, job: Job, now: float) -> list[Action]:
        """Ask the job's planner for more work; finish the job when it has none and nothing is out."""
        actions: list[Action] = []
        outstanding = len(job.subtasks) - job.done_count
        if not job.planner.finished:
            providers, why = self.eligible_providers(job)
            job.waiting = why
            if providers or job.planner.waiting():  # a waiting planner is asked with none too: it may time out
                try:
                    plans = job.planner.plan(providers[: job.nodes] if job.nodes else providers, outstanding, now)
                    effects = tuple(job.planner.effects())
                    if not plans and providers:  # a planner waiting for something (a start barrier) says what
                        job.waiting = job.planner.waiting()
                except DcfError as exc:
                    return self._fail(job, now, exc.message)
                except Exception as exc:  # a plugin's bug fails its job, not the scheduler
                    return self._fail(job, now, f"task type {job.task_type} could not plan the job: "
                                                f"{type(exc).__name__}: {exc}")
                if effects:
                    actions.append(PlannerEffects(job.job_id, effects))
                actions += self._add_subtasks(job, plans, now)
                outstanding += len(plans)
        if outstanding == 0 and job.planner.finished:
            actions += self._finish(job, JobState.DONE, now)
            actions.append(JobFinished(job.job_id))
        return actions

    def _add_subtasks(self, job: Job, plans: Sequence[SubtaskPlan], now: float) -> list[Action]:
        actions: list[Action] = []
        for p in plans:
            sub = Subtask(len(job.subtasks), p.params, p.cost, group=p.group,
                          verify=self._selected(job, len(job.subtasks), p))
            job.selected += sub.verify
            job.subtasks.append(sub)
            actions.append(self._send(job, sub, p.provider_id, now))
        return actions

    def _selected(self, job: Job, index: int, plan: SubtaskPlan) -> bool:
        """Whether ``--verify-rate`` picks this new subtask: one without a check of its values (its planner's
        ``checks_values``), not a collective's member, that its planner lets a second provider run."""
        if self.verification.rate <= 0.0 or plan.group is not None or job.planner.checks_values:
            return False
        return job.planner.verifiable(plan.params) and self.verification.selects(job.job_id, index)

    def _on_failed(self, ev: SubtaskFailed, now: float) -> list[Action]:
        heard = self._heard(ev, now, finished=True)
        self._finished_work(ev, now)
        self._report_stopped(ev)
        sub = self._live_subtask(ev)
        if (sub is None or sub.attempt != ev.attempt or sub.tried[ev.attempt - 1] != ev.provider_id
                or sub.state is SubState.PENDING):
            return heard
        self.counters["subtasks_failed"] += 1
        job = self.jobs[ev.job_id]
        prov = self.providers.get(ev.provider_id)
        if prov is not None:  # it is done with this one: not told to stop it below
            prov.assigned.discard((ev.job_id, ev.subtask))
        where = f"on provider {ev.provider_id[:8]}: {ev.error}"
        if not ev.retryable:
            return heard + self._fail(job, now, f"subtask {ev.subtask} failed {where}")
        return heard + self._strike(job, sub, now, f"failed {where}") + self._schedule(now)

    def _strike(self, job: Job, sub: Subtask, now: float, why: str) -> list[Action]:
        """Take a subtask back after a failure, a missed ack or a missed deadline; fail the job
        once it has struck out ``max_attempts`` times (so nothing is retried forever). A copy that missed
        its deadline is not told to stop: it may still finish first (its result is taken, PROTOCOL.md
        10.2), and the one result accepted stops the copies still held. A member of a collective group is
        not taken back alone: its group is abandoned (the planner counts and bounds those)."""
        if sub.group is not None:
            return self._abandon(job, sub.group, now, f"subtask {sub.index} {why}")
        self._release(job, sub)
        sub.strikes += 1
        if sub.strikes >= self.timing.max_attempts:
            return self._fail(job, now, f"subtask {sub.index} gave up after {sub.strikes} tries; last: {why}")
        return []

    def _abandon(self, job: Job, group: str, now: float, why: str) -> list[Action]:
        """A member of collective ``group`` is gone or failed: the others cannot finish without it. Every
        member still out is told to stop (it stays assigned until it did) and settles as ABANDONED, never
        merged; the planner hears why and plans the work again. A group with no member out (abandoned
        already, with the group it was chained to) is left alone."""
        actions = self._drop_group(job, group, now, why)
        if not actions:
            return []
        return actions + self._guarded(job, now, partial(self._regroup, job, group, why, now))

    def _drop_group(self, job: Job, group: str, now: float, why: str) -> list[Action]:
        """Stop and settle every member of ``group`` still out; nothing when none is."""
        actions: list[Action] = []
        out = [m for m in job.subtasks if m.group == group and not m.state.settled]
        for member in out:
            for pid in dict.fromkeys(member.tried):
                if self._stop(pid, job, member, now):
                    actions.append(StopSubtasks(pid, job.job_id, member.index))
            member.state = SubState.ABANDONED
            member.provider_id = None
            member.reported.clear()
            job.partial.pop(member.index, None)
            job.done_count += 1
        if not out:
            return []
        self.counters["groups_abandoned"] += 1
        actions.append(GroupAbandoned(job.job_id, group, why))
        return actions

    def _regroup(self, job: Job, group: str, why: str, now: float) -> list[Action]:
        """The planner hears of the abandoned group; the groups it drops with it (a round planned to start
        from the abandoned one's state) are abandoned too, then it is asked for work."""
        actions: list[Action] = []
        for other in job.planner.abandoned(group, why, now) or ():
            if other != group:
                actions += self._drop_group(job, other, now, f"it was to start from group {group}, abandoned: {why}")
        return actions + self._advance(job, now)

    def _fail(self, job: Job, now: float, error: str) -> list[Action]:
        stops = self._finish(job, JobState.FAILED, now, error)
        return [*stops, JobFailed(job.job_id, error)]

    def _on_progress(self, ev: SubtaskProgress, now: float) -> list[Action]:
        """A running subtask's provider reports how far it got: its flops count as they are done (the
        throughput moves during a long subtask) and the job's progress includes them."""
        heard = self._heard(ev, now)
        sub = self._live_subtask(ev)
        prov = self.providers.get(ev.provider_id)
        if (sub is None or prov is None or sub.tried[ev.attempt - 1] != ev.provider_id
                or (ev.job_id, ev.subtask) not in prov.assigned or ev.total <= 0):
            return heard
        fraction = min(1.0, max(0.0, ev.done / ev.total))
        before = sub.reported.get(ev.provider_id, 0.0)
        if fraction <= before:
            return heard
        sub.reported[ev.provider_id] = fraction
        prov.flops_done += sub.cost * (fraction - before)
        job = self.jobs[ev.job_id]
        try:
            units = float(job.planner.subtask_units(sub.params)) * fraction
        except Exception:  # a plugin's bug there costs the running subtask's share of the progress only
            units = 0.0
        if units > job.partial.get(ev.subtask, 0.0):
            job.partial[ev.subtask] = units
        return heard

    def _on_cancelled(self, ev: SubtaskCancelled, now: float) -> list[Action]:
        """A provider stopped a subtask it was told to stop: it is free of it. One it stopped unasked (a
        subtask the head still wants) is a retryable failure. Only the straggler itself stopping shows that
        its compute moves: a queued subtask is dropped by the provider's socket thread, stuck compute or not."""
        prov = self.providers.get(ev.provider_id)
        lag = prov.lag if prov is not None else None
        heard = self._heard(ev, now, finished=lag is not None and lag.key == (ev.job_id, ev.subtask))
        if self._report_stopped(ev):
            self.counters["subtasks_stopped"] += 1
            return heard
        return heard + self._on_failed(SubtaskFailed(ev.provider_id, ev.job_id, ev.subtask, ev.attempt,
                                                     ev.incarnation, "the provider stopped it", True), now)

    # ---- time ----------------------------------------------------------------------------
    def _catching_up(self, now: float) -> bool:
        """True for a heartbeat interval after a tick that came more than an interval late (ticks come several
        times an interval): no timeout is judged then. Such a gap is the head's own pause, not its providers'
        silence: its event loop was held up (a slow import holding the GIL, the machine swapping or overloaded),
        and what the providers sent meanwhile (heartbeats, acks, results) waits unread in its sockets. Judged
        at once, a pause longer than the timeouts would declare live providers lost and strike subtasks that
        were acknowledged; as Cassandra's failure detector ignores a local pause, the head first reads what
        came. A head whose every tick is late (overloaded for good) still judges: a catch-up is granted again
        only after a tick that judged."""
        last, self._last_tick = self._last_tick, now
        late = self.timing.detect_pauses and last is not None and now - last > self.timing.heartbeat_interval
        if late and self._judged_since_pause:
            self.counters["head_pauses"] += 1
            self._catch_up_until = now + self.timing.heartbeat_interval
            self._judged_since_pause = False
        if now < self._catch_up_until:
            return True
        self._judged_since_pause = True
        return False

    def _on_reschedule(self, ev: Reschedule, now: float) -> list[Action]:
        return self._schedule(now)

    def _on_tick(self, ev: Tick, now: float) -> list[Action]:
        actions: list[Action] = []
        if self._catching_up(now):
            return self._schedule(now)
        for pid, prov in list(self.providers.items()):
            gone = prov.disconnected_at
            if prov.alive and gone is not None and now - gone >= self.timing.disconnect_grace:
                actions += self._lose(pid, DISCONNECTED, now)
            elif prov.alive and now - prov.last_seen > self.timing.dead_after:
                actions += self._lose(pid, SILENT, now)
            elif not prov.alive and now - prov.last_seen > self.timing.forget_after:
                del self.providers[pid]  # bounded table; a late register brings it back
            elif prov.stopping:  # a provider that ignores cancels is taken at its word after a bound
                for key in [k for k, stop in prov.stopping.items() if now > stop.until]:
                    self._stopped(prov, key)
            if prov.alive and prov.unhealthy and now >= prov.retry_at and prov.probe_stage == 0:
                # its wait is over: once it has opened its connections anew, one subtask shows whether its
                # results come (the probation starts at its heartbeat after that reply, _on_heartbeat)
                prov.reconnect_due, prov.probe_stage = True, 1
            if prov.alive and prov.lag is not None:
                actions += self._check_stuck(prov, now)
        for job in self.jobs.values():
            if job.state is not JobState.RUNNING:
                continue
            for sub in job.subtasks:
                if job.state is not JobState.RUNNING:
                    break
                if sub.state is SubState.SENT and now - sub.sent_at > self.timing.ack_timeout:
                    actions += self._missed_ack(job, sub, now)
                    actions += self._strike(job, sub, now, "not acknowledged in time")
                elif sub.state is SubState.RUNNING and now > sub.deadline:
                    actions += self._strike(job, sub, now, "deadline passed")
                elif sub.state is not SubState.RUNNING or sub.group is not None:
                    continue  # a collective's member has no stand-in
                elif not sub.straggling and (now > sub.straggle_at or self._held_up(sub.provider_id)):
                    actions += self._guarded(job, now, partial(self._straggler, job, sub, now))
                elif sub.straggling and sub.provider_id == sub.straggled_on:  # no copy yet: try again
                    actions += self._guarded(job, now, partial(self._copy, job, sub, now))
        return actions + self._schedule(now)

    def _held_up(self, provider_id: str | None) -> bool:
        """Its results are not coming (unhealthy) or its compute is stuck: what it holds needs a copy now."""
        prov = self.providers.get(provider_id or "")
        return prov is not None and (prov.unhealthy or prov.stuck_since is not None)

    def _missed_ack(self, job: Job, sub: Subtask, now: float) -> list[Action]:
        """A subtask was not acknowledged in time. Counted against its provider's result channel only if
        nothing at all came from it there since it was sent (an ack lost on the task channel, the PUB
        dropping past its high-water mark, is not the result channel's fault); ``unhealthy_after`` in a row
        (one on probation) make it unhealthy."""
        prov = self.providers.get(sub.provider_id or "")
        if prov is None or not prov.alive or prov.last_report_at > sub.sent_at:
            return []
        prov.missed_acks += 1
        if prov.unhealthy or (prov.missed_acks < self.timing.unhealthy_after and not prov.probation):
            return []
        prov.unhealthy, prov.probation, prov.reconnect_due, prov.probe_stage = True, False, True, 0
        prov.retry_wait = min(self.timing.retry_max, 2 * prov.retry_wait if prov.retry_wait
                              else max(self.timing.ack_timeout, self.timing.dead_after))
        prov.retry_at = now + prov.retry_wait
        self.counters["providers_unhealthy"] += 1
        actions: list[Action] = [ProviderUnhealthy(prov.info.provider_id, prov.missed_acks, prov.retry_wait)]
        pid = prov.info.provider_id
        for job_id, index in sorted(prov.assigned):  # what else was sent to it will not be acked either
            other = self.jobs.get(job_id)
            if other is None or other.state is not JobState.RUNNING or (job_id, index) in prov.stopping:
                continue
            o = other.subtasks[index]
            if o is not sub and o.state is SubState.SENT and o.provider_id == pid and o.group is None:
                self._release(other, o)  # no strike: the channel, not the subtask, is at fault
        return actions

    def _straggler(self, job: Job, sub: Subtask, now: float) -> list[Action]:
        """Flag a straggler once and run a speculative copy on an idle provider, if there is one;
        the first result of either attempt is taken, the other is ignored."""
        sub.straggling = True
        slow = sub.provider_id or ""
        sub.straggled_on = slow
        prov = self.providers.get(slow)
        if (prov is not None and prov.alive and prov.lag is None and now > sub.straggle_at
                and not sub.reported.get(slow) and prov.last_result_at <= sub.acked_at):
            # no progress reported of it and nothing finished since it had it: it may be stuck (_check_stuck)
            prov.lag = Lag((job.job_id, sub.index), sub.acked_at, now, sub.cost, job.task_type)
        copy = self._copy(job, sub, now)
        copy_to = next((a.provider_id for a in copy if isinstance(a, Dispatch)), None)
        return [Straggler(job.job_id, sub.index, slow, round(now - sub.acked_at, 3), copy_to), *copy]

    def _copy(self, job: Job, sub: Subtask, now: float) -> list[Action]:
        """A speculative copy of a straggler on an idle provider (the fastest), if there is one."""
        slow = sub.provider_id or ""
        providers, _ = self.eligible_providers(job)
        task = tasks.get(job.task_type)
        idle = [w for w in providers if w.provider_id != slow and not self.providers[w.provider_id].assigned
                and w.provider_id not in sub.witnesses and task.fits(w, sub.params, job.inputs)]
        if not idle:
            return []
        self.counters["subtasks_speculative"] += 1
        return [self._send(job, sub, max(idle, key=lambda w: w.gflops).provider_id, now)]

    def _release(self, job: Job, sub: Subtask) -> None:
        prov = self.providers.get(sub.provider_id or "")
        if prov is not None and (job.job_id, sub.index) not in prov.stopping:  # a stopping one holds it still
            prov.assigned.discard((job.job_id, sub.index))
        if sub.state is not SubState.PENDING:
            self._requeue(job, sub)

    # ---- scheduling ----------------------------------------------------------------------
    def eligible_providers(self, job: Job) -> tuple[list[ProviderSpec], str | None]:
        providers, reasons = self._eligible(job.task_type, job.params, job.inputs)
        if providers:
            return providers, None
        if not reasons:
            return [], "waiting for providers: none is connected"
        return [], "waiting for a suitable provider: " + "; ".join(sorted(set(reasons)))

    def ready_for(self, task_type: str, params: Mapping[str, Any],
                  inputs: Mapping[str, ArrayMeta]) -> list[ProviderSpec]:
        """The ready providers a job of this type, params and inputs is eligible for, as its planner would see
        them (a query: it changes nothing)."""
        return self._eligible(task_type, params, inputs)[0]

    def _eligible(self, task_type: str, params: Mapping[str, Any],
                  inputs: Mapping[str, ArrayMeta]) -> tuple[list[ProviderSpec], list[str]]:
        """The ready providers eligible for such a job, in the order it goes to them, and why the others are not."""
        task = tasks.get(task_type)
        providers: list[ProviderSpec] = []
        reasons: list[str] = []
        caps = self._claim_caps(task_type)
        for prov in self.providers.values():
            if not prov.ready:
                if prov.alive and prov.subscribed and not prov.draining:  # unhealthy or stuck
                    reasons.append(f"{prov.info.name} is {prov.state}")
                continue
            if prov.probation and len(prov.assigned) > len(prov.stopping):  # tried again after being unhealthy:
                continue  # one subtask at a time (not counting those it was told to stop)
            if task_type not in prov.info.task_types:
                reasons.append(f"{prov.info.name} lacks task type {task_type}")
                continue
            provider = prov.spec(task_type, None if prov.measured(task_type) else caps(prov))
            why = task.eligible(provider, params, inputs)
            if why:
                reasons.append(why)
                continue
            providers.append(provider)
        providers.sort(key=self._order)
        return providers, reasons

    def _claim_caps(self, task_type: str) -> Callable[[Provider], float | None]:
        """The most an unmeasured provider's own claim of speed may count for: ``CLAIM_TRUST`` times the
        fastest known speed (learned, or claimed) of any other live provider; no cap when it is alone. A
        provider claiming 9e6 GFLOP/s beside honest ones at 50 then counts as 200 until its speed is measured,
        and its first measurement replaces the claim (``Provider.learn``)."""
        best: tuple[float, str] = (0.0, "")
        second = 0.0
        for prov in self.providers.values():
            if not prov.alive:
                continue
            speed = prov.gflops(task_type)
            if speed > best[0]:
                best, second = (speed, prov.info.provider_id), best[0]
            elif speed > second:
                second = speed
        def cap(prov: Provider) -> float | None:
            other = second if prov.info.provider_id == best[1] else best[0]
            return CLAIM_TRUST * other if other else None
        return cap

    def _order(self, w: ProviderSpec) -> tuple[float, int, float]:
        """Who a job goes to first: the least loaded (seconds of work out, to the millisecond), then the
        one with the fewest subtasks out (tiny jobs add no measurable load), then the fastest. On an idle
        pool that is fastest first; under a stream of small jobs they take turns."""
        prov = self.providers[w.provider_id]
        return round(prov.load(), 3), len(prov.assigned), -w.gflops

    def _schedule(self, now: float, but: Job | None = None) -> list[Action]:
        """A scheduling pass over every job (``but`` that one), the oldest first."""
        actions: list[Action] = []
        for job in sorted(self.jobs.values(), key=lambda j: j.created_at):
            if job is not but:
                actions += self._guarded(job, now, partial(self._schedule_job, job, now))
        return actions

    def _schedule_job(self, job: Job, now: float) -> list[Action]:
        actions: list[Action] = []
        if job.state is JobState.QUEUED:
            actions += self._start(job, now)
        if job.state is JobState.RUNNING:
            actions += self._assign_pending(job, now)
            if job.done_count == len(job.subtasks):  # a planner that had no workers last time
                actions += self._advance(job, now)
        return actions

    def _guarded(self, job: Job, now: float, step: Callable[[], list[Action]]) -> list[Action]:
        """One job's step; an exception from its task type (eligible, fits, a planner) fails that job,
        not the scheduler (the actions of the failed step are dropped with it)."""
        try:
            return step()
        except DcfError as exc:
            return self._fail(job, now, exc.message)
        except Exception as exc:
            return self._fail(job, now, f"task type {job.task_type} failed: {type(exc).__name__}: {exc}")

    def _start(self, job: Job, now: float) -> list[Action]:
        providers, why = self.eligible_providers(job)
        job.waiting = why
        if not providers:
            return []
        job.state = JobState.RUNNING
        job.started_at = self._wall
        job.started_t = now
        actions = self._advance(job, now)
        if job.state is JobState.FAILED:
            return actions
        return [JobStarted(job.job_id), *actions]

    def _assign_pending(self, job: Job, now: float) -> list[Action]:
        pending = [s for s in job.subtasks if s.state is SubState.PENDING and s.comparing is None]
        if not pending:
            return []
        eligible, why = self.eligible_providers(job)
        providers = eligible
        if job.nodes:  # keep to the providers the job already uses once it has its cap
            used = {p for s in job.subtasks for p in (s.provider_id, s.done_by) if p}
            in_use = [w for w in providers if w.provider_id in used]
            if len(used) >= job.nodes and in_use:
                providers = in_use
        task = tasks.get(job.task_type)
        actions: list[Action] = []
        for sub in pending:
            fit = [w for w in providers if w.provider_id not in sub.witnesses and task.fits(w, sub.params, job.inputs)]
            if not fit and sub.witnesses:  # its verification may go past the job's --nodes cap
                fit = [w for w in eligible if w.provider_id not in sub.witnesses
                       and task.fits(w, sub.params, job.inputs)]
            if not fit and sub.witnesses and any(task.fits(w, sub.params, job.inputs) for w in eligible):
                job.waiting = self._verifier_wanted(sub)  # only providers whose results of it are held could take it
                continue
            if not fit:
                sub.unfit_since = now if sub.unfit_since is None else sub.unfit_since
                job.waiting = why or job.planner.stalled(sub.params, now - sub.unfit_since)  # may fail the job
                continue
            sub.unfit_since = None
            fresh = [w for w in fit if w.provider_id not in sub.tried[-1:]] or fit
            best = min(fresh, key=lambda w: (self.providers[w.provider_id].load()
                                             + sub.cost / (w.gflops * 1e9)))
            actions.append(self._send(job, sub, best.provider_id, now))
        if actions:
            job.waiting = None
        return actions

    def _verifier_wanted(self, sub: Subtask) -> str:
        """Why a subtask being verified waits: every provider that could take it has sent a result of it."""
        held = " and ".join(self._name(w) for w in sub.witnesses)
        if len(sub.witnesses) == 1:
            return (f"waiting for a second provider to verify subtask {sub.index} (--verify-rate): only {held} "
                    "could take it, and its result is held")
        return (f"waiting for another provider to verify subtask {sub.index} (--verify-rate): the results of {held} "
                "disagree")

    def _send(self, job: Job, sub: Subtask, provider_id: str, now: float) -> Dispatch:
        sub.state = SubState.SENT
        sub.attempt += 1
        sub.provider_id = provider_id
        sub.straggled_on = None  # a new attempt: no copy of the old one is owed
        sub.sent_at = now
        sub.tried.append(provider_id)
        sub.sent.append(now)
        prov = self.providers[provider_id]
        prov.stopping.pop((job.job_id, sub.index), None)  # given to it again: it holds the new copy
        prov.assigned.add((job.job_id, sub.index), sub.cost / (prov.gflops(job.task_type) * 1e9))
        self.counters["subtasks_dispatched"] += 1
        return Dispatch(provider_id, job.job_id, sub.index, sub.attempt)


_HANDLERS: dict[type, str] = {
    ProviderRegistered: "_on_registered", HeartbeatReceived: "_on_heartbeat", SubscriptionChanged: "_on_subscription",
    ProviderDisconnected: "_on_disconnected", ProviderLeft: "_on_left", DrainRequested: "_on_drain",
    JobAdded: "_on_job_added", CancelRequested: "_on_cancel",
    JobFailRequested: "_on_fail_requested", JobForgotten: "_on_forgotten", SubtaskAcked: "_on_acked",
    ResultReceived: "_on_result", ResultMerged: "_on_merged", SubtaskFailed: "_on_failed", Tick: "_on_tick",
    Reschedule: "_on_reschedule", SubtaskProgress: "_on_progress", SubtaskCancelled: "_on_cancelled",
    WrongResultCaught: "_on_wrong", QuarantineCleared: "_on_clear", ResultsCompared: "_on_compared",
}
