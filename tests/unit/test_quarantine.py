"""Unit tests of untrusted providers in the state machine (head_node/state.py): a provider caught sending a
wrong result is quarantined until an operator clears it; a provider's own claim of speed is capped until
measured; the quarantine list on disk (head_node/quarantine.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.errors import Conflict, NotFound
from common.tasks import rows
from head_node import quarantine, stimuli
from head_node.state import ClusterState, JobState, SubState
from tests.unit.test_state import connect, dispatches, hexid, make_info, make_job, result, rows_by_provider, sent_to

BIG = 1000  # 2e9 flop per job: large enough to learn a speed from


@pytest.fixture(autouse=True)
def _split_small_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rows, "MIN_SHARE_SECONDS", 0.0)


@pytest.fixture
def cs() -> ClusterState:
    return ClusterState(incarnation=hexid())


def wrong(cs: ClusterState, provider_id: str, job_id: str, index: int, attempt: int, now: float) -> list:
    return cs.handle(stimuli.WrongResultCaught(provider_id, job_id, index, attempt, cs.incarnation,
                                               "rows 0..9 failed Freivalds' check"), now)


def two_providers_and_a_job(cs: ClusterState):
    liar, honest = make_info(10.0), make_info(10.0)
    connect(cs, liar)
    connect(cs, honest)
    job = make_job(m=100)
    cs.handle(stimuli.JobAdded(job), 0.0)
    assert set(rows_by_provider(job)) == {liar.provider_id, honest.provider_id}
    return liar, honest, job


def test_a_wrong_result_quarantines_its_provider_and_its_work_goes_elsewhere(cs):
    liar, honest, job = two_providers_and_a_job(cs)
    mine = [s for s in job.subtasks if s.provider_id == liar.provider_id]
    actions = wrong(cs, liar.provider_id, job.job_id, mine[0].index, mine[0].attempt, 1.0)
    told = [a for a in actions if isinstance(a, stimuli.ProviderQuarantined)]
    assert len(told) == 1 and told[0].provider_id == liar.provider_id and "Freivalds" in told[0].reason
    prov = cs.providers[liar.provider_id]
    assert prov.state == "quarantined" and not prov.ready
    assert cs.counters["providers_quarantined"] == 1 and cs.counters["results_wrong"] == 1
    # everything it held is sent to the honest one, with no strike
    assert {d.provider_id for d in dispatches(actions)} == {honest.provider_id}
    assert all(s.provider_id == honest.provider_id and s.strikes == 0 for s in mine)
    assert job.state is JobState.RUNNING


def test_a_quarantined_providers_later_results_are_ignored(cs):
    liar, honest, job = two_providers_and_a_job(cs)
    first, *others = [s for s in job.subtasks if s.provider_id == liar.provider_id]
    wrong(cs, liar.provider_id, job.job_id, first.index, first.attempt, 1.0)
    sub = job.subtasks[first.index]
    assert sub.state is SubState.SENT and sub.provider_id == honest.provider_id
    # a result from it for its old attempt of a subtask still open: not taken (it would be a late result)
    assert not result(cs, liar.provider_id, job.job_id, sub.index, 1, cs.incarnation, 1.5)
    assert result(cs, honest.provider_id, job.job_id, sub.index, sub.attempt, cs.incarnation, 2.0)


def test_a_job_never_waits_on_its_quarantined_only_provider_silently(cs):
    liar = make_info(10.0)
    connect(cs, liar)
    job = make_job(m=100)
    cs.handle(stimuli.JobAdded(job), 0.0)
    wrong(cs, liar.provider_id, job.job_id, 0, 1, 1.0)
    cs.handle(stimuli.Tick(), 2.0)
    assert job.state is JobState.RUNNING and job.waiting and "quarantined" in job.waiting


def test_quarantine_holds_across_registrations_by_id_and_by_key(cs):
    liar = make_info(10.0)
    key = "k" * 40
    cs.handle(stimuli.ProviderRegistered(liar, key), 0.0)
    cs.handle(stimuli.SubscriptionChanged(liar.provider_id, True), 0.0)
    job = make_job(m=100)
    cs.handle(stimuli.JobAdded(job), 0.0)
    wrong(cs, liar.provider_id, job.job_id, 0, 1, 1.0)
    cs.handle(stimuli.ProviderLeft(liar.provider_id), 2.0)  # gone from the table, not from the quarantine
    cs.handle(stimuli.ProviderRegistered(liar), 3.0)  # the same id again
    assert cs.providers[liar.provider_id].state == "quarantined"
    other = make_info(10.0)  # a new id with the same CURVE key
    cs.handle(stimuli.ProviderRegistered(other, key), 4.0)
    assert cs.providers[other.provider_id].quarantined is not None
    assert cs.quarantine[f"id:{liar.provider_id}"] == cs.quarantine[f"key:{key}"]


def test_an_operator_clears_a_quarantine_and_it_gets_work_again(cs):
    liar, honest, job = two_providers_and_a_job(cs)
    wrong(cs, liar.provider_id, job.job_id, job.subtasks[0].index, job.subtasks[0].attempt, 1.0)
    with pytest.raises(Conflict):
        cs.handle(stimuli.QuarantineCleared(honest.provider_id), 1.5)
    with pytest.raises(NotFound):
        cs.handle(stimuli.QuarantineCleared(hexid()), 1.5)
    cs.handle(stimuli.QuarantineCleared(liar.provider_id), 2.0)
    assert cs.providers[liar.provider_id].ready and not cs.quarantine
    nxt = make_job(m=100, created_at=2.0)
    cs.handle(stimuli.JobAdded(nxt), 2.0)
    assert liar.provider_id in {s.provider_id for s in nxt.subtasks}


def test_a_second_wrong_result_does_not_quarantine_twice(cs):
    liar, _honest, job = two_providers_and_a_job(cs)
    mine = [s for s in job.subtasks if s.provider_id == liar.provider_id]
    wrong(cs, liar.provider_id, job.job_id, mine[0].index, 1, 1.0)
    actions = wrong(cs, liar.provider_id, job.job_id, mine[0].index, 1, 1.1)
    assert not [a for a in actions if isinstance(a, stimuli.ProviderQuarantined)]
    assert cs.counters["providers_quarantined"] == 1 and cs.counters["results_wrong"] == 2


def test_a_wrong_result_from_an_earlier_head_run_is_ignored(cs):
    liar, _honest, job = two_providers_and_a_job(cs)
    cs.handle(stimuli.WrongResultCaught(liar.provider_id, job.job_id, 0, 1, "another-run", "x"), 1.0)
    assert cs.providers[liar.provider_id].quarantined is None


# ---- claims of speed -------------------------------------------------------------------------------------
def false_claim_beside_an_honest_one(cs: ClusterState):
    """A provider claiming 9e6 GFLOP/s and an honest one at 50, both ready, and a job of BIG rows split."""
    liar, honest = make_info(9e6), make_info(50.0)
    connect(cs, liar)
    connect(cs, honest)
    job = make_job(m=BIG, k=BIG, n=BIG)
    cs.handle(stimuli.JobAdded(job), 0.0)
    return liar, honest, job


def test_an_unmeasured_claim_counts_for_at_most_claim_trust_times_the_fastest_other(cs):
    liar, honest, job = false_claim_beside_an_honest_one(cs)
    got = rows_by_provider(job)
    assert got[liar.provider_id] == 800 and got[honest.provider_id] == 200  # 4 x 50 : 50, not 9e6 : 50


def test_a_claim_far_above_its_first_measurement_is_dropped(cs):
    liar, honest, job = false_claim_beside_an_honest_one(cs)
    for sub in job.subtasks:
        seconds = sub.cost / 50e9  # both compute at 50 GFLOP/s
        assert result(cs, sent_to(sub), job.job_id, sub.index, sub.attempt, cs.incarnation, seconds, seconds)
        cs.handle(stimuli.ResultMerged(job.job_id), seconds)
    assert cs.providers[liar.provider_id].gflops("matmul") == pytest.approx(50.0, rel=0.01)
    nxt = make_job(m=BIG, k=BIG, n=BIG, created_at=1.0)
    cs.handle(stimuli.JobAdded(nxt), 1.0)
    got = rows_by_provider(nxt)
    assert abs(got[liar.provider_id] - 500) <= 10  # measured alike: shared alike


def test_a_lone_provider_and_a_measured_one_keep_their_speed(cs):
    gpu = make_info(5000.0)
    connect(cs, gpu)
    job = make_job(m=BIG, k=BIG, n=BIG)
    cs.handle(stimuli.JobAdded(job), 0.0)
    assert rows_by_provider(job) == {gpu.provider_id: BIG}
    cpu = make_info(50.0)
    connect(cs, cpu)
    cs.providers[gpu.provider_id].speed["matmul"] = 5000.0  # measured: believed
    nxt = make_job(m=BIG, k=BIG, n=BIG, created_at=1.0)
    cs.handle(stimuli.JobAdded(nxt), 1.0)
    assert rows_by_provider(nxt)[gpu.provider_id] >= 985


# ---- the file -------------------------------------------------------------------------------------------
def test_the_quarantine_list_survives_a_restart(tmp_path: Path):
    entries = {"id:" + "a" * 32: "wrong result", "key:" + "K" * 40: "wrong result"}
    quarantine.save(tmp_path, entries, fsync=False)
    assert quarantine.load(tmp_path) == entries


@pytest.mark.parametrize("text", ["not json", "[1, 2]", json.dumps({"version": 2, "entries": {}}),
                                  json.dumps({"version": 1, "entries": {"id:x": 5, "other": "y", "id:y": "ok"}})])
def test_a_bad_quarantine_file_is_logged_and_its_valid_entries_kept(tmp_path: Path, text: str,
                                                                    caplog: pytest.LogCaptureFixture):
    (tmp_path / quarantine.FILE).write_text(text)
    got = quarantine.load(tmp_path)
    assert got == ({"id:y": "ok"} if "id:y" in text else {})
    if not got:
        assert "quarantine" in caplog.text
