"""Unit tests of head_node/state.py: the pure ClusterState machine (no I/O, explicit clock)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from common import tasks
from common.errors import Conflict, NotFound
from common.jobs import TERMINAL_NAMES, JobRecord
from common.tasks import ArrayMeta, JobContext, rows
from head_node import state as st
from head_node import stimuli, views
from head_node.state import (
    ClusterState,
    Dispatch,
    JobFailed,
    JobFinished,
    JobStarted,
    JobState,
    ProviderInfo,
    ProviderLost,
    SubState,
    Timing,
)


@pytest.fixture(autouse=True)
def _split_small_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests split small matrices to check the mechanics; the least-share rule
    (rows.MIN_SHARE_SECONDS) has tests of its own in test_matmul_task.py."""
    monkeypatch.setattr(rows, "MIN_SHARE_SECONDS", 0.0)

GiB = 1024**3


def hexid() -> str:
    return uuid.uuid4().hex


def make_info(gflops: float = 10.0, *, name: str | None = None, device_kind: str = "cpu",
              dtypes=("float32", "float64"), memory_bytes: int = 16 * GiB,
              task_types=("matmul",), pid: str | None = None) -> ProviderInfo:
    pid = pid or hexid()
    return ProviderInfo(provider_id=pid, name=name or pid[:8], host="host", os="linux",
                        device_kind=device_kind, device_name="dev", memory_bytes=memory_bytes, cores=4,
                        task_types=frozenset(task_types), dtypes=frozenset(dtypes), version="0.1.0",
                        gflops=gflops)


def make_job(m: int = 100, k: int = 8, n: int = 6, dtype: str = "float64", nodes: int | None = None,
             created_at: float = 0.0) -> st.Job:
    """A matmul job with its task's own planner (no arrays: the state machine never touches them)."""
    job_id = hexid()
    inputs = {"a": ArrayMeta(dtype, (m, k)), "b": ArrayMeta(dtype, (k, n))}
    outputs = {"c": ArrayMeta(dtype, (m, n))}
    ctx = JobContext(job_id=job_id, params={}, inputs=inputs, outputs=outputs, operands={}, blob_ids={},
                     results={}, job_dir=Path("/nonexistent"))
    return st.Job(job_id=job_id, task_type="matmul", params={}, inputs=inputs, outputs=outputs, nodes=nodes,
                  created_at=created_at, planner=tasks.get("matmul").planner(ctx))


def result(cs: ClusterState, provider_id: str, job_id: str, index: int, attempt: int, incarnation: str, now: float,
           elapsed: float = 0.0) -> bool:
    """True if the state machine asks for this result to be merged."""
    actions = cs.handle(stimuli.ResultReceived(provider_id, job_id, index, attempt, incarnation, elapsed), now)
    return any(isinstance(a, stimuli.MergeResult) for a in actions)


def heartbeat(cs: ClusterState, provider_id: str, now: float) -> bool:
    """False if the head tells the provider to register again."""
    actions = cs.handle(stimuli.HeartbeatReceived(provider_id), now)
    return not any(isinstance(a, stimuli.RegisterAgain) for a in actions)


def cancel(cs: ClusterState, job_id: str, now: float) -> st.Job:
    """Cancel: the providers holding its subtasks are told to stop them, then the job is closed."""
    actions = cs.handle(stimuli.CancelRequested(job_id), now)
    assert actions[-1] == stimuli.JobCancelled(job_id)
    assert all(isinstance(a, stimuli.StopSubtasks) and a.job_id == job_id and a.subtask is None for a in actions[:-1])
    return cs.jobs[job_id]


def failed(cs: ClusterState, provider_id: str, job_id: str, index: int, attempt: int, incarnation: str, error: str,
           retryable: bool, now: float) -> list:
    return cs.handle(stimuli.SubtaskFailed(provider_id, job_id, index, attempt, incarnation, error, retryable), now)


def view_of(job: st.Job, names: dict[str, str] | None = None) -> dict:
    record = JobRecord(job.job_id, job.task_type, job.params, {k: m.to_dict() for k, m in job.inputs.items()},
                       {k: m.to_dict() for k, m in job.outputs.items()}, job.nodes, job.created_at,
                       state=job.state, started_at=job.started_at, finished_at=job.finished_at, error=job.error)
    return views.live_job_view(record, job, names or {})


def connect(cs: ClusterState, info: ProviderInfo, now: float = 0.0) -> list:
    """Register and subscribe: the provider becomes ready."""
    return (cs.handle(stimuli.ProviderRegistered(info), now)
            + cs.handle(stimuli.SubscriptionChanged(info.provider_id, True), now))


def dispatches(actions) -> list[Dispatch]:
    return [a for a in actions if isinstance(a, Dispatch)]


def sent_to(sub: st.Subtask) -> str:
    """The provider a subtask was sent to (it has one once dispatched)."""
    assert sub.provider_id is not None, f"subtask {sub.index} was not sent"
    return sub.provider_id


def rows_by_provider(job: st.Job) -> dict[str, int]:
    out: dict[str, int] = {}
    for sub in job.subtasks:
        out[sent_to(sub)] = out.get(sent_to(sub), 0) + sub.params["rows"]
    return out


def finish_all(cs: ClusterState, job: st.Job, now: float) -> list:
    """Report a result for every subtask at its current attempt, from its current provider."""
    actions = []
    for sub in job.subtasks:
        assert result(cs, sent_to(sub), job.job_id, sub.index, sub.attempt, cs.incarnation, now)
        actions += cs.handle(stimuli.ResultMerged(job.job_id), now)
    return actions


@pytest.fixture
def cs() -> ClusterState:
    return ClusterState(incarnation=hexid())


# ---- readiness -----------------------------------------------------------------------------------
def test_register_alone_is_not_ready(cs):
    info = make_info()
    assert cs.handle(stimuli.ProviderRegistered(info), 0.0) == []
    assert not cs.providers[info.provider_id].ready
    assert views.provider_rows(cs.providers, 0.0)[0]["state"] == "connecting"


def test_subscription_alone_is_not_a_provider(cs):
    pid = hexid()
    assert cs.handle(stimuli.SubscriptionChanged(pid, True), 0.0) == []
    assert pid not in cs.providers


@pytest.mark.parametrize("subscribe_first", [False, True])
def test_ready_after_register_and_subscription_in_either_order(cs, subscribe_first):
    info = make_info()
    job = make_job()
    cs.handle(stimuli.JobAdded(job), 0.0)
    if subscribe_first:
        assert cs.handle(stimuli.SubscriptionChanged(info.provider_id, True), 0.0) == []
        actions = cs.handle(stimuli.ProviderRegistered(info), 1.0)
    else:
        assert cs.handle(stimuli.ProviderRegistered(info), 0.0) == []
        actions = cs.handle(stimuli.SubscriptionChanged(info.provider_id, True), 1.0)
    assert cs.providers[info.provider_id].ready
    assert views.provider_rows(cs.providers, 1.0)[0]["state"] == "ready"
    assert actions[0] == JobStarted(job.job_id)
    assert {d.provider_id for d in dispatches(actions)} == {info.provider_id}
    assert job.state is JobState.RUNNING


def test_no_dispatch_before_subscription(cs):
    info = make_info()
    job = make_job()
    cs.handle(stimuli.ProviderRegistered(info), 0.0)
    assert cs.handle(stimuli.JobAdded(job), 0.0) == []
    assert job.state is JobState.QUEUED
    assert job.waiting == "waiting for providers: none is connected"
    assert cs.handle(stimuli.Tick(), 1.0) == []


def test_unsubscribed_provider_gets_no_new_work(cs):
    a, b = make_info(10.0), make_info(10.0)
    connect(cs, a)
    connect(cs, b)
    assert cs.handle(stimuli.SubscriptionChanged(b.provider_id, False), 0.0) == []
    assert not cs.providers[b.provider_id].ready
    job = make_job()
    actions = cs.handle(stimuli.JobAdded(job), 0.0)
    assert {d.provider_id for d in dispatches(actions)} == {a.provider_id}


def test_dispatch_only_to_ready_providers(cs):
    ready = [make_info(10.0), make_info(5.0)]
    for info in ready:
        connect(cs, info)
    not_ready = make_info(100.0)
    cs.handle(stimuli.ProviderRegistered(not_ready), 0.0)
    job = make_job(m=300)
    actions = cs.handle(stimuli.JobAdded(job), 0.0)
    targets = {d.provider_id for d in dispatches(actions)}
    assert targets == {p.provider_id for p in ready}
    assert all(d.attempt == 1 for d in dispatches(actions))
    assert sum(s.params["rows"] for s in job.subtasks) == 300


# ---- waiting -------------------------------------------------------------------------------------
def test_job_waits_without_providers(cs):
    job = make_job()
    assert cs.handle(stimuli.JobAdded(job), 0.0) == []
    assert job.state is JobState.QUEUED
    assert job.waiting is not None and "none is connected" in job.waiting


def test_job_waits_for_provider_with_dtype(cs):
    mps = make_info(50.0, name="mac", device_kind="mps", dtypes={"float32"})
    connect(cs, mps)
    job = make_job(dtype="float64")
    assert cs.handle(stimuli.JobAdded(job), 0.0) == []
    assert job.state is JobState.QUEUED
    assert job.waiting is not None
    assert job.waiting.startswith("waiting for a suitable provider")
    assert "mps provider does not support float64" in job.waiting
    # a float32 job runs there
    job32 = make_job(dtype="float32")
    assert dispatches(cs.handle(stimuli.JobAdded(job32), 0.0))
    assert job32.waiting is None
    # a cpu provider with float64 arrives: the waiting job starts on it only
    cpu = make_info(1.0, dtypes={"float32", "float64"})
    actions = connect(cs, cpu, 1.0)
    assert JobStarted(job.job_id) in actions
    assert {d.provider_id for d in dispatches(actions) if d.job_id == job.job_id} == {cpu.provider_id}
    assert job.waiting is None


def test_job_waits_for_provider_with_task_type(cs):
    info = make_info(task_types=("other",), name="nomm")
    connect(cs, info)
    job = make_job()
    assert cs.handle(stimuli.JobAdded(job), 0.0) == []
    assert job.waiting is not None and "nomm lacks task type matmul" in job.waiting


def test_duplicate_add_job_is_ignored(cs):
    connect(cs, make_info())
    job = make_job()
    first = cs.handle(stimuli.JobAdded(job), 0.0)
    assert first
    assert cs.handle(stimuli.JobAdded(job), 0.0) == []


