"""The head's ZeroMQ transport: sockets, their loops, frames to messages, CURVE identities.

Sockets (all bound by the head):
  ROUTER  registration_port  register / heartbeat / unregister / fetch; every request gets a reply
  XPUB    task_port          subtasks, topic = provider id; subscriptions mark providers ready
  PULL    result_port        ack / result / failed / progress / cancelled from providers

Failure detection: the XPUB's unsubscribe of a provider's topic, which libzmq produces as soon as that
provider's SUB connection ends (its process died: the kernel closed the socket; or the TCP connection
broke), goes to the head as a disconnect (``Handlers.on_disconnect``); the state machine declares the
provider lost unless it subscribes again within a short grace. ZMTP heartbeats on all three sockets
(``zmtp_heartbeats``) close connections to peers that went silent without closing them (a machine that
vanished), so their unsubscribe comes too. The ROUTER's connections are not a signal of their own: a
provider's Lazy Pirate closes and reopens its REQ after every lost reply, fetch sockets come and go, and a
ROUTER cannot name the provider behind a connection that closed (ZMQ_ROUTER_NOTIFY is draft API); its
heartbeats only free what dead REQ peers held.

Subscriptions are the head's to grant (``XPUB_MANUAL``): a subscription is applied to its connection
only when its topic is exactly a provider id (``ID_RE``), never the empty topic or a prefix, which
would see every provider's subtasks; with CURVE also only when the id belongs to the subscribing key
(the key it registered with, or, for an id not yet registered, the key that subscribes first: the
binding ``check_key`` then holds the register to). In this mode libzmq reports an unsubscribe (with
no key) for every connection that subscribed to a topic and ended, granted or not, so the head counts
the connections of each topic (``_count``) and the provider's task connection is gone when none is
left. An unsubscribe sent by another key than the owner's is ignored (not counted): such an insider
can delay the owner's disconnect being noticed (its missed heartbeats then tell), never cause one.

It knows no job and no state: decoded messages go to the ``Handlers`` it is given (the head), and
what they answer goes back. A socket loop never dies of one bad message.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast

import zmq
import zmq.asyncio

from common import config, protocol, security
from common.errors import Conflict, DcfError, InternalError, Unauthorized, UnknownProvider
from common.protocol import check_id

log = logging.getLogger("dcf.head")

#: frames below this size are copied when sent: zero-copy tracking costs more than copying them
COPY_THRESHOLD = 1 << 20
#: the ROUTER loop waits this long after a request for more to answer in the same wake-up
ROUTER_BATCH_S = 0.005
#: the largest request the ROUTER takes (registration traffic is small; replies are not capped)
ROUTER_MAX_MESSAGE = 1 << 20
#: with CURVE, at most this many provider ids bound to keys
MAX_PROVIDER_KEYS = 10_000
#: the most topics whose subscribed connections are counted (ids are random: a flood of made-up ones
#: must not grow the table); past it a new topic is not counted, so its end is seen by heartbeats
MAX_SUBSCRIBED_TOPICS = 100_000
PROVIDER_TYPES = ("register", "heartbeat", "unregister", "fetch")
RESULT_TYPES = ("ack", "result", "failed", "progress", "cancelled")


class Handlers(Protocol):
    """What the transport hands its messages to (the head)."""

    def on_request(self, msg: protocol.Message) -> list[Any]:
        """A ROUTER request: return the reply frames."""
        ...

    def on_subscription(self, topic: str, subscribed: bool) -> None: ...

    def on_disconnect(self, provider_id: str) -> None:
        """The provider's task connection ended (its topic was unsubscribed on the XPUB)."""
        ...

    def on_result(self, msg: protocol.Message) -> None: ...

    def on_tick(self) -> None: ...


