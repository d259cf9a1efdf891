"""What the dashboard and ``/metrics`` show over time, kept in memory and bounded.

``Observer`` is pure (no I/O, no clock): it is fed head snapshots (``Head.snapshot()``) and
event dicts (``Event.to_dict()``), and keeps

* a time series, one sample per call to ``sample``: cluster throughput in GFLOP/s and each
  provider's, from the increase of the flops each provider has finished since the last sample
  (``flops_done``: from the node rows when they carry it, else from the ``flops`` mapping the
  caller reads off the head's state; a subtask's flops count when its result is accepted);
* each provider's share of the work done so far (by flops, and its subtasks done);
* training curves from ``job.metrics`` events (epoch, step, loss, accuracy, test_loss,
  test_accuracy, each optional; train_loss/train_accuracy stand for loss/accuracy; two events
  of one step make one point);
* alerts from ``node.lost``, ``job.failed`` and ``straggler`` events.

Every item has a cursor (a sample number, an event seq), so a reader asks only for what is
new: the SSE stream sends deltas after its first full message.

``render_prometheus`` writes the Prometheus text exposition format (version 0.0.4) by hand,
and ``sampler`` is the coroutine that feeds an ``Observer`` from a running head once a second.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from common.jobs import STATE_NAMES

log = logging.getLogger("dcf.head.observe")

#: event kinds that raise an alert, and the alert's title and level
ALERTS: dict[str, tuple[str, str]] = {
    "node.lost": ("node lost", "error"),
    "job.failed": ("job failed", "error"),
    "straggler": ("straggler", "warning"),
    "queue.lost": ("job queue unreachable", "error"),
    "queue.restored": ("job queue back", "info"),
}
METRIC_FIELDS = ("epoch", "step", "loss", "accuracy", "test_loss", "test_accuracy")
PROVIDER_STATES = ("ready", "connecting", "draining", "dead")
JOB_STATES = STATE_NAMES
#: bucket bounds (seconds) of the job duration histogram
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


class Observer:
    def __init__(self, keep: int = 3600, keep_alerts: int = 200, keep_points: int = 5000,
                 keep_jobs: int = 20) -> None:
        #: samples: {"n", "t", "gflops", "providers": {provider id: GFLOP/s}}
        self.samples: deque[dict[str, Any]] = deque(maxlen=keep)
        self.alerts: deque[dict[str, Any]] = deque(maxlen=keep_alerts)
        #: job id -> its job.metrics points, for the keep_jobs most recent training jobs
        self.training: dict[str, deque[dict[str, Any]]] = {}
        self.keep_points = keep_points
        self.keep_jobs = keep_jobs
        self.names: dict[str, str] = {}
        #: provider id -> {"name", "flops_done", "subtasks_done"}: the latest cumulative numbers
        self.totals: dict[str, dict[str, Any]] = {}
        self.last_seq = 0
        self._n = 0
        self._prev: tuple[float, dict[str, float]] | None = None

    # ---- input ---------------------------------------------------------------------------
    def sample(self, snapshot: Mapping[str, Any], flops: Mapping[str, float] | None = None) -> dict[str, Any] | None:
        """Fold one snapshot in. The first call only sets the baseline; later ones add a sample
        (returned) with the throughput since the previous call."""
        now = float(snapshot["time"])
        flops = flops or {}
        current: dict[str, float] = {}
        for row in snapshot.get("nodes", ()):
            pid = row["provider_id"]
            done = row.get("flops_done", flops.get(pid))
            self.names[pid] = row.get("name") or pid[:8]
            total = self.totals.setdefault(pid, {"name": self.names[pid], "flops_done": 0.0, "subtasks_done": 0})
            total["name"] = self.names[pid]
            total["subtasks_done"] = int(row.get("subtasks_done", 0))
            if done is not None:
                current[pid] = float(done)
                total["flops_done"] = float(done)
        prev = self._prev
        self._prev = (now, current)
        if prev is None or now <= prev[0]:
            return None
        dt = now - prev[0]
        per: dict[str, float] = {}
        for pid, done in current.items():
            before = prev[1].get(pid, 0.0)
            delta = done - before if done >= before else done  # a counter that went back: it restarted
            per[pid] = round(delta / dt / 1e9, 6)
        self._n += 1
        point = {"n": self._n, "t": round(now, 3), "gflops": round(sum(per.values()), 6), "providers": per}
        self.samples.append(point)
        return point

    def on_event(self, event: Mapping[str, Any]) -> None:
        """Fold one event (``Event.to_dict()``: seq, ts, kind and its fields) in."""
        seq = int(event.get("seq", 0))
        if seq and seq <= self.last_seq:
            return
        self.last_seq = max(self.last_seq, seq)
        kind = event.get("kind", "")
        if kind == "job.metrics":
            self._metrics(event)
        elif kind in ALERTS:
            self.alerts.append(_alert(event, self.names))

    def feed(self, events: Iterable[Mapping[str, Any]]) -> None:
        for event in events:
            self.on_event(event)

    def _metrics(self, event: Mapping[str, Any]) -> None:
        job_id = event.get("job_id")
        if not isinstance(job_id, str):
            return
        point: dict[str, Any] = {"seq": event.get("seq", 0), "ts": event.get("ts")}
        for name in METRIC_FIELDS:
            value = event.get(name)
            if value is None and name in ("loss", "accuracy"):
                value = event.get(f"train_{name}")  # an end-of-epoch record names them so
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                continue
            point[name] = value
        if len(point) == 2:
            return  # nothing plottable
        points = self.training.get(job_id)
        if points is None:
            while len(self.training) >= self.keep_jobs:
                self.training.pop(next(iter(self.training)))
            points = self.training[job_id] = deque(maxlen=self.keep_points)
        last = points[-1] if points else None
        if last is not None and "step" in point and last.get("step") == point["step"]:
            # the same step again (the end-of-epoch test metrics after the step's own): one point,
            # with the new seq so that readers of what is new get it again
            points[-1] = {**point, **{k: v for k, v in last.items() if k not in ("seq", "ts")}}
            return
        points.append(point)

    # ---- output --------------------------------------------------------------------------
    @property
    def cursor(self) -> dict[str, int]:
        return {"sample": self._n, "seq": self.last_seq}

    def latest_gflops(self) -> float:
        return self.samples[-1]["gflops"] if self.samples else 0.0

    def series(self, after: int = 0) -> dict[str, Any]:
        """The time series column by column (samples numbered above ``after``): ``t`` (unix
        seconds), ``throughput_gflops``, and per provider its GFLOP/s (None where it was absent)."""
        rows = [s for s in self.samples if s["n"] > after]
        pids: list[str] = []
        for s in rows:
            pids.extend(p for p in s["providers"] if p not in pids)
        return {
            "n": [s["n"] for s in rows], "t": [s["t"] for s in rows],
            "throughput_gflops": [s["gflops"] for s in rows],
            "providers": {p: {"name": self.names.get(p, p[:8]), "gflops": [s["providers"].get(p) for s in rows]}
                          for p in pids},
        }

    def shares(self) -> list[dict[str, Any]]:
        """Each provider's share of the flops finished so far (providers this observer has seen)."""
        total = sum(t["flops_done"] for t in self.totals.values())
        return [{"provider_id": pid, "name": t["name"], "flops_done": t["flops_done"],
                 "subtasks_done": t["subtasks_done"],
                 "share": round(t["flops_done"] / total, 6) if total else 0.0}
                for pid, t in self.totals.items()]

    def training_view(self, after_seq: int = 0) -> dict[str, list[dict[str, Any]]]:
        out = {}
        for job_id, points in self.training.items():
            new = [p for p in points if p["seq"] > after_seq]
            if new:
                out[job_id] = new
        return out

    def view(self, after_sample: int = 0, after_seq: int = 0) -> dict[str, Any]:
        """Everything (or what is new since a cursor) for the dashboard and ``/v1/metrics``."""
        return {
            "cursor": self.cursor,
            "series": self.series(after_sample),
            "shares": self.shares(),
            "training": self.training_view(after_seq),
            "alerts": [a for a in self.alerts if a["seq"] > after_seq],
        }

    def csv_rows(self) -> tuple[list[str], list[list[Any]]]:
        """Header and rows: time, throughput_gflops, then one GFLOP/s column per provider."""
        cols = self.series()
        pids = list(cols["providers"])
        headers = [cols["providers"][p]["name"] for p in pids]
        seen: set[str] = set()
        for i, (pid, name) in enumerate(zip(pids, headers, strict=True)):
            if name in seen or name in ("time", "throughput_gflops"):
                headers[i] = f"{name}-{pid[:8]}"
            seen.add(headers[i])
        header = ["time", "throughput_gflops", *[f"{h}_gflops" for h in headers]]
        rows = []
        for i, t in enumerate(cols["t"]):
            rows.append([t, cols["throughput_gflops"][i],
                         *["" if cols["providers"][p]["gflops"][i] is None else cols["providers"][p]["gflops"][i]
                           for p in pids]])
        return header, rows