def test_jobs_scheduled_in_creation_order(cs):
    late, early = make_job(created_at=5.0), make_job(created_at=1.0)
    cs.handle(stimuli.JobAdded(late), 6.0)
    cs.handle(stimuli.JobAdded(early), 6.0)
    actions = connect(cs, make_info(), 7.0)
    started = [a.job_id for a in actions if isinstance(a, JobStarted)]
    assert started == [early.job_id, late.job_id]


# ---- split ---------------------------------------------------------------------------------------
def test_split_proportional_to_gflops(cs):
    fast, slow = make_info(20.0), make_info(10.0)
    connect(cs, slow)
    connect(cs, fast)
    job = make_job(m=300)
    cs.handle(stimuli.JobAdded(job), 0.0)
    rows = rows_by_provider(job)
    assert rows == {fast.provider_id: 200, slow.provider_id: 100}


def test_split_three_way_sums_to_rows(cs):
    infos = [make_info(g) for g in (30.0, 20.0, 7.0)]
    for info in infos:
        connect(cs, info)
    job = make_job(m=1001)
    cs.handle(stimuli.JobAdded(job), 0.0)
    rows = rows_by_provider(job)
    assert sum(rows.values()) == 1001
    for info in infos:
        assert abs(rows[info.provider_id] - 1001 * info.gflops / 57.0) <= 1
    # the rows cover [0, m) exactly once
    covered = sorted((s.params["row0"], s.params["rows"]) for s in job.subtasks)
    pos = 0
    for row0, count in covered:
        assert row0 == pos
        pos += count
    assert pos == 1001


def test_nodes_cap_uses_only_the_fastest(cs):
    infos = [make_info(g) for g in (5.0, 40.0, 10.0)]
    for info in infos:
        connect(cs, info)
    job = make_job(m=100, nodes=1)
    actions = cs.handle(stimuli.JobAdded(job), 0.0)
    assert {d.provider_id for d in dispatches(actions)} == {infos[1].provider_id}
    assert rows_by_provider(job) == {infos[1].provider_id: 100}


def test_nodes_cap_two(cs):
    infos = [make_info(g) for g in (5.0, 40.0, 10.0)]
    for info in infos:
        connect(cs, info)
    job = make_job(m=100, nodes=2)
    cs.handle(stimuli.JobAdded(job), 0.0)
    assert set(rows_by_provider(job)) == {infos[1].provider_id, infos[2].provider_id}


def test_split_failure_fails_the_job(cs):
    tiny = make_info(memory_bytes=1024)
    connect(cs, tiny)
    job = make_job(m=10, k=100, n=100)
    actions = cs.handle(stimuli.JobAdded(job), 0.0)
    assert len(actions) == 1 and isinstance(actions[0], JobFailed)
    assert job.state is JobState.FAILED
    assert "does not fit" in (job.error or "")


# ---- happy path ------------------------------------------------------------------------------------
def test_full_job_lifecycle(cs):
    a, b = make_info(20.0), make_info(10.0)
    connect(cs, a)
    connect(cs, b)
    job = make_job(m=90)
    cs.handle(stimuli.JobAdded(job), 1.0)
    assert job.started_at == 1.0
    for sub in job.subtasks:
        assert sub.state is SubState.SENT
        cs.handle(stimuli.SubtaskAcked(sent_to(sub), job.job_id, sub.index, sub.attempt, cs.incarnation), 1.5)
        assert sub.state is SubState.RUNNING
        assert sub.deadline >= 1.5 + cs.timing.min_deadline
    actions = []
    for i, sub in enumerate(job.subtasks):
        assert result(cs, sent_to(sub), job.job_id, sub.index, 1, cs.incarnation, 2.0)
        job.planner.merge(sub.params, [], 2.0)  # what the I/O layer does (here: written in place)
        actions = cs.handle(stimuli.ResultMerged(job.job_id), 2.0)
        if i < len(job.subtasks) - 1:
            assert actions == []
    assert actions == [JobFinished(job.job_id)]
    assert job.state is JobState.DONE
    assert job.finished_at == 2.0
    assert job.done_count == len(job.subtasks)
    assert sum(job.shares().values()) == pytest.approx(1.0)
    assert job.shares()[a.provider_id] == pytest.approx(60 / 90)
    assert all(not p.assigned for p in cs.providers.values())
    assert cs.counters["subtasks_completed"] == len(job.subtasks)
    view = view_of(job)
    assert view["state"] == "done" and view["progress"] == {"done": 90, "total": 90, "unit": "rows"}


# ---- duplicates, late and foreign results -----------------------------------------------------------
@pytest.fixture
def running(cs):
    """One ready provider p and one running job of a single subtask."""
    p = make_info()
    connect(cs, p)
    job = make_job(m=10)
    cs.handle(stimuli.JobAdded(job), 0.0)
    assert len(job.subtasks) == 1
    return cs, p, job


def test_duplicate_result_is_ignored(running):
    cs, p, job = running
    assert result(cs, p.provider_id, job.job_id, 0, 1, cs.incarnation, 1.0) is True
    assert result(cs, p.provider_id, job.job_id, 0, 1, cs.incarnation, 1.1) is False
    assert cs.counters["results_ignored"] == 1
    assert cs.counters["subtasks_completed"] == 1
    assert cs.providers[p.provider_id].subtasks_done == 1


def test_late_result_after_job_done_is_ignored(running):
    cs, p, job = running
    assert result(cs, p.provider_id, job.job_id, 0, 1, cs.incarnation, 1.0)
    assert cs.handle(stimuli.ResultMerged(job.job_id), 1.0) == [JobFinished(job.job_id)]
    assert result(cs, p.provider_id, job.job_id, 0, 1, cs.incarnation, 2.0) is False


def test_result_for_old_attempt_after_done_is_ignored(cs):
    a, b = make_info(10.0), make_info(10.0)
    connect(cs, a)
    job = make_job(m=10)
    cs.handle(stimuli.JobAdded(job), 0.0)
    connect(cs, b, 0.0)
    # no ack from a: re-sent (to b, the other provider) as attempt 2
    for pid in (a.provider_id, b.provider_id):
        heartbeat(cs, pid, 11.0)
    d = dispatches(cs.handle(stimuli.Tick(), 11.0))
    assert d == [Dispatch(b.provider_id, job.job_id, 0, 2)]
    assert result(cs, b.provider_id, job.job_id, 0, 2, cs.incarnation, 12.0) is True
    # the first attempt's result comes late: ignored
    assert result(cs, a.provider_id, job.job_id, 0, 1, cs.incarnation, 12.5) is False


def test_result_with_wrong_epoch_is_ignored(running):
    cs, p, job = running
    assert result(cs, p.provider_id, job.job_id, 0, 1, hexid(), 1.0) is False
    assert job.subtasks[0].state is SubState.SENT
    assert result(cs, p.provider_id, job.job_id, 0, 1, cs.incarnation, 1.0) is True


def test_result_from_provider_not_sent_that_attempt_is_ignored(running):
    cs, p, job = running
    stranger = make_info()
    connect(cs, stranger)
    assert result(cs, stranger.provider_id, job.job_id, 0, 1, cs.incarnation, 1.0) is False
    assert result(cs, hexid(), job.job_id, 0, 1, cs.incarnation, 1.0) is False
    assert job.subtasks[0].state is SubState.SENT
    assert result(cs, p.provider_id, job.job_id, 0, 1, cs.incarnation, 1.0) is True


@pytest.mark.parametrize(("job_id", "index", "attempt"), [
    (None, 0, 2), (None, 0, 0), (None, 1, 1), (None, -1, 1), ("other", 0, 1),
])
def test_result_for_unknown_subtask_or_attempt_is_ignored(running, job_id, index, attempt):
    cs, p, job = running
    jid = hexid() if job_id == "other" else job.job_id
    assert result(cs, p.provider_id, jid, index, attempt, cs.incarnation, 1.0) is False
    assert job.subtasks[0].state is SubState.SENT


def test_old_attempt_result_accepted_if_subtask_still_open(cs):
    """A result of attempt 1 that arrives while attempt 2 is out is still a good result."""
    a, b = make_info(10.0), make_info(10.0)
    connect(cs, a)
    job = make_job(m=10)
    cs.handle(stimuli.JobAdded(job), 0.0)
    connect(cs, b)
    heartbeat(cs, a.provider_id, 11.0)
    heartbeat(cs, b.provider_id, 11.0)
    assert dispatches(cs.handle(stimuli.Tick(), 11.0)) == [Dispatch(b.provider_id, job.job_id, 0, 2)]
    assert result(cs, a.provider_id, job.job_id, 0, 1, cs.incarnation, 11.5) is True
    assert cs.handle(stimuli.ResultMerged(job.job_id), 11.5) == [JobFinished(job.job_id)]
    # b still computes its copy: it is told to stop that one subtask and holds it until it answers
    assert cs.providers[b.provider_id].stopping.keys() == {(job.job_id, 0)}
    assert result(cs, b.provider_id, job.job_id, 0, 2, cs.incarnation, 12.0) is False
    assert not cs.providers[b.provider_id].assigned and not cs.providers[b.provider_id].stopping


# ---- acks and deadlines ----------------------------------------------------------------------------
def test_ack_timeout_resends(running):
    cs, p, job = running
    sub = job.subtasks[0]
    heartbeat(cs, p.provider_id, 10.0)
    assert dispatches(cs.handle(stimuli.Tick(), 10.0)) == []  # not yet: exactly ack_timeout
    heartbeat(cs, p.provider_id, 10.5)
    actions = cs.handle(stimuli.Tick(), 10.5)
    assert dispatches(actions) == [Dispatch(p.provider_id, job.job_id, 0, 2)]  # only provider
    assert sub.attempt == 2 and sub.state is SubState.SENT and sub.sent_at == 10.5
    assert sub.tried == [p.provider_id, p.provider_id]
    assert cs.counters["subtasks_retried"] == 1


def test_ack_timeout_prefers_another_provider(cs):
    a, b = make_info(10.0), make_info(1.0)
    connect(cs, a)
    job = make_job(m=10)
    cs.handle(stimuli.JobAdded(job), 0.0)
    connect(cs, b)
    heartbeat(cs, a.provider_id, 10.5)
    heartbeat(cs, b.provider_id, 10.5)
    assert dispatches(cs.handle(stimuli.Tick(), 10.5)) == [Dispatch(b.provider_id, job.job_id, 0, 2)]
    assert (job.job_id, 0) not in cs.providers[a.provider_id].assigned
    assert (job.job_id, 0) in cs.providers[b.provider_id].assigned