class Transport:
    def __init__(self, cfg: config.HeadSettings, keys: security.ServerKeys | None,
                 known: Callable[[str], bool]) -> None:
        self.cfg = cfg
        self.keys = keys
        self.known = known  # is this provider id still in the head's state? (bounds the key table)
        self.ctx = zmq.asyncio.Context()
        #: with CURVE: provider id -> the public key it registered with; its later messages must carry it
        self.provider_keys: dict[str, str] = {}
        self.bad_messages = 0
        #: subscriptions not granted: the empty topic, a prefix, another key's provider id
        self.refused_subscriptions = 0
        #: provider id -> the connections subscribed to its topic (``_count``)
        self.subscribers: dict[str, int] = {}
        self._tasks: list[asyncio.Task[Any]] = []

    # ---- lifecycle ------------------------------------------------------------------------
    def _bind(self, kind: int, port: int, max_msg: int = protocol.DEFAULT_MAX_MESSAGE_BYTES) -> zmq.asyncio.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, max_msg)  # before bind: libzmq applies it to new connections
        zmtp_heartbeats(sock, self.cfg.heartbeat_interval)
        security.secure_server(sock, self.keys)
        sock.bind(f"tcp://{self.cfg.host}:{port}")
        return sock

    def start(self, handlers: Handlers) -> None:
        self.router = self._bind(zmq.ROUTER, self.cfg.registration_port, max_msg=ROUTER_MAX_MESSAGE)
        self.router.copy_threshold = COPY_THRESHOLD
        self.xpub = self.ctx.socket(zmq.XPUB)
        self.xpub.setsockopt(zmq.LINGER, 0)
        # VERBOSE: every subscribe comes up; MANUAL: a subscription is applied only when the head grants
        # it (``_grant``), and an unsubscribe comes up for every connection that ends (``_count``)
        self.xpub.setsockopt(zmq.XPUB_VERBOSE, 1)
        self.xpub.setsockopt(zmq.XPUB_MANUAL, 1)
        self.xpub.setsockopt(zmq.SNDHWM, 100_000)
        zmtp_heartbeats(self.xpub, self.cfg.heartbeat_interval)
        self.xpub.copy_threshold = COPY_THRESHOLD
        security.secure_server(self.xpub, self.keys)
        self.xpub.bind(f"tcp://{self.cfg.host}:{self.cfg.task_port}")
        self.pull = self._bind(zmq.PULL, self.cfg.result_port)
        self.pull.setsockopt(zmq.RCVHWM, 100_000)
        for coro in (self._router_loop(handlers), self._xpub_loop(handlers), self._pull_loop(handlers),
                     self._tick_loop(handlers)):
            self._tasks.append(asyncio.create_task(coro))

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.ctx.destroy(linger=0)

    # ---- sending --------------------------------------------------------------------------
    def publish(self, frames: Sequence[Any]) -> None:
        """PUB never blocks: past the high-water mark it drops, and the ack timeout re-sends."""
        # pyzmq types the result as a bare Awaitable; zmq.asyncio really returns an asyncio Future
        sent = cast("asyncio.Future[Any]", self.xpub.send_multipart(frames, copy=False))
        sent.add_done_callback(_log_send_error)

    # ---- loops ----------------------------------------------------------------------------
    @staticmethod
    async def _recv(sock: zmq.asyncio.Socket) -> list[zmq.Frame] | None:
        """The next message, or None after a receive error: a socket loop must never die of one."""
        try:
            return await sock.recv_multipart(copy=False)
        except zmq.Again:  # readable without a message (seen right after CURVE handshakes): wait again
            return None
        except zmq.ZMQError as exc:
            log.error("receive failed on a head socket: %s", exc)
            await asyncio.sleep(0.1)
            return None

    async def _router_loop(self, handlers: Handlers) -> None:
        while True:
            frames = await self._recv(self.router)
            if frames is None:
                continue
            # one wake-up for what arrives within the window (heartbeats of many providers): a wake-up,
            # not the handling, is most of what a request costs the head (bench/scale.py)
            await asyncio.sleep(ROUTER_BATCH_S)
            for request in [frames, *self._ready(self.router)]:
                await self._reply(handlers, request)

    @staticmethod
    def _ready(sock: zmq.asyncio.Socket) -> list[list[zmq.Frame]]:
        """The messages already queued on ``sock`` (at most 1000), without waiting."""
        out: list[list[zmq.Frame]] = []
        while len(out) < 1000:
            # a non-blocking receive of zmq.asyncio is done at once: a message, or zmq.Again
            got = cast("asyncio.Future[list[zmq.Frame]]", sock.recv_multipart(flags=zmq.NOBLOCK, copy=False))
            if got.exception() is not None:
                break
            out.append(got.result())
        return out

    async def _reply(self, handlers: Handlers, frames: list[zmq.Frame]) -> None:
        if len(frames) < 3 or frames[1].bytes != b"":
            self.bad_messages += 1
            log.warning("dropped a registration message without a REQ envelope",
                        extra={"peer": frames[0].bytes.hex()[:16]})
            return
        reply = self._answer(handlers, frames)
        try:
            await self.router.send_multipart([frames[0].bytes, b"", *reply], copy=False)
        except zmq.ZMQError as exc:  # the provider's Lazy Pirate asks again
            log.warning("could not reply to a provider: %s", exc, extra={"peer": frames[0].bytes.hex()[:16]})

    def _answer(self, handlers: Handlers, frames: list[zmq.Frame]) -> list[Any]:
        peer = frames[0].bytes.hex()[:16]
        try:
            msg = protocol.decode(frames[2:], max_bytes=0, expect=PROVIDER_TYPES)
            self.check_key(msg, frames[2], register=msg.type == "register")
            return handlers.on_request(msg)
        except DcfError as exc:
            self.bad_messages += 1
            log.warning("bad request from provider: %s", exc.message, extra={"peer": peer})
            return protocol.error_frames(exc.code, exc.message)
        except Exception as exc:  # never let one message stop the loop
            log.exception("error handling a provider request", extra={"peer": peer})
            return protocol.error_frames(InternalError.code, f"{type(exc).__name__}")

    async def _xpub_loop(self, handlers: Handlers) -> None:
        while True:
            frames = await self._recv(self.xpub)
            if not frames:
                continue
            frame = frames[0].bytes
            if not frame or frame[0] not in (0, 1):
                continue
            topic = frame[1:].decode("ascii", "replace")
            try:
                if frame[0] == 1:
                    self._count(topic, +1)
                    if self._grant(topic, user_id(frames[0])):
                        handlers.on_subscription(topic, True)
                elif self._counts(topic, user_id(frames[0])) and self._count(topic, -1) == 0:
                    handlers.on_disconnect(topic)  # the last SUB connection of this topic ended
            except Exception:
                log.exception("error handling a subscription")

    async def _pull_loop(self, handlers: Handlers) -> None:
        while True:
            frames = await self._recv(self.pull)
            if frames is None:
                continue
            for message in [frames, *self._ready(self.pull)]:  # what else came: no wake-up each
                self._on_result_frames(handlers, message)

    def _on_result_frames(self, handlers: Handlers, frames: list[zmq.Frame]) -> None:
        try:
            msg = protocol.decode(frames, expect=RESULT_TYPES)
            self.check_key(msg, frames[0])
            handlers.on_result(msg)
        except DcfError as exc:
            self.bad_messages += 1
            log.warning("bad message on the result socket: %s", exc.message,
                        extra={"peer": user_id(frames[0]) or "-"})
        except Exception:
            log.exception("error handling a result message")

    async def _tick_loop(self, handlers: Handlers) -> None:
        period = min(0.25, self.cfg.heartbeat_interval / 4)
        while True:
            await asyncio.sleep(period)
            try:
                handlers.on_tick()
            except Exception:
                log.exception("error in the scheduler tick")

    # ---- subscriptions ----------------------------------------------------------------------
    def _grant(self, topic: str, key: str) -> bool:
        """Apply the subscription just received to its connection if ``topic`` is a provider id the
        subscriber may read (module docstring); True when applied."""
        if not protocol.ID_RE.fullmatch(topic):
            self._refused(f"refused a subscription to {topic[:40]!r}: only a provider's own id is a topic")
            return False
        if self.keys is not None:
            owner = self.provider_keys.get(topic)
            if owner is None and key:
                try:
                    self._bind_key(topic, key)
                except Conflict:
                    owner = ""
                else:
                    owner = key
            if owner != key:
                self._refused(f"refused a subscription to provider {topic[:8]}'s topic from another CURVE key")
                return False
        self.xpub.setsockopt(zmq.SUBSCRIBE, topic.encode())
        return True

    def _refused(self, why: str) -> None:
        """Count a refused subscription; log the first and then every 100th (a flood stays a few lines)."""
        self.refused_subscriptions += 1
        if self.refused_subscriptions == 1 or self.refused_subscriptions % 100 == 0:
            log.warning("%s (%d refused so far)", why, self.refused_subscriptions)

    def _counts(self, topic: str, key: str) -> bool:
        """Whether an unsubscribe of ``topic`` counts: libzmq's as a connection that subscribed ended (no
        key), or the owner's; never another key's (it may not end the provider's subscription)."""
        if not protocol.ID_RE.fullmatch(topic):
            return False
        return self.keys is None or not key or self.provider_keys.get(topic) == key

    def _count(self, topic: str, change: int) -> int:
        """The connections subscribed to ``topic``, granted or not, after ``change``. With XPUB_MANUAL
        libzmq reports an unsubscribe for every connection that ends (not only the topic's last), so the
        head counts: the provider's task connection is gone when none is left."""
        if not protocol.ID_RE.fullmatch(topic):
            return -1
        left = max(0, self.subscribers.get(topic, 0) + change)
        if left:
            if topic in self.subscribers or len(self.subscribers) < MAX_SUBSCRIBED_TOPICS:
                self.subscribers[topic] = left
        else:
            self.subscribers.pop(topic, None)
        return left

    # ---- CURVE identities -------------------------------------------------------------------
    def _bind_key(self, pid: str, key: str) -> None:
        """``pid`` belongs to ``key`` from now on (Conflict when the table is full of live ids)."""
        if len(self.provider_keys) >= MAX_PROVIDER_KEYS:  # bounded: forget ids the state forgot
            self.provider_keys = {p: k for p, k in self.provider_keys.items() if self.known(p)}
            if len(self.provider_keys) >= MAX_PROVIDER_KEYS:
                raise Conflict("too many providers are registered")
        self.provider_keys[pid] = key

    def check_key(self, msg: protocol.Message, frame: zmq.Frame, register: bool = False) -> None:
        """With CURVE, a provider id belongs to the key it first registered (or subscribed) with:
        another allowed key cannot heartbeat, unregister or send results in its name."""
        if self.keys is None:
            return
        key = user_id(frame)
        pid = check_id(msg["provider_id"], "provider_id")
        owner = self.provider_keys.get(pid)
        if owner is None and register and key:
            self._bind_key(pid, key)
            return
        if owner is None:
            raise UnknownProvider("register again")
        if owner != key:
            raise Unauthorized(f"provider {pid[:8]} is not registered with this CURVE key")


def zmtp_heartbeats(sock: zmq.Socket[Any], heartbeat_interval: float) -> None:
    """ZMTP heartbeats on a socket's connections (set before bind or connect): a PING every heartbeat
    interval; a connection that hears nothing back for ``config.zmtp_heartbeat_ms``'s timeout is closed,
    and the TTL in each PING makes the peer close it too."""
    ivl, timeout = config.zmtp_heartbeat_ms(heartbeat_interval)
    sock.setsockopt(zmq.HEARTBEAT_IVL, ivl)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, timeout)
    sock.setsockopt(zmq.HEARTBEAT_TTL, timeout)


def user_id(frame: zmq.Frame) -> str:
    """The CURVE public key (Z85) the ZAP handler gave this message's connection; "" if none."""
    try:
        return str(frame.get("User-Id") or "")
    except (zmq.ZMQError, AttributeError):
        return ""


def _log_send_error(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        log.warning("subtask send failed: %s; the ack timeout will re-send it", fut.exception())
