"""``dcf-head`` / ``python -m head_node``: run the head."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from common import config, security, tasks
from common.errors import ConfigError
from common.logs import setup_logging

from . import leader
from .jobqueue import node_urls
from .leader import Leadership, active_head

log = logging.getLogger("dcf.head")
T = TypeVar("T")
#: seconds a head started without --standby tries the broker for the leader lock before it starts without it
#: (taking it later), so that a broker down at start does not keep its API from answering
START_LOCK_WAIT_S = 3.0
#: seconds a standby that got the lock waits for the last active head's health check (one started alone)
HEALTH_PROBE_S = 2.0


def main(argv: Sequence[str] | None = None) -> int:
    security.owner_only_files()  # blobs, results, the job database: 0600, folders 0700
    try:
        cfg = config.head_settings(argv)  # checked: types, ranges, distinct ports
        setup_logging(cfg.log_level, cfg.log_json)
        security.refuse_placeholders(cfg.api_token, cfg.amqp_url)  # .env.example's are no secrets
        tasks.load_plugins(cfg.plugins)
        security.server_keys(cfg)  # key files readable and well-formed before anything starts
    except ConfigError as exc:
        print(f"dcf-head: {exc.message}", file=sys.stderr)
        return 2
    import zmq

    try:
        fenced = _run_loop(serve(cfg))
    except (OSError, zmq.ZMQError) as exc:  # e.g. a port in use: one line, exit 1
        log.error("cannot start: %s", exc)
        return 1
    except ConfigError as exc:  # e.g. a job store that lost its jobs, or unreadable: one line, exit 2
        log.error("cannot start: %s", exc.message)
        print(f"dcf-head: {exc.message}", file=sys.stderr)
        return 2
    if fenced:  # the leader lock was lost: this process starts again, as a standby (head_node/leader.py)
        again = [sys.executable, "-m", "head_node", *(sys.argv[1:] if argv is None else argv)]
        if not cfg.standby:
            again.append("--standby")
        log.warning("restarting as a standby head")
        os.execv(sys.executable, again)
    return 0


def http_socket(host: str, port: int) -> socket.socket:
    """The REST API's listening socket, bound before anything else starts: a port in use is an
    OSError naming it, before the head touches its state dir (uvicorn would only log it, after)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT of a previous run is fine
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"HTTP port {port} on {host}: {exc.strerror} (--http-port)") from None
    return sock


def secure_by_default(cfg: config.HeadSettings) -> tuple[config.HeadSettings, security.Defaults | None]:
    """The settings the head runs with: an API token and CURVE keys not given explicitly are those of
    its state dir (``STATE_DIR/api-token``, ``STATE_DIR/keys``), created on the first start and reused
    afterwards; with ``--insecure``, none (None: nothing taken from the state dir)."""
    if cfg.insecure:
        return cfg, None
    curve_given = bool(cfg.curve_secret_key or cfg.curve_allow)
    if cfg.api_token and curve_given:
        return cfg, None
    defaults = security.secure_defaults(Path(cfg.state_dir), token=not cfg.api_token, curve=not curve_given)
    changes: dict[str, Any] = {}
    if defaults.token_file is not None:
        changes["api_token"] = defaults.api_token
    if defaults.key_dir is not None:
        changes["curve_secret_key"] = str(defaults.key_dir / "head.key_secret")
        changes["curve_allow"] = str(defaults.key_dir / "allowed")
    return dataclasses.replace(cfg, **changes), defaults


def announce_security(cfg: config.HeadSettings, defaults: security.Defaults | None) -> None:
    """One block at start-up: where the token and keys the head took from its state dir are and how to
    hand them to clients and providers, or a warning for what ``--insecure`` leaves open. The token
    itself is never written (only its file)."""
    where = "all interfaces" if cfg.host in ("0.0.0.0", "::", "") else cfg.host
    if defaults is None:
        if not cfg.insecure:
            return
        open_ = [*([] if cfg.api_token else [f"the REST API (port {cfg.http_port}) answers anyone, no token"]),
                 *([] if cfg.curve_secret_key else [f"ZeroMQ (ports {cfg.registration_port}, {cfg.task_port}, "
                                                    f"{cfg.result_port}) "
                                                    "has no CURVE: any peer can register as a provider, read "
                                                    "operands and send results"])]
        if open_:
            log.warning("--insecure: %s, listening on %s. Use it on a trusted network or 127.0.0.1 only; "
                        "without --insecure the head creates a token and CURVE keys in its state dir",
                        "; ".join(open_), where)
        return
    state = Path(cfg.state_dir).resolve()
    lines = ["secure by default (docs/DEPLOYMENT.md, 'Secure by default'):"]
    if defaults.token_file is not None:
        tf = defaults.token_file.resolve()
        lines += [
            f"  API token:  {tf} ({'created now' if defaults.token_created else 'kept'}; owner-only), required on "
            "every route but /v1/health",
            f"    on this machine, `dcf` reads it by itself (head URL on 127.0.0.1/localhost; DCF_STATE_DIR={state} "
            "or run it where ./dcf-state is this state dir)",
            f"    elsewhere: export DCF_API_TOKEN=\"$(cat {tf})\"; dashboard: http://HOST:{cfg.http_port}/?token=TOKEN "
            "once",
        ]
    if defaults.key_dir is not None:
        kd = defaults.key_dir.resolve()
        lines += [
            f"  CURVE keys: {kd}/head.key_secret ({'created now' if defaults.keys_created else 'kept'}), providers "
            f"allowed: the public keys in {kd}/allowed/",
            f"    enrol a provider: dcf keys add-provider NAME --head-state-dir {state}   (writes NAME-keys/: "
            "copy it to the provider's machine), then there:",
            "    dcf-provider --head THIS_HOST --curve-server-key NAME-keys/head.key --curve-secret-key "
            "NAME-keys/NAME.key_secret",
        ]
    lines.append("  opt out (trusted network only): --insecure")
    log.info("%s", "\n".join(lines))