def test_acked_subtask_is_not_resent_before_deadline(running):
    cs, p, job = running
    cs.handle(stimuli.SubtaskAcked(p.provider_id, job.job_id, 0, 1, cs.incarnation), 1.0)
    sub = job.subtasks[0]
    assert sub.state is SubState.RUNNING
    assert sub.deadline == pytest.approx(1.0 + cs.timing.min_deadline)
    for t in (20.0, 40.0, 60.0, 61.0):
        heartbeat(cs, p.provider_id, t)
        assert dispatches(cs.handle(stimuli.Tick(), t)) == []
    heartbeat(cs, p.provider_id, 61.5)
    assert dispatches(cs.handle(stimuli.Tick(), 61.5)) == [Dispatch(p.provider_id, job.job_id, 0, 2)]


def test_deadline_expiry_resends_to_another_provider(cs):
    a, b = make_info(10.0), make_info(10.0)
    connect(cs, a)
    job = make_job(m=10)
    cs.handle(stimuli.JobAdded(job), 0.0)
    connect(cs, b)
    cs.handle(stimuli.SubtaskAcked(a.provider_id, job.job_id, 0, 1, cs.incarnation), 0.5)
    deadline = job.subtasks[0].deadline
    for pid in (a.provider_id, b.provider_id):
        heartbeat(cs, pid, deadline + 0.1)
    assert dispatches(cs.handle(stimuli.Tick(), deadline + 0.1)) == [Dispatch(b.provider_id, job.job_id, 0, 2)]


def test_deadline_grows_with_work():
    cs = ClusterState(hexid(), Timing(min_deadline=1.0, deadline_factor=10.0))
    p = make_info(gflops=1.0)  # 1 GFLOP/s
    connect(cs, p)
    job = make_job(m=1000, k=1000, n=500)  # 1e9 flop
    cs.handle(stimuli.JobAdded(job), 0.0)
    cs.handle(stimuli.SubtaskAcked(p.provider_id, job.job_id, 0, 1, cs.incarnation), 0.0)
    assert job.subtasks[0].deadline >= 10.0


@pytest.mark.parametrize("how", ["wrong_provider", "wrong_attempt", "wrong_epoch"])
def test_foreign_ack_is_ignored(running, how):
    cs, p, job = running
    pid, attempt, incarnation = p.provider_id, 1, cs.incarnation
    if how == "wrong_provider":
        pid = hexid()
    elif how == "wrong_attempt":
        attempt = 2
    else:
        incarnation = hexid()
    cs.handle(stimuli.SubtaskAcked(pid, job.job_id, 0, attempt, incarnation), 1.0)
    assert job.subtasks[0].state is SubState.SENT


def test_ack_of_old_attempt_is_ignored(running):
    cs, p, job = running
    heartbeat(cs, p.provider_id, 10.5)
    cs.handle(stimuli.Tick(), 10.5)  # attempt 2 to the same provider
    cs.handle(stimuli.SubtaskAcked(p.provider_id, job.job_id, 0, 1, cs.incarnation), 11.0)
    assert job.subtasks[0].state is SubState.SENT
    cs.handle(stimuli.SubtaskAcked(p.provider_id, job.job_id, 0, 2, cs.incarnation), 11.0)
    assert job.subtasks[0].state is SubState.RUNNING


# ---- dead providers --------------------------------------------------------------------------------
def test_dead_after_three_missed_heartbeats(cs):
    p = make_info()
    connect(cs, p)
    assert cs.timing.dead_after == 15.0
    assert cs.handle(stimuli.Tick(), 15.0) == []
    assert cs.providers[p.provider_id].alive
    actions = cs.handle(stimuli.Tick(), 15.01)
    assert actions == [ProviderLost(p.provider_id, 0)]
    assert not cs.providers[p.provider_id].ready
    assert views.provider_rows(cs.providers, 15.01)[0]["state"] == "dead"
    assert heartbeat(cs, p.provider_id, 16.0) is False  # must register again
    assert cs.counters["providers_lost"] == 1
    assert cs.handle(stimuli.Tick(), 100.0) == []  # lost once


def ticks(cs: ClusterState, start: float, end: float, step: float) -> list:
    """The head's tick loop from ``start`` to ``end``: what the ticks asked for."""
    actions, now = [], start
    while now <= end + 1e-9:
        actions += cs.handle(stimuli.Tick(), now)
        now += step
    return actions


def test_the_heads_own_pause_is_not_its_providers_silence():
    cs = ClusterState(hexid(), Timing(heartbeat_interval=1.0, detect_pauses=True))
    p, q = make_info(), make_info()
    connect(cs, p)
    connect(cs, q)
    job = make_job(m=4)
    sent = dispatches(cs.handle(stimuli.JobAdded(job), 0.0))
    assert not any(isinstance(a, ProviderLost | JobFailed) for a in ticks(cs, 0.25, 1.0, 0.25))
    # the event loop is held up for 10 s (dead_after 3 s, ack timeout passed): the first tick after it judges
    # nothing, and for an interval the head reads what waited in its sockets
    assert cs.handle(stimuli.Tick(), 11.0) == [] and cs.counters["head_pauses"] == 1
    for s in sent:
        cs.handle(stimuli.SubtaskAcked(s.provider_id, job.job_id, s.subtask, s.attempt, cs.incarnation), 11.05)
    heartbeat(cs, p.provider_id, 11.1)
    heartbeat(cs, q.provider_id, 11.1)
    assert not any(isinstance(a, ProviderLost | JobFailed) for a in ticks(cs, 11.25, 13.0, 0.25))
    assert cs.providers[p.provider_id].alive and cs.providers[q.provider_id].alive
    assert all(sub.attempt == 1 for sub in job.subtasks)  # nothing struck or sent again
    # a provider that really went silent meanwhile is lost once the catch-up is over
    heartbeat(cs, p.provider_id, 13.5)
    lost = [a for a in ticks(cs, 13.25, 14.5, 0.25) if isinstance(a, ProviderLost)]
    assert lost == [ProviderLost(q.provider_id, len([s for s in sent if s.provider_id == q.provider_id]))]


def test_a_head_whose_every_tick_is_late_still_declares_a_silent_provider_lost():
    cs = ClusterState(hexid(), Timing(heartbeat_interval=1.0, detect_pauses=True))
    p = make_info()
    connect(cs, p)
    lost = []
    for now in (2.0, 4.0, 6.0, 8.0):  # every tick 2 s late: one catch-up, then judged anyway
        lost += [a for a in cs.handle(stimuli.Tick(), now) if isinstance(a, ProviderLost)]
    assert lost == [ProviderLost(p.provider_id, 0)] and cs.counters["head_pauses"] >= 1


def test_pauses_are_not_detected_where_time_jumps_from_tick_to_tick(cs):
    p = make_info()
    connect(cs, p)
    cs.handle(stimuli.Tick(), 1.0)
    assert cs.handle(stimuli.Tick(), 100.0) == [ProviderLost(p.provider_id, 0)]
    assert cs.counters["head_pauses"] == 0


def test_dead_provider_leaves_the_table_after_forget_after(cs):
    p, q = make_info(), make_info()
    connect(cs, p)
    connect(cs, q)
    for t in range(5, 700, 5):  # q stays alive
        heartbeat(cs, q.provider_id, float(t))
    cs.handle(stimuli.Tick(), 20.0)
    assert not cs.providers[p.provider_id].alive
    cs.handle(stimuli.Tick(), cs.timing.forget_after - 1.0)
    assert p.provider_id in cs.providers  # still listed as dead
    cs.handle(stimuli.Tick(), cs.timing.forget_after + 0.01)
    assert p.provider_id not in cs.providers and q.provider_id in cs.providers
    assert [r["provider_id"] for r in views.provider_rows(cs.providers, 700.0)] == [q.provider_id]
    connect(cs, p, 700.0)  # a late comeback registers again
    assert cs.providers[p.provider_id].ready


def test_heartbeats_keep_a_provider_alive(cs):
    p = make_info()
    connect(cs, p)
    for t in range(5, 100, 5):
        assert heartbeat(cs, p.provider_id, float(t)) is True
        assert cs.handle(stimuli.Tick(), float(t) + 0.5) == []
    assert cs.providers[p.provider_id].alive
    assert heartbeat(cs, hexid(), 1.0) is False


def test_custom_heartbeat_interval():
    cs = ClusterState(hexid(), Timing(heartbeat_interval=1.0))
    p = make_info()
    connect(cs, p)
    assert cs.handle(stimuli.Tick(), 3.0) == []
    assert cs.handle(stimuli.Tick(), 3.01) == [ProviderLost(p.provider_id, 0)]


def test_dead_provider_subtasks_reassigned_with_next_attempt(cs):
    fast, slow = make_info(20.0), make_info(10.0)
    connect(cs, fast)
    connect(cs, slow)
    job = make_job(m=300)
    cs.handle(stimuli.JobAdded(job), 0.0)
    for sub in job.subtasks:
        cs.handle(stimuli.SubtaskAcked(sent_to(sub), job.job_id, sub.index, 1, cs.incarnation), 1.0)
    lost = [s.index for s in job.subtasks if s.provider_id == fast.provider_id]
    heartbeat(cs, slow.provider_id, 15.0)
    actions = cs.handle(stimuli.Tick(), 16.0)
    assert ProviderLost(fast.provider_id, len(lost)) in actions
    redo = dispatches(actions)
    assert sorted(d.subtask for d in redo) == lost
    assert all(d.provider_id == slow.provider_id and d.attempt == 2 for d in redo)
    for i in lost:
        assert job.subtasks[i].tried == [fast.provider_id, slow.provider_id]
        assert job.subtasks[i].state is SubState.SENT
    assert not cs.providers[fast.provider_id].assigned
    # the job completes on the survivor
    assert finish_all(cs, job, 17.0)[-1] == JobFinished(job.job_id)
    assert job.shares() == {slow.provider_id: pytest.approx(1.0)}


