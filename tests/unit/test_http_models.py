"""The response models take what the head builds today and give it back unchanged: the same keys in
the same order, ints still ints, optional training metrics still absent where they were."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel, TypeAdapter
from pydantic import ValidationError as PydanticError

from common.jobs import JobRecord, JobState, Progress
from head_node.http.models import Event, JobSpec, JobView, MetricsView, NodeView
from head_node.observe import Observer


def round_trip(model: type[BaseModel] | Any, data: Any) -> Any:
    adapter = TypeAdapter(model)
    return json.loads(adapter.dump_json(adapter.validate_python(data)))


def same_json(got: Any, expected: Any) -> bool:
    """Equal as JSON text: the same keys in the same order, and 1 is not 1.0."""
    return json.dumps(got) == json.dumps(expected)


def queued_record() -> JobRecord:
    return JobRecord(job_id="a" * 32, type="train", params={"epochs": 2, "lr": 0.05, "nested": {"x": [1, 2]}},
                     inputs={"x": {"blob": "b" * 32, "dtype": "float32", "shape": [10, 4]}}, outputs={},
                     nodes=2, created_at=1722000000.5)


@pytest.mark.parametrize("view", [
    queued_record().view(),
    queued_record().view(progress=Progress(1, 40), shares={"p": 0.25, "q": 1}, waiting="no provider"),
    JobRecord.from_row({**queued_record().message(), "state": "failed", "started_at": 1.0, "finished_at": 2.0,
                        "error": "boom", "stats": {"progress": {"done": 3, "total": 4}, "loss": None}}).view(),
])
def test_job_views_round_trip(view: dict[str, Any]) -> None:
    assert same_json(round_trip(JobView, view), view)


def test_job_view_rejects_an_unknown_state() -> None:
    with pytest.raises(PydanticError):
        JobView.model_validate({**queued_record().view(), "state": "paused"})
    assert JobView.model_validate(queued_record().view()).state is JobState.QUEUED


def test_metrics_view_round_trips_an_observer_with_samples_curves_and_alerts() -> None:
    obs = Observer()
    node: dict[str, Any] = {"provider_id": "p" * 32, "name": "local-0", "host": "h", "os": "Linux", "device": "cpu",
            "device_name": "x86", "memory_bytes": 1 << 33, "cores": 4, "gflops": 10, "benchmark_gflops": 9.5,
            "task_types": ["matmul"], "dtypes": ["float64"], "version": "0.1.0", "state": "ready", "quarantined": None,
            "shares_state_dir": False, "assigned": 0, "subtasks_done": 2, "last_heartbeat_s": 0.1}
    for t, flops in ((100.0, 0.0), (101.0, 2e9), (102.0, 2e9)):
        obs.sample({"time": t, "nodes": [node]}, {node["provider_id"]: flops})
    obs.feed([{"seq": 1, "ts": 100.5, "kind": "job.metrics", "job_id": "j" * 32, "step": 1, "loss": 0.5},
              {"seq": 2, "ts": 100.6, "kind": "job.metrics", "job_id": "j" * 32, "step": 1, "test_accuracy": 0.9},
              {"seq": 3, "ts": 100.7, "kind": "node.lost", "provider_id": node["provider_id"], "requeued": 1}])
    body = {"time": 102.0, "uptime_s": 2.0, "counters": {"subtasks_completed": 2}, "nodes": [node],
            "jobs": [queued_record().view()], **obs.view()}
    got = round_trip(MetricsView, body)
    assert same_json(got, body)
    assert got["series"]["throughput_gflops"] == [2.0, 0.0] and len(got["training"]["j" * 32]) == 1
    assert NodeView.model_validate(node).gflops == 10 and isinstance(got["nodes"][0]["gflops"], int)


def test_events_keep_their_fields() -> None:
    event = {"seq": 4, "ts": 1.5, "kind": "job.progress", "job_id": "a" * 32, "done": 1, "total": 2}
    assert same_json(round_trip(Event, event), event)


def test_job_spec_limits_params() -> None:
    deep: Any = 1
    for _ in range(40):
        deep = [deep]
    with pytest.raises(PydanticError, match="nest deeper"):
        JobSpec.model_validate({"type": "matmul", "params": {"x": deep}})
    with pytest.raises(PydanticError, match="exceed"):
        JobSpec.model_validate({"type": "matmul", "params": {"x": "y" * 70_000}})
    with pytest.raises(PydanticError):
        JobSpec.model_validate({"type": "matmul", "unknown": 1})
