"""The head's REST API (FastAPI). Runs in the head's event loop: handlers call the Head directly.

Errors are JSON ``{"error": {"code": ..., "message": ...}}`` with a 4xx status.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from common import __version__, tasks
from common.errors import DcfError, TooLarge, Unauthorized

from .server import Head

log = logging.getLogger("dcf.head.api")


class JobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str = Field(min_length=1, max_length=64, description="task type, e.g. matmul")
    inputs: dict[str, str] = Field(default_factory=dict, description="input name -> blob id")
    params: dict[str, Any] = Field(default_factory=dict)
    nodes: int | None = Field(default=None, ge=1, le=100_000, description="at most this many providers")

    @field_validator("params")
    @classmethod
    def small_and_shallow(cls, params: dict[str, Any]) -> dict[str, Any]:
        """Params are stored and echoed with the job: keep them small and shallow."""
        if _depth(params) > MAX_PARAMS_DEPTH:
            raise ValueError(f"params nest deeper than {MAX_PARAMS_DEPTH} levels")
        if len(json.dumps(params)) > MAX_PARAMS_BYTES:
            raise ValueError(f"params exceed {MAX_PARAMS_BYTES} bytes as JSON")
        return params


MAX_PARAMS_DEPTH = 32
MAX_PARAMS_BYTES = 64 * 1024


def _depth(value: Any) -> int:
    """Nesting depth of JSON-like data, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        deepest = max(deepest, level)
        if isinstance(item, dict):
            stack.extend((v, level + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, level + 1) for v in item)
    return deepest


class Adopt(BaseModel):
    model_config = ConfigDict(extra="forbid")
    upload_id: str = Field(pattern="^[0-9a-f]{32}$")


class BigFileResponse(FileResponse):
    chunk_size = 4 * 1024 * 1024


def create_app(head: Head) -> FastAPI:
    app = FastAPI(title="dcf head", version=__version__,
                  description="Submit jobs, follow them, fetch results; see the providers.")

    async def auth(request: Request) -> None:
        token = head.cfg.api_token
        if not token:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            log.warning("rejected request without a valid token from %s",
                        request.client.host if request.client else "?")
            raise Unauthorized("missing or wrong bearer token")

    @app.exception_handler(DcfError)
    async def dcf_error(request: Request, exc: DcfError) -> JSONResponse:
        log.info("%s %s -> %d %s: %s", request.method, request.url.path, exc.http_status, exc.code,
                 exc.message)
        return JSONResponse({"error": exc.to_dict()}, status_code=exc.http_status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Unknown routes, wrong methods, unreadable bodies: the same error format as the rest."""
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(exc.status_code, "bad_request")
        return JSONResponse({"error": {"code": code, "message": str(exc.detail)}}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        msg = f"{where}: {first.get('msg', 'invalid request')}"
        log.info("%s %s -> 422: %s", request.method, request.url.path, msg)
        return JSONResponse({"error": {"code": "invalid", "message": msg}}, status_code=422)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse({"error": {"code": "internal", "message": f"internal error: {type(exc).__name__}"}},
                            status_code=500)

    guarded = [Depends(auth)]

    @app.get("/v1/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "version": __version__, "epoch": head.epoch, "queue": head.queue.name,
                "queue_connected": head.queue.is_connected,
                "task_types": tasks.names()}

    @app.get("/v1/info", dependencies=guarded)
    async def info() -> dict[str, Any]:
        """Where the state dir is: a client on this machine that can read it exchanges files there."""
        return {"epoch": head.epoch, "state_dir": str(head.root.resolve()), "fsync": head.cfg.fsync}

    @app.put("/v1/blobs", status_code=201, dependencies=guarded)
    async def upload(request: Request) -> dict[str, Any]:
        """Upload one array as the raw bytes of a .npy file (C order, float32 or float64)."""
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > head.cfg.max_upload_bytes:
            raise TooLarge(f"upload of {declared} bytes exceeds {head.cfg.max_upload_bytes}")
        writer = head.blobs.writer(head.cfg.max_upload_bytes)
        try:
            async for chunk in request.stream():
                writer.feed(chunk)
            blob_id, meta = writer.finish(head.cfg.fsync)
        except BaseException:
            writer.abort()
            raise
        log.info("blob stored: %s %s", meta.dtype, list(meta.shape), extra={"blob_id": blob_id})
        return {"blob_id": blob_id, **meta.to_dict(), "bytes": meta.nbytes}

    @app.post("/v1/blobs/adopt", status_code=201, dependencies=guarded)
    async def adopt(body: Adopt) -> dict[str, Any]:
        """Take a .npy file a client on the head's machine wrote to STATE_DIR/incoming/<upload_id>.npy."""
        blob_id, meta = head.blobs.adopt(body.upload_id, head.cfg.max_upload_bytes, head.cfg.fsync)
        log.info("blob adopted: %s %s", meta.dtype, list(meta.shape), extra={"blob_id": blob_id})
        return {"blob_id": blob_id, **meta.to_dict(), "bytes": meta.nbytes}

    @app.delete("/v1/blobs/{blob_id}", status_code=204, dependencies=guarded)
    async def delete_blob(blob_id: str) -> None:
        from common.errors import NotFound

        if not head.blobs.delete_blob(blob_id):
            raise NotFound(f"no blob {blob_id}")

    @app.post("/v1/jobs", status_code=201, dependencies=guarded)
    async def submit(spec: JobSpec) -> dict[str, Any]:
        job_id = await head.submit(spec.model_dump())
        return head.job_view(job_id)

    @app.get("/v1/jobs", dependencies=guarded)
    async def list_jobs(state: str | None = Query(None, pattern="^(queued|running|done|failed|cancelled)$"),
                        limit: int = Query(100, ge=1, le=10_000)) -> list[dict[str, Any]]:
        return head.list_jobs(state, limit)

    @app.get("/v1/jobs/{job_id}", dependencies=guarded)
    async def job(job_id: str, wait: float = Query(0.0, ge=0.0, le=60.0,
                                                  description="seconds to wait for the job to end")
                  ) -> dict[str, Any]:
        return await head.wait(job_id, wait)

    @app.post("/v1/jobs/{job_id}/cancel", dependencies=guarded)
    async def cancel(job_id: str) -> dict[str, Any]:
        return head.cancel(job_id)

    @app.delete("/v1/jobs/{job_id}", status_code=204, dependencies=guarded)
    async def delete(job_id: str) -> None:
        await head.delete(job_id)

    @app.get("/v1/jobs/{job_id}/result", dependencies=guarded, response_class=FileResponse,
             responses={200: {"content": {"application/octet-stream": {}},
                              "description": "the output as a .npy file, or a named output file"}})
    async def result(job_id: str, name: str | None = Query(None, max_length=64)) -> FileResponse:
        path = head.result_path(job_id, name)
        return BigFileResponse(path, media_type="application/octet-stream", filename=f"{job_id}-{path.name}")

    @app.get("/v1/nodes", dependencies=guarded)
    async def nodes() -> list[dict[str, Any]]:
        return head.nodes()

    from .ops_api import install
    install(app, head)
    return app