#: the cyclic garbage collector's thresholds on a running head (CPython's default: 700, 10, 10). Each job makes
#: a few hundred objects, nearly all freed by reference counting; with the defaults a head holding 10,000 tiny
#: jobs spent about 1 s of CPU in 12 full collections of 66 ms (bench/tasks.py, 11,000 jobs): about 9% of its
#: time per job. With these, and what start-up made frozen out of the collector's view, 0.28 s.
GC_THRESHOLDS = (20_000, 20, 20)


def tune_gc() -> None:
    """What start-up made (modules, settings, recovered jobs) moved out of the collector's view, and the
    thresholds raised (``GC_THRESHOLDS``): cycles are still collected, a few times less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _run_loop(coro: Coroutine[Any, Any, T]) -> T:
    """uvloop where it is installed (faster HTTP bodies), asyncio elsewhere (e.g. Windows)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


class _Server:
    """uvicorn's server, without its signal handlers (the head handles signals itself)."""

    @staticmethod
    def make(app: Any, cfg: config.HeadSettings) -> Any:
        import uvicorn

        from .http.guard import guarded_protocol, max_connections

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                yield

        # guarded: a connection that sends no complete request head in 10 s is closed (slow loris), and
        # open connections stay below the file limit (head_node/http/guard.py)
        return Server(uvicorn.Config(app, host=cfg.host, port=cfg.http_port, log_level="warning", access_log=False,
                                     lifespan="off", http=guarded_protocol(), timeout_keep_alive=5,
                                     limit_concurrency=max_connections(), h11_max_incomplete_event_size=16 * 1024,
                                     timeout_graceful_shutdown=2))  # open SSE streams must not hold a stop


def _on_signals(stop: Callable[..., None]) -> None:
    # SIGHUP too (its terminal closed, e.g. under `dcf up`): a clean stop, not the default instant death
    for sig in (signal.SIGINT, signal.SIGTERM, *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])):
        signal.signal(sig, stop)


async def take_the_lead(cfg: config.HeadSettings, sock: socket.socket) -> tuple[Leadership | None, socket.socket]:
    """With ``--amqp-url``: the broker's leader lock, held (head_node/leader.py). A head that finds another
    active refuses to start (ConfigError) unless ``--standby``, with which it answers as a standby on ``sock``
    until it takes the lock. Returns the lock and the HTTP socket to serve on (None, ``sock``: no broker)."""
    if not cfg.amqp_url:
        if cfg.standby:
            raise ConfigError("--standby needs --amqp-url: the broker decides which head is active")
        return None, sock
    lead = Leadership(node_urls(cfg.amqp_url), cfg.amqp_queue, cfg.amqp_heartbeat, strict=cfg.standby)
    if not cfg.standby:  # alone: no waiting, and a broker down at start does not keep the head from serving
        got = await lead.acquire(patient=False, give_up_after=START_LOCK_WAIT_S)
        if got == "unreachable":
            lead.hold_later()
        if got != "taken":
            return lead, sock
        # the holder may be this head's own previous run, whose connection the broker has not seen end yet
        # (a machine that went silent: up to --amqp-heartbeat)
        wait = 2 * cfg.amqp_heartbeat
        log.warning("the broker's leader lock %s is held; waiting up to %.0f s for it (a previous run of this "
                    "head?)", lead.lock_name, wait)
        with contextlib.suppress(asyncio.TimeoutError):
            if await asyncio.wait_for(lead.acquire(patient=True), wait) == "held":
                return lead, sock
        raise ConfigError(f"another head is active on queue {cfg.amqp_queue} (it holds the broker's leader lock "
                          f"{lead.lock_name}); start this one with --standby to wait as its standby")
    first = await lead.acquire(patient=False, give_up_after=START_LOCK_WAIT_S)
    if first == "held":
        await _refuse_beside_a_head_alone(cfg, lead)
        return lead, sock
    alone = active_head(Path(cfg.state_dir))
    if first == "taken" and alone.get("standby_group") is False:
        await lead.close()
        raise ConfigError(f"the active head ({alone.get('url', 'unknown')}) was started without --standby: it does "
                          "not stop when cut off from the broker, so no standby may wait on it; start every head "
                          "of the group with --standby")
    from .http.standby import StandbyApp

    server = _Server.make(StandbyApp(Path(cfg.state_dir)), cfg)
    stopped = asyncio.Event()
    _on_signals(lambda *_: stopped.set())
    log.info("standby head: waiting for the broker's leader lock %s (active head: %s)", lead.lock_name,
             active_head(Path(cfg.state_dir)).get("url", "unknown"))
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    taking = asyncio.ensure_future(lead.acquire(patient=True))
    await asyncio.wait([taking, asyncio.ensure_future(stopped.wait())], return_when=asyncio.FIRST_COMPLETED)
    server.should_exit = True
    await serving
    if not taking.done():  # stopped while waiting
        taking.cancel()
        await asyncio.gather(taking, return_exceptions=True)
        await lead.close()
        raise _Stopped
    await _refuse_beside_a_head_alone(cfg, lead)
    log.info("standby head taking over as the active head")
    return lead, http_socket(cfg.host, cfg.http_port)  # uvicorn closed the standby's socket


