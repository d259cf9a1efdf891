"""Durable job queues. A job id is returned to the user only after ``publish`` returned.

* ``EmbeddedQueue``: the SQLite job store in the state dir is the queue; unfinished
  accepted jobs are delivered again when the head starts.
* ``AmqpQueue``: a durable RabbitMQ queue ``dcf.jobs``; persistent messages, publisher
  confirms, manual ack only once the job's outcome is stored. Unacked jobs come back
  after a head crash or a broker restart. Messages hold the job spec and blob ids,
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

RECONNECT_S = 1.0
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
                 republish_after: float = 30.0) -> None:
        #: called with True/False when the broker connection comes back / goes away
        self.on_state: Callable[[bool], None] | None = None
        #: called with the ids of accepted jobs published again (they never came back)
        self.on_republish: Callable[[list[str]], None] | None = None
        self.url = url
        self.queue_name = queue_name
        self.store = store
        self.key = key
        self.prefetch = prefetch
        self.republish_after = republish_after
        self.connection: Any = None
        self.channel: Any = None
        self.deliver: Deliver | None = None
        self.connected = asyncio.Event()
        #: job ids delivered on the current connection and not acked yet
        self.held: set[str] = set()
        #: accepted, unfinished job id not held -> when (monotonic) it was first seen so
        self.missing: dict[str, float] = {}
        self._watch: asyncio.Task[None] | None = None

    @property
    def is_connected(self) -> bool:
        return self.connected.is_set()

    async def start(self, deliver: Deliver) -> None:
        """Connect (retrying with backoff while the broker is down) and consume. The head runs
        this in the background: its API answers, and refuses submissions, until it is done."""
        self.deliver = deliver
        _discard_unaccepted(self.store)
        delay = 0.5
        while True:
            try:
                await self._connect()
                return
            except Exception as exc:  # broker down at start: keep trying, with backoff
                log.warning("RabbitMQ at %s unreachable (%s); retrying in %.1fs", _safe(self.url), exc, delay)
                if self.connection is not None:
                    with contextlib.suppress(Exception):
                        await self.connection.close()
                    self.connection = None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    async def _connect(self) -> None:
        import aio_pika

        # reconnect every second while the broker is away (aio-pika's default is 5 s): jobs are
        # accepted again about a second after RabbitMQ is back
        self.connection = await aio_pika.connect_robust(self.url, timeout=10, reconnect_interval=RECONNECT_S)
        self.connection.reconnect_callbacks.add(self._on_reconnect)
        self.connection.close_callbacks.add(self._on_close)
        self.channel = await self.connection.channel(publisher_confirms=True)
        await self.channel.set_qos(prefetch_count=self.prefetch)
        queue = await self.channel.declare_queue(self.queue_name, durable=True)
        await queue.consume(self._on_message, no_ack=False)
        if self._watch is None:
            self._watch = asyncio.ensure_future(self._watch_missing())
        self.events_channel = await self.connection.channel(publisher_confirms=False)
        self.exchange = await self.events_channel.declare_exchange(
            EVENTS_EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True)
        self.connected.set()
        log.info("job queue: RabbitMQ queue %s at %s", self.queue_name, _safe(self.url))

    def _on_close(self, *args: Any) -> None:
        was_up = self.connected.is_set()
        self.connected.clear()
        self.held.clear()  # the broker takes back what this connection held, and delivers it again
        self.missing.clear()
        log.warning("RabbitMQ connection lost; reconnecting")
        if was_up and self.on_state is not None:
            self.on_state(False)

    def _on_reconnect(self, *args: Any) -> None:
        self.connected.set()
        log.info("RabbitMQ connection restored")
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

        if event.kind in LOCAL_EVENTS or not self.connected.is_set() or getattr(self, "exchange", None) is None:
            return
        body = json.dumps(event.to_dict(), default=str).encode()
        message = aio_pika.Message(body, content_type="application/json", type=event.kind,
                                   delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT)
        task = asyncio.ensure_future(self.exchange.publish(message, routing_key=event.kind, mandatory=False))
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
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        if self.connection is not None:
            await self.connection.close()


def _discard_unaccepted(store: JobStore) -> None:
    count = store.discard_unaccepted()
    if count:
        log.warning("%d submissions were cut off before they were accepted (no id was returned): discarded",
                    count)


def _safe(url: str) -> str:
    """The URL without its password, for logs."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
    return url
