"""Lazy Pirate: a reliable request-reply client over a REQ socket.

A REQ socket that lost its reply is stuck (it may not send again). So: send, wait up to
``timeout``; on timeout close the socket (linger 0), open a new one, and send the same
request again after a backoff that doubles up to ``max_backoff``. It never gives up:
a provider keeps running while the head is down. Non-blocking: the owner polls
``socket`` and calls ``on_readable`` / ``check``.

With CURVE (``secure`` given) a socket monitor tells a refused key apart from a head
that is down: the log says which one it is, and ``check`` reports it to the owner.

``zmtp_heartbeats`` sets the ZMTP heartbeat options every provider socket uses (the REQ here, and the
SUB and PUSH sockets of ``node.py``), so that a connection to a head that vanished is closed and opened
anew by libzmq.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from common import config, protocol
from common.errors import DcfError, InternalError

log = logging.getLogger("dcf.provider.pirate")

HANDSHAKE_FAILURES = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                      | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


@dataclass(frozen=True)
class LostReply:
    """A request timed out: the socket was opened anew and the request is sent again soon."""

    failures: int  # timeouts in a row of this request
    refused: bool  # a CURVE handshake with the head failed meanwhile (our key was not allowed)


def zmtp_heartbeats(sock: zmq.Socket, heartbeat_interval: float) -> None:
    """ZMTP heartbeats on a socket's connections (set before connect): a PING every heartbeat interval;
    a connection that hears nothing back for ``config.zmtp_heartbeat_ms``'s timeout is closed (libzmq then
    reconnects), and the TTL in each PING makes the head close it too."""
    ivl, timeout = config.zmtp_heartbeat_ms(heartbeat_interval)
    sock.setsockopt(zmq.HEARTBEAT_IVL, ivl)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, timeout)
    sock.setsockopt(zmq.HEARTBEAT_TTL, timeout)


class LazyPirate:
    def __init__(self, ctx: zmq.Context, endpoint: str, timeout: float, max_backoff: float = 8.0,
                 secure: Callable[[zmq.Socket], None] | None = None, heartbeat_interval: float = 0.0) -> None:
        self.ctx = ctx
        self.endpoint = endpoint
        self.secure = secure
        self.heartbeat_interval = heartbeat_interval  # ZMTP heartbeats on its REQ (0: none)
        self.monitor: zmq.Socket | None = None
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
        if self.heartbeat_interval > 0:
            zmtp_heartbeats(sock, self.heartbeat_interval)
        if self.secure is not None:
            self.secure(sock)
            self.monitor = sock.get_monitor_socket(HANDSHAKE_FAILURES)
        sock.connect(self.endpoint)
        return sock

    def _close_socket(self) -> None:
        if self.monitor is not None:
            self.socket.disable_monitor()
            self.monitor.close(linger=0)
            self.monitor = None
        self.socket.close(linger=0)

    def handshake_failure(self) -> str | None:
        """Why the CURVE handshake with the head failed since the socket opened, if it did."""
        why = None
        while self.monitor is not None and self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                why = "the head refused this provider's CURVE key (is its .key in the head's allow-list?)"
            elif event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and why is None:
                why = "the CURVE handshake with the head failed (is --curve-server-key the head's public key?)"
            # HANDSHAKE_FAILED_NO_DETAIL: the connection broke mid-handshake (e.g. the head died): no hint
        return why

    @property
    def busy(self) -> bool:
        return self.request is not None

    def send(self, frames: list[Any], now: float) -> None:
        if self.busy:
            raise InternalError("a request is already in flight")
        self.request = frames
        self._transmit(now)

    def _transmit(self, now: float) -> None:
        assert self.request is not None
        # never block: a REQ whose only connection was refused (CURVE) has no pipe to queue on; a
        # request that could not be queued counts as lost: the deadline reconnects and sends again
        with contextlib.suppress(zmq.Again):
            self.socket.send_multipart(self.request, flags=zmq.NOBLOCK)
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

    def check(self, now: float) -> LostReply | None:
        """Send a request again once its back-off is over; a request past its deadline: open the
        socket anew and report the lost reply."""
        if self.request is None:
            return None
        if self.resend_at is not None:
            if now >= self.resend_at:
                self._transmit(now)
            return None
        if now < self.deadline:
            return None
        self.failures += 1
        refused = self.handshake_failure()
        if refused is not None and (self.failures == 1 or self.failures % 10 == 0):
            log.error("%s at %s (try %d); retrying", refused, self.endpoint, self.failures)
        elif self.failures == 1 or self.failures % 10 == 0:
            log.warning("no reply from the head at %s (try %d); reconnecting", self.endpoint, self.failures)
        self._close_socket()
        self.socket = self._open()
        self.resend_at = now + self.backoff
        self.backoff = min(self.backoff * 2, self.max_backoff)
        return LostReply(self.failures, refused is not None)

    def close(self) -> None:
        self._close_socket()