def _alert(event: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
    kind = event["kind"]
    title, level = ALERTS[kind]
    pid = event.get("provider_id")
    who = event.get("name") or (names.get(pid) if isinstance(pid, str) else None) or (pid or "")[:8]
    job = (event.get("job_id") or "")[:8]
    if kind == "node.lost":
        message = f"provider {who} stopped sending heartbeats; {event.get('requeued', 0)} subtasks re-queued"
    elif kind == "job.failed":
        message = f"job {job}: {event.get('error') or 'failed'}"
    elif kind == "queue.lost":
        message = "RabbitMQ unreachable: the head is reconnecting; running jobs go on, submissions wait"
    elif kind == "queue.restored":
        message = "RabbitMQ reachable again: the head accepts jobs"
    else:
        parts = [f"provider {who}" if who else "", f"job {job}" if job else ""]
        if "subtask" in event:
            parts.append(f"subtask {event['subtask']}")
        detail = event.get("message") or event.get("reason")
        message = ", ".join(p for p in parts if p) + (f": {detail}" if detail else " is running slow")
    extra = {k: v for k, v in event.items() if k not in ("seq", "ts", "kind")}
    return {"seq": event.get("seq", 0), "ts": event.get("ts"), "kind": kind, "level": level, "title": title,
            "message": message, "data": extra}


# ---- Prometheus -------------------------------------------------------------------------------
COUNTER_HELP = {
    "subtasks_dispatched": "Subtasks sent to providers (every attempt).",
    "subtasks_completed": "Subtask results accepted.",
    "subtasks_failed": "Subtasks a provider reported as failed.",
    "subtasks_retried": "Subtasks taken back and queued again.",
    "results_ignored": "Late, duplicate or unknown results ignored.",
    "providers_lost": "Providers declared dead.",
    "bytes_in": "Result bytes received from providers over sockets.",
    "bytes_out": "Operand bytes sent to providers over sockets.",
    "bad_messages": "Malformed messages dropped.",
}


def _esc(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: Any) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in labels.items()) + "}"


