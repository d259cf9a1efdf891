"""The live feed behind the dashboard, ``/metrics`` and ``/v1/stream``: an ``Observer`` fed by a
sampler task, and the messages of the Server-Sent Events stream."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from common.errors import DcfError

from ..observe import Observer, head_metrics, sampler
from .facade import HeadApi

#: finished jobs the dashboard lists beside the live ones
RECENT_JOBS = 20
#: events the first stream message carries, for the dashboard's event log
RECENT_EVENTS = 50
#: how often an idle event stream checks that the head is not stopping
EXIT_CHECK_S = 0.25
#: the most event streams open at once (each builds a snapshot every period: 100 of them at 0.2 s
#: took /v1/health to 5 s); one more is a 503
MAX_STREAMS = 32
#: the shortest period a stream gets (a shorter one asked for is raised to this)
MIN_PERIOD_S = 0.5


class TooManyStreams(DcfError):
    """All ``MAX_STREAMS`` event streams are taken: 503, try again later."""

    http_status = 503


class Live:
    """The observer and the task that samples the head into it, once a ``period``."""

    def __init__(self, head: HeadApi, period: float = 1.0) -> None:
        self.head = head
        self.period = period
        self.observer = Observer()
        self.metrics = head_metrics(head, self.observer)
        self.task: asyncio.Task[None] | None = None
        #: the event streams now open (one token each)
        self.streams: set[object] = set()

    def admit(self) -> None:
        """Raise ``TooManyStreams`` when ``MAX_STREAMS`` streams are open (checked again as a
        stream starts: requests of the same moment cannot overshoot it)."""
        if len(self.streams) >= MAX_STREAMS:
            raise TooManyStreams(f"{MAX_STREAMS} event streams are open already; try again later")

    def exiting(self) -> bool:
        """True once the head is stopping (set on SIGINT/SIGTERM). uvicorn waits for every open
        response before it stops, and an event stream never ends by itself, so the streams end
        themselves then."""
        return self.head.stopping.is_set()

    def ensure_sampler(self) -> None:
        """Start the sampler in the running loop, once (again if it ever stopped)."""
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(sampler(self.head, self.observer, self.period))

    def payload(self, full: bool, after_sample: int = 0, after_seq: int = 0) -> dict[str, Any]:
        """One stream message: the head snapshot (without its long list of finished jobs), the
        recent jobs, and the observer's view (all of it, or what is new after the cursors); the
        first (full) one also the latest events."""
        snap = self.head.snapshot()
        finished = snap.pop("finished", [])
        snap["finished_count"] = len(finished)
        msg = {"full": full, "snapshot": snap, "recent_jobs": self.head.list_jobs(None, RECENT_JOBS),
               "observe": self.observer.view(after_sample, after_seq)}
        if full:
            msg["recent_events"] = self.head.events.since(0)[-RECENT_EVENTS:]
        return msg


async def event_stream(live: Live, period: float, disconnected: Callable[[], Awaitable[bool]]
                       ) -> AsyncIterator[str]:
    """SSE text: a full ``snapshot`` first, then every ``period`` s (at least ``MIN_PERIOD_S``) one
    with what is new, and an ``event`` for each head event as it happens; until the client has gone
    or the head stops. Past ``MAX_STREAMS`` open streams, one ``busy`` message and the end."""
    period = max(period, MIN_PERIOD_S)
    if len(live.streams) >= MAX_STREAMS:
        yield "retry: 10000\n" + sse("busy", {"message": f"{MAX_STREAMS} event streams are open already"})
        return
    token = object()
    live.streams.add(token)
    events = live.head.events
    queue = events.subscribe()
    try:
        first = live.payload(True)
        cursor = first["observe"]["cursor"]
        # events emitted between subscribing and the first message are in both: each is sent once,
        # and in the head's order (by seq)
        sent = max((e["seq"] for e in first.get("recent_events", ())), default=0)
        yield "retry: 2000\n" + sse("snapshot", first)  # retry: the browser's reconnect delay (ms)
        next_tick = time.monotonic() + period
        while not live.exiting():
            wait = next_tick - time.monotonic()
            if wait <= 0:
                if await disconnected():
                    return
                msg = live.payload(False, cursor["sample"], cursor["seq"])
                cursor = msg["observe"]["cursor"]
                yield sse("snapshot", msg)
                next_tick = max(next_tick + period, time.monotonic())
                continue
            try:
                event = await asyncio.wait_for(queue.get(), min(wait, EXIT_CHECK_S))
            except asyncio.TimeoutError:
                continue
            if event.seq > sent:
                sent = event.seq
                yield sse("event", event.to_dict(), event.seq)
    finally:
        events.unsubscribe(queue)
        live.streams.discard(token)


def sse(name: str, data: Any, ident: int | None = None) -> str:
    """One Server-Sent Events message."""
    head = f"id: {ident}\n" if ident is not None else ""
    return f"{head}event: {name}\ndata: {json.dumps(data, separators=(',', ':'), default=str)}\n\n"
