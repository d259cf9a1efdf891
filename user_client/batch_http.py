"""The client's channel for the batch API (msgpack POSTs to /v1/jobs/batch and /v1/jobs/gather):
keep-alive ``http.client`` connections, one per thread.

A tiny job is one request, so the client's cost per request counts. Measured on the project's
2-core machine against the head's /v1/health, one httpx request costs the client about 480-610 µs
of CPU and one ``http.client`` request about 140-160 µs; the rest of the client keeps httpx.
"""

from __future__ import annotations

import http.client
import threading
import time
import urllib.parse

from common.errors import HeadUnreachable

MSGPACK = "application/msgpack"
#: a connection idle this long is replaced before the next request: the head's server closes idle
#: ones after 5 s (uvicorn's keep-alive timeout), and a POST is never sent twice on a guess
MAX_IDLE_S = 2.0


class BatchChannel:
    def __init__(self, url: str, token: str | None, timeout: float) -> None:
        parts = urllib.parse.urlsplit(url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.https else 80)
        self.prefix = parts.path.rstrip("/")
        self.url = url
        self.timeout = timeout
        self.headers = {"content-type": MSGPACK, "accept": MSGPACK}
        if token:
            self.headers["authorization"] = f"Bearer {token}"
        self._local = threading.local()

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is not None and time.monotonic() - self._local.used < MAX_IDLE_S:
            return conn
        self.close()
        kind = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        conn = kind(self.host, self.port, timeout=self.timeout)
        self._local.conn = conn
        return conn

    def post(self, path: str, body: bytes, timeout: float | None = None) -> tuple[int, bytes]:
        """(status, body) of one POST; HeadUnreachable when the head cannot be reached."""
        conn = self._connection()
        conn.timeout = timeout or self.timeout
        if conn.sock is not None:
            conn.sock.settimeout(conn.timeout)
        try:
            conn.request("POST", self.prefix + path, body=body, headers=self.headers)
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise HeadUnreachable(f"head at {self.url} unreachable: {type(exc).__name__}: {exc}") from None
        self._local.used = time.monotonic()
        if resp.will_close:
            self.close()
        return resp.status, data

    def close(self) -> None:
        """Close this thread's connection (others close when their threads end)."""
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()
