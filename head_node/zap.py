"""The head's ZAP handler (ZeroMQ RFC 27): decides which CURVE clients may connect.

libzmq asks it about every CURVE handshake on the head's sockets, over
``inproc://zeromq.zap.01`` in the head's ZeroMQ context. It runs on its own thread
with its own REP socket, so a busy event loop never stalls handshakes, and it holds
no cluster state: only the allow-list, re-read when the directory changes (adding a
provider's ``.key`` file takes effect without restarting the head).

A refused client is logged with its address and public key (once per key and address
every ``LOG_EVERY`` seconds: a refused client reconnects again and again).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import zmq
import zmq.utils.z85

from common.security import read_allow_list

log = logging.getLogger("dcf.head.zap")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
LOG_EVERY = 30.0
RELOAD_EVERY = 1.0
MISS_RELOAD_EVERY = 0.1  # an unknown key re-reads the directory, at most this often


class AllowList:
    """Allowed Z85 public keys, reloaded at most every ``RELOAD_EVERY`` s when the directory changed."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.keys: dict[bytes, str] = {}
        self._signature: object = None
        self._checked = 0.0
        self.reload(force=True)

    def _current_signature(self) -> object:
        try:
            stats = ((p.name, p.stat()) for p in self.directory.glob("*.key"))
            return tuple(sorted((name, st.st_mtime_ns, st.st_size) for name, st in stats))
        except OSError:
            return None

    def reload(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < RELOAD_EVERY:
            return
        self._checked = now
        signature = self._current_signature()
        if signature == self._signature:
            return
        self._signature = signature
        self.keys = read_allow_list(self.directory)
        log.info("CURVE allow-list %s: %d provider keys", self.directory, len(self.keys))

    def name_of(self, public_z85: bytes) -> str | None:
        self.reload()
        name = self.keys.get(public_z85)
        if name is None and time.monotonic() - self._checked >= MISS_RELOAD_EVERY:
            self.reload(force=True)  # a key just added must not be refused for a second
            name = self.keys.get(public_z85)
        return name


class ZapHandler:
    """Answers ZAP requests on a thread; ``start`` returns once it is bound (bind it before
    the CURVE sockets so that no handshake can happen without it)."""

    def __init__(self, ctx: zmq.Context, allow_dir: Path) -> None:
        # same libzmq context, plain (sync) sockets
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.shadow(ctx.underlying)
        self.allow = AllowList(allow_dir)
        self.denied = 0
        self._last_logged: dict[tuple[bytes, bytes], float] = {}
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="dcf-zap", daemon=True)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None:
            raise RuntimeError(f"the ZAP handler did not start: {self._error}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        try:
            sock = self.ctx.socket(zmq.REP)
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while not self._stop.is_set():
                if not sock.poll(200):
                    continue
                request = sock.recv_multipart()
                try:
                    reply = self.answer(request)
                except Exception:  # never let the thread die: without it every handshake is refused
                    log.exception("error answering a ZAP request")
                    reply = [b"1.0", request[1] if len(request) > 1 else b"", b"500", b"internal error", b"", b""]
                sock.send_multipart(reply)
        finally:
            sock.close(linger=0)

    def answer(self, request: list[bytes]) -> list[bytes]:
        """The ZAP reply to one request: 200 with the key as user id, or 400."""
        if len(request) < 6 or request[0] != b"1.0":
            log.warning("malformed ZAP request (%d frames)", len(request))
            return [b"1.0", request[1] if len(request) > 1 else b"", b"500", b"malformed ZAP request", b"", b""]
        _, request_id, _domain, address, _identity, mechanism, *credentials = request
        if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
            self._deny(address, b"", f"mechanism {mechanism.decode('ascii', 'replace')} is not allowed")
            return [b"1.0", request_id, b"400", b"CURVE required", b"", b""]
        public = zmq.utils.z85.encode(credentials[0])
        name = self.allow.name_of(public)
        if name is None:
            self._deny(address, public, "key not in the allow-list")
            return [b"1.0", request_id, b"400", b"key not allowed", b"", b""]
        return [b"1.0", request_id, b"200", b"OK", public, b""]

    def _deny(self, address: bytes, public: bytes, why: str) -> None:
        self.denied += 1
        now = time.monotonic()
        key = (address, public)
        if now - self._last_logged.get(key, -LOG_EVERY) < LOG_EVERY:
            return
        if len(self._last_logged) > 10_000:
            self._last_logged.clear()
        self._last_logged[key] = now
        log.warning("refused a connection from %s: %s (public key %s; allow-list %s)",
                    address.decode("ascii", "replace"), why, public.decode("ascii", "replace") or "-",
                    self.allow.directory, extra={"peer": address.decode("ascii", "replace")})