def _num(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, metric: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {metric} {help_text}")
        self.lines.append(f"# TYPE {metric} {kind}")

    def value(self, metric: str, value: float, /, **labels: Any) -> None:
        self.lines.append(f"{metric}{_labels(**labels)} {_num(value)}")


def render_prometheus(snapshot: Mapping[str, Any], observer: Observer | None = None, *,
                      subscribers: int | None = None) -> str:
    """The head's metrics in the Prometheus text format, version 0.0.4 (``subscribers``: open
    event streams, when known)."""
    w = _Writer()
    _head_metrics(w, snapshot)
    _provider_metrics(w, snapshot)
    if observer is not None:
        w.family("dcf_cluster_throughput_gflops", "gauge", "Cluster throughput over the last sample, GFLOP/s.")
        w.value("dcf_cluster_throughput_gflops", observer.latest_gflops())
        w.family("dcf_provider_flops_done_total", "counter", "Floating-point operations the provider finished.")
        for share in observer.shares():
            w.value("dcf_provider_flops_done_total", share["flops_done"], provider_id=share["provider_id"],
                    name=share["name"])
    if subscribers is not None:
        w.family("dcf_event_subscribers", "gauge", "Open event streams (SSE clients of /v1/stream).")
        w.value("dcf_event_subscribers", subscribers)
    _job_metrics(w, snapshot)
    return "\n".join(w.lines) + "\n"


def _head_metrics(w: _Writer, snapshot: Mapping[str, Any]) -> None:
    w.family("dcf_up", "gauge", "1 while the head is serving.")
    w.value("dcf_up", 1, epoch=snapshot.get("epoch", ""), queue=snapshot.get("queue", ""))
    w.family("dcf_queue_connected", "gauge", "1 while the head's job queue (RabbitMQ, or the embedded store) "
             "is reachable.")
    w.value("dcf_queue_connected", int(bool(snapshot.get("queue_connected", True))))
    w.family("dcf_uptime_seconds", "gauge", "Seconds since the head started.")
    w.value("dcf_uptime_seconds", round(float(snapshot.get("uptime_s", 0.0)), 3))
    counters = snapshot.get("counters", {})
    for key in sorted(counters):
        name = f"dcf_{key}_total"
        w.family(name, "counter", COUNTER_HELP.get(key, f"{key.replace('_', ' ')}."))
        w.value(name, counters[key])


def _provider_metrics(w: _Writer, snapshot: Mapping[str, Any]) -> None:
    nodes = list(snapshot.get("nodes", ()))
    by_state = dict.fromkeys(PROVIDER_STATES, 0)
    for row in nodes:
        by_state[row["state"]] = by_state.get(row["state"], 0) + 1
    w.family("dcf_providers", "gauge", "Providers by state.")
    for state, count in by_state.items():
        w.value("dcf_providers", count, state=state)

    per_node = [
        ("dcf_provider_heartbeat_lag_seconds", "gauge", "Seconds since the provider's last heartbeat.",
         "last_heartbeat_s"),
        ("dcf_provider_gflops", "gauge", "Provider throughput for matmul (measured), GFLOP/s.", "gflops"),
        ("dcf_provider_assigned_subtasks", "gauge", "Subtasks assigned to the provider and not finished.",
         "assigned"),
        ("dcf_provider_subtasks_done_total", "counter", "Subtasks the provider finished.", "subtasks_done"),
    ]
    for name, kind, help_text, key in per_node:
        w.family(name, kind, help_text)
        for row in nodes:
            w.value(name, row.get(key, 0), provider_id=row["provider_id"], name=row.get("name", ""),
                    device=row.get("device", ""))


def _job_metrics(w: _Writer, snapshot: Mapping[str, Any]) -> None:
    finished = [tuple(f) for f in snapshot.get("finished", ())]
    jobs_by_state = dict.fromkeys(JOB_STATES, 0)
    for job in snapshot.get("jobs", ()):
        jobs_by_state[job["state"]] = jobs_by_state.get(job["state"], 0) + 1
    for _type, state, _secs in finished:
        jobs_by_state[state] = jobs_by_state.get(state, 0) + 1
    w.family("dcf_jobs", "gauge",
             "Jobs by state: live jobs, and jobs finished since the head started (the last 10000).")
    for state, count in jobs_by_state.items():
        w.value("dcf_jobs", count, state=state)

    w.family("dcf_job_duration_seconds", "histogram",
             "Seconds from submission to end of finished jobs, by task type and final state.")
    groups: dict[tuple[str, str], list[float]] = {}
    for task_type, state, secs in finished:
        groups.setdefault((task_type, state), []).append(float(secs))
    for (task_type, state), values in sorted(groups.items()):
        for bound in DURATION_BUCKETS:
            w.value("dcf_job_duration_seconds_bucket", sum(1 for v in values if v <= bound),
                    type=task_type, state=state, le=_num(bound))
        w.value("dcf_job_duration_seconds_bucket", len(values), type=task_type, state=state, le="+Inf")
        w.value("dcf_job_duration_seconds_sum", round(sum(values), 6), type=task_type, state=state)
        w.value("dcf_job_duration_seconds_count", len(values), type=task_type, state=state)


# ---- the live feed ----------------------------------------------------------------------------
def provider_flops(head: Any) -> dict[str, float]:
    """provider id -> flops finished, read (never changed) from the head's state machine."""
    return {pid: float(getattr(p, "flops_done", 0.0)) for pid, p in head.state.providers.items()}


def observe_once(head: Any, observer: Observer) -> None:
    observer.feed(head.events.since(observer.last_seq, kinds=("job.metrics", *ALERTS)))
    observer.sample(head.snapshot(), provider_flops(head))


async def sampler(head: Any, observer: Observer, period: float = 1.0) -> None:
    """Feed ``observer`` from a running head every ``period`` seconds, until cancelled."""
    while True:
        try:
            observe_once(head, observer)
        except Exception:  # a bad sample must not stop the series
            log.exception("metrics sample failed")
        await asyncio.sleep(period)
