"""What goes into the head's state machine (stimuli) and what comes out (actions).

``ClusterState.handle(stimulus, now) -> list[Action]`` is its one entry. Stimuli are what the I/O
layer saw (a message, a request, a tick); actions are what it must do (send, store, emit, write).
"""

from __future__ import annotations

from dataclasses import dataclass

from common.tasks import Effect

from .entities import Job, ProviderInfo


# ---- stimuli ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProviderRegistered:
    info: ProviderInfo
    #: the CURVE public key (Z85) it registered with; "" without CURVE. A quarantine holds for the key too
    key: str = ""


@dataclass(frozen=True)
class HeartbeatReceived:
    provider_id: str
    local: bool = False  # it proved it shares the head's state dir
    #: the "job_id:subtask" entries it says it holds (queued or running); None: not known (a list that
    #: may have been cut at its 64 entries, or not a list of strings)
    running: frozenset[str] | None = None
    #: subtasks waiting in its local queue (``heartbeat.queued``); None: not said
    queued: int | None = None


@dataclass(frozen=True)
class SubscriptionChanged:
    """The head's XPUB saw a subscription to ``topic`` (the transport reports an unsubscribe as
    ``ProviderDisconnected``; ``subscribed=False`` here only marks the provider not ready)."""

    topic: str
    subscribed: bool


@dataclass(frozen=True)
class ProviderDisconnected:
    """The provider's task connection ended: the head's XPUB reported its topic unsubscribed (``\\x00`` + id).
    libzmq reports that when the topic's last SUB connection closes: the provider's process died (the
    kernel closed its sockets), its TCP connection broke, or ZMTP heartbeats found the peer silent (a
    machine that vanished). The provider is not ready from now on, and it is declared lost (its subtasks
    re-queued) unless it subscribes again within ``Timing.disconnect_grace``, as a provider that only
    reconnects or reopens its sockets does."""

    provider_id: str


@dataclass(frozen=True)
class ProviderLeft:
    provider_id: str


@dataclass(frozen=True)
class DrainRequested:
    provider_id: str
    draining: bool = True


@dataclass(frozen=True)
class JobAdded:
    job: Job


@dataclass(frozen=True)
class CancelRequested:
    job_id: str


@dataclass(frozen=True)
class JobFailRequested:
    """The I/O layer could not go on with a job (a planner's merge failed, a result could not be kept)."""

    job_id: str
    error: str


@dataclass(frozen=True)
class JobForgotten:
    job_id: str
    deleted: bool = False  # by the user (DELETE): providers still stopping its subtasks are told again


@dataclass(frozen=True)
class SubtaskReport:
    """What every message of a provider about one subtask attempt names: who, which attempt, and
    the head incarnation it was sent in."""

    provider_id: str
    job_id: str
    subtask: int
    attempt: int
    incarnation: str


@dataclass(frozen=True)
class SubtaskAcked(SubtaskReport):
    """The provider has the subtask (it runs it next, or queued it)."""


@dataclass(frozen=True)
class ResultReceived(SubtaskReport):
    """A result that passed its planner's checks; ``elapsed``: compute seconds the provider reports."""

    elapsed: float = 0.0


@dataclass(frozen=True)
class ResultMerged:
    """The I/O layer merged the result that ``MergeResult`` asked for."""

    job_id: str


@dataclass(frozen=True)
class SubtaskFailed(SubtaskReport):
    error: str
    retryable: bool


@dataclass(frozen=True)
class WrongResultCaught(SubtaskReport):
    """A result failed its planner's check of its values (``WrongResult``): the attempt failed, and the
    provider that sent it is quarantined."""

    error: str


@dataclass(frozen=True)
class ResultsCompared:
    """The I/O layer compared the result ``CompareResult`` named with the results held of its subtask (the planner's
    ``compare``): ``verdicts`` holds (witness, None if the two agree, else what differs) for each witness compared."""

    provider_id: str
    job_id: str
    subtask: int
    attempt: int
    verdicts: tuple[tuple[str, str | None], ...]


@dataclass(frozen=True)
class QuarantineCleared:
    """An operator trusts this provider again (``POST /v1/nodes/{id}/clear``)."""

    provider_id: str


@dataclass(frozen=True)
class SubtaskProgress(SubtaskReport):
    """A provider says how far it got with a running subtask: ``done`` of ``total`` of its own units."""

    done: int = 0
    total: int = 1


@dataclass(frozen=True)
class SubtaskCancelled(SubtaskReport):
    """A provider stopped (or dropped) a subtask without a result, as a ``cancel`` asked."""


@dataclass(frozen=True)
class Tick:
    """Time passed: timeouts, deadlines, stragglers, dead providers."""


@dataclass(frozen=True)
class Reschedule:
    """Something outside the state changed (a provider undrained): hand out what can be."""


