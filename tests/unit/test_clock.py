"""The head's timers run on a monotonic clock; the wall clock only stamps what users see (issue 14 B7).

Stepping the wall clock (NTP, an operator, a VM resumed) used to move every timer of the head: +120 s
marked both healthy providers dead, -60 s held back the detection of a dead one by a minute. Now the state
machine gets ``now`` from ``time.monotonic()`` and ``wall`` from ``time.time()`` (head_node/server.py
``Head.apply``); ``wall`` is only written on a job's ``started_at`` and ``finished_at``. The chaos test
tests/chaos/test_clock_step.py steps a real head's wall clock."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from common import config, tasks
from common.tasks import ArrayMeta, JobContext, rows
from head_node import state as st
from head_node import stimuli
from head_node.server import Head

GiB = 1024**3


@pytest.fixture(autouse=True)
def _split_small_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rows, "MIN_SHARE_SECONDS", 0.0)


def info(name: str) -> st.ProviderInfo:
    return st.ProviderInfo(provider_id=uuid.uuid4().hex, name=name, host="h", os="linux", device_kind="cpu",
                           device_name="cpu", memory_bytes=16 * GiB, cores=4, task_types=frozenset({"matmul"}),
                           dtypes=frozenset({"float64"}), version="0", gflops=10.0)


def job(m: int = 20) -> st.Job:
    job_id = uuid.uuid4().hex
    inputs = {"a": ArrayMeta("float64", (m, 4)), "b": ArrayMeta("float64", (4, 3))}
    outputs = {"c": ArrayMeta("float64", (m, 3))}
    ctx = JobContext(job_id=job_id, params={}, inputs=inputs, outputs=outputs, operands={}, blob_ids={},
                     results={}, job_dir=Path("/nonexistent"))
    return st.Job(job_id=job_id, task_type="matmul", params={}, inputs=inputs, outputs=outputs, nodes=None,
                  created_at=1.7e9, planner=tasks.get("matmul").planner(ctx))


def connect(cs: st.ClusterState, p: st.ProviderInfo, now: float, wall: float) -> None:
    cs.handle(stimuli.ProviderRegistered(p), now, wall)
    cs.handle(stimuli.SubscriptionChanged(p.provider_id, True), now, wall)


def test_wall_clock_steps_move_no_timer_of_the_state_machine() -> None:
    """Heartbeats every 0.5 s on the monotonic clock while the wall clock jumps +120 s, then -60 s: no
    provider is lost, the job runs, and its started_at / finished_at are the wall clock's."""
    cs = st.ClusterState(uuid.uuid4().hex, st.Timing(heartbeat_interval=0.5))
    a, b = info("a"), info("b")
    mono, wall = 1000.0, 1.7e9
    connect(cs, a, mono, wall)
    connect(cs, b, mono, wall)
    j = job()
    cs.handle(stimuli.JobAdded(j), mono, wall)
    assert j.started_at == wall and j.started_t == mono
    lost = []
    for step in (120.0, -60.0, 0.0, 0.0):
        mono, wall = mono + 0.5, wall + 0.5 + step
        for p in (a, b):
            cs.handle(stimuli.HeartbeatReceived(p.provider_id), mono, wall)
        lost += [x for x in cs.handle(stimuli.Tick(), mono, wall) if isinstance(x, stimuli.ProviderLost)]
    assert lost == [] and all(p.ready for p in cs.providers.values())
    for sub in j.subtasks:
        assert sub.provider_id is not None
        cs.handle(stimuli.ResultReceived(sub.provider_id, j.job_id, sub.index, 1, cs.incarnation), mono, wall)
        cs.handle(stimuli.ResultMerged(j.job_id), mono, wall)
    assert j.state is st.JobState.DONE
    assert j.finished_at == wall and j.finished_t == mono
    assert j.finished_t - j.started_t == pytest.approx(2.0)  # durations from the monotonic clock: 4 x 0.5 s


def test_a_dead_provider_is_detected_on_time_whatever_the_wall_clock_does() -> None:
    cs = st.ClusterState(uuid.uuid4().hex, st.Timing(heartbeat_interval=0.5))
    a = info("a")
    mono, wall = 50.0, 1.7e9
    connect(cs, a, mono, wall)
    cs.handle(stimuli.ProviderDisconnected(a.provider_id), mono, wall)  # kill -9: its SUB closed
    tick = cs.handle(stimuli.Tick(), mono + 0.6, wall - 60.0)  # the wall clock stepped back a minute meanwhile
    assert [x.reason for x in tick if isinstance(x, stimuli.ProviderLost)] == [stimuli.DISCONNECTED]


def test_handle_without_a_wall_clock_stamps_now() -> None:
    cs = st.ClusterState(uuid.uuid4().hex)
    connect(cs, info("a"), 3.0, 3.0)
    j = job()
    cs.handle(stimuli.JobAdded(j), 7.0)
    assert j.started_at == 7.0 and j.started_t == 7.0


@pytest.fixture
def head(tmp_path: Path) -> Iterator[Head]:
    """A head that is built but not started (no socket bound): its ``apply`` is what every stimulus goes
    through."""
    cfg = config.head_settings(["--state-dir", str(tmp_path), "--heartbeat-interval", "0.5"], env={})
    h = Head(cfg)
    yield h
    h.store.close()
    h.transport.ctx.destroy(linger=0)


@pytest.mark.parametrize("step", [120.0, -60.0])
def test_the_head_runs_its_state_machine_on_the_monotonic_clock(head: Head, step: float,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = info("a"), info("b")
    for p in (a, b):
        head.apply(stimuli.ProviderRegistered(p))
        head.apply(stimuli.SubscriptionChanged(p.provider_id, True))
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + step)  # the wall clock steps (as NTP would)
    assert [x for x in head.apply(stimuli.Tick()) if isinstance(x, stimuli.ProviderLost)] == []
    rows_ = head.nodes()
    assert [r["state"] for r in rows_] == ["ready", "ready"]
    assert all(0 <= r["last_heartbeat_s"] < 5 for r in rows_)  # not 120 s, nor -60 s
    snap = head.snapshot()
    assert 0 <= snap["uptime_s"] < 60 and abs(snap["time"] - (real() + step)) < 5  # shown: the wall clock
    # a provider that stops: detected after 3 intervals of the monotonic clock, however the wall clock went
    head.apply(stimuli.HeartbeatReceived(a.provider_id))
    head.state.providers[b.provider_id].last_seen -= 1.6  # b's last heartbeat was 1.6 s ago (> 3 x 0.5 s)
    lost = [x for x in head.apply(stimuli.Tick()) if isinstance(x, stimuli.ProviderLost)]
    assert lost == [stimuli.ProviderLost(b.provider_id, 0, stimuli.SILENT)]
