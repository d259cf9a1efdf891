"""A user-space delaying TCP proxy for the network test bed (this kernel has no ``netem``).

Run inside a provider host's namespace (``NetBed.add_provider(..., delay=S)``): it listens on the
host's own bed address at each of the head's port numbers and forwards to the head's address, holding
every chunk ``--delay`` seconds in each direction (bytes are queued, never dropped, and keep their
order), with the chaos suite's pump (tests/linkpipe.py); bandwidth stays the job of the link's tbf qdisc.

    python -m tests.netbed.delayproxy --listen 10.213.7.11 --target 10.213.7.1 --ports 5555,5556 --delay 0.03
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

from tests.linkpipe import delayed_pipe


async def _serve(listen: str, target: str, ports: list[int], delay: float) -> None:
    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, port: int) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(target, port)
        except OSError:
            writer.close()
            return
        try:
            await asyncio.gather(delayed_pipe(reader, up_writer, delay), delayed_pipe(up_reader, writer, delay))
        finally:
            for w in (writer, up_writer):
                w.close()

    servers = []
    for port in ports:
        async def accept(r: asyncio.StreamReader, w: asyncio.StreamWriter, port: int = port) -> None:
            with contextlib.suppress(asyncio.CancelledError):
                await connection(r, w, port)
        servers.append(await asyncio.start_server(accept, listen, port, reuse_address=True))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for s in servers:
        s.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", required=True, help="address to listen on (the host's bed address)")
    ap.add_argument("--target", required=True, help="address to forward to (the head's)")
    ap.add_argument("--ports", required=True, help="comma-separated ports, the same on both sides")
    ap.add_argument("--delay", type=float, required=True, help="one-way delay, seconds, each direction")
    args = ap.parse_args(argv)
    asyncio.run(_serve(args.listen, args.target, [int(p) for p in args.ports.split(",")], args.delay))


if __name__ == "__main__":
    main()
