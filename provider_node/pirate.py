"""Lazy Pirate: a reliable request-reply client over a REQ socket.

A REQ socket that lost its reply is stuck (it may not send again). So: send, wait up to
``timeout``; on timeout close the socket (linger 0), open a new one, and send the same
request again after a backoff that doubles up to ``max_backoff``. It never gives up:
a provider keeps running while the head is down. Non-blocking: the owner polls
``socket`` and calls ``on_readable`` / ``check``.
"""

from __future__ import annotations

import logging
from typing import Any

import zmq

from common import protocol
from common.errors import DcfError

log = logging.getLogger("dcf.provider.pirate")


class LazyPirate:
    def __init__(self, ctx: zmq.Context, endpoint: str, timeout: float, max_backoff: float = 8.0) -> None:
        self.ctx = ctx
        self.endpoint = endpoint
        self.timeout = timeout
        self.max_backoff = max_backoff
        self.socket: zmq.Socket = self._open()
        self.request: list[Any] | None = None
        self.deadline = 0.0
        self.resend_at: float | None = None
        self.backoff = 0.25
        self.failures = 0

    def _open(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, 1 << 20)
        sock.connect(self.endpoint)
        return sock

    @property
    def busy(self) -> bool:
        return self.request is not None

    def send(self, frames: list[Any], now: float) -> None:
        if self.busy:
            raise RuntimeError("a request is already in flight")
        self.request = frames
        self._transmit(now)

    def _transmit(self, now: float) -> None:
        assert self.request is not None
        self.socket.send_multipart(self.request)
        self.deadline = now + self.timeout
        self.resend_at = None

    def on_readable(self) -> protocol.Message | None:
        """The reply, decoded; None if it was malformed (the request is then retried)."""
        frames = self.socket.recv_multipart(copy=False)
        try:
            msg = protocol.decode(frames, max_bytes=0)
        except DcfError as exc:
            log.warning("malformed reply from the head: %s", exc.message)
            self.deadline = 0.0  # treat as a lost reply: reconnect and resend on the next check
            return None
        self.request = None
        self.failures = 0
        self.backoff = 0.25
        return msg

    def next_event(self, now: float) -> float:
        """Seconds until ``check`` has something to do (for the poll timeout)."""
        if self.request is None:
            return 3600.0
        when = self.resend_at if self.resend_at is not None else self.deadline
        return max(0.0, when - now)

    def check(self, now: float) -> bool:
        """Handle a timed-out request; True if the head looks unreachable."""
        if self.request is None:
            return False
        if self.resend_at is not None:
            if now >= self.resend_at:
                self._transmit(now)
            return self.failures > 0
        if now < self.deadline:
            return False
        self.failures += 1
        if self.failures == 1 or self.failures % 10 == 0:
            log.warning("no reply from the head at %s (try %d); reconnecting", self.endpoint, self.failures)
        self.socket.close(linger=0)
        self.socket = self._open()
        self.resend_at = now + self.backoff
        self.backoff = min(self.backoff * 2, self.max_backoff)
        return True

    def close(self) -> None:
        self.socket.close(linger=0)
