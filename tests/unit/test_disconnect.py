"""Unit tests of failure detection in head_node/state.py: the ``ProviderDisconnected`` stimulus (the XPUB
unsubscribe the transport reports when a provider's task connection ends) and its grace, next to the
heartbeat rule; and the ZMTP heartbeat settings of common/config.py."""

from __future__ import annotations

import pytest

from common import config
from head_node import stimuli, views
from head_node.state import ClusterState, JobState, ProviderLost, SubState, Timing
from tests.unit.test_state import connect, dispatches, heartbeat, hexid, make_info, make_job, result, sent_to

GRACE = config.DISCONNECT_GRACE


@pytest.fixture
def cs() -> ClusterState:
    return ClusterState(incarnation=hexid())


def gone(cs: ClusterState, provider_id: str, now: float) -> list:
    return cs.handle(stimuli.ProviderDisconnected(provider_id), now)


def back(cs: ClusterState, provider_id: str, now: float) -> list:
    return cs.handle(stimuli.SubscriptionChanged(provider_id, True), now)


def busy(cs: ClusterState) -> tuple:
    """Two ready providers a, b and a running job split over both, every subtask acknowledged."""
    a, b = make_info(10.0), make_info(10.0)
    connect(cs, a)
    connect(cs, b)
    job = make_job(m=200)
    cs.handle(stimuli.JobAdded(job), 0.0)
    for sub in job.subtasks:
        cs.handle(stimuli.SubtaskAcked(sent_to(sub), job.job_id, sub.index, 1, cs.incarnation), 0.1)
    return a, b, job


def test_grace_default_and_timing():
    assert Timing().disconnect_grace == GRACE == 0.5
    assert Timing(disconnect_grace=0.2).disconnect_grace == 0.2


def test_disconnect_makes_the_provider_not_ready_at_once(cs):
    a, b = make_info(), make_info()
    connect(cs, a)
    connect(cs, b)
    assert gone(cs, a.provider_id, 1.0) == []
    prov = cs.providers[a.provider_id]
    assert not prov.ready and prov.alive and prov.disconnected_at == 1.0
    assert a.provider_id not in cs.subscribed_topics
    actions = cs.handle(stimuli.JobAdded(make_job()), 1.1)  # new work goes to the other one only
    assert {d.provider_id for d in dispatches(actions)} == {b.provider_id}


def test_disconnected_provider_is_lost_after_the_grace_and_its_work_requeued(cs):
    a, b, job = busy(cs)
    mine = sorted(s.index for s in job.subtasks if s.provider_id == a.provider_id)
    assert mine
    gone(cs, a.provider_id, 1.0)
    assert cs.handle(stimuli.Tick(), 1.0 + GRACE / 2) == []  # within the grace: nothing yet
    assert all(job.subtasks[i].provider_id == a.provider_id for i in mine)
    actions = cs.handle(stimuli.Tick(), 1.0 + GRACE)
    assert actions[0] == ProviderLost(a.provider_id, len(mine), stimuli.DISCONNECTED)
    redo = dispatches(actions)
    assert sorted(d.subtask for d in redo) == mine
    assert all(d.provider_id == b.provider_id and d.attempt == 2 for d in redo)
    assert all(job.subtasks[i].strikes == 0 for i in mine)  # a death is not a strike
    states = {r["provider_id"]: r["state"] for r in views.provider_rows(cs.providers, 2.0)}
    assert states == {a.provider_id: "dead", b.provider_id: "ready"}
    assert cs.counters["providers_lost"] == 1
    assert not [x for x in cs.handle(stimuli.Tick(), 10.0) if isinstance(x, ProviderLost)]  # lost once
    assert heartbeat(cs, a.provider_id, 3.0) is False  # a live one is told to register again


def test_detection_does_not_wait_for_the_heartbeat_rule(cs):
    a = make_info()
    connect(cs, a)
    heartbeat(cs, a.provider_id, 4.9)  # heard from it a moment ago: 15 s of heartbeat budget left
    gone(cs, a.provider_id, 5.0)
    assert cs.handle(stimuli.Tick(), 5.0 + GRACE) == [ProviderLost(a.provider_id, 0, stimuli.DISCONNECTED)]


@pytest.mark.parametrize("gap", [0.05, GRACE * 0.9])
def test_a_reconnect_within_the_grace_loses_nothing(cs, gap):
    a, b, job = busy(cs)
    mine = [s for s in job.subtasks if s.provider_id == a.provider_id]
    gone(cs, a.provider_id, 1.0)
    back(cs, a.provider_id, 1.0 + gap)  # libzmq reconnected, or the provider reopened its SUB
    prov = cs.providers[a.provider_id]
    assert prov.ready and prov.disconnected_at is None
    for t in (1.0 + GRACE, 1.5, 2.0):  # (a straggler only from 2.1 s)
        assert cs.handle(stimuli.Tick(), t) == []
    assert all(s.provider_id == a.provider_id and s.state is SubState.RUNNING and s.attempt == 1 for s in mine)
    assert cs.counters["providers_lost"] == 0
    assert result(cs, a.provider_id, job.job_id, mine[0].index, 1, cs.incarnation, 2.0)


