"""The pure Observer (time series, shares, training curves, alerts) and the Prometheus text."""

from __future__ import annotations

from typing import Any

from head_node.events import EventBus
from head_node.observe import Metrics, Observer, render_prometheus
from tests.promtext import parse_prometheus, value

A, B = "a" * 32, "b" * 32


def node(pid: str, name: str, done: int = 0, state: str = "ready", lag: float = 0.2) -> dict[str, Any]:
    return {"provider_id": pid, "name": name, "device": "cpu", "state": state, "gflops": 10.0, "assigned": 1,
            "subtasks_done": done, "last_heartbeat_s": lag}


def snap(t: float, nodes: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    return {"time": t, "epoch": "e1", "uptime_s": t, "queue": "embedded", "nodes": nodes, "jobs": [],
            "counters": {"subtasks_completed": 3, "bytes_in": 10, "bytes_out": 20}, "finished": [], **kw}


def test_throughput_from_the_increase_of_flops() -> None:
    obs = Observer()
    assert obs.sample(snap(100.0, [node(A, "a")]), {A: 0.0}) is None  # the baseline
    point = obs.sample(snap(101.0, [node(A, "a", 1)]), {A: 4e9})
    assert point is not None and point["gflops"] == 4.0 and point["providers"] == {A: 4.0}
    # a provider that joins counts from zero; one that restarted its counter counts what it has
    obs.sample(snap(103.0, [node(A, "a", 2), node(B, "b", 1)]), {A: 8e9, B: 2e9})
    obs.sample(snap(104.0, [node(A, "a", 2), node(B, "b", 1)]), {A: 1e9, B: 2e9})
    cols = obs.series()
    assert cols["n"] == [1, 2, 3] and cols["t"] == [101.0, 103.0, 104.0]
    assert cols["throughput_gflops"] == [4.0, 3.0, 1.0]
    assert cols["providers"][A] == {"name": "a", "gflops": [4.0, 2.0, 1.0]}
    assert cols["providers"][B] == {"name": "b", "gflops": [None, 1.0, 0.0]}
    assert obs.series(after=2)["t"] == [104.0]
    shares = {s["name"]: s for s in obs.shares()}
    assert abs(shares["a"]["share"] - 1 / 3) < 1e-6 and shares["b"]["subtasks_done"] == 1
    header, rows = obs.csv_rows()
    assert header == ["time", "throughput_gflops", "a_gflops", "b_gflops"]
    assert rows[0] == [101.0, 4.0, 4.0, ""]


def test_flops_in_the_node_rows_win_and_the_series_is_bounded() -> None:
    obs = Observer(keep=3)
    for i in range(6):
        obs.sample(snap(float(i), [{**node(A, "a"), "flops_done": i * 1e9}]))
    assert obs.series()["throughput_gflops"] == [1.0, 1.0, 1.0] and obs.series()["n"] == [3, 4, 5]
    assert obs.sample(snap(5.0, [node(A, "a")])) is None  # no time passed: no sample


def test_training_metrics_and_alerts_from_events() -> None:
    obs = Observer(keep_jobs=2)
    obs.sample(snap(1.0, [node(A, "gpu-1")]), {A: 0.0})
    obs.feed([
        {"seq": 1, "ts": 1.0, "kind": "job.metrics", "job_id": "j1", "epoch": 1, "step": 10, "loss": 2.0},
        {"seq": 2, "ts": 2.0, "kind": "job.metrics", "job_id": "j1", "epoch": 1, "step": 20, "loss": 1.0,
         "accuracy": 0.5, "test_loss": float("nan"), "test_accuracy": None},
        {"seq": 3, "ts": 2.0, "kind": "job.metrics", "job_id": "j1"},  # nothing to plot
        {"seq": 4, "ts": 3.0, "kind": "node.lost", "provider_id": A, "name": "", "requeued": 2},
        {"seq": 5, "ts": 3.0, "kind": "job.failed", "job_id": "j2" * 16, "error": "boom"},
        {"seq": 6, "ts": 3.0, "kind": "straggler", "provider_id": A, "job_id": "j3", "subtask": 4},
        {"seq": 7, "ts": 3.0, "kind": "job.progress", "job_id": "j1", "done": 1, "total": 2},
    ])
    obs.on_event({"seq": 2, "ts": 2.0, "kind": "job.metrics", "job_id": "j1", "loss": 9.0})  # seen: ignored
    points = obs.training["j1"]
    assert [p["loss"] for p in points] == [2.0, 1.0] and "test_loss" not in points[1]
    assert points[1]["accuracy"] == 0.5
    titles = [(a["title"], a["level"]) for a in obs.alerts]
    assert titles == [("node lost", "error"), ("job failed", "error"), ("straggler", "warning")]
    assert "gpu-1" in obs.alerts[0]["message"] and "2 subtasks" in obs.alerts[0]["message"]
    assert "boom" in obs.alerts[1]["message"] and "subtask 4" in obs.alerts[2]["message"]
    view = obs.view(after_sample=0, after_seq=4)
    assert [a["seq"] for a in view["alerts"]] == [5, 6] and view["training"] == {}
    assert view["cursor"] == {"sample": 0, "seq": 7}
    # an end-of-epoch record for the step already seen adds its test metrics to that point
    obs.on_event({"seq": 8, "ts": 4.0, "kind": "job.metrics", "job_id": "j1", "scope": "epoch", "epoch": 1,
                  "step": 20, "train_loss": 1.5, "train_accuracy": 0.4, "test_loss": 1.2, "test_accuracy": 0.45})
    obs.on_event({"seq": 9, "ts": 4.0, "kind": "job.metrics", "job_id": "j1", "scope": "epoch", "epoch": 2,
                  "step": 30, "train_loss": 0.9, "test_loss": 1.0})
    points = obs.training["j1"]
    assert [p["step"] for p in points] == [10, 20, 30]
    assert points[1] == {"seq": 8, "ts": 4.0, "epoch": 1, "step": 20, "loss": 1.0, "accuracy": 0.5,
                         "test_loss": 1.2, "test_accuracy": 0.45}
    assert points[2]["loss"] == 0.9 and points[2]["test_loss"] == 1.0
    assert [p["seq"] for p in obs.view(after_seq=7)["training"]["j1"]] == [8, 9]
    for i in range(3):  # only the most recent training jobs are kept
        obs.on_event({"seq": 10 + i, "ts": 4.0, "kind": "job.metrics", "job_id": f"k{i}", "loss": 1.0})
    assert list(obs.training) == ["k1", "k2"]


def finish(metrics: Metrics, seq: int, job_id: str, task_type: str, state: str, seconds: float) -> None:
    metrics.on_event({"seq": seq, "ts": 1000.0, "kind": "job.accepted", "job_id": job_id, "type": task_type})
    metrics.on_event({"seq": seq + 1, "ts": 1000.0 + seconds, "kind": f"job.{state}", "job_id": job_id})


def test_prometheus_text() -> None:
    obs = Observer()
    nodes = [node(A, 'we"ird\\name\n', 3), node(B, "b", state="draining", lag=1.5)]
    obs.sample(snap(1.0, nodes), {A: 0.0, B: 0.0})
    obs.sample(snap(2.0, nodes), {A: 2e9, B: 0.0})
    jobs = [{"state": "running"}, {"state": "queued"}, {"state": "queued"}]
    metrics = Metrics(lambda: snap(2.0, nodes, jobs=jobs), obs, lambda: 2)
    for i, (task_type, state, secs) in enumerate([("matmul", "done", 0.25), ("matmul", "done", 7.0),
                                                   ("matmul", "failed", 1.0), ("train", "done", 90.0)]):
        finish(metrics, 10 * i, f"j{i}", task_type, state, secs)
    types, samples = parse_prometheus(metrics.render())
    assert types["dcf_job_duration_seconds"] == "histogram" and types["dcf_subtasks_completed_total"] == "counter"
    assert types["dcf_jobs_finished_total"] == "counter"
    assert not [t for t in types if t.endswith("_created")]
    assert value(samples, "dcf_providers", state="ready") == 1
    assert value(samples, "dcf_providers", state="draining") == 1
    assert value(samples, "dcf_providers", state="dead") == 0
    assert value(samples, "dcf_subtasks_completed_total") == 3 and value(samples, "dcf_bytes_out_total") == 20
    assert value(samples, "dcf_provider_heartbeat_lag_seconds", provider_id=B) == 1.5
    assert value(samples, "dcf_provider_heartbeat_lag_seconds", name='we\\"ird\\\\name\\n') == 0.2
    assert value(samples, "dcf_cluster_throughput_gflops") == 2.0
    assert value(samples, "dcf_event_subscribers") == 2
    assert value(samples, "dcf_jobs", state="queued") == 2 and value(samples, "dcf_jobs", state="done") == 3
    assert value(samples, "dcf_jobs", state="failed") == 1 and value(samples, "dcf_jobs", state="cancelled") == 0
    assert value(samples, "dcf_jobs_finished_total", type="matmul", state="failed") == 1
    assert value(samples, "dcf_job_duration_seconds_count", type="matmul", state="done") == 2
    assert value(samples, "dcf_job_duration_seconds_bucket", type="matmul", state="done", le="0.5") == 1
    assert value(samples, "dcf_job_duration_seconds_bucket", type="matmul", state="done", le="10.0") == 2
    assert value(samples, "dcf_job_duration_seconds_bucket", type="train", state="done", le="60.0") == 0
    assert value(samples, "dcf_job_duration_seconds_sum", type="matmul", state="done") == 7.25


def test_finished_jobs_are_counted_from_the_event_bus_and_looked_up() -> None:
    # the head's lookup (its live job, else its row) names the type and the duration; a job it
    # no longer knows is still counted, as type unknown
    known = {"j1": ("train", 4.0)}
    metrics = Metrics(lambda: snap(1.0, []), lookup=known.get)
    bus = EventBus()
    bus.sinks.append(metrics.sink)
    bus.emit("job.failed", job_id="j1", error="boom")
    bus.emit("job.cancelled", job_id="j2", error=None)
    bus.emit("job.progress", job_id="j1", done=1, total=2)
    _, samples = parse_prometheus(metrics.render())
    assert value(samples, "dcf_jobs", state="failed") == 1 and value(samples, "dcf_jobs", state="cancelled") == 1
    assert value(samples, "dcf_job_duration_seconds_sum", type="train", state="failed") == 4.0
    assert value(samples, "dcf_jobs_finished_total", type="unknown", state="cancelled") == 1
    # a reading taken in the head's loop is what a worker thread renders, whatever happens after
    reading = metrics.reading()
    bus.emit("job.failed", job_id="j3", error="boom")
    _, pinned = parse_prometheus(metrics.render(reading))
    assert value(pinned, "dcf_jobs", state="failed") == 1
    assert value(parse_prometheus(metrics.render())[1], "dcf_jobs", state="failed") == 2
    # every Metrics has its own registry: a second head in the process starts from zero
    _, other = parse_prometheus(Metrics(lambda: snap(1.0, [])).render())
    assert value(other, "dcf_jobs", state="failed") == 0


    # no observer, no providers, nothing finished: still valid
    parse_prometheus(render_prometheus(snap(0.0, [])))


def busy(pid: str, name: str, assigned: int) -> dict[str, Any]:
    return {**node(pid, name), "assigned": assigned}


def test_work_is_spread_over_the_time_it_was_computed() -> None:
    # a subtask at 10 GFLOP/s, sent between 100 and 101 (seen busy from 101) and done at 116, whose
    # flops all count when its result comes in: 16 samples at its rate over 100-116 (never above
    # 10 GFLOP/s), not 15 zeros and a 150 GFLOP/s spike
    obs = Observer()
    obs.sample(snap(100.0, [busy(A, "a", 0), busy(B, "b", 0)]), {A: 0.0, B: 0.0})
    for t in range(101, 116):
        obs.sample(snap(float(t), [busy(A, "a", 1), busy(B, "b", 0)]), {A: 0.0, B: 0.0})
    cursor = obs.cursor["sample"]
    assert cursor == 15 and obs.latest_gflops() == 0.0
    point = obs.sample(snap(116.0, [busy(A, "a", 0), busy(B, "b", 0)]), {A: 150e9, B: 0.0})
    assert point is not None and point["providers"][A] == 9.375
    cols = obs.series()
    assert cols["providers"][A]["gflops"] == [9.375] * 16
    assert max(cols["throughput_gflops"]) == 9.375 and cols["providers"][B]["gflops"] == [0.0] * 16
    # a reader that had everything up to the cursor gets the amended samples again, by number
    delta = obs.series(after=cursor)
    assert delta["n"] == list(range(1, 17)) and delta["throughput_gflops"] == [9.375] * 16
    assert obs.series(after=obs.cursor["sample"])["n"] == []

    # idle in between: a short subtask later is not spread over the idle time
    obs.sample(snap(117.0, [busy(A, "a", 0), busy(B, "b", 0)]), {A: 150e9, B: 0.0})
    obs.sample(snap(118.0, [busy(A, "a", 0), busy(B, "b", 1)]), {A: 150e9, B: 0.0})
    obs.sample(snap(120.0, [busy(A, "a", 0), busy(B, "b", 0)]), {A: 150e9, B: 8e9})
    cols = obs.series()
    # seen idle at 117, busy at 118, done by 120: 8 GFLOP over 117-120, nothing before 117
    assert cols["providers"][B]["gflops"][-4:] == [0.0, 0.0, 2.666667, 2.666667]
    assert cols["providers"][A]["gflops"][-3:] == [0.0, 0.0, 0.0]
    # progress reported as it goes: nothing to spread, each sample has its own share
    obs.sample(snap(121.0, [busy(A, "a", 1), busy(B, "b", 0)]), {A: 153e9, B: 8e9})
    obs.sample(snap(122.0, [busy(A, "a", 1), busy(B, "b", 0)]), {A: 156e9, B: 8e9})
    assert obs.series()["providers"][A]["gflops"][-2:] == [3.0, 3.0]
