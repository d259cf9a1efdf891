"""The client's HTTP channel for everything but streamed transfers: keep-alive ``http.client``
connections, one per thread.

A tiny job is one request, and ``dcf status`` is one request, so what a request costs counts.
Measured on the project's 2-core machine against the head's /v1/health: one httpx request costs
the client about 480-610 µs of CPU and one ``http.client`` request about 140-160 µs; importing
httpx and building its client (httpcore, TLS) costs about 0.2 s of the CLI's start-up. httpx is
kept for the streamed uploads and downloads of large arrays (``Client.http``, built on first use).
"""

from __future__ import annotations

import http.client
import json
import select
import threading
import time
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

from common.errors import HeadUnreachable

#: a connection idle this long is replaced before the next request: the head's server closes idle
#: ones after 5 s (uvicorn's keep-alive timeout)
MAX_IDLE_S = 2.0
#: a kept-alive connection the head closed meanwhile fails with one of these before any reply: a
#: GET (or a submission with an Idempotency-Key header) is then sent again on a new connection; anything else
#: is reported, never sent twice
STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    content_type: str


class _NotSent(Exception):  # noqa: N818 (internal: the connection failed before the request went out)
    def __init__(self, error: HeadUnreachable) -> None:
        self.error = error


class Channel:
    """Requests to one head, or to the first that serves of several (an active head and its standbys,
    comma-separated in ``url``): a head that cannot be connected to, or answers that it is a standby
    (503 ``standby``), passes the request to the next; nothing was done by it, so that is always safe."""

    def __init__(self, url: str, token: str | None, timeout: float) -> None:
        self.urls = [u.strip().rstrip("/") for u in url.split(",") if u.strip()] or [url]
        self.index = 0
        self._use(0)
        self.timeout = timeout
        self.headers = {"authorization": f"Bearer {token}"} if token else {}
        self._local = threading.local()
        #: whether a connection to the head was ever made (a head was there, even if it went since)
        self.connected = False

    def _use(self, index: int) -> None:
        """Talk to head ``index`` of ``urls`` from now on."""
        self.index = index % len(self.urls)
        self.url = self.urls[self.index]
        parts = urllib.parse.urlsplit(self.url)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.https else 80)
        self.prefix = parts.path.rstrip("/")

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's connection, and whether it served a request before."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and time.monotonic() - self._local.used < MAX_IDLE_S and not _dropped(conn):
            return conn, True
        self.close()
        kind = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        conn = kind(self.host, self.port, timeout=self.timeout)
        self._local.conn = conn
        return conn, False

    def request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None,
                timeout: float | None = None, headers: Mapping[str, str] | None = None) -> Reply:
        """One request; HeadUnreachable when no head can be reached. One with an ``Idempotency-Key``
        header may be sent twice, so a stale kept-alive connection re-sends it as it does a GET. With
        several heads, the next is tried when one cannot be connected to or is a standby."""
        for tried in range(1, len(self.urls) + 1):
            try:
                reply = self._request_one(method, path, body, content_type, timeout, headers)
            except _NotSent as exc:
                if tried == len(self.urls):
                    raise exc.error from None
                self.close()
                self._use(self.index + 1)
                continue
            if tried < len(self.urls) and reply.status == 503 and _is_standby(reply.body):
                self.close()
                self._use(self.index + 1)
                continue
            return reply
        raise AssertionError("unreachable")

    def move_on(self, failed_url: str) -> None:
        """A request outside this channel (a streamed upload or download) found head ``failed_url`` unreachable,
        or a standby: the next request goes to the next head, unless another thread moved on already."""
        if len(self.urls) > 1 and self.url == failed_url:
            self.close()
            self._use(self.index + 1)

    def _request_one(self, method: str, path: str, body: bytes | None, content_type: str | None,
                     timeout: float | None, headers: Mapping[str, str] | None) -> Reply:
        headers = {**self.headers, **(headers or {})}
        resend = method == "GET" or "idempotency-key" in headers
        if content_type:
            headers["content-type"] = content_type
        for attempt in range(2):
            conn, reused = self._connection()
            conn.timeout = timeout or self.timeout
            if conn.sock is not None:
                conn.sock.settimeout(conn.timeout)
            try:
                if conn.sock is None:
                    try:
                        conn.connect()
                    except OSError as exc:  # nothing was sent: another head may take it
                        self.close()
                        raise _NotSent(HeadUnreachable(f"head at {self.url} unreachable: {type(exc).__name__}: "
                                                       f"{exc}")) from None
                    self.connected = True
                conn.request(method, target(self.prefix + path), body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            except STALE as exc:
                self.close()
                if reused and resend and attempt == 0:
                    continue
                raise HeadUnreachable(f"head at {self.url} unreachable: {type(exc).__name__}: {exc}") from None
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise HeadUnreachable(f"head at {self.url} unreachable: {type(exc).__name__}: {exc}") from None
            self._local.used = time.monotonic()
            if resp.will_close:
                self.close()
            return Reply(resp.status, data, resp.getheader("content-type") or "")
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Close this thread's connection (others close when their threads end)."""
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()


def _is_standby(body: bytes) -> bool:
    """Whether a 503 reply says its head is a standby (error code ``standby``)."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return False
    return isinstance(error, dict) and error.get("code") == "standby"


def _dropped(conn: http.client.HTTPConnection) -> bool:
    """Whether the head closed this idle connection: readable with no request out means EOF (the
    check urllib3 and httpcore make before they reuse a pooled connection)."""
    if conn.sock is None:
        return True
    try:
        readable, _, _ = select.select([conn.sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def target(path: str) -> str:
    """The request target for ``path``: what a URL may not hold as it is (a space, a non-ASCII letter in a
    job id typed by hand) percent-encoded, so that the head answers it (404) instead of http.client
    refusing to send it; a query already encoded stays as it is."""
    return urllib.parse.quote(path, safe="/?=&%:@!$'()*+,;~-._")