def test_dead_provider_subtasks_wait_without_providers(running):
    cs, p, job = running
    actions = cs.handle(stimuli.Tick(), 20.0)
    assert actions == [ProviderLost(p.provider_id, 1)]
    sub = job.subtasks[0]
    assert sub.state is SubState.PENDING and sub.provider_id is None
    assert job.state is JobState.RUNNING
    assert job.waiting is not None and "none is connected" in job.waiting
    # a new provider picks it up
    q = make_info()
    actions = connect(cs, q, 21.0)
    assert dispatches(actions) == [Dispatch(q.provider_id, job.job_id, 0, 2)]


def test_reregistered_provider_is_ready_again(cs):
    p = make_info()
    connect(cs, p)
    cs.handle(stimuli.Tick(), 20.0)
    assert not cs.providers[p.provider_id].alive
    cs.handle(stimuli.ProviderRegistered(p), 21.0)  # the subscription is still known
    assert cs.providers[p.provider_id].ready
    assert heartbeat(cs, p.provider_id, 22.0)


# ---- failures ------------------------------------------------------------------------------------
def _failed_args(sub, job, cs, **over):
    args = {"provider_id": sub.provider_id, "job_id": job.job_id, "index": sub.index,
            "attempt": sub.attempt, "incarnation": cs.incarnation, "error": "boom", "retryable": True, "now": 1.0}
    args.update(over)
    return args


def test_retryable_failure_requeues(cs):
    a, b = make_info(10.0), make_info(10.0)
    connect(cs, a)
    job = make_job(m=10)
    cs.handle(stimuli.JobAdded(job), 0.0)
    connect(cs, b)
    sub = job.subtasks[0]
    actions = failed(cs, **_failed_args(sub, job, cs))
    assert dispatches(actions) == [Dispatch(b.provider_id, job.job_id, 0, 2)]
    assert job.state is JobState.RUNNING
    assert cs.counters["subtasks_failed"] == 1 and cs.counters["subtasks_retried"] == 1
    assert (job.job_id, 0) not in cs.providers[a.provider_id].assigned


def test_retryable_failure_with_one_provider_retries_there(running):
    cs, p, job = running
    actions = failed(cs, **_failed_args(job.subtasks[0], job, cs))
    assert dispatches(actions) == [Dispatch(p.provider_id, job.job_id, 0, 2)]


def test_non_retryable_failure_fails_the_job(cs):
    a, b = make_info(10.0), make_info(10.0)
    connect(cs, a)
    connect(cs, b)
    job = make_job(m=100)
    cs.handle(stimuli.JobAdded(job), 0.0)
    sub = job.subtasks[0]
    actions = failed(cs, **_failed_args(sub, job, cs, retryable=False, error="bad input"))
    other = job.subtasks[1]
    # the other provider is told to stop its subtask of the failed job; the one that failed holds nothing
    assert actions[:-1] == [stimuli.StopSubtasks(owner(other), job.job_id)]
    assert isinstance(actions[-1], JobFailed)
    assert job.state is JobState.FAILED
    assert job.error is not None and "bad input" in job.error and "subtask 0" in job.error
    assert actions[-1].error == job.error
    assert not cs.providers[owner(sub)].assigned
    assert cs.providers[owner(other)].assigned and owner(other) != owner(sub)
    cs.handle(stimuli.SubtaskCancelled(owner(other), job.job_id, 1, 1, cs.incarnation), 1.5)
    assert all(not p.assigned for p in cs.providers.values())
    # results for the failed job are ignored
    other = job.subtasks[1]
    assert result(cs, sent_to(other), job.job_id, 1, 1, cs.incarnation, 2.0) is False


def test_max_attempts_fails_the_job():
    cs = ClusterState(hexid(), Timing(max_attempts=3))
    p = make_info()
    connect(cs, p)
    job = make_job(m=10)
    cs.handle(stimuli.JobAdded(job), 0.0)
    sub = job.subtasks[0]
    for attempt in (1, 2):
        assert sub.attempt == attempt
        actions = failed(cs, **_failed_args(sub, job, cs))
        assert dispatches(actions) == [Dispatch(p.provider_id, job.job_id, 0, attempt + 1)]
    actions = failed(cs, **_failed_args(sub, job, cs))
    assert [type(a) for a in actions] == [JobFailed]
    assert job.state is JobState.FAILED


def test_failed_for_stale_attempt_or_epoch_is_ignored(running):
    cs, p, job = running
    sub = job.subtasks[0]
    assert failed(cs, **_failed_args(sub, job, cs, incarnation=hexid(), retryable=False)) == []
    assert failed(cs, **_failed_args(sub, job, cs, attempt=2, retryable=False)) == []
    assert failed(cs, **_failed_args(sub, job, cs, job_id=hexid(), retryable=False)) == []
    assert job.state is JobState.RUNNING
    result(cs, p.provider_id, job.job_id, 0, 1, cs.incarnation, 1.0)
    assert failed(cs, **_failed_args(sub, job, cs, retryable=False)) == []
    assert job.state is JobState.RUNNING and sub.state is SubState.DONE


def test_failed_from_provider_not_sent_that_attempt_is_ignored(running):
    """Like result(), a failed() counts only from the provider that was sent that attempt."""
    cs, p, job = running
    stranger = make_info()
    connect(cs, stranger)
    sub = job.subtasks[0]
    assert failed(cs, **_failed_args(sub, job, cs, provider_id=stranger.provider_id,
                                    retryable=False)) == []
    assert job.state is JobState.RUNNING


def test_missed_acks_count_towards_max_attempts():
    """A subtask that is never acknowledged is not retried forever (the provider is not marked unhealthy
    here: that rule, which also bounds the retries, has tests of its own in test_clock.py)."""
    cs = ClusterState(hexid(), Timing(max_attempts=3, unhealthy_after=99))
    p = make_info()
    connect(cs, p)
    job = make_job(m=10)
    cs.handle(stimuli.JobAdded(job), 0.0)
    now, actions = 0.0, []
    for _ in range(3):
        assert job.state is JobState.RUNNING
        now += cs.timing.ack_timeout + 1
        heartbeat(cs, p.provider_id, now)
        actions = cs.handle(stimuli.Tick(), now)
    assert job.state is JobState.FAILED
    assert [type(a) for a in actions] == [JobFailed]
    assert job.subtasks[0].attempt == 3
    assert job.error is not None and "3" in job.error
    assert not cs.providers[p.provider_id].assigned


def test_missed_deadlines_count_towards_max_attempts():
    cs = ClusterState(hexid(), Timing(max_attempts=2))
    p = make_info()
    connect(cs, p)
    job = make_job(m=10)
    cs.handle(stimuli.JobAdded(job), 0.0)
    sub = job.subtasks[0]
    now = 0.0
    for _ in range(2):
        cs.handle(stimuli.SubtaskAcked(p.provider_id, job.job_id, 0, sub.attempt, cs.incarnation), now)
        now = sub.deadline + 1
        heartbeat(cs, p.provider_id, now)
        cs.handle(stimuli.Tick(), now)
    assert job.state is JobState.FAILED


def test_provider_deaths_do_not_count_towards_max_attempts():
    cs = ClusterState(hexid(), Timing(max_attempts=2))
    job = make_job(m=10)
    cs.handle(stimuli.JobAdded(job), 0.0)
    now = 0.0
    for _ in range(5):
        p = make_info()
        connect(cs, p, now)
        now += cs.timing.dead_after + 1
        cs.handle(stimuli.Tick(), now)  # p dies holding the subtask
        assert job.state is JobState.RUNNING
    assert job.subtasks[0].attempt == 5
    assert job.subtasks[0].state is SubState.PENDING


def test_failures_and_timeouts_add_up():
    cs = ClusterState(hexid(), Timing(max_attempts=2))
    p = make_info()
    connect(cs, p)
    job = make_job(m=10)
    cs.handle(stimuli.JobAdded(job), 0.0)
    failed(cs, **_failed_args(job.subtasks[0], job, cs))  # strike 1, re-sent at t=1
    assert job.state is JobState.RUNNING
    heartbeat(cs, p.provider_id, 12.0)
    assert [type(a) for a in cs.handle(stimuli.Tick(), 12.0)] == [JobFailed]  # strike 2: missed ack


def test_requeued_subtask_not_sent_to_provider_without_memory_for_it(cs):
    m, k, n, item = 1000, 100, 100, 8
    big = make_info(100.0)
    # room for b plus 10 rows (its own share), far from the 990 rows of big's subtask
    small = make_info(1.0, memory_bytes=2 * (k * n * item + 10 * (k + n) * item))
    connect(cs, big)
    connect(cs, small)
    cs.providers[big.provider_id].speed["matmul"] = 100.0  # measured: believed beyond CLAIM_TRUST x small's
    job = make_job(m=m, k=k, n=n)
    cs.handle(stimuli.JobAdded(job), 0.0)
    assert rows_by_provider(job) == {big.provider_id: 990, small.provider_id: 10}
    actions = cs.handle(stimuli.ProviderLeft(big.provider_id), 1.0)
    for d in dispatches(actions):
        rows = job.subtasks[d.subtask].params["rows"]
        need = (k * n + rows * (k + n)) * item
        assert need <= small.memory_bytes * 0.5, f"{rows} rows need {need} bytes"


# ---- cancel, unregister, forget ------------------------------------------------------------------------
def test_cancel_running_job(running):
    cs, p, job = running
    cancelled = cancel(cs, job.job_id, 2.0)
    assert cancelled is job
    assert job.state is JobState.CANCELLED and job.finished_at == 2.0
    assert job.error == "cancelled by user"
    # the provider still holds the subtask until it says it stopped: `assigned` is never a lie
    assert len(cs.providers[p.provider_id].assigned) == 1
    assert result(cs, p.provider_id, job.job_id, 0, 1, cs.incarnation, 3.0) is False  # it did not stop: finished
    assert not cs.providers[p.provider_id].assigned
    assert cs.handle(stimuli.Tick(), 5.0) == []
    with pytest.raises(Conflict):
        cancel(cs, job.job_id, 3.0)


def test_cancel_queued_job(cs):
    job = make_job()
    cs.handle(stimuli.JobAdded(job), 0.0)
    cancel(cs, job.job_id, 1.0)
    assert job.state is JobState.CANCELLED
    assert connect(cs, make_info(), 2.0) == []  # never started


def test_cancel_unknown_job(cs):
    with pytest.raises(NotFound):
        cancel(cs, hexid(), 0.0)
    with pytest.raises(NotFound):
        cs.handle(stimuli.CancelRequested(hexid()), 0.0)


