"""The routers' dependencies: the head, the live feed, and the one bearer-token check.

With a token (``--api-token``, or by default the one ``dcf-head`` creates in STATE_DIR/api-token
on its first start; none only with ``--insecure``), every route needs ``Authorization: Bearer TOKEN`` except
``/v1/health``, the dashboard page ``/`` and its ``/static`` files, which hold no data. The
event stream ``/v1/stream`` also takes the token as ``?token=`` (a browser's EventSource cannot
send headers). Tokens are compared in constant time.
"""

from __future__ import annotations

import hmac
import logging
import time
from typing import Annotated

from fastapi import Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from common.errors import Unauthorized

from .facade import HeadApi
from .live import Live

log = logging.getLogger("dcf.head.api")


async def get_head(request: Request) -> HeadApi:
    head: HeadApi = request.app.state.head
    return head


async def get_live(request: Request) -> Live:
    """The live feed, its sampler started if it was not yet (``create_app`` outside a loop)."""
    live: Live = request.app.state.live
    live.ensure_sampler()
    return live


HeadDep = Annotated[HeadApi, Depends(get_head)]
LiveDep = Annotated[Live, Depends(get_live)]


def check_token(request: Request, head: HeadApi, query_token: str | None = None) -> None:
    """Pass if no token is configured, or the Authorization header (or ``query_token``, where the
    route takes one) carries it; else ``Unauthorized`` (401)."""
    require_bearer(head.cfg.api_token, request.headers.get("authorization", ""),
                   request.client.host if request.client else "?", query_token)


def carries_token(request: Request, head: HeadApi) -> bool:
    """Whether the request carries the API token (or none is configured): a quiet check, for a public
    route that tells token holders more (no warning, no 401)."""
    token = head.cfg.api_token
    return not token or _bearer_is(token, request.headers.get("authorization", ""))


def _bearer_is(token: str, authorization: str) -> bool:
    """Whether ``authorization`` is exactly ``Bearer <token>``, compared in constant time."""
    return hmac.compare_digest(authorization.encode(), f"Bearer {token}".encode())


def require_bearer(token: str | None, authorization: str, client: str, query_token: str | None = None) -> None:
    """The one token check (also of the ASGI front, ``fast.py``), in constant time: pass if ``token``
    is unset or the header (or ``query_token``) carries it, else log and raise ``Unauthorized``."""
    if not token:
        return
    if _bearer_is(token, authorization):
        return
    if query_token is not None and _bearer_is(token, f"Bearer {query_token}"):
        return
    REJECTIONS.warn(client)
    raise Unauthorized("missing or wrong bearer token")


class RejectionLog:
    """The wrong-token warning, at most one line per source per ``every`` s: a flood of bad requests
    (20,000 in a red-team run) is one line now and then, with the count of those it left out."""

    def __init__(self, every: float = 10.0, sources: int = 1024) -> None:
        self.every = every
        self.sources = sources  # remembered sources at most (spoofed ones cannot grow it unbounded)
        #: source -> (when its last line went out, rejections since that were not logged)
        self.seen: dict[str, tuple[float, int]] = {}

    def warn(self, client: str) -> bool:
        """Log the rejection of a request from ``client`` unless one was logged < ``every`` s ago
        (then count it); True if a line went out."""
        now = time.monotonic()
        last = self.seen.get(client)
        if last is not None and now - last[0] < self.every:
            self.seen[client] = (last[0], last[1] + 1)
            return False
        if last is None and len(self.seen) >= self.sources:
            self.seen = {k: v for k, v in self.seen.items() if now - v[0] < self.every}
            if len(self.seen) >= self.sources:
                self.seen.clear()
        suppressed = last[1] if last is not None else 0
        self.seen[client] = (now, 0)
        log.warning("rejected request without a valid token from %s%s", client,
                    f" ({suppressed} more since the last line, not logged)" if suppressed else "")
        return True


#: the one rejection log of this process
REJECTIONS = RejectionLog()


#: declares the bearer token in /openapi.json (the "Authorize" button of /docs); the check itself
#: is ``check_token``'s
BEARER = HTTPBearer(auto_error=False, description="the head's --api-token, when it has one")
Bearer = Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]


async def require_token(request: Request, head: HeadDep, _: Bearer) -> None:
    """The token dependency of every guarded router."""
    check_token(request, head)


async def require_token_or_query(
        request: Request, head: HeadDep, _: Bearer,
        token: Annotated[str | None, Query(description="the API token, for clients that cannot send "
                                                       "an Authorization header (EventSource)")] = None,
) -> None:
    """The same check, also taking the token from the query string (the event stream only)."""
    check_token(request, head, token)
