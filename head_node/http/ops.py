"""Operations: health, where the state dir is, Prometheus and JSON/CSV metrics, the live event
stream (Server-Sent Events), and the dashboard page (its ``/static`` files are mounted by
``create_app``)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, Response, StreamingResponse

from common import __version__, tasks

from ..observe import observe_once
from .deps import HeadDep, LiveDep, carries_token, require_token, require_token_or_query
from .errors import documented
from .live import event_stream
from .models import Health, Info, MetricsView

DASHBOARD = Path(__file__).resolve().parent.parent / "dashboard"
PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: no token needed: nothing here is data
public = APIRouter(tags=["ops"])
guarded = APIRouter(tags=["ops"], dependencies=[Depends(require_token)], responses=documented(401))
#: the event stream also takes the token as ?token=
streams = APIRouter(tags=["ops"], dependencies=[Depends(require_token_or_query)], responses=documented(401, 422))


@public.get("/v1/health", response_model=Health, response_model_exclude_none=True)
async def health(request: Request, head: HeadDep) -> dict[str, Any]:
    """Liveness, open to anyone; the head's run id (``epoch``) only with the API token: messages of the
    provider protocol carry it, so it is not handed to strangers."""
    return {"status": "fenced" if head.fenced else "ok", "version": __version__, "queue": head.queue.name,
            "queue_connected": head.queue.is_connected, "task_types": tasks.names(),
            "role": "fenced" if head.fenced else "active", **({"fenced": head.fenced} if head.fenced else {}),
            "epoch": head.incarnation if carries_token(request, head) else None}


@public.get("/", include_in_schema=False)
async def dashboard(live: LiveDep) -> HTMLResponse:
    return HTMLResponse((DASHBOARD / "index.html").read_text(encoding="utf-8"), headers={"Cache-Control": "no-cache"})


@guarded.get("/v1/info", response_model=Info)
async def info(head: HeadDep) -> dict[str, Any]:
    """Where the state dir is: a client on this machine that can read it exchanges files there."""
    return {"epoch": head.incarnation, "state_dir": str(head.root.resolve()), "fsync": head.cfg.fsync}


@guarded.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(live: LiveDep) -> Response:
    """Prometheus text format (0.0.4)."""
    metrics = live.metrics
    # read in the loop, formatted in a worker thread (tens of ms at 500 providers)
    text = await run_in_threadpool(metrics.render, metrics.reading())
    return Response(text, media_type=PROMETHEUS_TYPE)


@guarded.get("/v1/metrics", response_model=MetricsView)
async def metrics_json(head: HeadDep, live: LiveDep) -> dict[str, Any]:
    """Counters, providers and the time series (throughput, per-provider GFLOP/s), training
    curves and alerts."""
    if not live.observer.samples:
        observe_once(head, live.observer)  # right after start-up: at least the baseline
    snap = head.snapshot()
    return {"time": snap["time"], "uptime_s": snap["uptime_s"], "counters": snap["counters"],
            "nodes": snap["nodes"], "jobs": snap["jobs"], **live.observer.view()}


@guarded.get("/v1/metrics.csv", response_class=Response, responses={200: {"content": {"text/csv": {}}}})
async def metrics_csv(live: LiveDep) -> Response:
    """The time series: time (unix s), throughput_gflops, then each provider's GFLOP/s."""
    header, rows = live.observer.csv_rows()
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(header)
    out.writerows(rows)
    return Response(buf.getvalue(), media_type="text/csv; charset=utf-8",
                    headers={"Content-Disposition": 'attachment; filename="dcf-metrics.csv"'})


@streams.get("/v1/stream", response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}}}, **documented(503)})
async def stream(request: Request, live: LiveDep,
                 period: Annotated[float, Query(ge=0.2, le=60.0, description="seconds between snapshots; "
                                                "at least 0.5 (a shorter one is raised to it)")] = 1.0
                 ) -> StreamingResponse:
    """Server-Sent Events: ``snapshot`` (first in full, then every ``period`` s with what is
    new), and ``event`` for each head event as it happens. At most 32 streams are open at once:
    503 past that."""
    live.admit()
    return StreamingResponse(event_stream(live, period, request.is_disconnected), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
