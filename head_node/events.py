"""Node and job events: kept in memory for the API and dashboard, streamed to subscribers
(SSE), and forwarded to sinks (the RabbitMQ topic exchange ``dcf.events`` when configured).

Kinds: node.registered, node.left, node.lost, node.draining, node.undrained, job.accepted,
job.started, job.progress, job.done, job.failed, job.cancelled, job.metrics, job.republished (an
accepted job the queue never delivered back, published again), job.disagreement (two providers' results of a
subtask picked by ``--verify-rate`` differ), straggler, queue.lost, queue.restored.

A job's events come in order, ``job.accepted`` first; ``job.started``, ``job.progress`` and the end events
(``job.done``, ``job.failed``, ``job.cancelled``) carry the job's one progress (``done``, ``total``, ``unit``:
``Job.progress``), ``job.progress`` on each merged result and, while subtasks run, at most four a second
from the providers' reports. ``node.left`` (a clean exit, with
``requeued``) is not a ``node.lost``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("dcf.head.events")


@dataclass(frozen=True)
class Event:
    seq: int
    ts: float
    kind: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "ts": self.ts, "kind": self.kind, **self.data}


class EventBus:
    def __init__(self, keep: int = 5000, per_job: int = 2000, jobs: int = 10_000) -> None:
        self.recent: deque[Event] = deque(maxlen=keep)
        #: the events of the ``jobs`` jobs heard of last (the oldest job's are dropped first)
        self.by_job: OrderedDict[str, deque[Event]] = OrderedDict()
        self.jobs = jobs
        self.per_job = per_job
        self.subscribers: set[asyncio.Queue[Event]] = set()
        self.sinks: list[Callable[[Event], None]] = []
        self._seq = itertools.count(1)

    def emit(self, kind: str, **data: Any) -> Event:
        event = Event(next(self._seq), time.time(), kind, data)
        self.recent.append(event)
        job_id = data.get("job_id")
        if isinstance(job_id, str):
            events = self.by_job.get(job_id)
            if events is None:
                events = self.by_job[job_id] = deque(maxlen=self.per_job)
                if len(self.by_job) > self.jobs:
                    self.by_job.popitem(last=False)
            events.append(event)
        for queue in list(self.subscribers):
            with contextlib.suppress(asyncio.QueueFull):  # a slow reader misses events, not the head
                queue.put_nowait(event)
        for sink in self.sinks:
            try:
                sink(event)
            except Exception:
                log.exception("event sink failed")
        return event

    def subscribe(self, size: int = 1000) -> asyncio.Queue[Event]:
        queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=size)
        self.subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[Event]) -> None:
        self.subscribers.discard(queue)

    def job_events(self, job_id: str, since: int = 0) -> list[dict[str, Any]]:
        return [e.to_dict() for e in self.by_job.get(job_id, ()) if e.seq > since]

    def since(self, seq: int = 0, kinds: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        return [e.to_dict() for e in self.recent if e.seq > seq and (not kinds or e.kind.startswith(kinds))]

    def forget_job(self, job_id: str) -> None:
        self.by_job.pop(job_id, None)
