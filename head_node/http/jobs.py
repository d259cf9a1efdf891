"""Jobs: submit, list, follow, cancel, delete, fetch the result, read the job's events."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from common.errors import InternalError
from common.jobs import STATE_NAMES
from common.npyfmt import npy_header
from common.protocol import batch

from . import fast
from .deps import HeadDep, require_token
from .errors import documented
from .ids import JobId
from .models import Event, JobSpec, JobView

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(require_token)],
                   responses=documented(401, 422))

JOB_NOT_FOUND = documented(404)
#: a short id that matches more than one job
AMBIGUOUS = documented(409)
#: the most jobs one list returns (a smaller page needs a cursor to list them all: not built yet)
MAX_LIMIT = 10_000
STATE_PATTERN = f"^({'|'.join(STATE_NAMES)})$"


class BigFileResponse(FileResponse):
    chunk_size = 4 * 1024 * 1024


MSGPACK = fast.MSGPACK
BATCH_BODY = {"requestBody": {"required": True, "content": {MSGPACK: {"schema": {"type": "string",
                                                                                 "format": "binary"}}}}}
BATCH_REPLY: dict[int | str, dict[str, Any]] = {
    200: {"content": {MSGPACK: {}}, "description": "the jobs' outcomes (docs/PROTOCOL.md §14)"}}


@router.post("", status_code=201, response_model=JobView, responses=documented(400, 404, 409, 503))
async def submit(spec: JobSpec, head: HeadDep,
                 idempotency_key: Annotated[str | None, Header(
                     description="the client's key for this submission (1-128 of A-Z a-z 0-9 . _ : -): a "
                                 "retry with the same key returns the job the first try made, never a second "
                                 "one (docs/PROTOCOL.md §14.1)")] = None) -> dict[str, Any]:
    """Submit a job; it is accepted (durable) when this returns."""
    if idempotency_key is not None:  # a bad one: 422, logged by the error handler
        batch.check_idempotency_key("Idempotency-Key header", idempotency_key)
    job_id = await head.submit(batch.JobSpec(spec.type, spec.inputs, {}, spec.params, spec.nodes, idempotency_key))
    return head.job_view(job_id)


async def _body(request: Request) -> bytes:
    fast.check_body_size(request.headers.get("content-length"))
    return await fast.read_body(request.receive)


@router.post("/batch", response_class=Response, openapi_extra=BATCH_BODY,
             responses={**BATCH_REPLY, **documented(400, 404, 413, 503)})
async def submit_batch(request: Request, head: HeadDep) -> Response:
    """Submit many jobs in one msgpack request, small operands inline: all are accepted (durable) or
    none. With ``wait``, the reply comes once they all ended (or the wait passed), with their small
    results inline. (Served by ``fast.FastFront`` ahead of FastAPI; the same code.)"""
    return Response(await fast.reply(head, fast.ROUTES[0], await _body(request)), media_type=MSGPACK)


@router.post("/gather", response_class=Response, openapi_extra=BATCH_BODY,
             responses={**BATCH_REPLY, **documented(400, 404, 413)})
async def gather(request: Request, head: HeadDep) -> Response:
    """The outcomes of many jobs, once they all ended or ``wait`` passed, their small results inline;
    with ``forget``, the ended ones are deleted once read (as a result backend consumes them)."""
    return Response(await fast.reply(head, fast.ROUTES[1], await _body(request)), media_type=MSGPACK)


@router.get("", response_model=list[JobView])
async def list_jobs(head: HeadDep,
                    state: Annotated[str | None, Query(pattern=STATE_PATTERN, description="job state")] = None,
                    task_type: Annotated[str | None, Query(alias="type", min_length=1, max_length=64,
                                                           description="task type, e.g. matmul")] = None,
                    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100) -> JSONResponse:
    """Jobs, newest first; filter by state and task type."""
    # returned as is (the head's own views): checking each against the model cost ~18 µs a job
    if task_type is None:
        return JSONResponse(head.list_jobs(state, limit))
    return JSONResponse([j for j in head.list_jobs(state, MAX_LIMIT) if j["type"] == task_type][:limit])


@router.get("/{job_id}", response_model=JobView, responses=JOB_NOT_FOUND | AMBIGUOUS)
async def job(job_id: JobId, head: HeadDep,
              wait: Annotated[float, Query(ge=0.0, le=60.0, description="seconds to wait for the job to end")] = 0.0
              ) -> dict[str, Any]:
    return await head.wait(job_id, wait)


@router.post("/{job_id}/cancel", response_model=JobView, responses=documented(404, 409))
async def cancel(job_id: JobId, head: HeadDep) -> dict[str, Any]:
    return head.cancel(job_id)


@router.delete("/{job_id}", status_code=204, responses=documented(404, 409))
async def delete(job_id: JobId, head: HeadDep) -> None:
    """Forget a finished job: its record, outputs and events, and the input blobs no other job uses."""
    await head.delete(job_id)


@router.get("/{job_id}/result", response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                 "format": "binary"}}},
                             "description": "the output as a .npy file, or a named output file"},
                       **documented(404, 409, 500)})
async def result(job_id: JobId, head: HeadDep,
                 name: Annotated[str | None, Query(max_length=64)] = None) -> Response:
    found = head.result_file(job_id, name)
    if isinstance(found, Path):
        # never wrong bytes: a file whose checksum does not match is a 500 naming it (hashed on a thread,
        # and only when this head has not checked the file since it changed or since it started)
        what = f"result {found.stem if found.suffix == '.npy' else found.name} of job {job_id}"
        await asyncio.to_thread(head.blobs.verify, found, what, InternalError)
        return BigFileResponse(found, media_type="application/octet-stream", filename=f"{job_id}-{found.name}")
    body = npy_header(found) + found.tobytes()  # a small output kept in the job's row
    return Response(body, media_type="application/octet-stream",
                    headers={"content-disposition": f'attachment; filename="{job_id}-{name or "result"}.npy"'})


@router.get("/{job_id}/events", response_model=list[Event], responses=JOB_NOT_FOUND | AMBIGUOUS)
async def job_events(job_id: JobId, head: HeadDep,
                     since: Annotated[int, Query(ge=0)] = 0) -> list[dict[str, Any]]:
    """The job's events (kept in memory since the head started), oldest first."""
    head.job_view(job_id)  # 404 for an unknown job
    return head.events.job_events(job_id, since)
