"""Stragglers: flagged once, copied to an idle provider; the first result of either attempt wins."""

from __future__ import annotations

import pytest

from common.tasks import rows
from head_node import state as st
from head_node import stimuli
from head_node.state import ClusterState, Timing
from tests.unit.test_state import connect, dispatches, hexid, make_info, make_job, result


@pytest.fixture(autouse=True)
def _split_small_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests split small matrices to check the mechanics; the least-share rule
    (rows.MIN_SHARE_SECONDS) has tests of its own in test_matmul_task.py."""
    monkeypatch.setattr(rows, "MIN_SHARE_SECONDS", 0.0)


def setup(now: float = 0.0):
    cs = ClusterState(hexid(), Timing(heartbeat_interval=100.0, straggler_min=2.0, straggler_factor=3.0))
    fast, slow = make_info(10.0, name="fast"), make_info(10.0, name="slow")
    connect(cs, fast, now)
    connect(cs, slow, now)
    job = make_job(m=100)
    actions = cs.handle(stimuli.JobAdded(job), now)
    for d in dispatches(actions):
        cs.handle(stimuli.SubtaskAcked(d.provider_id, d.job_id, d.subtask, d.attempt, cs.incarnation), now)
    return cs, job, fast, slow, dispatches(actions)


def test_straggler_is_flagged_once_and_copied_to_the_idle_provider() -> None:
    cs, job, fast, slow, sent = setup()
    by_provider = {d.provider_id: d for d in sent}
    quick = by_provider[fast.provider_id]
    assert result(cs, fast.provider_id, job.job_id, quick.subtask, quick.attempt, cs.incarnation, 0.5)
    cs.handle(stimuli.ResultMerged(job.job_id), 0.5)
    assert not [a for a in cs.handle(stimuli.Tick(), 1.0) if isinstance(a, stimuli.Straggler)]  # not yet
    actions = cs.handle(stimuli.Tick(), 3.0)
    flagged = [a for a in actions if isinstance(a, stimuli.Straggler)]
    assert len(flagged) == 1 and flagged[0].provider_id == slow.provider_id
    assert flagged[0].copied_to == fast.provider_id and flagged[0].seconds >= 2.0
    copy = [d for d in dispatches(actions)]
    assert len(copy) == 1 and copy[0].provider_id == fast.provider_id and copy[0].attempt == 2
    assert not [a for a in cs.handle(stimuli.Tick(), 4.0) if isinstance(a, stimuli.Straggler)]  # flagged once
    assert cs.counters["subtasks_speculative"] == 1
    # the slow original finishes first: it wins, the copy's result is ignored
    orig = by_provider[slow.provider_id]
    assert result(cs, slow.provider_id, job.job_id, orig.subtask, orig.attempt, cs.incarnation, 4.5)
    assert [type(a) for a in cs.handle(stimuli.ResultMerged(job.job_id), 4.5)] == [st.JobFinished]
    assert not result(cs, fast.provider_id, job.job_id, orig.subtask, 2, cs.incarnation, 4.6)
    assert not cs.providers[fast.provider_id].assigned and not cs.providers[slow.provider_id].assigned


def test_copy_result_wins_when_it_comes_first() -> None:
    cs, job, fast, slow, sent = setup()
    by_provider = {d.provider_id: d for d in sent}
    quick = by_provider[fast.provider_id]
    result(cs, fast.provider_id, job.job_id, quick.subtask, quick.attempt, cs.incarnation, 0.5)
    cs.handle(stimuli.ResultMerged(job.job_id), 0.5)
    copy = dispatches(cs.handle(stimuli.Tick(), 3.0))[0]
    assert result(cs, fast.provider_id, job.job_id, copy.subtask, copy.attempt, cs.incarnation, 3.2)
    assert [type(a) for a in cs.handle(stimuli.ResultMerged(job.job_id), 3.2)] == [st.JobFinished]
    orig = by_provider[slow.provider_id]
    assert not result(cs, slow.provider_id, job.job_id, orig.subtask, orig.attempt, cs.incarnation, 5.0)


def test_no_copy_without_an_idle_provider() -> None:
    cs, job, fast, slow, sent = setup()
    actions = cs.handle(stimuli.Tick(), 3.0)  # both still busy
    flagged = [a for a in actions if isinstance(a, stimuli.Straggler)]
    assert len(flagged) == 2 and all(a.copied_to is None for a in flagged)
    assert not dispatches(actions)
