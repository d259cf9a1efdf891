"""Durable job queues. A job id is returned to the user only after ``publish`` returned.

* ``EmbeddedQueue``: the SQLite job store in the state dir is the queue; unfinished
  accepted jobs are delivered again when the head starts.
* ``AmqpQueue``: a durable RabbitMQ queue ``dcf.jobs``; persistent messages, publisher
  confirms, manual ack only once the job's outcome is stored. Unacked jobs come back
  after a head crash or a broker restart. The queue is classic (one node) or quorum
  (``--amqp-queue-type quorum``: replicated over a cluster's nodes by Raft, a publish
  confirmed once a majority holds it); ``--amqp-url`` may name several nodes of one
  cluster, and a lost connection is made again to each in turn. Messages hold the job spec and blob ids,
  never bulk data (claim-check): ``protocol.encode_job_message`` writes them and
  ``protocol.decode_job_message`` checks every field of what comes back.

  The broker is not trusted with more than delivery. Each message is signed with the
  state dir's queue key (``security.queue_key``), and one without a valid signature is
  dropped: anyone with broker credentials could otherwise inject jobs. An accepted job
  that does not come back while the head has room for more (another consumer of the queue
  took it) is published again after ``--amqp-republish-after`` seconds; the head runs a
  job id once, however many copies reach it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from common.errors import DcfError, QueueUnavailable
from common.protocol import (
    JOB_SIGNATURE_HEADER,
    check_job_signature,
    decode_job_message,
    encode_job_message,
    job_message,
    sign_job_message,
)

from .store import JobStore

log = logging.getLogger("dcf.head.queue")

Ack = Callable[[], Awaitable[None]]
Deliver = Callable[[dict[str, Any], Ack], None]

#: seconds between rounds of connection attempts after the connection was lost (every node is tried each round)
RECONNECT_S = 1.0
#: at start, while no node answers, the wait between rounds doubles up to this
START_BACKOFF_MAX = 10.0
#: how often the head looks for accepted jobs the queue has not delivered to it
MISSING_CHECK_S = 2.0
JOB_QUEUE = "dcf.jobs"
EVENTS_EXCHANGE = "dcf.events"  # topic exchange: routing key = event kind, e.g. job.done
#: the kinds kept off the exchange: one or more per job and subtask, and each publish costs the head
#: about as much as running a tiny job; they stay on the head's own event API (GET /v1/stream)
LOCAL_EVENTS = frozenset({"job.accepted", "job.started", "job.progress"})


class JobQueue(Protocol):
    name: str

    async def start(self, deliver: Deliver) -> None: ...

    @property
    def is_connected(self) -> bool: ...

    async def publish_many(self, records: list[dict[str, Any]]) -> None:
        """Publish durably, all of them or raise (QueueUnavailable); the caller stores ``accepted``."""
        ...

    async def close(self) -> None: ...


async def _no_ack() -> None:
    return None


class EmbeddedQueue:
    name = "embedded"

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self.deliver: Deliver | None = None

    @property
    def is_connected(self) -> bool:
        return True

    async def start(self, deliver: Deliver) -> None:
        self.deliver = deliver
        _discard_unaccepted(self.store)
        for record in self.store.unfinished():
            log.info("recovering job", extra={"job_id": record["job_id"]})
            deliver(record, _no_ack)

    async def publish_many(self, records: list[dict[str, Any]]) -> None:
        """The job store is the queue: the caller's ``accepted`` mark, committed, makes them durable."""
        assert self.deliver is not None
        loop = asyncio.get_running_loop()
        for record in records:  # delivered on a later loop turn, as a broker would
            loop.call_soon(self.deliver, record, _no_ack)

    async def close(self) -> None:
        return None


