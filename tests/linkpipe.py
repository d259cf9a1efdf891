"""One direction of a slow TCP link, for the user-space delaying proxies of the test suites (the chaos
suite's ``SlowLink`` on loopback and the network test bed's ``tests/netbed/delayproxy.py``): this
kernel has no ``netem``, so delay (and, for SlowLink, bandwidth) is added here."""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable


async def delayed_pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, latency: float,
                       rate: float = math.inf, counted: Callable[[int], None] | None = None) -> None:
    """Copy ``reader`` to ``writer`` as a link of ``rate`` bytes/s with ``latency`` seconds of one-way
    delay would: bytes are queued, never dropped, and keep their order; EOF is passed on. ``counted``
    is told the size of every chunk read. Returns when the reader ends or either side fails; closes
    ``writer``."""
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    async def send() -> None:
        while True:
            due, chunk = await queue.get()
            if not chunk:
                with contextlib.suppress(OSError):
                    writer.write_eof()
                return
            await asyncio.sleep(max(0.0, due - loop.time()))
            writer.write(chunk)
            await writer.drain()

    sender = asyncio.create_task(send())
    link_free = 0.0
    try:
        while True:
            chunk = await reader.read(1 << 16)
            now = loop.time()
            if not chunk:
                queue.put_nowait((now, b""))
                break
            if counted is not None:
                counted(len(chunk))
            link_free = max(now, link_free) + len(chunk) / rate
            queue.put_nowait((link_free + latency, chunk))
        await sender
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await sender
        writer.close()