def test_each_disconnect_has_its_own_grace(cs):
    a = make_info()
    connect(cs, a)
    gone(cs, a.provider_id, 1.0)
    back(cs, a.provider_id, 1.1)
    gone(cs, a.provider_id, 1.4)  # a second drop: timed from now, not from the first one
    assert cs.handle(stimuli.Tick(), 1.0 + GRACE + 0.01) == []
    assert cs.handle(stimuli.Tick(), 1.4 + GRACE) == [ProviderLost(a.provider_id, 0, stimuli.DISCONNECTED)]


def test_reregistering_within_the_grace_is_a_live_provider(cs):
    a = make_info()
    connect(cs, a)
    gone(cs, a.provider_id, 1.0)
    cs.handle(stimuli.ProviderRegistered(a), 1.2)  # only a live process registers
    assert cs.handle(stimuli.Tick(), 1.0 + GRACE * 3) == []
    assert cs.providers[a.provider_id].alive and not cs.providers[a.provider_id].ready
    back(cs, a.provider_id, 2.0)
    assert cs.providers[a.provider_id].ready


def test_heartbeats_do_not_cancel_a_disconnect(cs):
    """A heartbeat may have been on its way when the process died: only a new subscription (or a new
    registration) shows that the provider is back; one that cannot be sent work is not kept."""
    a = make_info()
    connect(cs, a)
    gone(cs, a.provider_id, 1.0)
    assert heartbeat(cs, a.provider_id, 1.1) is True
    assert cs.handle(stimuli.Tick(), 1.0 + GRACE) == [ProviderLost(a.provider_id, 0, stimuli.DISCONNECTED)]


def test_disconnect_of_unknown_or_dead_providers_changes_nothing(cs):
    pid = hexid()
    assert gone(cs, pid, 0.0) == []
    assert pid not in cs.providers
    a = make_info()
    connect(cs, a)
    cs.handle(stimuli.Tick(), 20.0)  # dead by the heartbeat rule
    assert not cs.providers[a.provider_id].alive
    assert gone(cs, a.provider_id, 20.1) == []
    assert cs.providers[a.provider_id].disconnected_at is None
    assert cs.handle(stimuli.Tick(), 30.0) == []
    assert cs.counters["providers_lost"] == 1


def test_a_subscription_before_registration_then_a_disconnect(cs):
    a = make_info()
    back(cs, a.provider_id, 0.0)
    gone(cs, a.provider_id, 0.5)  # the SUB went away again before the provider registered
    cs.handle(stimuli.ProviderRegistered(a), 1.0)
    prov = cs.providers[a.provider_id]
    assert not prov.subscribed and prov.disconnected_at is None
    assert cs.handle(stimuli.Tick(), 5.0) == []


def test_unregistered_after_a_disconnect_is_left_not_lost_twice(cs):
    a, b, job = busy(cs)
    mine = sum(1 for s in job.subtasks if s.provider_id == a.provider_id)
    gone(cs, a.provider_id, 1.0)
    actions = cs.handle(stimuli.ProviderLeft(a.provider_id), 1.1)
    assert actions[0] == ProviderLost(a.provider_id, mine, stimuli.LEFT)
    assert a.provider_id not in cs.providers
    assert not [x for x in cs.handle(stimuli.Tick(), 2.0) if isinstance(x, ProviderLost)]
    assert cs.counters["providers_lost"] == 1


def test_silent_provider_is_lost_by_the_heartbeat_rule_with_its_reason(cs):
    a = make_info()
    connect(cs, a)
    assert cs.handle(stimuli.Tick(), cs.timing.dead_after + 0.01) == [ProviderLost(a.provider_id, 0, stimuli.SILENT)]


def test_disconnect_while_a_job_waits_for_providers(cs):
    a = make_info()
    connect(cs, a)
    job = make_job(m=10)
    cs.handle(stimuli.JobAdded(job), 0.0)
    gone(cs, a.provider_id, 1.0)
    cs.handle(stimuli.Tick(), 1.0 + GRACE)
    sub = job.subtasks[0]
    assert sub.state is SubState.PENDING and job.state is JobState.RUNNING
    q = make_info()
    assert dispatches(connect(cs, q, 2.0)) == [stimuli.Dispatch(q.provider_id, job.job_id, 0, 2)]


# ---- ZMTP heartbeat settings --------------------------------------------------------------------
@pytest.mark.parametrize(("interval", "expected"), [
    (5.0, (5000, 15000)),  # the default: silent for 3 intervals, a PING every interval
    (0.4, (3333, 10000)),  # short intervals: never below ZMTP_TIMEOUT_MIN (a large frame on a slow link),
    (0.01, (3333, 10000)),  # ... and 3 PINGs in that time, not one per interval
    (60.0, (60000, 180000)),
    (3000.0, (2184500, 6553500)),  # libzmq's TTL is a 16-bit count of deciseconds
])
def test_zmtp_heartbeat_ms(interval, expected):
    assert config.zmtp_heartbeat_ms(interval) == expected
    ivl, timeout = expected
    assert timeout >= ivl
