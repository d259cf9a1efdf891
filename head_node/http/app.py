"""``create_app(head)``: the head's REST API, one router per area, the error handlers and the
dashboard's static files. It runs in the head's event loop: handlers call the head directly."""

from __future__ import annotations

import contextlib

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
    return app
