"""Every error the REST API answers is JSON ``{"error": {"code": ..., "message": ...}}``
(``ErrorBody``): dcf's own errors, the framework's (unknown route, wrong method, unreadable body),
invalid requests, and bugs (500, ``internal``).
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.errors import BadRequest, DcfError, InternalError, MethodNotAllowed, NotFound, TooLarge, ValidationError

from .models import ErrorBody

log = logging.getLogger("dcf.head.api")

#: the codes of the framework's own HTTP errors
FRAMEWORK_CODES = {404: NotFound.code, 405: MethodNotAllowed.code, 413: TooLarge.code}
FRAMEWORK_DEFAULT_CODE = BadRequest.code


def error_response(code: str, message: str, status: int, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


async def dcf_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DcfError)
    log.info("%s %s -> %d %s: %s", request.method, request.url.path, exc.http_status, exc.code, exc.message)
    return JSONResponse({"error": exc.to_dict()}, status_code=exc.http_status)


async def framework_error(request: Request, exc: Exception) -> JSONResponse:
    """Unknown routes, wrong methods, unreadable bodies: the same error format as the rest."""
    assert isinstance(exc, StarletteHTTPException)
    code = FRAMEWORK_CODES.get(exc.status_code, FRAMEWORK_DEFAULT_CODE)
    return error_response(code, str(exc.detail), exc.status_code, getattr(exc, "headers", None))


async def invalid_request(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ()))
    msg = f"{where}: {first.get('msg', 'invalid request')}"
    log.info("%s %s -> 422: %s", request.method, request.url.path, msg)
    return error_response(ValidationError.code, msg, ValidationError.http_status)


async def internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
    err = InternalError(f"internal error: {type(exc).__name__}")
    return JSONResponse({"error": err.to_dict()}, status_code=err.http_status)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(DcfError, dcf_error)
    app.add_exception_handler(StarletteHTTPException, framework_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(Exception, internal_error)


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for these error statuses, each with the ``ErrorBody`` schema."""
    return {status: {"model": ErrorBody, "description": ERROR_DESCRIPTIONS.get(status, "error")}
            for status in statuses}


ERROR_DESCRIPTIONS = {
    400: "unreadable request",
    401: "missing or wrong bearer token (with --api-token)",
    404: "no such job, blob, provider or output",
    409: "the request does not fit the job's state, or a short id matches more than one",
    413: "too large",
    422: "invalid request",
    503: "the job queue (RabbitMQ) is unreachable, or the head holds --max-jobs unfinished jobs: the job was not "
         "accepted",
    507: "no room: the head's state dir is full, or it holds --max-unused-bytes of uploads no job uses",
}