Stimulus = (ProviderRegistered | HeartbeatReceived | SubscriptionChanged | ProviderDisconnected | ProviderLeft
            | DrainRequested | JobAdded | CancelRequested | JobFailRequested | JobForgotten | SubtaskAcked
            | ResultReceived | ResultMerged | SubtaskFailed | SubtaskProgress | SubtaskCancelled | Tick | Reschedule
            | WrongResultCaught | QuarantineCleared | ResultsCompared)


# ---- actions ----------------------------------------------------------------------------------
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
class GroupAbandoned:
    """A collective subtask group lost a member: its other members were told to stop, the planner plans again."""

    job_id: str
    group: str
    why: str


#: why a provider was lost (``ProviderLost.reason``)
SILENT = "silent"  # no heartbeat for MISSED_HEARTBEATS intervals (hung, cut off, or dead without a disconnect)
DISCONNECTED = "disconnected"  # its task connection closed and did not come back within the grace
LEFT = "left"  # it unregistered


@dataclass(frozen=True)
class ProviderLost:
    provider_id: str
    requeued: int
    reason: str = SILENT


@dataclass(frozen=True)
class JobCancelled:
    job_id: str


@dataclass(frozen=True)
class MergeResult:
    """Merge this result into its job (the planner's merge), then send ``ResultMerged``."""

    provider_id: str
    job_id: str
    subtask: int
    attempt: int


@dataclass(frozen=True)
class HoldResult:
    """Keep this result's arrays, unmerged, until its job ends: its subtask is being verified (``--verify-rate``) and
    no other provider's result agreed with it yet. The subtask goes to another provider."""

    provider_id: str
    job_id: str
    subtask: int
    attempt: int


@dataclass(frozen=True)
class CompareResult:
    """Compare this result with the held results of ``witnesses`` (the planner's ``compare``), then send
    ``ResultsCompared``; it answers ``MergeResult`` if one agreed, ``HoldResult`` if none did."""

    provider_id: str
    job_id: str
    subtask: int
    attempt: int
    witnesses: tuple[str, ...]


@dataclass(frozen=True)
class ResultDisagreed:
    """A result of a subtask being verified agreed with none of the results held of it (``why``: what differed
    from each): another provider must decide."""

    provider_id: str
    job_id: str
    subtask: int
    witnesses: tuple[str, ...]
    why: str


@dataclass(frozen=True)
class StopSubtasks:
    """Tell a provider to stop the job's subtasks it holds (``subtask``: only that one): the job ended, or
    another copy of the subtask won. They stay in its assignments until it says they stopped."""

    provider_id: str
    job_id: str
    subtask: int | None = None


@dataclass(frozen=True)
class ProviderUnhealthy:
    """Acks from this provider went missing ``missed_acks`` times in a row with nothing heard from it on the
    result channel: it gets no new work for ``retry_in`` seconds (then one subtask on probation), and its
    next heartbeat reply asks it to open its connections anew (``AskReconnect``)."""

    provider_id: str
    missed_acks: int
    retry_in: float


@dataclass(frozen=True)
class ProviderStuck:
    """This provider has held a straggler for ``seconds`` and finished nothing meanwhile, while its heartbeats
    say it still holds work (``queued`` waiting): it gets no new work until it finishes something."""

    provider_id: str
    seconds: float
    queued: int


@dataclass(frozen=True)
class ProviderQuarantined:
    """This provider sent a wrong result (``reason``): it gets no more work until an operator clears it, what
    it holds is taken back and run elsewhere (``taken_back`` subtasks), and its later results are ignored."""

    provider_id: str
    job_id: str
    subtask: int
    reason: str
    taken_back: int


@dataclass(frozen=True)
class ProviderHealthy:
    """A provider marked ``was`` (``"unhealthy"`` or ``"stuck"``) is given work again."""

    provider_id: str
    was: str


@dataclass(frozen=True)
class AskReconnect:
    """Answer this provider's heartbeat with ``reconnect: true``: it opens its SUB and PUSH anew."""

    provider_id: str


@dataclass(frozen=True)
class RegisterAgain:
    """Tell this provider the head does not know it (a heartbeat from an unknown or dead id)."""

    provider_id: str


@dataclass(frozen=True)
class PlannerEffects:
    """What a job's planner asked for (files to write, metrics to publish), in order."""

    job_id: str
    effects: tuple[Effect, ...]


Action = (Dispatch | JobStarted | JobFinished | JobFailed | JobCancelled | ProviderLost | Straggler | MergeResult
          | RegisterAgain | PlannerEffects | StopSubtasks | GroupAbandoned | ProviderUnhealthy | ProviderStuck
          | ProviderHealthy | AskReconnect | ProviderQuarantined | HoldResult | CompareResult | ResultDisagreed)