class AmqpQueue:
    name = "rabbitmq"

    def __init__(self, url: str, store: JobStore, key: bytes, prefetch: int = 1000, queue_name: str = JOB_QUEUE,
                 republish_after: float = 30.0, queue_type: str = "classic") -> None:
        #: called with True/False when the broker connection comes back / goes away
        self.on_state: Callable[[bool], None] | None = None
        #: called with the ids of accepted jobs published again (they never came back)
        self.on_republish: Callable[[list[str]], None] | None = None
        self.urls = node_urls(url)
        if not self.urls:
            raise ValueError("AmqpQueue needs at least one amqp:// URL")
        self.node = 0  # index in ``urls`` of the node in use, or tried next
        self.queue_name = queue_name
        self.queue_type = queue_type
        self.store = store
        self.key = key
        self.prefetch = prefetch
        self.republish_after = republish_after
        self.connection: Any = None
        self.channel: Any = None
        self.exchange: Any = None
        self.deliver: Deliver | None = None
        self.connected = asyncio.Event()
        #: job ids delivered on the current connection and not acked yet
        self.held: set[str] = set()
        #: accepted, unfinished job id not held -> when (monotonic) it was first seen so
        self.missing: dict[str, float] = {}
        self._watch: asyncio.Task[None] | None = None
        self._reconnecting: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def url(self) -> str:
        """The URL of the node in use (or tried next)."""
        return self.urls[self.node]

    @property
    def is_connected(self) -> bool:
        return self.connected.is_set()

    async def start(self, deliver: Deliver) -> None:
        """Connect (retrying with backoff while no node answers) and consume. The head runs this in the
        background: its API answers, and refuses submissions, until it is done."""
        self.deliver = deliver
        _discard_unaccepted(self.store)
        await self._connect_any(START_BACKOFF_MAX)

    async def _connect_any(self, backoff_max: float) -> None:
        """Connect to a node, trying each of ``urls`` in turn from the one in use; between rounds in which
        none answered, wait (doubling, up to ``backoff_max`` seconds)."""
        delay = min(0.5, backoff_max)
        while not self._closing:
            for _ in self.urls:
                try:
                    await self._connect()
                    return
                except Exception as exc:  # node down, or refusing: try the next one
                    log.warning("RabbitMQ at %s: %s", _safe(self.url), _connect_error(exc, self))
                    await self._drop_connection()
                    self.node = (self.node + 1) % len(self.urls)
            log.warning("no RabbitMQ node of %d reachable; retrying in %.1fs", len(self.urls), delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, backoff_max)

    async def _connect(self) -> None:
        import aio_pika

        connection = await aio_pika.connect(self.url, timeout=10)
        self.connection = connection
        channel = await connection.channel(publisher_confirms=True)
        await channel.set_qos(prefetch_count=self.prefetch)
        queue = await channel.declare_queue(self.queue_name, durable=True, arguments=self.queue_arguments())
        events_channel = await connection.channel(publisher_confirms=False)
        exchange = await events_channel.declare_exchange(EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        self.channel, self.exchange = channel, exchange
        connection.close_callbacks.add(self._on_close)
        for ch in (channel, events_channel):  # a channel the broker closed ends the connection: all is redone
            ch.close_callbacks.add(self._on_channel_close)
        await queue.consume(self._on_message, no_ack=False)
        if self._watch is None:
            self._watch = asyncio.ensure_future(self._watch_missing())
        self.connected.set()
        log.info("job queue: RabbitMQ %s queue %s at %s", self.queue_type, self.queue_name, _safe(self.url))

    def queue_arguments(self) -> dict[str, Any] | None:
        """The jobs queue's declaration arguments: a quorum queue is replicated over the cluster's nodes."""
        return {"x-queue-type": "quorum"} if self.queue_type == "quorum" else None

    async def _drop_connection(self) -> None:
        connection, self.connection = self.connection, None
        self.channel = self.exchange = None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()

    def _on_channel_close(self, channel: Any, *args: Any) -> None:
        connection = self.connection
        if self._closing or connection is None or connection.is_closed:
            return
        log.warning("RabbitMQ closed a channel (%s); connecting again", args[0] if args else "no reason given")
        task = asyncio.ensure_future(connection.close())
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def _on_close(self, connection: Any, *args: Any) -> None:
        if connection is not self.connection:  # one given up already (a failed connect, a stale close)
            return
        was_up = self.connected.is_set()
        self.connected.clear()
        self.held.clear()  # the broker takes back what this connection held, and delivers it again
        self.missing.clear()
        self.connection = self.channel = self.exchange = None
        if self._closing:
            return
        log.warning("RabbitMQ connection to %s lost; reconnecting%s", _safe(self.url),
                    f" (nodes: {len(self.urls)})" if len(self.urls) > 1 else "")
        if was_up and self.on_state is not None:
            self.on_state(False)
        if self._reconnecting is None or self._reconnecting.done():
            self._reconnecting = asyncio.ensure_future(self._reconnect())

    async def _reconnect(self) -> None:
        """After a lost connection: every node in turn, about every second (jobs are accepted again about a
        second after a node is back)."""
        await asyncio.sleep(0)  # let aio-pika finish closing the old connection first
        await self._connect_any(RECONNECT_S)
        if self.connected.is_set():
            log.info("RabbitMQ connection restored (%s)", _safe(self.url))
            if self.on_state is not None:
                self.on_state(True)

    async def _on_message(self, message: Any) -> None:
        try:
            check_job_signature(message.body, (message.headers or {}).get(JOB_SIGNATURE_HEADER), self.key)
        except DcfError as exc:  # injected by someone with broker credentials: never run
            log.error("dropping job message %.40s: %s", message.message_id or "(no id)", exc.message)
            await message.reject(requeue=False)
            return
        try:
            record = decode_job_message(message.body)
        except DcfError as exc:
            log.error("dropping malformed job message: %s", exc.message)
            await message.reject(requeue=False)
            return
        job_id = record["job_id"]
        if self.store.is_deleted(job_id):  # deleted, or refused after a lost confirm
            log.info("dropping the queue message of a deleted job", extra={"job_id": job_id})
            await message.ack()
            return
        if job_id in self.held:  # a second copy (one published again, and the first came back too)
            await message.ack()
            return
        self.held.add(job_id)
        self.missing.pop(job_id, None)

        async def ack() -> None:
            self.held.discard(job_id)
            try:
                await message.ack()
            except Exception as exc:  # channel gone: the broker redelivers; the head dedupes
                log.warning("could not ack job message (%s); it will be redelivered", exc,
                            extra={"job_id": job_id})

        self.store.insert(record, accepted=True)
        self.store.mark_accepted(job_id)
        assert self.deliver is not None
        self.deliver(record, ack)

    # ---- accepted jobs that never came back ------------------------------------------------------
    async def _watch_missing(self) -> None:
        while True:
            await asyncio.sleep(MISSING_CHECK_S)
            if not self.connected.is_set():
                continue
            due = self.missing_jobs(time.monotonic())
            if not due:
                continue
            ids = [r["job_id"] for r in due]
            try:
                await self.publish_many(due)
            except DcfError as exc:
                log.warning("could not publish %d missing jobs again (%s); trying later", len(due), exc.message)
                continue
            log.warning("%d accepted jobs never came back from queue %s (another consumer took them?): "
                        "published again", len(ids), self.queue_name)
            if self.on_republish is not None:
                self.on_republish(ids)

    def missing_jobs(self, now: float) -> list[dict[str, Any]]:
        """The messages of the accepted, unfinished jobs not delivered to this head for
        ``republish_after`` seconds while it had room for more (with ``prefetch`` held, the rest wait
        in the broker, as they should). Each is given another ``republish_after`` before the next try."""
        if len(self.held) >= self.prefetch:
            self.missing.clear()  # the broker holds jobs back for want of room: none is missing
            return []
        due, seen = [], set()
        for job_id in self.store.unfinished_ids():
            if job_id in self.held:
                continue
            seen.add(job_id)
            since = self.missing.setdefault(job_id, now)
            row = self.store.get(job_id) if now - since >= self.republish_after else None
            if row is not None:
                due.append(job_message(row))
                self.missing[job_id] = now
        for job_id in [j for j in self.missing if j not in seen]:
            del self.missing[job_id]
        return due

    def publish_event(self, event: Any) -> None:
        """Fire and forget: events are for watchers (management UI, other systems), not state."""
        import json

        import aio_pika

        exchange = self.exchange
        if event.kind in LOCAL_EVENTS or not self.connected.is_set() or exchange is None:
            return
        body = json.dumps(event.to_dict(), default=str).encode()
        message = aio_pika.Message(body, content_type="application/json", type=event.kind,
                                   delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT)
        task = asyncio.ensure_future(exchange.publish(message, routing_key=event.kind, mandatory=False))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # never "exception never retrieved"

    async def publish_many(self, records: list[dict[str, Any]]) -> None:
        """Persistent messages, their publisher confirms pipelined: all confirmed, or QueueUnavailable."""
        import aio_pika

        if not self.connected.is_set():
            raise QueueUnavailable("the job queue (RabbitMQ) is unreachable; the head is reconnecting")
        exchange = self.channel.default_exchange
        bodies = [encode_job_message(r) for r in records]
        sends = [exchange.publish(aio_pika.Message(body, message_id=r["job_id"],
                                                   headers={JOB_SIGNATURE_HEADER: sign_job_message(body, self.key)},
                                                   delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                                   content_type="application/msgpack", type=f"dcf.job.{r['type']}"),
                                  routing_key=self.queue_name) for r, body in zip(records, bodies, strict=True)]
        try:
            await asyncio.wait_for(asyncio.gather(*sends), timeout=15 + len(records) / 1000)
        except Exception as exc:
            raise QueueUnavailable(f"the job queue did not confirm the job{'s' if len(records) > 1 else ''} "
                                   f"({type(exc).__name__}); try again") from None

    async def close(self) -> None:
        self._closing = True
        for task in (self._watch, self._reconnecting):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self._drop_connection()


def _discard_unaccepted(store: JobStore) -> None:
    count = store.discard_unaccepted()
    if count:
        log.warning("%d submissions were cut off before they were accepted (no id was returned): discarded",
                    count)


def node_urls(url: str) -> list[str]:
    """The broker nodes of ``--amqp-url``: one URL, or several, comma-separated (nodes of one cluster)."""
    return [u.strip() for u in url.split(",") if u.strip()]


def _connect_error(exc: BaseException, queue: AmqpQueue) -> str:
    """What a failed connection attempt says in the log; a queue declared with other arguments (a classic
    queue of that name where a quorum queue is asked, or the reverse) says how to mend it."""
    text = f"{type(exc).__name__}: {exc}"
    if "PRECONDITION_FAILED" in text and "x-queue-type" in text:
        return (f"queue {queue.queue_name} exists on the broker with another type than {queue.queue_type} "
                f"(--amqp-queue-type); a queue's type cannot change: use another --amqp-queue, or drain and "
                f"delete the old queue ({text})")
    return text


def _safe(url: str) -> str:
    """The URL without its password, for logs."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
    return url
