"""Operations routes of the head: the live dashboard, Prometheus metrics, the SSE event stream,
job events and node detail / drain. ``install(app, head)`` adds them to the REST API app.

Auth: with ``--api-token`` set, every route here needs ``Authorization: Bearer TOKEN`` like the
rest of the API, except the dashboard page ``/`` and its ``/static`` files, which hold no data.
The page takes the token from ``/?token=...`` once, keeps it in the browser's local storage and
sends it with every API call; ``/v1/stream`` (EventSource cannot send headers) also accepts it
as ``?token=``.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import hmac
import io
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles

from common.errors import Unauthorized

from .observe import Observer, observe_once, render_prometheus, sampler
from .server import Head

log = logging.getLogger("dcf.head.ops")

DASHBOARD = Path(__file__).resolve().parent / "dashboard"
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
JOB_STATES = "^(queued|running|done|failed|cancelled)$"
#: finished jobs the dashboard lists beside the live ones
RECENT_JOBS = 20
#: events the first stream message carries, for the dashboard's event log
RECENT_EVENTS = 50
#: how often an idle event stream checks that the head is not stopping
EXIT_CHECK_S = 0.25


class Ops:
    """What the ops routes share: the observer and the task that samples into it."""

    def __init__(self, app: FastAPI, head: Head, period: float = 1.0) -> None:
        self.app = app
        self.head = head
        self.period = period
        self.observer = Observer()
        self.task: asyncio.Task[None] | None = None

    def exiting(self) -> bool:
        """True once the head is stopping (``Head.stopping``, set on SIGINT/SIGTERM). uvicorn waits
        for every open response before it stops, and an event stream never ends by itself, so the
        streams end themselves then."""
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


def install(app: FastAPI, head: Head) -> Ops:
    """Add the ops routes to ``app`` (called at the end of ``create_app``) and start the sampler:
    at once when called inside the running loop (``dcf-head``), else at the first ops request."""
    ops = Ops(app, head)
    app.state.ops = ops
    with contextlib.suppress(RuntimeError):  # no running loop here: the first ops request starts it
        ops.ensure_sampler()

    def check_token(request: Request, allow_query: bool) -> None:
        token = head.cfg.api_token
        if not token:
            return
        expected = f"Bearer {token}".encode()
        if hmac.compare_digest(request.headers.get("authorization", "").encode(), expected):
            return
        if allow_query and hmac.compare_digest(f"Bearer {request.query_params.get('token', '')}".encode(),
                                               expected):
            return
        log.warning("rejected request without a valid token from %s", request.client.host if request.client else "?")
        raise Unauthorized("missing or wrong bearer token")

    async def auth(request: Request) -> None:
        ops.ensure_sampler()
        check_token(request, allow_query=False)

    async def stream_auth(request: Request) -> None:
        ops.ensure_sampler()
        check_token(request, allow_query=True)

    guarded = [Depends(auth)]

    # ---- the dashboard --------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def dashboard() -> HTMLResponse:
        ops.ensure_sampler()
        return HTMLResponse((DASHBOARD / "index.html").read_text(encoding="utf-8"),
                            headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=DASHBOARD), name="static")

    # ---- metrics --------------------------------------------------------------------------
    @app.get("/metrics", dependencies=guarded, response_class=Response,
             responses={200: {"content": {"text/plain": {}}}})
    async def metrics() -> Response:
        """Prometheus text format (0.0.4)."""
        text = render_prometheus(head.snapshot(), ops.observer, subscribers=len(head.events.subscribers))
        return Response(text, media_type=PROMETHEUS_TYPE)

    @app.get("/v1/metrics", dependencies=guarded)
    async def metrics_json() -> dict[str, Any]:
        """Counters, providers and the time series (throughput, per-provider GFLOP/s), training
        curves and alerts."""
        if not ops.observer.samples:
            observe_once(head, ops.observer)  # right after start-up: at least the baseline
        snap = head.snapshot()
        return {"time": snap["time"], "uptime_s": snap["uptime_s"], "counters": snap["counters"],
                "nodes": snap["nodes"], "jobs": snap["jobs"], **ops.observer.view()}

    @app.get("/v1/metrics.csv", dependencies=guarded, response_class=Response,
             responses={200: {"content": {"text/csv": {}}}})
    async def metrics_csv() -> Response:
        """The time series: time (unix s), throughput_gflops, then each provider's GFLOP/s."""
        header, rows = ops.observer.csv_rows()
        buf = io.StringIO()
        out = csv.writer(buf, lineterminator="\n")
        out.writerow(header)
        out.writerows(rows)
        return Response(buf.getvalue(), media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition": 'attachment; filename="dcf-metrics.csv"'})

    # ---- live stream ----------------------------------------------------------------------
    @app.get("/v1/stream", dependencies=[Depends(stream_auth)], response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}}}})
    async def stream(request: Request, period: float = Query(1.0, ge=0.2, le=60.0)) -> StreamingResponse:
        """Server-Sent Events: ``snapshot`` (first in full, then every ``period`` s with what is
        new), and ``event`` for each head event as it happens."""
        return StreamingResponse(_events(request, ops, period), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # ---- jobs and nodes -------------------------------------------------------------------
    @app.get("/v1/jobs/{job_id}/events", dependencies=guarded)
    async def job_events(job_id: str, since: int = Query(0, ge=0)) -> list[dict[str, Any]]:
        """The job's events (kept in memory since the head started), oldest first."""
        head.job_view(job_id)  # 404 for an unknown job
        return head.events.job_events(job_id, since)

    @app.get("/v1/nodes/{provider_id}", dependencies=guarded)
    async def node(provider_id: str) -> dict[str, Any]:
        return head.node_view(provider_id)

    @app.post("/v1/nodes/{provider_id}/drain", dependencies=guarded)
    async def drain(provider_id: str) -> dict[str, Any]:
        """The provider finishes what it has and is given nothing new."""
        return head.drain(provider_id, True)

    @app.post("/v1/nodes/{provider_id}/undrain", dependencies=guarded)
    async def undrain(provider_id: str) -> dict[str, Any]:
        return head.drain(provider_id, False)

    # GET /v1/jobs again, with type= too: it replaces the route create_app added
    app.router.routes[:] = [r for r in app.router.routes
                            if not (isinstance(r, APIRoute) and r.path == "/v1/jobs" and "GET" in r.methods)]

    @app.get("/v1/jobs", dependencies=guarded)
    async def list_jobs(state: str | None = Query(None, pattern=JOB_STATES),
                        task_type: str | None = Query(None, alias="type", min_length=1, max_length=64,
                                                      description="task type, e.g. matmul"),
                        limit: int = Query(100, ge=1, le=10_000)) -> list[dict[str, Any]]:
        """Jobs, newest first; filter by state and task type."""
        if task_type is None:
            return head.list_jobs(state, limit)
        return [j for j in head.list_jobs(state, 10_000) if j["type"] == task_type][:limit]

    app.openapi_schema = None
    return ops


async def _events(request: Request, ops: Ops, period: float) -> AsyncIterator[str]:
    head = ops.head
    queue = head.events.subscribe()
    try:
        first = ops.payload(True)
        cursor = first["observe"]["cursor"]
        yield "retry: 2000\n" + _sse("snapshot", first)  # retry: the browser's reconnect delay (ms)
        next_tick = time.monotonic() + period
        while not ops.exiting():
            wait = next_tick - time.monotonic()
            if wait <= 0:
                if await request.is_disconnected():
                    return
                msg = ops.payload(False, cursor["sample"], cursor["seq"])
                cursor = msg["observe"]["cursor"]
                yield _sse("snapshot", msg)
                next_tick = max(next_tick + period, time.monotonic())
                continue
            try:
                event = await asyncio.wait_for(queue.get(), min(wait, EXIT_CHECK_S))
            except asyncio.TimeoutError:
                continue
            yield _sse("event", event.to_dict(), event.seq)
    finally:
        head.events.unsubscribe(queue)


def _sse(name: str, data: Any, ident: int | None = None) -> str:
    head = f"id: {ident}\n" if ident is not None else ""
    return f"{head}event: {name}\ndata: {json.dumps(data, separators=(',', ':'), default=str)}\n\n"
