"""``--verify-rate`` in the state machine (head_node/state.py): a fraction of the subtasks without a check of their
values is run on a second provider; the first result is held, never merged alone, and never sent back to its
provider; two agreeing results are merged once, a provider outvoted two to one is quarantined, and a subtask
whose results all disagree fails its job."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pytest

from common.tasks import Planner, ProviderSpec, SubtaskPlan
from head_node import state as st
from head_node import stimuli
from head_node.state import ClusterState, JobState, SubState, Verification
from tests.unit.test_groups import GroupRounds
from tests.unit.test_state import connect, dispatches, hexid, make_info, make_job

SECRET = b"the head's secret"


class Shares(Planner):
    """A single-round planner like ``SplitPlanner``, without a check of its values: ``count`` subtasks of 10 rows
    (matmul's ``fits`` reads them), round robin over the providers ready at the start."""

    def __init__(self, count: int, verifiable: bool = True) -> None:
        self.count, self.merged, self._verifiable = count, 0, verifiable

    def plan(self, providers: Sequence[ProviderSpec], outstanding: int, now: float) -> list[SubtaskPlan]:
        if self.finished:
            return []
        self.finished = True
        return [SubtaskPlan(providers[i % len(providers)].provider_id, {"row0": 10 * i, "rows": 10}, 1e6)
                for i in range(self.count)]

    def verifiable(self, sub_params: Mapping[str, Any]) -> bool:
        return self._verifiable

    def subtask_inputs(self, sub_params: Mapping[str, Any]) -> list[np.ndarray]:
        return []

    def check_result(self, sub_params: Mapping[str, Any], arrays: Sequence[np.ndarray]) -> None:
        pass

    def merge(self, sub_params: Mapping[str, Any], arrays: Sequence[np.ndarray], now: float) -> None:
        self.merged += 1

    def progress(self) -> tuple[int, int]:
        return self.merged, self.count


def verifying(rate: float = 1.0) -> ClusterState:
    return ClusterState(hexid(), st.Timing(heartbeat_interval=1.0), Verification(rate, SECRET))


def providers(cs: ClusterState, count: int) -> list[str]:
    infos = [make_info(10.0, name=f"p{i}") for i in range(count)]
    for info in infos:
        connect(cs, info)
    return [info.provider_id for info in infos]


def add_job(cs: ClusterState, planner: Planner, nodes: int | None = None) -> st.Job:
    job = make_job(m=1000, nodes=nodes)
    job.planner = planner
    cs.handle(stimuli.JobAdded(job), 1.0)
    return job


def send_result(cs: ClusterState, job: st.Job, index: int, now: float, provider_id: str | None = None) -> list:
    """A result of the subtask's current attempt from its provider (or ``provider_id``'s attempt)."""
    sub = job.subtasks[index]
    pid = provider_id or sub.provider_id
    assert pid is not None
    attempt = max(k for k, p in enumerate(sub.tried, 1) if p == pid)
    return cs.handle(stimuli.ResultReceived(pid, job.job_id, index, attempt, cs.incarnation), now)


def compared(cs: ClusterState, ask: stimuli.CompareResult, now: float, **verdicts: str | None) -> list:
    """Answer a ``CompareResult`` as the I/O layer does: witness id -> None (agrees) or what differs."""
    return cs.handle(stimuli.ResultsCompared(ask.provider_id, ask.job_id, ask.subtask, ask.attempt,
                                             tuple(verdicts.items())), now)


def only(actions: list, kind: type) -> Any:
    found = [a for a in actions if isinstance(a, kind)]
    assert len(found) == 1, actions
    return found[0]


def none_of(actions: list, kind: type) -> bool:
    return not any(isinstance(a, kind) for a in actions)


# ---- selection ---------------------------------------------------------------------------------
def test_the_selected_fraction_is_the_rate_and_a_pure_function_of_the_secret() -> None:
    rate = Verification(0.3, SECRET)
    picks = [rate.selects(f"job{j}", i) for j in range(40) for i in range(500)]
    assert abs(sum(picks) / len(picks) - 0.3) < 0.02
    assert picks == [rate.selects(f"job{j}", i) for j in range(40) for i in range(500)]  # replayed alike
    other = [Verification(0.3, b"another secret").selects(f"job{j}", i) for j in range(40) for i in range(500)]
    assert sum(a != b for a, b in zip(picks, other, strict=True)) > 0.3 * len(picks)  # providers cannot guess it
    assert not any(Verification(0.0, SECRET).selects(f"job{j}", 0) for j in range(1000))
    assert all(Verification(1.0, SECRET).selects(f"job{j}", 0) for j in range(1000))


def test_a_planned_subtask_is_selected_at_the_rate() -> None:
    cs = verifying(0.25)
    providers(cs, 2)
    job = add_job(cs, Shares(4000))
    assert abs(job.selected / 4000 - 0.25) < 0.03
    assert job.selected == sum(s.verify for s in job.subtasks)
    assert all(s.verify == cs.verification.selects(job.job_id, s.index) for s in job.subtasks)


def test_only_subtasks_without_a_check_of_their_own_are_candidates() -> None:
    cs = verifying(1.0)
    providers(cs, 2)
    matmul = make_job(m=100)  # Freivalds' check: checks_values
    cs.handle(stimuli.JobAdded(matmul), 1.0)
    group = add_job(cs, GroupRounds(rounds=1))  # a collective's members are never copied
    declined = add_job(cs, Shares(3, verifiable=False))
    for job in (matmul, group, declined):
        assert job.subtasks and not any(s.verify for s in job.subtasks) and not job.selected
        assert job.summary().get("verify", {}).get("method") != "replicas"


def test_without_a_rate_results_merge_at_once() -> None:
    cs = ClusterState(hexid())
    providers(cs, 2)
    job = add_job(cs, Shares(2))
    assert not any(s.verify for s in job.subtasks)
    for sub in job.subtasks:
        actions = send_result(cs, job, sub.index, 2.0)
        assert only(actions, stimuli.MergeResult).subtask == sub.index
        assert none_of(actions, stimuli.HoldResult) and none_of(actions, stimuli.CompareResult)
    assert "verify" not in job.summary()


# ---- a result held, then compared ---------------------------------------------------------------
def test_the_first_result_is_held_not_merged_and_goes_to_another_provider() -> None:
    cs = verifying()
    a, b = providers(cs, 2)
    job = add_job(cs, Shares(1))
    sub = job.subtasks[0]
    assert sub.verify and sub.provider_id == a
    actions = send_result(cs, job, 0, 2.0)
    assert only(actions, stimuli.HoldResult) == stimuli.HoldResult(a, job.job_id, 0, 1)
    assert none_of(actions, stimuli.MergeResult)
    assert [d.provider_id for d in dispatches(actions)] == [b]
    assert sub.witnesses == [a] and sub.state is SubState.SENT and sub.provider_id == b and sub.attempt == 2
    assert job.done_count == 0 and (job.job_id, 0) not in cs.providers[a].assigned
    assert cs.providers[a].subtasks_done == 1  # it did the work: its speed and load count it


def test_agreeing_results_are_merged_once() -> None:
    cs = verifying()
    a, b = providers(cs, 2)
    job = add_job(cs, Shares(1))
    send_result(cs, job, 0, 2.0)
    ask = only(send_result(cs, job, 0, 3.0), stimuli.CompareResult)
    assert ask == stimuli.CompareResult(b, job.job_id, 0, 2, (a,))
    assert none_of(send_result(cs, job, 0, 3.1, provider_id=b), stimuli.CompareResult)  # mid-comparison: ignored
    actions = compared(cs, ask, 3.2, **{a: None})
    assert only(actions, stimuli.MergeResult) == stimuli.MergeResult(b, job.job_id, 0, 2)
    assert none_of(actions, stimuli.ProviderQuarantined)
    sub = job.subtasks[0]
    assert sub.state is SubState.DONE and sub.done_by == b and job.done_count == 1
    assert job.verified == 1 and cs.counters["results_verified"] == 1
    assert job.summary()["verify"] == {"method": "replicas", "selected": 1, "verified": 1, "disagreements": 0}
    assert none_of(send_result(cs, job, 0, 3.3, provider_id=a), stimuli.MergeResult)  # a duplicate: ignored
    assert none_of(compared(cs, ask, 3.4, **{a: None}), stimuli.MergeResult)  # a second answer: ignored
    finished = cs.handle(stimuli.ResultMerged(job.job_id), 3.5)
    assert any(isinstance(x, st.JobFinished) for x in finished) and job.state is JobState.DONE


def test_a_disagreement_needs_a_third_provider_and_the_outvoted_one_is_quarantined() -> None:
    cs = verifying()
    liar, b, c = providers(cs, 3)
    job = add_job(cs, Shares(1))
    assert job.subtasks[0].provider_id == liar
    send_result(cs, job, 0, 2.0)
    sub = job.subtasks[0]
    second = sub.provider_id
    assert second in (b, c)
    actions = compared(cs, only(send_result(cs, job, 0, 3.0), stimuli.CompareResult), 3.0,
                       **{liar: "1 of 10 elements differ"})
    assert only(actions, stimuli.HoldResult).provider_id == second
    told = only(actions, stimuli.ResultDisagreed)
    assert told.witnesses == (liar,) and "1 of 10 elements differ" in told.why
    third = only(dispatches(actions), st.Dispatch).provider_id
    assert third not in (liar, second) and sub.witnesses == [liar, second]
    assert job.disagreements == 1 and cs.counters["results_disagreed"] == 1 and none_of(actions, stimuli.MergeResult)

    ask = only(send_result(cs, job, 0, 4.0), stimuli.CompareResult)
    assert ask.witnesses == (liar, second)
    actions = compared(cs, ask, 4.0, **{liar: "1 of 10 elements differ", second: None})
    assert only(actions, stimuli.MergeResult).provider_id == third
    caught = only(actions, stimuli.ProviderQuarantined)
    assert caught.provider_id == liar and caught.job_id == job.job_id and caught.subtask == 0
    assert caught.reason.startswith(f"outvoted for job {job.job_id[:8]} subtask 0") and "1 of 10" in caught.reason
    assert cs.providers[liar].state == "quarantined" and cs.quarantine[f"id:{liar}"] == caught.reason
    assert cs.counters["results_outvoted"] == 1 and cs.counters["providers_quarantined"] == 1
    assert cs.providers[second].ready and cs.providers[third].ready
    assert job.summary()["verify"] == {"method": "replicas", "selected": 1, "verified": 1, "disagreements": 1}


def test_the_outvoted_providers_unverified_work_is_redone_elsewhere() -> None:
    cs = verifying()
    liar, b, c = providers(cs, 3)
    job = add_job(cs, Shares(3))
    assert [s.provider_id for s in job.subtasks] == [liar, b, c]
    own, checked = job.subtasks[0], job.subtasks[1]
    send_result(cs, job, 0, 2.0)  # the liar's own result: held
    x = own.provider_id
    assert x in (b, c)
    send_result(cs, job, 1, 2.1)  # b's: held, and the liar (holding nothing) is to verify it
    assert checked.witnesses == [b] and checked.provider_id == liar
    compared(cs, only(send_result(cs, job, 0, 3.0), stimuli.CompareResult), 3.0, **{liar: "differs"})
    y = own.provider_id
    assert {x, y} == {b, c}
    actions = compared(cs, only(send_result(cs, job, 0, 4.0), stimuli.CompareResult), 4.0,
                       **{liar: "differs", x: None})
    assert only(actions, stimuli.ProviderQuarantined).taken_back == 1
    assert stimuli.StopSubtasks(liar, job.job_id, 1) in actions
    # what it was verifying goes to the one provider left that has no result of it held, without a strike
    assert [(d.provider_id, d.subtask) for d in dispatches(actions)] == [(c, 1)]
    assert checked.witnesses == [b] and checked.strikes == 0
    assert none_of(send_result(cs, job, 1, 4.5, provider_id=liar), stimuli.CompareResult)  # ignored from now on


def test_a_quarantined_witness_no_longer_counts() -> None:
    cs = verifying()
    a, b = providers(cs, 2)
    job = add_job(cs, Shares(1))
    send_result(cs, job, 0, 2.0)
    assert job.subtasks[0].witnesses == [a]
    matmul = make_job(m=100, created_at=2.0)  # a is caught lying elsewhere
    cs.handle(stimuli.JobAdded(matmul), 2.0)
    held = next(s for s in matmul.subtasks if s.provider_id == a)
    cs.handle(stimuli.WrongResultCaught(a, matmul.job_id, held.index, held.attempt, cs.incarnation, "Freivalds"), 2.5)
    assert job.subtasks[0].witnesses == []
    actions = send_result(cs, job, 0, 3.0)  # b's result is the first held now: it needs another provider's
    assert only(actions, stimuli.HoldResult).provider_id == b and none_of(actions, stimuli.CompareResult)
    assert "waiting for a second provider to verify subtask 0" in (job.waiting or "")


def test_results_that_all_disagree_fail_the_job_naming_the_providers() -> None:
    cs = verifying()
    pids = providers(cs, st.MAX_WITNESSES + 1)
    job = add_job(cs, Shares(1))
    send_result(cs, job, 0, 2.0)
    for k in range(st.MAX_WITNESSES - 1):
        ask = only(send_result(cs, job, 0, 3.0 + k), stimuli.CompareResult)
        actions = compared(cs, ask, 3.0 + k, **{w: f"off {k}" for w in ask.witnesses})
    assert job.state is JobState.FAILED and len(job.subtasks[0].witnesses) == st.MAX_WITNESSES
    error = only(actions, st.JobFailed).error
    assert "subtask 0: the results of providers" in error and "all disagree (--verify-rate)" in error
    assert all(cs.providers[p].info.name in error for p in job.subtasks[0].witnesses)
    assert not any(cs.providers[p].quarantined for p in pids)  # nobody was outvoted


# ---- never back to a witness --------------------------------------------------------------------
def test_with_no_second_provider_the_job_waits_and_says_so() -> None:
    cs = verifying()
    (a,) = providers(cs, 1)
    job = add_job(cs, Shares(1))
    actions = send_result(cs, job, 0, 2.0)
    assert only(actions, stimuli.HoldResult).provider_id == a and not dispatches(actions)
    for t in (2.5, 3.0, 4.0, 5.0):
        assert not dispatches(cs.handle(stimuli.HeartbeatReceived(a), t) + cs.handle(stimuli.Tick(), t))
    sub = job.subtasks[0]
    assert sub.state is SubState.PENDING and sub.attempt == 1 and job.state is JobState.RUNNING
    assert job.waiting == ("waiting for a second provider to verify subtask 0 (--verify-rate): only p0 could take "
                           "it, and its result is held")
    info = make_info(10.0, name="p1")
    sent = dispatches(connect(cs, info, 5.5))
    assert [d.provider_id for d in sent] == [info.provider_id]


def test_a_third_provider_is_waited_for_after_a_disagreement() -> None:
    cs = verifying()
    a, b = providers(cs, 2)
    job = add_job(cs, Shares(1))
    send_result(cs, job, 0, 2.0)
    actions = compared(cs, only(send_result(cs, job, 0, 3.0), stimuli.CompareResult), 3.0, **{a: "differs"})
    beats = cs.handle(stimuli.HeartbeatReceived(a), 4.0) + cs.handle(stimuli.HeartbeatReceived(b), 4.0)
    assert not dispatches(actions + beats + cs.handle(stimuli.Tick(), 4.0))
    assert job.waiting == ("waiting for another provider to verify subtask 0 (--verify-rate): the results of p0 "
                           "and p1 disagree")


def test_a_straggling_verification_is_never_copied_to_a_witness() -> None:
    cs = verifying()
    a, b = providers(cs, 2)
    job = add_job(cs, Shares(1))
    send_result(cs, job, 0, 2.0)
    sub = job.subtasks[0]
    cs.handle(stimuli.SubtaskAcked(b, job.job_id, 0, 2, cs.incarnation), 2.0)
    for t in (2.5, 10.0, 20.0, 30.0):  # heartbeats: nobody is lost
        for pid in (a, b):
            cs.handle(stimuli.HeartbeatReceived(pid), t)
        actions = cs.handle(stimuli.Tick(), t)
        assert not any(d.provider_id == a for d in dispatches(actions))
    assert sub.straggling and sub.tried == [a, b]


def test_a_verification_may_go_past_the_jobs_nodes_cap() -> None:
    cs = verifying()
    a, b = providers(cs, 2)
    job = add_job(cs, Shares(2), nodes=1)
    assert {s.provider_id for s in job.subtasks} == {a}  # the cap: one provider
    actions = send_result(cs, job, 0, 2.0)
    assert [d.provider_id for d in dispatches(actions)] == [b]


def test_a_lost_verifier_sends_the_subtask_to_another_non_witness() -> None:
    cs = verifying()
    a, b, c = providers(cs, 3)
    job = add_job(cs, Shares(1))
    send_result(cs, job, 0, 2.0)
    sub = job.subtasks[0]
    first = sub.provider_id
    assert first in (b, c)
    actions = cs.handle(stimuli.ProviderLeft(first), 3.0)
    assert [d.provider_id for d in dispatches(actions)] == [({b, c} - {first}).pop()]
    assert sub.witnesses == [a] and sub.strikes == 0


@pytest.mark.parametrize("rate", [0.0, 1.0])
def test_every_subtask_merges_exactly_once(rate: float) -> None:
    """A job of many subtasks on 3 honest providers: every subtask merged once, all verified at rate 1."""
    cs = verifying(rate)
    providers(cs, 3)
    job = add_job(cs, Shares(12))
    merged: list[int] = []
    now = 2.0
    while job.state is JobState.RUNNING:
        sub = next(s for s in job.subtasks if s.state is SubState.SENT)
        actions = send_result(cs, job, sub.index, now)
        ask = next((x for x in actions if isinstance(x, stimuli.CompareResult)), None)
        if ask is not None:
            actions = compared(cs, ask, now, **dict.fromkeys(ask.witnesses))
        merged += [x.subtask for x in actions if isinstance(x, stimuli.MergeResult)]
        if any(isinstance(x, stimuli.MergeResult) for x in actions):
            cs.handle(stimuli.ResultMerged(job.job_id), now)
        now += 0.1
    assert job.state is JobState.DONE and sorted(merged) == list(range(12))
    assert job.verified == (12 if rate else 0) and job.disagreements == 0
    assert all(s.done_by not in s.witnesses for s in job.subtasks)
