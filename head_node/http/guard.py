"""The HTTP server's guard against idle and slow connections (slow loris), for uvicorn.

uvicorn closes a keep-alive connection that stays idle ``timeout_keep_alive`` s after a response,
but never one that connects and sends nothing, or a request line and then a header byte now and
then: 200 such connections stayed open for good, each holding a file descriptor, until real
uploads failed. ``GuardedHttp`` (uvicorn's own protocol, httptools or h11, with this mixed in)

* closes a connection that has waited ``HEADER_TIMEOUT_S`` for a complete request head (from its
  start, or from the end of its last response); a request being handled is never cut, however
  long its body or its reply takes;
* closes at once a connection past ``max_connections()`` open ones (below the process's file limit).
"""

from __future__ import annotations

import asyncio
from typing import Any

#: seconds a connection may take to send a complete request head
HEADER_TIMEOUT_S = 10.0
#: the most open connections at any file limit
MAX_CONNECTIONS = 1000


def max_connections() -> int:
    """Open connections the head allows: ``MAX_CONNECTIONS``, or half the soft file limit where that
    is lower (the rest is for blobs, the job database, ZeroMQ)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return MAX_CONNECTIONS
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return MAX_CONNECTIONS
    return max(16, min(MAX_CONNECTIONS, soft // 2))


class _Guard:
    """Mixed in ahead of a uvicorn HTTP protocol class (``connections``, ``cycle``, ``transport``)."""

    connections: set[Any]
    cycle: Any
    transport: asyncio.Transport
    header_timeout: float = HEADER_TIMEOUT_S
    limit: int = MAX_CONNECTIONS

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._idle_since = asyncio.get_running_loop().time()
        self._guard: asyncio.TimerHandle | None = None
        if len(self.connections) > self.limit:
            transport.close()
            return
        self._arm(self.header_timeout)

    def _arm(self, delay: float) -> None:
        self._guard = asyncio.get_running_loop().call_later(delay, self._check)

    def _check(self) -> None:
        self._guard = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:  # a request is being handled
            self._arm(self.header_timeout)
            return
        left = self._idle_since + self.header_timeout - asyncio.get_running_loop().time()
        if left > 0:
            self._arm(left)
            return
        self.transport.close()  # no complete request head in time

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self._idle_since = asyncio.get_running_loop().time()

    def connection_lost(self, exc: Exception | None) -> None:
        if getattr(self, "_guard", None) is not None:
            self._guard.cancel()  # type: ignore[union-attr]
            self._guard = None
        super().connection_lost(exc)  # type: ignore[misc]


def guarded_protocol() -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools where installed, else h11) with the guard mixed in."""
    base: type[asyncio.Protocol]
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        base = HttpToolsProtocol
    except ImportError:
        from uvicorn.protocols.http.h11_impl import H11Protocol

        base = H11Protocol
    return type(f"Guarded{base.__name__}", (_Guard, base), {"limit": max_connections()})
