"""The leader lock on a real RabbitMQ (head_node/leader.py): one holder at a time, a failed round trip on a
live connection never fences its holder, and the connection ending does."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from head_node.leader import Leadership

pytestmark = pytest.mark.integration

HEARTBEAT = 2.0


def leadership(amqp_url: str, queue: str, strict: bool = True) -> Leadership:
    return Leadership([amqp_url], queue, HEARTBEAT, strict=strict)


def test_one_holder_and_a_bad_round_trip_does_not_fence_it(amqp_url: str) -> None:
    async def scenario() -> None:
        queue = f"dcf-test-{uuid.uuid4().hex[:8]}"
        a, b = leadership(amqp_url, queue), leadership(amqp_url, queue)
        try:
            assert await a.acquire(patient=False) == "held"
            assert await b.acquire(patient=False) == "taken"  # RESOURCE_LOCKED: the broker keeps it to one
            # the broker closes the lock's channel (what aiormq does to a channel whose call was cancelled, or a
            # channel error): the connection and the lock are fine, so the lease must stay fresh
            await a.channel.close()
            await asyncio.sleep(HEARTBEAT)  # past the lease (heartbeat / 2) several times over
            assert a.lost is None and a.valid(time.monotonic()), a.lost
            assert await b.acquire(patient=False) == "taken"
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())


def test_the_lock_frees_when_its_connection_ends_and_a_strict_holder_is_fenced(amqp_url: str) -> None:
    async def scenario() -> None:
        queue = f"dcf-test-{uuid.uuid4().hex[:8]}"
        a, b = leadership(amqp_url, queue), leadership(amqp_url, queue)
        fenced: list[str] = []
        a.on_lost = fenced.append
        try:
            assert await a.acquire(patient=False) == "held"
            waiting = asyncio.ensure_future(b.acquire(patient=True))
            await asyncio.sleep(0.5)
            assert not waiting.done()  # a standby waits while the lock is held
            await a.connection.close()
            assert await asyncio.wait_for(waiting, 10) == "held"
            assert fenced and "ended" in fenced[0] and not a.valid(time.monotonic())
        finally:
            await a.close()
            await b.close()

    asyncio.run(scenario())