def test_forget(running):
    cs, p, job = running
    cs.handle(stimuli.JobForgotten(job.job_id), 0.0)
    assert job.job_id not in cs.jobs
    cs.handle(stimuli.JobForgotten(job.job_id), 0.0)  # idempotent
    assert result(cs, p.provider_id, job.job_id, 0, 1, cs.incarnation, 1.0) is False


def test_unregister_requeues_to_others(cs):
    a, b = make_info(20.0), make_info(10.0)
    connect(cs, a)
    connect(cs, b)
    job = make_job(m=300)
    cs.handle(stimuli.JobAdded(job), 0.0)
    moved = [s.index for s in job.subtasks if s.provider_id == a.provider_id]
    actions = cs.handle(stimuli.ProviderLeft(a.provider_id), 1.0)
    assert actions[0] == ProviderLost(a.provider_id, len(moved), stimuli.LEFT)
    assert sorted(d.subtask for d in dispatches(actions)) == moved
    assert all(d.provider_id == b.provider_id and d.attempt == 2 for d in dispatches(actions))
    assert a.provider_id not in cs.providers
    assert cs.handle(stimuli.ProviderLeft(a.provider_id), 2.0) == []
    assert heartbeat(cs, a.provider_id, 2.0) is False


def test_unregister_does_not_touch_finished_subtasks(cs):
    a, b = make_info(10.0), make_info(10.0)
    connect(cs, a)
    connect(cs, b)
    job = make_job(m=100)
    cs.handle(stimuli.JobAdded(job), 0.0)
    done = next(s for s in job.subtasks if s.provider_id == a.provider_id)
    assert result(cs, a.provider_id, job.job_id, done.index, 1, cs.incarnation, 1.0)
    cs.handle(stimuli.ResultMerged(job.job_id), 1.0)
    actions = cs.handle(stimuli.ProviderLeft(a.provider_id), 2.0)
    assert actions == [ProviderLost(a.provider_id, 0, stimuli.LEFT)]
    assert done.state is SubState.DONE


# ---- views ----------------------------------------------------------------------------------------
def test_provider_rows_and_job_view(cs):
    p = make_info(12.345, name="alpha")
    connect(cs, p)
    job = make_job(m=10)
    cs.handle(stimuli.JobAdded(job), 0.0)
    (row,) = views.provider_rows(cs.providers, 2.0)
    assert row["name"] == "alpha" and row["gflops"] == 12.35 and row["assigned"] == 1
    assert row["last_heartbeat_s"] == 2.0
    view = view_of(job, {p.provider_id: "alpha"})
    assert view["state"] == "running" and view["progress"] == {"done": 0, "total": 10, "unit": "rows"}
    assert view["inputs"]["a"] == {"dtype": "float64", "shape": [10, 8]}
    assert set(TERMINAL_NAMES) == {"done", "failed", "cancelled"}
    assert result(cs, p.provider_id, job.job_id, 0, 1, cs.incarnation, 1.0)
    assert view_of(job, {p.provider_id: "alpha"})["shares"] == {"alpha": 1.0}


# ---- speed learning: the service time the head observes ---------------------------------------------
BIG = 1000  # make_job(m=BIG, k=BIG, n=BIG): 2e9 FLOP; half of it, 1e9 FLOP, is well over MEASURABLE_FLOPS


def speed(cs: ClusterState, info: ProviderInfo) -> float:
    return cs.providers[info.provider_id].gflops("matmul")


def finish(cs: ClusterState, job: st.Job, provider: ProviderInfo, now: float, elapsed: float,
           attempt: int | None = None) -> bool:
    """The result of ``provider``'s (only, or given attempt's) subtask of ``job`` arrives at ``now``."""
    sub = next(s for s in job.subtasks if provider.provider_id in s.tried)
    attempt = attempt or sub.tried.index(provider.provider_id) + 1
    ok = result(cs, provider.provider_id, job.job_id, sub.index, attempt, cs.incarnation, now, elapsed=elapsed)
    if ok:
        cs.handle(stimuli.ResultMerged(job.job_id), now)
    return ok


def test_late_results_lower_the_learned_speed_and_the_next_share(cs):
    """Both compute a half in 0.1 s, but one's result (behind a slow link) arrives after 1 s: the head
    learns that one at the speed it observed, and gives it fewer rows of the next job."""
    near, far = make_info(10.0), make_info(10.0)
    connect(cs, near)
    connect(cs, far)
    job = make_job(m=BIG, k=BIG, n=BIG)
    cs.handle(stimuli.JobAdded(job), 0.0)
    assert rows_by_provider(job) == {near.provider_id: 500, far.provider_id: 500}
    assert finish(cs, job, near, 0.1, elapsed=0.1)
    assert finish(cs, job, far, 1.0, elapsed=0.1)  # compute 0.1 s, transfers 0.9 s
    assert job.state is JobState.DONE
    assert speed(cs, near) == pytest.approx(10.0)  # 1e9 FLOP in 0.1 s
    # 1e9 FLOP in 1 s, not 0.1 s; a first measurement 10x below the claim replaces it (CLAIM_TRUST)
    assert speed(cs, far) == pytest.approx(1.0)
    nxt = make_job(m=BIG, k=BIG, n=BIG, created_at=1.0)
    cs.handle(stimuli.JobAdded(nxt), 1.0)
    rows = rows_by_provider(nxt)
    assert rows[far.provider_id] == round(BIG * 1.0 / 11.0) and rows[near.provider_id] > 900


def test_reported_compute_time_still_counts(cs):
    """The provider's own elapsed_s is a floor: a longer compute than the head saw is believed."""
    p = make_info(10.0)
    connect(cs, p)
    job = make_job(m=BIG, k=BIG, n=BIG)
    cs.handle(stimuli.JobAdded(job), 0.0)
    assert finish(cs, job, p, 4.0, elapsed=4.0)
    assert speed(cs, p) == pytest.approx(2e9 / 4.0 / 1e9)  # 20x below the claim: it replaces it


def test_queued_subtasks_are_not_charged_for_waiting(cs):
    """A provider runs its subtasks one at a time: a block sent at 0 s behind three others starts when
    the head hears the previous one finish, so each block costs 0.5 s, not 0.5, 1, 1.5 and 2 s."""
    mem = 2 * (BIG * BIG * 8 + 250 * 2 * BIG * 8)  # B and 250 rows of A and C in half the memory
    p = make_info(1.0, memory_bytes=mem)
    connect(cs, p)
    job = make_job(m=BIG, k=BIG, n=BIG)
    cs.handle(stimuli.JobAdded(job), 0.0)
    assert [s.params["rows"] for s in job.subtasks] == [250] * 4 and all(s.sent == [0.0] for s in job.subtasks)
    for i, sub in enumerate(job.subtasks):  # 5e8 FLOP each at 1 GFLOP/s: 0.5 s each
        now = 0.5 * (i + 1)
        assert result(cs, p.provider_id, job.job_id, sub.index, 1, cs.incarnation, now, elapsed=0.5)
        cs.handle(stimuli.ResultMerged(job.job_id), now)
        assert speed(cs, p) == pytest.approx(1.0)
    assert cs.providers[p.provider_id].last_result_at == 2.0
    # another job's subtask sent while the provider was idle is measured from its own send time
    later = make_job(m=BIG, k=BIG, n=BIG, created_at=10.0)
    cs.handle(stimuli.JobAdded(later), 10.0)
    sub = later.subtasks[0]
    assert result(cs, p.provider_id, later.job_id, sub.index, 1, cs.incarnation, 10.5, elapsed=0.5)
    assert speed(cs, p) == pytest.approx(1.0)


def test_a_failure_frees_the_provider_for_the_next_subtask(cs):
    mem = 2 * (BIG * BIG * 8 + 500 * 2 * BIG * 8)
    p = make_info(1.0, memory_bytes=mem)
    connect(cs, p)
    job = make_job(m=BIG, k=BIG, n=BIG)
    cs.handle(stimuli.JobAdded(job), 0.0)
    first, second = job.subtasks
    cs.handle(stimuli.SubtaskFailed(p.provider_id, job.job_id, first.index, 1, cs.incarnation, "boom", True), 3.0)
    assert cs.providers[p.provider_id].last_result_at == 3.0
    assert result(cs, p.provider_id, job.job_id, second.index, 1, cs.incarnation, 4.0, elapsed=1.0)
    assert speed(cs, p) == pytest.approx(1.0)  # 1e9 FLOP in 1 s (from 3 s), not in 4 s


def straggling(cs: ClusterState):
    """Two providers at 10 GFLOP/s, a measurable job; fast finishes its half at 0.1 s, slow's half is
    flagged at 3 s and copied to fast (attempt 2, sent at 3 s)."""
    fast, slow = make_info(10.0, name="fast"), make_info(10.0, name="slow")
    connect(cs, fast)
    connect(cs, slow)
    job = make_job(m=BIG, k=BIG, n=BIG)
    cs.handle(stimuli.JobAdded(job), 0.0)
    for sub in job.subtasks:
        cs.handle(stimuli.SubtaskAcked(sent_to(sub), job.job_id, sub.index, 1, cs.incarnation), 0.0)
    assert finish(cs, job, fast, 0.1, elapsed=0.1)
    copy = dispatches(cs.handle(stimuli.Tick(), 3.0))
    sub = next(s for s in job.subtasks if s.state is not SubState.DONE)
    assert copy == [Dispatch(fast.provider_id, job.job_id, sub.index, 2)]
    assert sub.tried == [slow.provider_id, fast.provider_id] and sub.sent == [0.0, 3.0]
    return fast, slow, job, sub


def test_original_winning_over_a_speculative_copy_is_timed_from_its_own_send(cs):
    fast, slow, job, sub = straggling(cs)
    assert result(cs, slow.provider_id, job.job_id, sub.index, 1, cs.incarnation, 4.0, elapsed=0.2)
    assert speed(cs, slow) == pytest.approx(1e9 / 4.0 / 1e9)  # 4 s, not 1 s since the copy
    # the copy's result is ignored and teaches nothing, but fast is free again from then
    assert not result(cs, fast.provider_id, job.job_id, sub.index, 2, cs.incarnation, 4.2, elapsed=4.1)
    assert speed(cs, fast) == pytest.approx(10.0)
    assert cs.providers[fast.provider_id].last_result_at == 4.2