async def _refuse_beside_a_head_alone(cfg: config.HeadSettings, lead: Leadership) -> None:
    """A standby that got the lock while the last active head, started without --standby, still serves (its
    broker connection dropped, which frees the lock, but such a head does not stop): two heads would dispatch.
    It lets the lock go and refuses to start (ConfigError) rather than become the second."""
    last = active_head(Path(cfg.state_dir))
    url = last.get("url")
    if last.get("standby_group") is not False or not isinstance(url, str):
        return
    if await asyncio.to_thread(_serves_as_active, url):
        await lead.close()
        raise ConfigError(f"the active head ({url}) was started without --standby and still serves, though the "
                          "broker's leader lock was free (its broker connection dropped): this head does not take "
                          "over beside it; start every head of the group with --standby")


def _serves_as_active(url: str) -> bool:
    """Whether the head at ``url`` answers its health check as an active head (not fenced, not a standby)."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/v1/health", timeout=HEALTH_PROBE_S) as resp:
            doc = json.loads(resp.read())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("role") == "active"


class _Stopped(Exception):  # noqa: N818 (a signal while waiting as a standby: a clean exit)
    pass


async def serve(cfg: config.HeadSettings) -> bool:
    """Run the head until it is stopped (False) or fenced (True: it lost the leader lock)."""
    try:
        return await _serve(cfg)
    except _Stopped:
        log.info("standby head stopped")
        return False


async def _serve(cfg: config.HeadSettings) -> bool:
    from .api import create_app
    from .http.fast import FastFront
    from .server import Head
    from .store import check_state_dir

    sock = http_socket(cfg.host, cfg.http_port)
    try:
        lead, sock = await take_the_lead(cfg, sock)
    except BaseException:
        sock.close()
        raise
    try:  # before the head opens its state dir: a job store that lost its jobs is refused (ConfigError)
        check_state_dir(Path(cfg.state_dir), cfg.accept_empty_store)
    except BaseException:
        sock.close()
        raise
    try:  # secure by default: the token and CURVE keys not given are the state dir's (created on first start)
        cfg, defaults = secure_by_default(cfg)
    except BaseException:
        sock.close()
        raise
    head = Head(cfg)
    head.leadership = lead
    try:
        await head.start()
    except BaseException:
        sock.close()
        if lead is not None:
            await lead.close()
        raise
    announce_security(cfg, defaults)
    server = _Server.make(FastFront(create_app(head), head), cfg)
    tune_gc()
    loop = asyncio.get_running_loop()
    if lead is not None:
        lead.on_lost = head.fence
        if lead.lost is not None:  # lost while the head was starting: fenced now, not never
            head.fence(lead.lost)
        leader.announce(head.root, advertised_url(cfg), head.incarnation, cfg.standby, cfg.fsync)

    def stop(*_: object) -> None:
        loop.call_soon_threadsafe(head.stopping.set)

    _on_signals(stop)

    async def stop_serving() -> None:
        await head.stopping.wait()
        server.should_exit = True

    watcher = asyncio.ensure_future(stop_serving())
    try:
        await server.serve(sockets=[sock])
    finally:
        watcher.cancel()
        await head.stop()
        log.info("head stopped%s", f" (fenced: {head.fenced})" if head.fenced else "")
    return head.fenced is not None


def advertised_url(cfg: config.HeadSettings) -> str:
    """The URL standbys name as the active head's: this host's, as clients would reach it."""
    host = cfg.host if cfg.host not in ("0.0.0.0", "::", "") else socket.getfqdn()
    return f"http://{f'[{host}]' if ':' in host else host}:{cfg.http_port}"


if __name__ == "__main__":
    sys.exit(main())
