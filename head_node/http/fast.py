"""The batch API's two routes, ``POST /v1/jobs/batch`` and ``POST /v1/jobs/gather`` (msgpack), and
an ASGI front that serves them without FastAPI's middleware, routing and dependency layers.

A tiny job is one request, so what a request costs the head bounds the jobs per second. Measured
on the project's 2-core machine (bench/tasks.py, `Client.submit_async` one by one), FastAPI's
layers cost the head about 1 ms of CPU per request before the handler runs; this front answers the
same request for a fraction of that. The routes stay declared in FastAPI (``jobs.py``), for
/openapi.json and for any request the front passes on, and both call ``reply`` below: one
implementation, the same token check, limits and JSON errors.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from common.errors import DcfError, InternalError, TooLarge
from common.protocol import batch

from .deps import require_bearer
from .facade import HeadApi

log = logging.getLogger("dcf.head.api")

MSGPACK = "application/msgpack"
ROUTES = ("/v1/jobs/batch", "/v1/jobs/gather")

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


async def reply(head: HeadApi, path: str, body: bytes) -> bytes:
    """The msgpack reply to a batch or gather request (raises DcfError for a bad one)."""
    if path == ROUTES[0]:
        req = batch.decode_batch_request(body)
        return batch.encode_outcomes(await head.submit_many(req.jobs, req.wait))
    greq = batch.decode_gather_request(body)
    return batch.encode_outcomes(await head.gather(greq.job_ids, greq.wait, greq.forget))


def check_body_size(declared: str | None) -> None:
    if declared and declared.isdigit() and int(declared) > batch.MAX_BATCH_BYTES:
        raise TooLarge(f"request of {declared} bytes exceeds the {batch.MAX_BATCH_BYTES} byte limit")


class FastFront:
    """ASGI: the batch routes answered here, everything else passed to ``app``."""

    def __init__(self, app: App, head: HeadApi) -> None:
        self.app = app
        self.head = head

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in ROUTES:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin1"): v.decode("latin1") for k, v in scope["headers"]}
        try:
            require_bearer(self.head.cfg.api_token, headers.get("authorization", ""),
                           (scope.get("client") or ("?",))[0])
            check_body_size(headers.get("content-length"))
            body = await read_body(receive)
            status, content, ctype = 200, await reply(self.head, scope["path"], body), MSGPACK
        except DcfError as exc:
            log.info("POST %s -> %d %s: %s", scope["path"], exc.http_status, exc.code, exc.message)
            status, content, ctype = exc.http_status, _error(exc), "application/json"
        except Exception as exc:
            log.exception("POST %s failed", scope["path"])
            err = InternalError(f"internal error: {type(exc).__name__}")
            status, content, ctype = err.http_status, _error(err), "application/json"
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", ctype.encode()), (b"content-length", str(len(content)).encode())]})
        await send({"type": "http.response.body", "body": content})


async def read_body(receive: Receive) -> bytes:
    """The whole request body, refused past ``MAX_BATCH_BYTES`` as it arrives."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise DcfError("the client went away")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > batch.MAX_BATCH_BYTES:
            raise TooLarge(f"request exceeds the {batch.MAX_BATCH_BYTES} byte limit")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _error(exc: DcfError) -> bytes:
    return json.dumps({"error": exc.to_dict()}).encode()
