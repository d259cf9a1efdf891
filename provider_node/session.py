"""The provider's session with the head, as a pure state machine.

It holds the registration state and makes every decision about it: when to register, how long
to back off after a refusal, when a heartbeat is due, what a head restart or an ``unknown_provider``
/ ``unauthorized`` reply means, and when the task (SUB) and result (PUSH) connections must be
opened anew. It does no I/O and reads no clock: the socket layer (``node.py``) feeds it events
with ``now`` (seconds on a monotonic clock) and carries out the commands it returns.

The head's restart id (the wire field ``epoch``, new each time the head starts) is called the
head's *incarnation* here, so that it is not mistaken for a training epoch.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass

from common.errors import Unauthorized, UnknownProvider
from common.protocol import Message

RESUBSCRIBE_AFTER = 3  # heartbeat acks in a row without our subscription: connect SUB and PUSH anew
FIRST_BACKOFF_S = 1.0  # wait after the first refused registration; doubles with each refusal
MAX_BACKOFF_S = 60.0


# ---- commands: what the socket layer does for the session --------------------------------------
@dataclass(frozen=True)
class SendRegister:
    """Send a ``register`` request with the session's current provider id (``again``: the head
    answered ``unknown_provider``: it restarted or forgot this provider)."""

    again: bool = False


@dataclass(frozen=True)
class SendHeartbeat:
    """Send a ``heartbeat`` request."""


@dataclass(frozen=True)
class RenewIdentity:
    """Subscribe to the topic of ``new_id`` instead of ``old_id`` (the head binds ``old_id`` to
    another CURVE key)."""

    old_id: str
    new_id: str


@dataclass(frozen=True)
class Registered:
    """The head accepted the registration. Forget what was known of its state dir; with a
    ``state_dir``, check whether this process shares it (co-located fast path) and on success
    call ``Session.on_shared_files``."""

    incarnation: str
    state_dir: str | None


@dataclass(frozen=True)
class WaitToRegister:
    """The head refused a request (``code``, ``message``): the session registers again at
    ``until``, ``retry_in_s`` from now, by itself (``due``)."""

    until: float
    retry_in_s: float
    code: str
    message: str


@dataclass(frozen=True)
class Reconnect:
    """Close the SUB and PUSH connections and open them anew (libzmq does not retry a refused
    CURVE handshake; the head may not see our subscription, or asked for it with ``reconnect``)."""


Command = SendRegister | SendHeartbeat | RenewIdentity | Registered | WaitToRegister | Reconnect


class Session:
    """Registration state machine of one provider process. Pure: no I/O, no clock."""

    def __init__(self, provider_id: str, share_files: bool,
                 new_id: Callable[[], str] = lambda: uuid.uuid4().hex) -> None:
        self.provider_id = provider_id
        self.heartbeat_interval_s = 0.0  # the head's, from its ``registered`` reply
        self.share_files = share_files  # probe the head's state dir when it announces one
        self._new_id = new_id
        self.registered = False
        self.incarnation = ""  # the head's restart id ("epoch" on the wire); "" before registering
        self.awaiting_reply = False  # a request is out and its reply has not come
        self.next_heartbeat = 0.0
        self.register_at: float | None = None  # when to send a register that waits for its time
        self.backoff_s = FIRST_BACKOFF_S
        self.unsubscribed_acks = 0  # heartbeat acks in a row saying the head does not see our SUB
        self.reopen_connections = False  # SUB and PUSH must be opened anew once registered

    # ---- events -------------------------------------------------------------------------------
    def start(self) -> list[Command]:
        """The first registration, sent at once."""
        return self._send(SendRegister())

    def on_reply(self, msg: Message, now: float) -> list[Command]:
        """The (decoded, checked) reply to the request in flight: ``registered``, ``heartbeat_ack``
        or ``error``; anything else is ignored."""
        self.awaiting_reply = False
        commands: list[Command] = []
        if msg.type == "registered":
            commands += self._on_registered(msg, now)
        elif msg.type == "heartbeat_ack":
            self._on_heartbeat_ack(msg)
        elif msg.type == "error":
            commands += self._on_error(msg["code"], msg["message"], now)
        if self.registered and self.reopen_connections:
            self.reopen_connections = False
            commands.append(Reconnect())
        return commands

    def on_handshake_refused(self) -> None:
        """The head refused a CURVE handshake (our key was not allowed then): the SUB and PUSH
        connections, refused too and never retried by libzmq, are opened anew after the next reply."""
        self.reopen_connections = True

    def on_shared_files(self, now: float) -> None:
        """The probe found the head's state dir: tell the head at once, with the next heartbeat."""
        self.next_heartbeat = now

    def due(self, now: float) -> list[Command]:
        """The requests whose time has come (one at most: a request waits for the last reply)."""
        if self.awaiting_reply:
            return []
        if self.register_at is not None and now >= self.register_at:
            self.register_at = None
            return self._send(SendRegister())
        if self.registered and now >= self.next_heartbeat:
            self.next_heartbeat = now + self.heartbeat_interval_s
            return self._send(SendHeartbeat())
        return []

    def seconds_until_due(self, now: float) -> float | None:
        """How long until ``due`` has something to do; None: only a reply can move the session."""
        if self.awaiting_reply:
            return None
        if self.registered:
            return max(0.0, self.next_heartbeat - now)
        if self.register_at is not None:
            return max(0.0, self.register_at - now)
        return None

    # ---- replies ------------------------------------------------------------------------------
    def _on_registered(self, msg: Message, now: float) -> list[Command]:
        self.registered = True
        self.backoff_s = FIRST_BACKOFF_S
        self.incarnation = str(msg["epoch"])
        self.heartbeat_interval_s = float(msg["heartbeat_interval_s"])
        self.next_heartbeat = now + self.heartbeat_interval_s
        state_dir = msg.get("state_dir")
        return [Registered(self.incarnation, str(state_dir) if self.share_files and state_dir else None)]

    def _on_heartbeat_ack(self, msg: Message) -> None:
        self.incarnation = str(msg["epoch"])
        subscribed = msg.get("subscribed", True)
        self.unsubscribed_acks = 0 if subscribed else self.unsubscribed_acks + 1
        if self.unsubscribed_acks >= RESUBSCRIBE_AFTER:
            self.unsubscribed_acks = 0
            self.reopen_connections = True
        if msg.get("reconnect"):  # the head stopped hearing our acks: our result connection may be black-holed
            self.reopen_connections = True

    def _on_error(self, code: str, message: str, now: float) -> list[Command]:
        """Any error makes the provider unregistered until the head accepts it again."""
        self.registered = False
        if code == UnknownProvider.code:  # the head restarted (or forgot us): register again at once
            self.backoff_s = FIRST_BACKOFF_S
            return self._send(SendRegister(again=True))
        if code == Unauthorized.code:  # our id is bound to another CURVE key: take a new one
            old_id, self.provider_id = self.provider_id, self._new_id()
            self.register_at = now
            return [RenewIdentity(old_id, self.provider_id)]
        # refused: try again later, not in a tight loop
        wait = WaitToRegister(now + self.backoff_s, self.backoff_s, code, message)
        self.register_at = wait.until
        self.backoff_s = min(self.backoff_s * 2, MAX_BACKOFF_S)
        return [wait]

    def _send(self, command: SendRegister | SendHeartbeat) -> list[Command]:
        self.awaiting_reply = True
        return [command]