def test_speculative_copy_winning_is_timed_from_the_copy_and_the_late_original_teaches_nothing(cs):
    fast, slow, job, sub = straggling(cs)
    assert result(cs, fast.provider_id, job.job_id, sub.index, 2, cs.incarnation, 3.1, elapsed=0.1)
    assert speed(cs, fast) == pytest.approx(10.0)  # 0.1 s from the copy's send, not 3.1 s from the original's
    assert cs.handle(stimuli.ResultMerged(job.job_id), 3.1) == [JobFinished(job.job_id)]
    assert not result(cs, slow.provider_id, job.job_id, sub.index, 1, cs.incarnation, 9.0, elapsed=0.1)
    assert speed(cs, slow) == pytest.approx(10.0)  # only the benchmark: nothing accepted from it
    assert cs.providers[slow.provider_id].last_result_at == 9.0


def test_old_attempt_result_is_timed_from_that_attempt(cs):
    """A re-send after a missed ack does not make attempt 1's result look quicker than it was."""
    a, b = make_info(10.0), make_info(10.0)
    connect(cs, a)
    job = make_job(m=BIG, k=BIG, n=BIG)
    cs.handle(stimuli.JobAdded(job), 0.0)
    connect(cs, b)
    heartbeat(cs, a.provider_id, 11.0)
    heartbeat(cs, b.provider_id, 11.0)
    assert dispatches(cs.handle(stimuli.Tick(), 11.0)) == [Dispatch(b.provider_id, job.job_id, 0, 2)]
    assert result(cs, a.provider_id, job.job_id, 0, 1, cs.incarnation, 20.0, elapsed=1.0) is True
    assert speed(cs, a) == pytest.approx(2e9 / 20.0 / 1e9)  # 20 s, not 9 s


def test_results_from_a_foreign_provider_or_epoch_do_not_move_its_clock(running):
    cs, p, job = running
    other = make_info()
    connect(cs, other)
    assert not result(cs, other.provider_id, job.job_id, 0, 1, cs.incarnation, 5.0)
    assert not result(cs, p.provider_id, job.job_id, 0, 1, hexid(), 5.0)
    assert cs.providers[other.provider_id].last_result_at == 0.0
    assert cs.providers[p.provider_id].last_result_at == 0.0


@pytest.mark.parametrize("reported, sent_at, free_at, now, expected", [
    (0.1, 0.0, 0.0, 1.0, 1.0),  # transfers count
    (0.1, 0.0, 2.0, 3.0, 1.0),  # sent while busy: from when the previous result came back
    (2.0, 0.0, 2.5, 3.0, 2.0),  # the provider's compute time is a floor
    (50.0, 0.0, 0.0, 3.0, 3.0),  # ...capped by the time since the attempt was sent (bogus elapsed_s)
    (0.0, 0.0, 0.0, 1.0, 1.0),  # not measured by the provider: the head's observation alone
    (float("nan"), 0.0, 0.0, 1.0, 1.0),
    (-1.0, 0.0, 0.0, 1.0, 1.0),
    (float("inf"), 0.0, 0.0, 1.0, 1.0),
    (0.3, 5.0, 0.0, 4.0, 0.3),  # the clock stepped back: the provider's word alone
    (0.3, 5.0, 0.0, 5.0, 0.3),
    (0.3, 0.0, 7.0, 5.0, 0.3),  # heard it finish "after" now (clock step): no observation
    (float("nan"), 5.0, 0.0, 4.0, 0.0),  # nothing believable: learn nothing
])
def test_service_seconds(reported, sent_at, free_at, now, expected):
    assert st.service_seconds(reported, sent_at, free_at, now) == pytest.approx(expected)


def test_nothing_believable_learns_nothing(cs):
    p = make_info(10.0)
    connect(cs, p, 5.0)
    job = make_job(m=BIG, k=BIG, n=BIG, created_at=5.0)
    cs.handle(stimuli.JobAdded(job), 5.0)
    assert finish(cs, job, p, 4.0, elapsed=float("nan"))  # the clock stepped back, elapsed_s is garbage
    assert speed(cs, p) == 10.0


def test_a_stream_of_tiny_jobs_takes_turns_on_the_providers(cs, monkeypatch: pytest.MonkeyPatch) -> None:
    """One subtask each (too small to split); the least loaded provider gets the next, not always the fastest."""
    monkeypatch.setattr(rows, "MIN_SHARE_SECONDS", 0.002)
    fast, slow = make_info(11.0), make_info(10.0)
    connect(cs, fast)
    connect(cs, slow)
    first = dispatches(cs.handle(stimuli.JobAdded(make_job(m=4, k=4, n=4)), 0.0))
    assert [d.provider_id for d in first] == [fast.provider_id], "an idle pool: the fastest"
    second = dispatches(cs.handle(stimuli.JobAdded(make_job(m=4, k=4, n=4)), 0.0))
    assert [d.provider_id for d in second] == [slow.provider_id], "the fastest is busy: the other"
    targets = [d.provider_id for _ in range(10)
               for d in dispatches(cs.handle(stimuli.JobAdded(make_job(m=4, k=4, n=4)), 0.0))]
    assert targets.count(fast.provider_id) == targets.count(slow.provider_id) == 5


def owner(sub: st.Subtask) -> str:
    """The provider a subtask is out on."""
    assert sub.provider_id is not None
    return sub.provider_id


# ---- cancel reaches the providers; `assigned` tells the truth ---------------------------------------
def _two_running(cs: ClusterState) -> tuple[ProviderInfo, ProviderInfo, st.Job]:
    a, b = make_info(10.0), make_info(10.0)
    connect(cs, a)
    connect(cs, b)
    job = make_job(m=100)
    cs.handle(stimuli.JobAdded(job), 0.0)
    for sub in job.subtasks:
        cs.handle(stimuli.SubtaskAcked(owner(sub), job.job_id, sub.index, 1, cs.incarnation), 0.1)
    assert {s.provider_id for s in job.subtasks} == {a.provider_id, b.provider_id}
    return a, b, job


def test_cancel_tells_each_provider_and_keeps_the_subtasks_assigned_until_they_stop(cs):
    a, b, job = _two_running(cs)
    actions = cs.handle(stimuli.CancelRequested(job.job_id), 1.0)
    assert sorted(actions[:-1], key=lambda x: x.provider_id) == sorted(
        [stimuli.StopSubtasks(a.provider_id, job.job_id), stimuli.StopSubtasks(b.provider_id, job.job_id)],
        key=lambda x: x.provider_id)
    rows_of = {r["provider_id"]: r["assigned"] for r in views.provider_rows(cs.providers, 1.0)}
    assert rows_of == {a.provider_id: 1, b.provider_id: 1}  # still computing: not shown free
    cs.handle(stimuli.JobForgotten(job.job_id), 1.1)  # its outcome stored: the scheduler lets it go
    sub_a = next(s for s in job.subtasks if s.provider_id == a.provider_id)
    assert cs.handle(stimuli.SubtaskCancelled(a.provider_id, job.job_id, sub_a.index, 1, cs.incarnation), 1.2) == []
    assert not cs.providers[a.provider_id].assigned and cs.providers[b.provider_id].assigned
    # a stale report (another head incarnation) frees nothing
    sub_b = next(s for s in job.subtasks if s.provider_id == b.provider_id)
    cs.handle(stimuli.SubtaskCancelled(b.provider_id, job.job_id, sub_b.index, 1, hexid()), 1.3)
    assert cs.providers[b.provider_id].assigned


def test_a_result_that_crossed_the_cancel_frees_its_provider_after_the_job_is_forgotten(cs):
    """The provider finished its last block before the cancel arrived and sent the result: the job is gone
    from the scheduler by then, and the result is ignored, but the provider is free of it at once."""
    a, b, job = _two_running(cs)
    cs.handle(stimuli.CancelRequested(job.job_id), 1.0)
    cs.handle(stimuli.JobForgotten(job.job_id), 1.1)
    sub_b = next(s for s in job.subtasks if s.provider_id == b.provider_id)
    ignored = cs.counters["results_ignored"]
    assert cs.handle(stimuli.ResultReceived(b.provider_id, job.job_id, sub_b.index, 1, cs.incarnation), 1.2) == []
    assert not cs.providers[b.provider_id].assigned and cs.providers[a.provider_id].assigned
    assert cs.counters["results_ignored"] == ignored + 1


def test_a_heartbeat_that_no_longer_lists_a_stopped_subtask_frees_it_and_one_that_does_tells_again(cs):
    a, b, job = _two_running(cs)
    cs.handle(stimuli.CancelRequested(job.job_id), 1.0)
    sub_a = next(s for s in job.subtasks if s.provider_id == a.provider_id)
    held = frozenset({f"{job.job_id}:{sub_a.index}"})
    # a heartbeat sent before the cancel arrived proves nothing
    assert cs.handle(stimuli.HeartbeatReceived(a.provider_id, running=frozenset()), 1.5) == []
    assert cs.providers[a.provider_id].assigned
    # still listed one interval later: the cancel was lost; it is sent again (that subtask only)
    later = 1.0 + cs.timing.heartbeat_interval
    assert cs.handle(stimuli.HeartbeatReceived(a.provider_id, running=held), later) == [
        stimuli.StopSubtasks(a.provider_id, job.job_id, sub_a.index)]
    # no longer listed: it stopped
    assert cs.handle(stimuli.HeartbeatReceived(a.provider_id, running=frozenset()), later + 0.1) == []
    assert not cs.providers[a.provider_id].assigned
    # a heartbeat whose list may be cut (None) decides nothing
    cs.handle(stimuli.HeartbeatReceived(b.provider_id, running=None), later + 0.1)
    assert cs.providers[b.provider_id].assigned


def test_a_provider_that_ignores_the_cancel_is_freed_after_a_bound(cs):
    a, b, job = _two_running(cs)
    cs.handle(stimuli.CancelRequested(job.job_id), 1.0)
    stop = cs.providers[a.provider_id].stopping[next(iter(cs.providers[a.provider_id].stopping))]
    assert stop.until >= 1.0 + max(cs.timing.ack_timeout, cs.timing.dead_after)
    for t in (2.0, 4.0, 6.0, 8.0, 10.0, 12.0):  # heartbeats keep it alive; it says nothing of its subtasks
        heartbeat(cs, a.provider_id, t)
        heartbeat(cs, b.provider_id, t)
        cs.handle(stimuli.Tick(), t)
    assert cs.providers[a.provider_id].assigned
    heartbeat(cs, a.provider_id, stop.until + 0.5)
    heartbeat(cs, b.provider_id, stop.until + 0.5)
    cs.handle(stimuli.Tick(), stop.until + 0.5)
    assert not cs.providers[a.provider_id].assigned and not cs.providers[b.provider_id].assigned


