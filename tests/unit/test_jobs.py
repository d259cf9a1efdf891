"""common/jobs.py: one record type with its queue message, store row and API view."""

from __future__ import annotations

from common.jobs import STATE_NAMES, TERMINAL_NAMES, JobRecord, JobState, Progress


def record(**over: object) -> JobRecord:
    base = JobRecord(job_id="a" * 32, type="matmul", params={"x": 1},
                     inputs={"a": {"blob": "b" * 32, "dtype": "float64", "shape": [2, 3]}},
                     outputs={"c": {"dtype": "float64", "shape": [2, 2]}}, nodes=None, created_at=5.0)
    return JobRecord(**{**base.__dict__, **over})


def test_message_round_trip_and_row() -> None:
    r = record()
    assert JobRecord.from_message(r.message()) == r
    row = {**r.message(), "state": "done", "started_at": 6.0, "finished_at": 7.0, "error": None,
           "stats": {"progress": {"done": 2, "total": 2}, "shares": {"p": 1.0}}, "accepted": 1}
    stored = JobRecord.from_row(row)
    assert stored.state is JobState.DONE and stored.blob_ids() == {"a": "b" * 32}


def test_one_view_for_stored_and_live_jobs() -> None:
    stored = record(state=JobState.DONE, stats={"progress": {"done": 2, "total": 2, "unit": "rows"},
                                                "shares": {"p": 1.0}})
    view = stored.view()
    assert view["inputs"] == {"a": {"dtype": "float64", "shape": [2, 3]}}  # no blob id in a view
    assert view["progress"] == {"done": 2, "total": 2, "unit": "rows"} and view["shares"] == {"p": 1.0}
    assert view["waiting"] is None
    live = record(state=JobState.RUNNING).view(progress=Progress(1, 4, "steps"), shares={}, waiting="w")
    assert live["progress"] == {"done": 1, "total": 4, "unit": "steps"} and live["waiting"] == "w"
    # a row stored before progress had a unit reads as subtasks
    old = record(state=JobState.DONE, stats={"progress": {"done": 2, "total": 2}}).view()
    assert old["progress"] == {"done": 2, "total": 2, "unit": "subtasks"}
    assert record().view()["waiting"] == "waiting for the head to schedule it"
    assert JobRecord.from_view(view).state is JobState.DONE


def test_state_names() -> None:
    assert STATE_NAMES == ("queued", "running", "done", "failed", "cancelled")
    assert {"done", "failed", "cancelled"} == TERMINAL_NAMES
    assert [s for s in JobState if s.terminal] == [JobState.DONE, JobState.FAILED, JobState.CANCELLED]
