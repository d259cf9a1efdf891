"""Collective subtask groups in the state machine (``SubtaskPlan.group``): members live and die together."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest

from common.tasks import Planner, ProviderSpec, SubtaskPlan
from head_node import state as st
from head_node import stimuli
from head_node.state import ClusterState, SubState
from tests.unit.test_state import connect, dispatches, failed, hexid, make_info, make_job, result


class GroupRounds(Planner):
    """Plans each round as one group over every ready provider; counts finished and abandoned rounds."""

    def __init__(self, rounds: int) -> None:
        self.rounds, self.done, self.round = rounds, 0, 0
        self.abandons: list[tuple[str, str]] = []
        self.members: list[tuple[str, ...]] = []
        self.out = False

    def plan(self, providers: Sequence[ProviderSpec], outstanding: int, now: float) -> list[SubtaskPlan]:
        if outstanding or self.finished:
            return []
        self.round += 1
        group = f"r{self.round}"
        self.members.append(tuple(w.provider_id for w in providers))
        return [SubtaskPlan(w.provider_id, {"rank": r, "round": self.round}, 1e6, group=group)
                for r, w in enumerate(providers)]

    def abandoned(self, group: str, why: str, now: float) -> Sequence[str]:
        self.abandons.append((group, why))
        return ()

    def subtask_inputs(self, sub_params: Mapping[str, Any]) -> list[np.ndarray]:
        return []

    def check_result(self, sub_params: Mapping[str, Any], arrays: Sequence[np.ndarray]) -> None:
        pass

    def merge(self, sub_params: Mapping[str, Any], arrays: Sequence[np.ndarray], now: float) -> None:
        self.done += 1
        if self.done >= self.rounds * len(self.members[-1]):
            self.finished = True

    def progress(self) -> tuple[int, int]:
        return self.done, self.rounds


@pytest.fixture
def cs() -> ClusterState:
    return ClusterState(incarnation=hexid(), timing=st.Timing(heartbeat_interval=1.0))


def start(cs: ClusterState, providers: int) -> tuple[st.Job, GroupRounds, list[str]]:
    infos = [make_info() for _ in range(providers)]
    for info in infos:
        connect(cs, info)
    job = make_job()
    planner = GroupRounds(rounds=1)
    job.planner = planner
    sent = dispatches(cs.handle(stimuli.JobAdded(job), 1.0))
    assert len(sent) == providers and len({d.provider_id for d in sent}) == providers
    return job, planner, [i.provider_id for i in infos]


def stops(actions: list) -> set[tuple[str, int | None]]:
    return {(a.provider_id, a.subtask) for a in actions if isinstance(a, stimuli.StopSubtasks)}


def test_a_lost_member_stops_the_others_and_the_planner_plans_again(cs) -> None:
    job, planner, pids = start(cs, 3)
    for sub in job.subtasks:
        cs.handle(stimuli.SubtaskAcked(sub.tried[0], job.job_id, sub.index, 1, cs.incarnation), 1.1)
    assert result(cs, job.subtasks[0].tried[0], job.job_id, 0, 1, cs.incarnation, 1.2)  # one member finished
    running, dead = job.subtasks[1].provider_id, job.subtasks[2].provider_id
    actions = cs.handle(stimuli.ProviderLeft(dead or ""), 2.0)
    # the running member (not the dead one, nor the one that finished) is told to stop its copy
    assert stops(actions) == {(running, 1)}
    assert [a for a in actions if isinstance(a, stimuli.GroupAbandoned)][0].group == "r1"
    assert planner.abandons and planner.abandons[0][0] == "r1" and "lost" in planner.abandons[0][1]
    assert [s.state for s in job.subtasks[:3]] == [SubState.DONE, SubState.ABANDONED, SubState.ABANDONED]
    # the new round goes to the two left; nothing of the old one is re-queued or copied
    again = dispatches(actions)
    assert {d.provider_id for d in again} == set(pids) - {dead} and len(again) == 2
    assert all(s.group == "r2" for s in job.subtasks[3:]) and len(job.subtasks) == 5
    assert cs.counters["groups_abandoned"] == 1


def test_a_late_result_of_an_abandoned_member_is_ignored(cs) -> None:
    job, planner, _ = start(cs, 2)
    p0 = job.subtasks[0].tried[0]
    failed(cs, p0, job.job_id, 0, 1, cs.incarnation, "RuntimeError: Connection closed by peer", True, 2.0)
    assert job.subtasks[1].state is SubState.ABANDONED
    assert not result(cs, job.subtasks[1].tried[0], job.job_id, 1, 1, cs.incarnation, 2.1)
    assert planner.done == 0 and job.state is st.JobState.RUNNING


def test_a_member_that_misses_its_ack_abandons_the_group_without_a_copy(cs) -> None:
    job, planner, _ = start(cs, 2)
    cs.handle(stimuli.SubtaskAcked(job.subtasks[0].tried[0], job.job_id, 0, 1, cs.incarnation), 1.1)
    for pid in list(cs.providers):
        cs.handle(stimuli.HeartbeatReceived(pid), 1.0 + cs.timing.ack_timeout)
    actions = cs.handle(stimuli.Tick(), 1.5 + cs.timing.ack_timeout)
    assert planner.abandons and "not acknowledged" in planner.abandons[0][1]
    assert job.subtasks[0].state is SubState.ABANDONED and job.subtasks[0].attempt == 1  # never re-sent
    assert len(dispatches(actions)) == 2  # the next round, on both


def test_a_finished_group_finishes_the_job(cs) -> None:
    job, planner, _ = start(cs, 2)
    actions: list = []
    for sub in list(job.subtasks):
        assert result(cs, sub.provider_id or "", job.job_id, sub.index, 1, cs.incarnation, 2.0)
        planner.merge(sub.params, [], 2.0)  # the I/O layer merges, then says so
        actions += cs.handle(stimuli.ResultMerged(job.job_id), 2.0)
    assert any(isinstance(a, stimuli.JobFinished) for a in actions) and not planner.abandons


def test_the_default_planner_fails_its_job_when_a_group_is_abandoned(cs) -> None:
    job, planner, _ = start(cs, 2)
    planner.abandoned = lambda group, why, now: Planner.abandoned(planner, group, why, now)  # type: ignore[method-assign]
    actions = failed(cs, job.subtasks[0].provider_id or "", job.job_id, 0, 1, cs.incarnation, "boom", True, 2.0)
    assert job.state is st.JobState.FAILED and "abandoned" in (job.error or "")
    assert any(isinstance(a, stimuli.JobFailed) for a in actions)


class ChainedRounds(GroupRounds):
    """Plans two groups at once, the second to start from the first's results (pipelined rounds): abandoning
    either drops both."""

    def plan(self, providers: Sequence[ProviderSpec], outstanding: int, now: float) -> list[SubtaskPlan]:
        if outstanding or self.finished:
            return []
        first = super().plan(providers, 0, now)
        return first + super().plan(providers, 0, now)

    def abandoned(self, group: str, why: str, now: float) -> Sequence[str]:
        self.abandons.append((group, why))
        n = int(group[1:])
        return [f"r{n + 1 if n % 2 else n - 1}"]  # its partner: r1 with r2, r3 with r4


def test_a_group_the_planner_drops_with_an_abandoned_one_is_stopped_and_abandoned_too(cs) -> None:
    infos = [make_info() for _ in range(2)]
    for info in infos:
        connect(cs, info)
    job = make_job()
    job.planner = planner = ChainedRounds(rounds=1)
    sent = dispatches(cs.handle(stimuli.JobAdded(job), 1.0))
    assert [s.group for s in job.subtasks] == ["r1", "r1", "r2", "r2"] and len(sent) == 4
    for sub in job.subtasks:
        cs.handle(stimuli.SubtaskAcked(sub.tried[0], job.job_id, sub.index, 1, cs.incarnation), 1.1)
    p0 = job.subtasks[0].tried[0]
    actions = failed(cs, p0, job.job_id, 0, 1, cs.incarnation, "RuntimeError: Connection closed by peer", True, 2.0)
    # both groups are settled and their members told to stop; the planner heard once, of the one that failed
    assert [s.state for s in job.subtasks[:4]] == [SubState.ABANDONED] * 4
    assert planner.abandons == [("r1", planner.abandons[0][1])]
    assert {a.group for a in actions if isinstance(a, stimuli.GroupAbandoned)} == {"r1", "r2"}
    assert {(a.provider_id, a.subtask) for a in actions if isinstance(a, stimuli.StopSubtasks)} >= {
        (job.subtasks[1].tried[0], 1), (job.subtasks[2].tried[0], 2), (job.subtasks[3].tried[0], 3)}
    assert cs.counters["groups_abandoned"] == 2
    # a late result of the dropped group is not merged; the next two groups went out
    assert not result(cs, job.subtasks[3].tried[0], job.job_id, 3, 1, cs.incarnation, 2.1)
    assert [s.group for s in job.subtasks[4:]] == ["r3", "r3", "r4", "r4"]