def test_delete_tells_the_providers_still_stopping_again_and_a_lost_provider_holds_nothing(cs):
    a, b, job = _two_running(cs)
    cs.handle(stimuli.CancelRequested(job.job_id), 1.0)
    sub_a = next(s for s in job.subtasks if s.provider_id == a.provider_id)
    cs.handle(stimuli.SubtaskCancelled(a.provider_id, job.job_id, sub_a.index, 1, cs.incarnation), 1.2)
    assert cs.handle(stimuli.JobForgotten(job.job_id), 1.3) == []  # after close: nothing new to say
    assert cs.handle(stimuli.JobForgotten(job.job_id, deleted=True), 2.0) == [
        stimuli.StopSubtasks(b.provider_id, job.job_id)]
    cs.handle(stimuli.ProviderLeft(b.provider_id), 3.0)
    assert b.provider_id not in cs.providers


def test_a_missed_deadline_does_not_stop_the_late_copy_and_its_result_still_wins(cs):
    """A provider slower than estimated may still be the one making progress: the deadline re-sends the
    subtask elsewhere but does not stop it, and whichever result comes first is taken."""
    a, b = make_info(10.0), make_info(10.0)
    connect(cs, a)
    job = make_job(m=10)
    cs.handle(stimuli.JobAdded(job), 0.0)
    sub = job.subtasks[0]
    cs.handle(stimuli.SubtaskAcked(a.provider_id, job.job_id, 0, 1, cs.incarnation), 0.1)
    connect(cs, b, 0.2)
    late = sub.deadline + 1
    heartbeat(cs, a.provider_id, late)
    heartbeat(cs, b.provider_id, late)
    actions = cs.handle(stimuli.Tick(), late)
    assert not [x for x in actions if isinstance(x, stimuli.StopSubtasks)]
    assert Dispatch(b.provider_id, job.job_id, 0, 2) in actions
    assert not cs.providers[a.provider_id].stopping
    # a's late result still counts (attempt 1 was its own); b is told to stop its copy
    actions = cs.handle(stimuli.ResultReceived(a.provider_id, job.job_id, 0, 1, cs.incarnation), late + 1)
    assert stimuli.StopSubtasks(b.provider_id, job.job_id, 0) in actions
    assert not cs.providers[a.provider_id].assigned
    assert cs.providers[b.provider_id].stopping.keys() == {(job.job_id, 0)}


def test_given_again_to_the_provider_stopping_it_is_its_new_copy(cs):
    a = make_info(10.0)
    connect(cs, a)
    job = make_job(m=10)
    cs.handle(stimuli.JobAdded(job), 0.0)
    sub = job.subtasks[0]
    cs.handle(stimuli.SubtaskAcked(a.provider_id, job.job_id, 0, 1, cs.incarnation), 0.1)
    late = sub.deadline + 1
    heartbeat(cs, a.provider_id, late)
    actions = cs.handle(stimuli.Tick(), late)  # the only provider: stopped and sent again
    assert Dispatch(a.provider_id, job.job_id, 0, 2) in actions
    assert not cs.providers[a.provider_id].stopping and len(cs.providers[a.provider_id].assigned) == 1
    # the old copy's `cancelled` is not the new copy's end
    cs.handle(stimuli.SubtaskCancelled(a.provider_id, job.job_id, 0, 1, cs.incarnation), late + 0.1)
    assert len(cs.providers[a.provider_id].assigned) == 1 and sub.state is SubState.SENT


def test_a_cancelled_subtask_of_a_running_job_is_a_retryable_failure(cs):
    a, b, job = _two_running(cs)
    sub = job.subtasks[0]
    cs.handle(stimuli.SubtaskCancelled(owner(sub), job.job_id, 0, 1, cs.incarnation), 1.0)
    assert sub.strikes == 1 and job.state is JobState.RUNNING


