"""``create_app(head)``: the head's REST API, one router per area, the error handlers and the
dashboard's static files. It runs in the head's event loop: handlers call the head directly."""

from __future__ import annotations

import contextlib
from typing import Any

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from common import __version__

from . import blobs, docs, jobs, nodes, ops
from .errors import install_error_handlers
from .facade import HeadApi
from .live import Live

ROUTERS = (ops.public, docs.router, jobs.router, blobs.router, nodes.router, ops.guarded, ops.streams)


def create_app(head: HeadApi) -> FastAPI:
    """The app for ``head``; its live-feed sampler starts at once inside a running loop
    (``dcf-head``), else at the first request that needs it."""
    app = FastAPI(title="dcf head", version=__version__,
                  description="Submit jobs, follow them, fetch results; see the providers.",
                  docs_url=None, redoc_url=None)  # served by docs.py, with their assets from the head
    app.state.head = head
    app.state.live = live = Live(head)
    with contextlib.suppress(RuntimeError):  # no running loop here
        live.ensure_sampler()
    install_error_handlers(app)
    for router in ROUTERS:
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=ops.DASHBOARD), name="static")
    _token_optional_unless_set(app, bool(head.cfg.api_token))
    return app


def _token_optional_unless_set(app: FastAPI, required: bool) -> None:
    """The bearer token is declared on every guarded route (the "Authorize" button of /docs), as
    required only where the head has one (``--api-token``): without, no security is an option too."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()
        if not required:
            for ops in schema.get("paths", {}).values():
                for op in ops.values():
                    if isinstance(op, dict) and op.get("security") and {} not in op["security"]:
                        op["security"].append({})
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
