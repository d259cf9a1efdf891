"""Which head is active, decided by RabbitMQ (issue 15 §1): the broker is the consensus, not dcf.

Every head with ``--amqp-url`` holds, while it is active, the exclusive queue ``<--amqp-queue>.leader`` on a
connection of its own (the *lock*). RabbitMQ lets one connection at a time declare an exclusive queue
(another gets ``RESOURCE_LOCKED``) and deletes it when that connection ends: the process died (its socket
closed: at once), or the broker missed two of its heartbeats (``--amqp-heartbeat`` seconds of silence,
a partition). A standby (``--standby``) tries to take the lock every ``POLL_S`` and becomes active the moment
it does.

Fencing (heads of a standby group, all started with ``--standby``): an active head may dispatch only while its
lease is fresh, that is while the last round trip to the broker on the lock's connection was *sent* less than
``heartbeat / 2`` ago (``Leadership.valid``, checked before every dispatch). The broker cannot give the lock
away before it has heard nothing from the head for ``heartbeat`` seconds, so a head cut off from the broker
stops dispatching at least ``heartbeat / 2`` before a standby can start (docs/RELIABILITY.md, "Standby head").
A head whose lease expired is *fenced*: it stops serving and starts again as a standby (``__main__``). A head
started without ``--standby`` is alone by intent: it refuses to start while another holds the lock, and holds
the lock itself so that no standby starts beside it, but a broker outage does not stop it (the lock is taken
again when the broker is back; finding it taken fences it then).

The active head also writes ``STATE_DIR/active-head.json`` (its URL, run id and since when), which a standby
reads to answer "standby, active is X"; the state dir is shared by the heads (a network file system in
production, one path in tests).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .store import replace_file

log = logging.getLogger("dcf.head.leader")

#: seconds between a standby's tries to take the lock
POLL_S = 0.2
ACTIVE_FILE = "active-head.json"


def with_heartbeat(url: str, heartbeat: float) -> str:
    """``url`` asking the broker for a heartbeat timeout of ``heartbeat`` seconds (whole, at least 1)."""
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query))
    query["heartbeat"] = str(max(1, round(heartbeat)))
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def active_head(root: Path) -> dict[str, Any]:
    """What the active head wrote of itself in the shared state dir ({} when nothing readable is there)."""
    try:
        doc = json.loads((root / ACTIVE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


class Leadership:
    """The lock on one broker connection, held by the active head (module docstring). ``strict`` (a head of a
    standby group, ``--standby``): it may dispatch only on a fresh lease, and losing the lock fences it. Not
    strict (a head started alone): the lock only keeps a standby from starting beside it; a broker outage does
    not stop it (it takes the lock again once the broker is back), but finding the lock taken by another head
    then fences it."""

    def __init__(self, urls: list[str], queue_name: str, heartbeat: float, strict: bool = True) -> None:
        self.urls = [with_heartbeat(u, heartbeat) for u in urls]
        self.lock_name = f"{queue_name}.leader"
        self.heartbeat = float(max(1, round(heartbeat)))  # what the broker is asked for (whole seconds)
        self.strict = strict
        self.node = 0
        self.connection: Any = None
        self.channel: Any = None
        #: monotonic time the last successful round trip on the lock's connection was sent
        self.confirmed = 0.0
        self.lost: str | None = None  # why this head may no longer be active, once that is so
        self.on_lost: Callable[[str], None] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._probe: asyncio.Future[None] | None = None  # the round trip in flight

    # ---- taking the lock --------------------------------------------------------------------------
    async def acquire(self, patient: bool, give_up_after: float | None = None) -> str:
        """Take the lock: "held" once held. ``patient`` (a standby): try until it is free; else "taken" at the
        first answer that another head holds it. An unreachable broker is retried, for up to ``give_up_after``
        seconds ("unreachable"; None: for ever)."""
        import aio_pika
        import aiormq

        end = None if give_up_after is None else time.monotonic() + give_up_after
        while True:
            url = self.urls[self.node]
            try:
                if self.connection is None or self.connection.is_closed:
                    self.connection = await aio_pika.connect(url, timeout=10)
                sent = time.monotonic()
                channel = await self.connection.channel(publisher_confirms=False)
                await channel.declare_queue(self.lock_name, exclusive=True, auto_delete=True)
            except aiormq.exceptions.ChannelLockedResource:
                if not patient:
                    return "taken"
                await asyncio.sleep(POLL_S)
                continue
            except Exception as exc:  # node down or refusing: the next one, after a pause
                log.debug("leader lock: %s unreachable (%s)", _safe(url), exc)
                await self._drop()
                self.node = (self.node + 1) % len(self.urls)
                if end is not None and time.monotonic() > end:
                    return "unreachable"
                await asyncio.sleep(POLL_S)
                continue
            self.channel, self.confirmed = channel, sent
            self.connection.close_callbacks.add(self._closed)
            self._keeper = asyncio.ensure_future(self._keep())
            log.info("leader lock %s taken on %s (broker heartbeat %.0f s): this head is active", self.lock_name,
                     _safe(url), self.heartbeat)
            return "held"

    def hold_later(self) -> None:
        """A head started alone whose broker was unreachable: take the lock once the broker is back."""
        self._keeper = asyncio.ensure_future(self._regain())

    # ---- holding it -------------------------------------------------------------------------------
    def valid(self, now: float) -> bool:
        """Whether this head may dispatch now: a strict one holds the lock on a fresh lease; one started
        alone, unless another head took the lock."""
        if not self.strict:
            return self.lost is None
        return self.lost is None and self.channel is not None and now - self.confirmed < self.heartbeat / 2

    async def _keep(self) -> None:
        """Round trips on the lock's connection every heartbeat/8 (one at a time, never cancelled: aiormq closes
        a channel whose call is cancelled); the lease expiring (a partition), or the connection ending, loses the
        lock."""
        step = self.heartbeat / 8
        while self.lost is None and self.channel is not None:
            now = time.monotonic()
            if self._probe is None or self._probe.done():
                self._probe = asyncio.ensure_future(self._round_trip(now))
            if self.strict and not self.valid(now):
                self._lose(f"no answer from the broker for {now - self.confirmed:.1f} s "
                           f"(the lease is {self.heartbeat / 2:.1f} s)")
                return
            await asyncio.sleep(step)

    async def _round_trip(self, sent: float) -> None:
        """One passive declare of the lock's queue; a channel that failed (the connection still up: a broker
        error, not a partition) is replaced, so one bad reply never fences a head whose lock is fine."""
        try:
            await self.channel.declare_queue(self.lock_name, passive=True)
        except Exception as exc:
            log.debug("leader lock: round trip failed (%s)", exc)
            if self.lost is None and self.connection is not None and not self.connection.is_closed:
                with contextlib.suppress(Exception):
                    self.channel = await self.connection.channel(publisher_confirms=False)
            return
        self.confirmed = max(self.confirmed, sent)

    def _closed(self, *args: Any) -> None:
        why = f"the broker connection holding the lock ended ({args[1] if len(args) > 1 else 'closed'})"
        if self.strict:
            self._lose(why)
            return
        if self.lost is None and self.channel is not None:  # started alone: take it again when the broker is back
            log.warning("leader lock: %s; taking it again once the broker answers", why)
            self.channel = None
            self.connection = None
            self._keeper = asyncio.ensure_future(self._regain())

    async def _regain(self) -> None:
        if await self.acquire(patient=False) == "taken":
            self._lose("another head took the leader lock while the broker was away")

    def _lose(self, why: str) -> None:
        if self.lost is not None:
            return
        self.lost = why
        log.error("leader lock lost: %s; this head stops dispatching and accepting jobs (fenced)", why)
        if self.on_lost is not None:
            self.on_lost(why)

    async def _drop(self) -> None:
        connection, self.connection, self.channel = self.connection, None, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()

    async def close(self) -> None:
        """Let the lock go (a clean stop: a standby takes it at once)."""
        self.lost = self.lost or "stopped"
        for task in (self._keeper, self._probe):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self._drop()


def announce(root: Path, url: str, incarnation: str, standby_group: bool, fsync: bool) -> None:
    """The active head says who it is, in the shared state dir (read by standbys); ``standby_group``: it was
    started with ``--standby`` (it fences itself, so standbys may wait on it)."""
    path = root / ACTIVE_FILE
    tmp = path.with_name(f".{ACTIVE_FILE}.tmp")
    tmp.write_text(json.dumps({"url": url, "epoch_prefix": incarnation[:8], "since": time.time(),
                               "standby_group": standby_group}))
    replace_file(tmp, path, fsync)


def _safe(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}:{parts.port or 5672}"
