"""What a standby head answers over HTTP while it waits for the leader lock (head_node/leader.py): every
route ``503`` with error code ``standby`` and the active head's URL, so that a client given several heads
moves to the next (user_client/channel.py); ``GET /v1/health`` ``200`` with ``status: "standby"`` (it is
alive: a liveness probe must not restart it)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from common import __version__

from ..leader import active_head

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class StandbyApp:
    """The ASGI app of a standby head of the state dir ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def active(self) -> str | None:
        url = active_head(self.root).get("url")
        return url if isinstance(url, str) else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        active = self.active()
        if scope["method"] == "GET" and scope["path"] == "/v1/health":
            status, body = 200, {"status": "standby", "version": __version__, "queue": "rabbitmq",
                                 "queue_connected": False, "role": "standby", "active": active, "epoch": None}
        else:
            status, body = 503, {"error": {"code": "standby", "message": (
                f"this head is a standby; the active head is {active}" if active
                else "this head is a standby and no head is active yet")}, "active": active}
        data = json.dumps(body).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                                (b"cache-control", b"no-store")]})
        await send({"type": "http.response.body", "body": data})