# ---- progress of running subtasks: rows and flops as they are done -------------------------------
def test_row_progress_counts_in_the_job_and_the_flops_once(cs):
    a, b, job = _two_running(cs)
    sub = job.subtasks[0]
    pid = owner(sub)
    prov = cs.providers[pid]
    rows = sub.params["rows"]
    assert job.progress().to_dict() == {"done": 0, "total": 100, "unit": "rows"}
    cs.handle(stimuli.SubtaskProgress(pid, job.job_id, 0, 1, cs.incarnation, done=rows // 2, total=rows), 1.0)
    assert prov.flops_done == pytest.approx(sub.cost * (rows // 2) / rows)
    assert job.progress().done == rows // 2
    # going backwards, over the total, another provider's or a stale report: ignored
    cs.handle(stimuli.SubtaskProgress(pid, job.job_id, 0, 1, cs.incarnation, done=1, total=rows), 1.1)
    other = next(p for p in cs.providers if p != pid)
    cs.handle(stimuli.SubtaskProgress(other, job.job_id, 0, 1, cs.incarnation, done=rows, total=rows), 1.1)
    cs.handle(stimuli.SubtaskProgress(pid, job.job_id, 0, 1, hexid(), done=rows, total=rows), 1.1)
    assert job.progress().done == rows // 2 and cs.providers[other].flops_done == 0
    assert result(cs, pid, job.job_id, 0, 1, cs.incarnation, 2.0)
    assert prov.flops_done == pytest.approx(sub.cost)  # the rest at the result, never twice
    job.planner.merge(sub.params, [], 2.0)  # what the head's I/O layer does before ResultMerged
    cs.handle(stimuli.ResultMerged(job.job_id), 2.0)
    assert job.progress().done == rows


def test_row_progress_of_a_requeued_subtask_starts_over_and_a_cancelled_job_keeps_its_progress(cs):
    a, b, job = _two_running(cs)
    sub = job.subtasks[0]
    rows = sub.params["rows"]
    cs.handle(stimuli.SubtaskProgress(owner(sub), job.job_id, 0, 1, cs.incarnation, done=rows, total=rows),
              1.0)
    assert job.progress().done == rows
    cs.handle(stimuli.ProviderLeft(owner(sub)), 1.5)  # its subtask goes back to pending
    assert job.progress().done == 0
    sub1 = job.subtasks[1]
    cs.handle(stimuli.SubtaskProgress(owner(sub1), job.job_id, 1, 1, cs.incarnation, done=10,
                                      total=sub1.params["rows"]), 2.0)
    cancel(cs, job.job_id, 2.5)
    assert job.progress().to_dict() == {"done": 10, "total": 100, "unit": "rows"}


# ---- a result channel that black-holes acks (issue 14 B4), compute that is stuck (B5) ----------------
def beat(cs: ClusterState, info: ProviderInfo, now: float, running: frozenset[str] | None = None,
         queued: int | None = None) -> list:
    return cs.handle(stimuli.HeartbeatReceived(info.provider_id, running=running, queued=queued), now)


def ack_all(cs: ClusterState, job: st.Job, info: ProviderInfo, now: float) -> None:
    for sub in job.subtasks:
        if sub.provider_id == info.provider_id and sub.state is SubState.SENT:
            cs.handle(stimuli.SubtaskAcked(info.provider_id, job.job_id, sub.index, sub.attempt, cs.incarnation), now)


def two_providers(timing: Timing | None = None) -> tuple[ClusterState, ProviderInfo, ProviderInfo]:
    cs = ClusterState(hexid(), timing or Timing(heartbeat_interval=1.0, ack_timeout=2.0))
    good, bad = make_info(10.0, name="good"), make_info(10.0, name="bad")
    connect(cs, good)
    connect(cs, bad)
    return cs, good, bad


def test_acks_missing_twice_in_a_row_make_a_provider_unhealthy_and_it_is_asked_to_reconnect():
    cs, good, bad = two_providers()
    now, marked = 0.0, []
    for n in range(2):  # two jobs: each time bad's share is never acknowledged (its PUSH is black-holed)
        job = make_job(m=20)
        cs.handle(stimuli.JobAdded(job), now)
        assert {s.provider_id for s in job.subtasks} == {good.provider_id, bad.provider_id}
        ack_all(cs, job, good, now)
        for t in (now + 1.0, now + 2.5):
            beat(cs, good, t)
            beat(cs, bad, t)
            actions = cs.handle(stimuli.Tick(), t)
            marked += [a for a in actions if isinstance(a, stimuli.ProviderUnhealthy)]
        assert cs.providers[bad.provider_id].missed_acks == n + 1
        assert all(s.provider_id == good.provider_id for s in job.subtasks if s.state is not SubState.DONE)
        finish_all(cs, job, now + 2.6)
        now += 3.0
    assert marked == [stimuli.ProviderUnhealthy(bad.provider_id, 2, cs.timing.dead_after)]
    prov = cs.providers[bad.provider_id]
    assert prov.state == "unhealthy" and not prov.ready and prov.alive
    assert views.provider_row(prov, now)["state"] == "unhealthy"
    # its next heartbeat reply asks it to open its connections anew, once
    assert beat(cs, bad, now) == [stimuli.AskReconnect(bad.provider_id)]
    assert beat(cs, bad, now + 0.5) == []
    # meanwhile every new job goes to the healthy provider alone
    job = make_job(m=20)
    cs.handle(stimuli.JobAdded(job), now + 0.5)
    assert {s.provider_id for s in job.subtasks} == {good.provider_id}
    assert cs.counters["providers_unhealthy"] == 1


def unhealthy(timing: Timing | None = None) -> tuple[ClusterState, ProviderInfo, ProviderInfo, float]:
    """``bad`` has just been marked unhealthy (two jobs' shares unacknowledged); the time it happened."""
    cs, good, bad = two_providers(timing)
    now = 0.0
    for _ in range(2):
        job = make_job(m=20)
        cs.handle(stimuli.JobAdded(job), now)
        ack_all(cs, job, good, now)
        beat(cs, good, now + 2.5)
        beat(cs, bad, now + 2.5)
        cs.handle(stimuli.Tick(), now + 2.5)
        finish_all(cs, job, now + 2.6)
        now += 3.0
    assert cs.providers[bad.provider_id].unhealthy
    return cs, good, bad, now - 3.0 + 2.5


def test_an_unhealthy_provider_is_tried_again_with_one_subtask_and_a_report_makes_it_healthy():
    cs, good, bad, t0 = unhealthy()
    prov = cs.providers[bad.provider_id]
    wait = prov.retry_wait
    assert beat(cs, bad, t0 + 0.5) == [stimuli.AskReconnect(bad.provider_id)]  # when it was marked
    beat(cs, good, t0 + wait)
    beat(cs, bad, t0 + wait)
    cs.handle(stimuli.Tick(), t0 + wait + 0.01)
    assert not prov.ready  # its wait is over: it is asked to reconnect once more, then probed
    assert beat(cs, bad, t0 + wait + 0.01) == [stimuli.AskReconnect(bad.provider_id)]
    assert not prov.ready
    beat(cs, bad, t0 + wait + 0.015)  # sent after it opened its connections anew
    assert prov.probation and prov.ready and prov.state == "ready"
    job = make_job(m=30)
    cs.handle(stimuli.JobAdded(job), t0 + wait + 0.02)
    on_bad = [s for s in job.subtasks if s.provider_id == bad.provider_id]
    assert len(on_bad) == 1  # a split takes it, but it is a probe: nothing more until it reports
    actions = cs.handle(stimuli.SubtaskAcked(bad.provider_id, job.job_id, on_bad[0].index, 1, cs.incarnation),
                        t0 + wait + 0.1)
    assert actions == [stimuli.ProviderHealthy(bad.provider_id, "unhealthy")]
    assert prov.state == "ready" and not prov.probation and prov.missed_acks == 0 and prov.retry_wait == 0.0


def test_a_probe_that_is_not_acknowledged_makes_it_unhealthy_again_for_twice_as_long():
    cs, good, bad, t0 = unhealthy()
    prov = cs.providers[bad.provider_id]
    first = prov.retry_wait
    t = t0 + first + 0.01
    beat(cs, good, t)
    beat(cs, bad, t)
    cs.handle(stimuli.Tick(), t)
    beat(cs, bad, t)
    beat(cs, bad, t)
    assert prov.probation
    job = make_job(m=30)
    cs.handle(stimuli.JobAdded(job), t)
    ack_all(cs, job, good, t)
    beat(cs, good, t + 2.5)
    beat(cs, bad, t + 2.5)
    actions = cs.handle(stimuli.Tick(), t + 2.5)
    assert stimuli.ProviderUnhealthy(bad.provider_id, 3, 2 * first) in actions
    assert prov.unhealthy and prov.retry_at == pytest.approx(t + 2.5 + 2 * first) and prov.reconnect_due
    assert all(s.provider_id == good.provider_id for s in job.subtasks)  # its share re-sent to good


def test_a_late_report_makes_an_unhealthy_provider_healthy_at_once():
    cs, good, bad, t0 = unhealthy()
    old = next(j for j in cs.jobs.values())
    sub = next(s for s in old.subtasks if bad.provider_id in s.tried)
    # its result channel works again: a late result of an earlier attempt (ignored: the job is done) says so
    actions = cs.handle(stimuli.ResultReceived(bad.provider_id, old.job_id, sub.index, 1, cs.incarnation), t0 + 1)
    assert stimuli.ProviderHealthy(bad.provider_id, "unhealthy") in actions
    assert cs.providers[bad.provider_id].ready


def test_a_lost_ack_with_other_reports_meanwhile_does_not_count_against_the_result_channel():
    cs, good, bad = two_providers()
    now = 0.0
    for _ in range(3):
        job = make_job(m=20)
        cs.handle(stimuli.JobAdded(job), now)
        ack_all(cs, job, good, now)
        sub = next(s for s in job.subtasks if s.provider_id == bad.provider_id)
        # bad's ack of this one is lost (the PUB dropped it), but it reports progress of other work meanwhile
        cs.handle(stimuli.SubtaskProgress(bad.provider_id, hexid(), 0, 1, cs.incarnation, 1, 2), now + 1.0)
        beat(cs, good, now + 2.5)
        beat(cs, bad, now + 2.5)
        actions = cs.handle(stimuli.Tick(), now + 2.5)
        assert not any(isinstance(a, stimuli.ProviderUnhealthy) for a in actions)
        assert sub.strikes == 1
        finish_all(cs, job, now + 2.6)
        now += 3.0
    assert cs.providers[bad.provider_id].ready


def stuck_provider() -> tuple[ClusterState, ProviderInfo, ProviderInfo, st.Job, st.Subtask]:
    """good finishes its share of a measurable job at once; bad acknowledges its share and then computes
    nothing (its compute thread hangs) while its heartbeats go on, listing that subtask."""
    cs, good, bad = two_providers(Timing(heartbeat_interval=1.0))
    job = make_job(m=BIG, k=BIG, n=BIG)
    cs.handle(stimuli.JobAdded(job), 0.0)
    for info in (good, bad):
        ack_all(cs, job, info, 0.0)
    assert finish(cs, job, good, 0.1, elapsed=0.1)
    sub = next(s for s in job.subtasks if s.state is not SubState.DONE)
    return cs, good, bad, job, sub


def test_a_provider_with_a_straggler_and_nothing_finished_is_stuck_and_gets_no_new_work():
    cs, good, bad, job, sub = stuck_provider()
    held = frozenset({f"{job.job_id}:{sub.index}"})
    t, stuck = 0.5, []
    while t <= 8.0:
        beat(cs, good, t)
        beat(cs, bad, t, running=held, queued=0)
        actions = cs.handle(stimuli.Tick(), t)
        stuck += [(t, a) for a in actions if isinstance(a, stimuli.ProviderStuck)]
        if t == 2.5:  # flagged a straggler (ack + 2 s) and copied to good at once (it is idle)
            assert [a.copied_to for a in actions if isinstance(a, stimuli.Straggler)] == [good.provider_id]
        t += 0.5
    # flagged at 2.5 s (ack + 2 s): stuck once it has held it twice that long, and at least stuck_min
    assert [s for s, _ in stuck] == [5.0]
    assert stuck[0][1] == stimuli.ProviderStuck(bad.provider_id, 5.0, 0)
    prov = cs.providers[bad.provider_id]
    assert prov.state == "stuck" and not prov.ready
    # what it is taken to be: no faster than 1e9 FLOP in 5 s, folded into its estimate
    assert speed(cs, bad) == pytest.approx(1e9 / 5.0 / 1e9)  # 50x below its claim: the claim is dropped
    nxt = make_job(m=20)
    cs.handle(stimuli.JobAdded(nxt), 8.0)
    assert {s.provider_id for s in nxt.subtasks} == {good.provider_id}
    assert cs.counters["providers_stuck"] == 1


def test_a_stuck_provider_is_given_work_again_when_it_finishes_or_says_it_holds_nothing():
    cs, good, bad, job, sub = stuck_provider()
    held = frozenset({f"{job.job_id}:{sub.index}"})
    for t in (0.5, 1.0, 2.5, 3.0, 4.0, 5.0, 5.5):
        beat(cs, good, t)
        beat(cs, bad, t, running=held, queued=1)
        cs.handle(stimuli.Tick(), t)
    assert cs.providers[bad.provider_id].state == "stuck"
    assert beat(cs, bad, 6.0, running=frozenset(), queued=0) == [stimuli.ProviderHealthy(bad.provider_id, "stuck")]
    assert cs.providers[bad.provider_id].ready
    # or by finishing something: stuck again, then its late result
    cs2, good2, bad2, job2, sub2 = stuck_provider()
    for t in (0.5, 2.5, 5.5):
        beat(cs2, bad2, t, running=frozenset({f"{job2.job_id}:{sub2.index}"}), queued=0)
        beat(cs2, good2, t)
        cs2.handle(stimuli.Tick(), t)
    assert cs2.providers[bad2.provider_id].state == "stuck"
    actions = cs2.handle(stimuli.ResultReceived(bad2.provider_id, job2.job_id, sub2.index, 1, cs2.incarnation, 5.0),
                         6.0)
    assert stimuli.ProviderHealthy(bad2.provider_id, "stuck") in actions
    assert cs2.providers[bad2.provider_id].ready


def test_a_provider_that_reports_progress_or_says_it_holds_nothing_is_not_stuck():
    cs, good, bad, job, sub = stuck_provider()
    for t in (0.5, 2.5, 5.5, 8.0):  # heartbeats that list nothing: the head's picture is stale, not stuck
        beat(cs, good, t)
        beat(cs, bad, t, running=frozenset(), queued=0)
        assert not any(isinstance(a, stimuli.ProviderStuck) for a in cs.handle(stimuli.Tick(), t))
    cs, good, bad, job, sub = stuck_provider()
    held = frozenset({f"{job.job_id}:{sub.index}"})
    cs.handle(stimuli.SubtaskProgress(bad.provider_id, job.job_id, sub.index, 1, cs.incarnation, 10, 100), 1.0)
    for t in (0.5, 2.5, 5.5, 8.0):  # slow but moving: a straggler (copied), not stuck
        beat(cs, good, t)
        beat(cs, bad, t, running=held, queued=0)
        assert not any(isinstance(a, stimuli.ProviderStuck) for a in cs.handle(stimuli.Tick(), t))
    assert cs.providers[bad.provider_id].ready


def test_a_straggler_not_copied_for_want_of_an_idle_provider_is_copied_once_one_is_idle():
    cs, good, bad, job, sub = stuck_provider()
    other = make_job(m=20, created_at=1.0)  # keeps good busy past the straggler's flag
    beat(cs, good, 0.5)
    beat(cs, bad, 0.5)
    cs.handle(stimuli.DrainRequested(bad.provider_id), 0.5)
    cs.handle(stimuli.JobAdded(other), 0.5)
    ack_all(cs, other, good, 0.5)
    beat(cs, good, 2.5)
    beat(cs, bad, 2.5)
    flagged = cs.handle(stimuli.Tick(), 2.5)
    assert [a.copied_to for a in flagged if isinstance(a, stimuli.Straggler)] == [None]
    finish_all(cs, other, 3.0)
    beat(cs, good, 3.0)
    beat(cs, bad, 3.0)
    actions = cs.handle(stimuli.Tick(), 3.25)
    assert dispatches(actions) == [Dispatch(good.provider_id, job.job_id, sub.index, 2)]
    assert not any(isinstance(a, stimuli.Straggler) for a in actions)  # flagged once, copied later
