"""What the dashboard and ``/metrics`` show over time, kept in memory and bounded.

``Observer`` is pure (no I/O, no clock): it is fed head snapshots (``Head.snapshot()``) and
event dicts (``Event.to_dict()``), and keeps

* a time series, one sample per call to ``sample``: cluster throughput in GFLOP/s and each
  provider's, from the increase of the flops each provider has finished since the last sample
  (``flops_done``: from the node rows when they carry it, else from the ``flops`` mapping the
  caller reads off the head's state; they count as providers report progress and results), an
  increase spread over the time the provider was busy computing it (``sample``);
* each provider's share of the work done so far (by flops, and its subtasks done);
* training curves from ``job.metrics`` events (epoch, step, loss, accuracy, test_loss,
  test_accuracy, each optional; train_loss/train_accuracy stand for loss/accuracy; two events
  of one step make one point);
* alerts from ``node.lost``, ``job.failed`` and ``straggler`` events.

Every item has a cursor (a sample number, an event seq), so a reader asks only for what is
new: the SSE stream sends deltas after its first full message.

``Metrics`` serves ``/metrics`` with ``prometheus_client`` (the text format, version 0.0.4): jobs
are counted, and their durations observed, as their end events happen; the rest is read from the
head's snapshot when scraped. ``sampler`` is the coroutine that feeds an ``Observer`` from a
running head once a second.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from common.jobs import STATE_NAMES

log = logging.getLogger("dcf.head.observe")
# no ``*_created`` series beside every counter and histogram: the head's uptime tells when they began
prometheus_client.disable_created_metrics()

#: event kinds that raise an alert, and the alert's title and level
ALERTS: dict[str, tuple[str, str]] = {
    "node.lost": ("node lost", "error"),
    "node.unhealthy": ("node unhealthy", "error"),
    "node.stuck": ("node stuck", "warning"),
    "node.healthy": ("node healthy again", "info"),
    "node.quarantined": ("node quarantined", "error"),
    "node.cleared": ("node cleared of quarantine", "info"),
    "job.failed": ("job failed", "error"),
    "straggler": ("straggler", "warning"),
    "job.regroup": ("training group re-formed", "warning"),
    "job.disagreement": ("results disagree (--verify-rate)", "warning"),
    "job.republished": ("job published again (another consumer of the queue took it)", "warning"),
    "queue.lost": ("job queue unreachable", "error"),
    "queue.restored": ("job queue back", "info"),
}
METRIC_FIELDS = ("epoch", "step", "loss", "accuracy", "test_loss", "test_accuracy")
PROVIDER_STATES = ("ready", "connecting", "draining", "unhealthy", "stuck", "quarantined", "dead")
JOB_STATES = STATE_NAMES
#: bucket bounds (seconds) of the job duration histogram
#: how far back a provider's work is spread at most (seconds)
MAX_SPREAD_S = 600.0
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)


class Observer:
    def __init__(self, keep: int = 3600, keep_alerts: int = 200, keep_points: int = 5000,
                 keep_jobs: int = 20) -> None:
        #: samples: {"n", "rev", "t", "gflops", "providers": {provider id: GFLOP/s}}; ``rev``: the
        #: sample number when it was last changed (``n``, or later where work was spread back over it)
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
        #: provider id -> the time since which the work it reports next was computed
        self._since: dict[str, float] = {}

    # ---- input ---------------------------------------------------------------------------
    def sample(self, snapshot: Mapping[str, Any], flops: Mapping[str, float] | None = None) -> dict[str, Any] | None:
        """Fold one snapshot in. The first call only sets the baseline; later ones add a sample
        (returned) with the throughput since the previous call.

        Work is accounted over the time it was computed: a provider's flops count when a
        subtask's result (or progress) comes in, and what came in now was computed while the
        provider was busy since it last reported or was last seen idle (no subtask assigned). So
        an increase is spread evenly over the samples of that time, which are amended (their
        ``rev`` is this sample's number, and ``series(after)`` returns them again): a 15 s subtask
        shows as 15 s at its rate, not as 0 then a spike above the provider's speed."""
        now = float(snapshot["time"])
        current, busy = self._read(snapshot, flops or {})
        prev = self._prev
        self._prev = (now, current)
        if prev is None or now <= prev[0]:
            self._since = {pid: now for pid in current}
            return None
        self._n += 1
        point: dict[str, Any] = {"n": self._n, "rev": self._n, "t": round(now, 3), "gflops": 0.0, "providers": {}}
        self.samples.append(point)
        for pid, done in current.items():
            before = prev[1].get(pid, 0.0)
            delta = done - before if done >= before else done  # a counter that went back: it restarted
            since = max(self._since.get(pid, prev[0]), now - MAX_SPREAD_S)
            self._spread(pid, delta, since, now)
            if delta > 0 or not busy.get(pid):
                self._since[pid] = now  # what comes in later was computed after now
        point["gflops"] = _total(point)
        return point

    def _read(self, snapshot: Mapping[str, Any], flops: Mapping[str, float]
              ) -> tuple[dict[str, float], dict[str, bool]]:
        """Each provider's flops done (where known) and whether it has subtasks assigned."""
        current: dict[str, float] = {}
        busy: dict[str, bool] = {}
        for row in snapshot.get("nodes", ()):
            pid = row["provider_id"]
            done = row.get("flops_done", flops.get(pid))
            self.names[pid] = row.get("name") or pid[:8]
            total = self.totals.setdefault(pid, {"name": self.names[pid], "flops_done": 0.0, "subtasks_done": 0})
            total["name"] = self.names[pid]
            total["subtasks_done"] = int(row.get("subtasks_done", 0))
            busy[pid] = int(row.get("assigned", 0) or 0) > 0
            if done is not None:
                current[pid] = float(done)
                total["flops_done"] = float(done)
        return current, busy

    def _spread(self, pid: str, flops: float, since: float, now: float) -> None:
        """Add ``flops`` done between ``since`` and ``now`` to the provider's samples of that time,
        at one rate (the latest sample, just added, is always one of them)."""
        latest = self.samples[-1]
        if flops <= 0:
            latest["providers"][pid] = 0.0
            return
        rate = flops / (now - since) / 1e9
        edge = round(since, 3)
        for s in reversed(self.samples):
            if s is not latest and s["t"] <= edge:
                break
            s["providers"][pid] = round((s["providers"].get(pid) or 0.0) + rate, 6)
            if s is not latest:
                s["gflops"] = _total(s)
                s["rev"] = self._n

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
        """The time series column by column (samples added or amended after sample ``after``): ``n``
        (a reader replaces a sample it has by ``n``), ``t`` (unix seconds), ``throughput_gflops``, and
        per provider its GFLOP/s (None where it was absent)."""
        rows = [s for s in self.samples if s["rev"] > after]
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


def _total(sample: Mapping[str, Any]) -> float:
    return round(sum(v for v in sample["providers"].values() if v is not None), 6)


def _alert(event: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
    kind = event["kind"]
    title, level = ALERTS[kind]
    pid = event.get("provider_id")
    who = event.get("name") or (names.get(pid) if isinstance(pid, str) else None) or (pid or "")[:8]
    job = (event.get("job_id") or "")[:8]
    if kind == "node.lost":
        message = f"provider {who} stopped sending heartbeats; {event.get('requeued', 0)} subtasks re-queued"
    elif kind == "node.unhealthy":
        message = (f"provider {who}: {event.get('missed_acks', 0)} acks missed in a row, nothing heard on its result "
                   f"connection; no new work, asked to reconnect, tried again in {event.get('retry_in_s', 0):.0f} s")
    elif kind == "node.stuck":
        message = (f"provider {who}: a subtask held {event.get('seconds', 0):.1f} s and nothing finished "
                   f"({event.get('queued', 0)} queued); no new work until it finishes something")
    elif kind == "node.quarantined":
        message = (f"provider {who} sent a wrong result ({event.get('reason', '')}); no work until an operator "
                   f"clears it, {event.get('taken_back', 0)} subtasks taken back")
    elif kind == "node.healthy":
        message = f"provider {who} is given work again (was {event.get('was', 'unhealthy')})"
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
        detail = event.get("message") or event.get("reason") or event.get("why")
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
    "providers_unhealthy": "Providers marked unhealthy (acks missed in a row, nothing heard on the result channel).",
    "providers_stuck": "Providers marked stuck (a straggler held, nothing finished, heartbeats going on).",
    "providers_quarantined": "Providers quarantined for sending a wrong result (no work until cleared).",
    "results_wrong": "Results that failed the check of their values (Freivalds' for matmul).",
    "results_verified": "Subtasks picked by --verify-rate whose result two providers agreed on (then merged).",
    "results_disagreed": "Results of a subtask picked by --verify-rate that agreed with no other held of it.",
    "results_outvoted": "Held results two agreeing providers outvoted (--verify-rate): their providers quarantined.",
    "subtasks_stopped": "Subtasks a provider stopped before finishing, when told to (a cancelled or failed job).",
    "head_pauses": "Scheduler ticks a heartbeat interval late (the head's event loop held up): no timeout is "
                   "judged for an interval after one, while the head reads what came meanwhile.",
    "groups_abandoned": "Collective subtask groups (allreduce rounds) abandoned because a member was lost or failed.",
    "bytes_in": "Result bytes received from providers over sockets.",
    "bytes_out": "Operand bytes sent to providers over sockets.",
    "bad_messages": "Malformed messages dropped.",
    "subscriptions_refused": "Task-port subscriptions refused: the empty topic, a prefix, or another CURVE key's "
                             "provider id.",
}
#: the events that end a job, and the job's final state
FINISH_KINDS = {"job.done": "done", "job.failed": "failed", "job.cancelled": "cancelled"}
#: job.accepted events remembered (task type, time) until the job ends, at most (without a lookup)
KEEP_ACCEPTED = 100_000
#: what ``Metrics`` asks of a finished job: (task type, seconds from submission to end), or None
JobLookup = Callable[[str], tuple[str, float | None] | None]


class Metrics:
    """The head's Prometheus metrics, in their own ``CollectorRegistry`` (one per head, so that
    heads in one process never mix): counters of finished jobs and the job duration histogram,
    updated once per job as its end event happens (``on_event``), and gauges and counters read
    from the head's snapshot (``read``) at scrape time."""

    def __init__(self, read: Callable[[], Mapping[str, Any]], observer: Observer | None = None,
                 subscribers: Callable[[], int] | None = None, lookup: JobLookup | None = None) -> None:
        self.read = read
        self.observer = observer
        self.subscribers = subscribers
        self.lookup = lookup
        self.registry = CollectorRegistry(auto_describe=False)
        self.finished = Counter("dcf_jobs_finished", "Jobs that ended since the head started, by task type and "
                                "final state.", ["type", "state"], registry=self.registry)
        self.duration = Histogram("dcf_job_duration_seconds", "Seconds from submission to end of finished "
                                  "jobs, by task type and final state.", ["type", "state"],
                                  buckets=DURATION_BUCKETS, registry=self.registry)
        #: final state -> jobs that ended in it (the dcf_jobs gauge)
        self.by_state: dict[str, int] = {}
        self._accepted: OrderedDict[str, tuple[str, float]] = OrderedDict()
        #: (type, state) -> its counter and histogram children (labels() takes a lock each call)
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._rendering = threading.Lock()
        self._pinned: Reading | None = None
        self.registry.register(_SnapshotCollector(self))

    def on_event(self, event: Mapping[str, Any]) -> None:
        """Fold one event dict (``Event.to_dict()``) in: ``job.accepted`` is remembered, an end
        (done, failed, cancelled) is counted and its duration observed."""
        self._fold(str(event.get("kind", "")), float(event.get("ts") or 0.0), event)

    def sink(self, event: Any) -> None:
        """An ``EventBus`` sink: called with each ``Event`` as it is emitted."""
        self._fold(event.kind, event.ts, event.data)

    def _fold(self, kind: str, ts: float, data: Mapping[str, Any]) -> None:
        if kind != "job.accepted" and kind not in FINISH_KINDS:
            return
        job_id = data.get("job_id")
        if not isinstance(job_id, str):
            return
        if kind == "job.accepted":
            if self.lookup is not None:
                return  # the head names the job's type and times when it ends
            self._accepted[job_id] = (str(data.get("type") or "unknown"), ts)
            if len(self._accepted) > KEEP_ACCEPTED:
                self._accepted.popitem(last=False)
        else:
            self._finished(job_id, FINISH_KINDS[kind], ts)

    def _finished(self, job_id: str, state: str, ts: float) -> None:
        accepted = self._accepted.pop(job_id, None)
        found = self.lookup(job_id) if self.lookup is not None else None
        if found is not None:
            task_type, seconds = found
        elif accepted is not None:
            task_type, seconds = accepted[0], max(0.0, ts - accepted[1])
        else:
            task_type, seconds = "unknown", None
        self.by_state[state] = self.by_state.get(state, 0) + 1
        children = self._children.get((task_type, state))
        if children is None:
            children = self._children[(task_type, state)] = (self.finished.labels(task_type, state),
                                                               self.duration.labels(task_type, state))
        children[0].inc()
        if seconds is not None:
            children[1].observe(seconds)

    def reading(self) -> Reading:
        """What the gauges show, read now (in the head's loop: the head's state is not thread-safe)."""
        observer = self.observer
        return Reading(self.read(), None if observer is None else observer.latest_gflops(),
                       None if observer is None else observer.shares(),
                       None if self.subscribers is None else self.subscribers(), dict(self.by_state))

    def render(self, reading: Reading | None = None) -> str:
        """The Prometheus text format, version 0.0.4, of ``reading`` (else of one taken now). With
        a reading taken in the head's loop, this may run in a worker thread: formatting thousands
        of samples (500 providers) takes tens of ms the loop need not wait for."""
        with self._rendering:
            self._pinned = reading or self.reading()
            try:
                return generate_latest(self.registry).decode("utf-8")
            finally:
                self._pinned = None


@dataclass(frozen=True)
class Reading:
    """One scrape's view of the head: its snapshot and the observer's numbers."""

    snapshot: Mapping[str, Any]
    gflops: float | None
    shares: list[dict[str, Any]] | None
    subscribers: int | None
    by_state: dict[str, int]


class _SnapshotCollector(Collector):
    """Gauges and counters read from the head's snapshot when scraped."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        now = self.metrics._pinned or self.metrics.reading()
        snapshot = now.snapshot
        yield from _head_metrics(snapshot)
        yield from _provider_metrics(snapshot)
        if now.gflops is not None:
            yield GaugeMetricFamily("dcf_cluster_throughput_gflops", "Cluster throughput over the last sample, "
                                    "GFLOP/s.", value=now.gflops)
        if now.shares is not None:
            done = CounterMetricFamily("dcf_provider_flops_done", "Floating-point operations the provider "
                                       "finished.", labels=["provider_id", "name"])
            for share in now.shares:
                done.add_metric([share["provider_id"], share["name"]], share["flops_done"])
            yield done
        if now.subscribers is not None:
            yield GaugeMetricFamily("dcf_event_subscribers", "Open event streams (SSE clients of /v1/stream).",
                                    value=now.subscribers)
        jobs = GaugeMetricFamily("dcf_jobs", "Jobs by state: live jobs, and jobs finished since the head "
                                 "started.", labels=["state"])
        counts = dict.fromkeys(JOB_STATES, 0)
        if "live_counts" in snapshot:  # the live jobs by state (the snapshot lists only the oldest queued)
            counts.update(snapshot["live_counts"])
        else:
            for job in snapshot.get("jobs", ()):
                counts[job["state"]] = counts.get(job["state"], 0) + 1
        for state, n in now.by_state.items():
            counts[state] = counts.get(state, 0) + n
        for state, n in counts.items():
            jobs.add_metric([state], n)
        yield jobs


def _one(family: GaugeMetricFamily, labels: list[str], value: float) -> GaugeMetricFamily:
    family.add_metric(labels, value)
    return family


def _head_metrics(snapshot: Mapping[str, Any]) -> Iterator[Metric]:
    yield _one(GaugeMetricFamily("dcf_up", "1 while the head is serving.", labels=["epoch", "queue"]),
               [str(snapshot.get("epoch", "")), str(snapshot.get("queue", ""))], 1)
    yield GaugeMetricFamily("dcf_queue_connected", "1 while the head's job queue (RabbitMQ, or the embedded "
                            "store) is reachable.", value=int(bool(snapshot.get("queue_connected", True))))
    yield GaugeMetricFamily("dcf_uptime_seconds", "Seconds since the head started.",
                            value=round(float(snapshot.get("uptime_s", 0.0)), 3))
    counters = snapshot.get("counters", {})
    for key in sorted(counters):
        yield CounterMetricFamily(f"dcf_{key}", COUNTER_HELP.get(key, f"{key.replace('_', ' ')}."),
                                  value=counters[key])


#: per provider: metric, kind, help, the node row's key
PER_PROVIDER = (
    ("dcf_provider_heartbeat_lag_seconds", "gauge", "Seconds since the provider's last heartbeat.",
     "last_heartbeat_s"),
    ("dcf_provider_gflops", "gauge", "Provider throughput for matmul (measured), GFLOP/s.", "gflops"),
    ("dcf_provider_assigned_subtasks", "gauge", "Subtasks assigned to the provider and not finished.", "assigned"),
    ("dcf_provider_subtasks_done", "counter", "Subtasks the provider finished.", "subtasks_done"),
)


def _provider_metrics(snapshot: Mapping[str, Any]) -> Iterator[Metric]:
    nodes = list(snapshot.get("nodes", ()))
    by_state = dict.fromkeys(PROVIDER_STATES, 0)
    for row in nodes:
        by_state[row["state"]] = by_state.get(row["state"], 0) + 1
    providers = GaugeMetricFamily("dcf_providers", "Providers by state.", labels=["state"])
    for state, count in by_state.items():
        providers.add_metric([state], count)
    yield providers
    for name, kind, help_text, key in PER_PROVIDER:
        family_type = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
        family = family_type(name, help_text, labels=["provider_id", "name", "device"])
        for row in nodes:
            family.add_metric([row["provider_id"], str(row.get("name", "")), str(row.get("device", ""))],
                              row.get(key, 0))
        yield family


def render_prometheus(snapshot: Mapping[str, Any], observer: Observer | None = None, *,
                      subscribers: int | None = None) -> str:
    """The Prometheus text of one snapshot, without finished-job counters (a ``Metrics`` keeps those)."""
    return Metrics(lambda: snapshot, observer, None if subscribers is None else (lambda: subscribers)).render()


# ---- the live feed ----------------------------------------------------------------------------
def provider_flops(head: Any) -> dict[str, float]:
    """provider id -> flops finished, read (never changed) from the head's state machine."""
    return {pid: float(getattr(p, "flops_done", 0.0)) for pid, p in head.state.providers.items()}


def finished_job(head: Any, job_id: str) -> tuple[str, float | None] | None:
    """(task type, seconds from submission to end) of a job that just ended, read (never changed)
    from the head: its live job while the head still holds it, else its row; None if neither."""
    job = getattr(getattr(head, "state", None), "jobs", {}).get(job_id)
    if job is not None:
        return str(job.task_type), _elapsed(job.created_at, job.finished_at)
    store = getattr(head, "store", None)
    row = store.get(job_id) if store is not None else None
    if row is None:
        return None
    return str(row["type"]), _elapsed(row.get("created_at"), row.get("finished_at"))


def _elapsed(start: float | None, end: float | None) -> float | None:
    return max(0.0, float(end) - float(start)) if start and end else None


def head_metrics(head: Any, observer: Observer | None) -> Metrics:
    """The ``Metrics`` of a running head, fed by its event bus from now on."""
    metrics = Metrics(head.snapshot, observer, lambda: len(head.events.subscribers),
                      lambda job_id: finished_job(head, job_id))
    head.events.sinks.append(metrics.sink)
    return metrics


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
