"""A local cluster: a head and N providers as child processes on this machine.

Used by ``dcf up``, ``dcf demo``, the tests and the benchmarks. No Docker, no
RabbitMQ needed (the head's embedded store); pass ``amqp_url`` to use RabbitMQ.

Every port is bound to 127.0.0.1 only, and the head runs with ``--insecure`` (no API token, no
CURVE, unless ``head_args`` give a token or ``curve`` asks for keys): nothing off this machine can
reach it, the one-command ``dcf up``/``dcf demo`` flow needs no token, and the suite stays fast.
``secure=True`` runs the head as an operator's would, with no security flags: it creates its token
and CURVE keys in the state dir, the cluster's providers get key pairs on its allow-list and its
own client reads the token there.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import httpx

from common import config, layout, security
from common.config import HeadSettings
from common.errors import ConfigError, DcfError, HeadUnreachable, WaitTimeout

from .client import Client


def check_port_free(port: int, host: str = "127.0.0.1", what: str = "HTTP") -> None:
    """ConfigError, naming the port, when something already listens on it (e.g. another head): found
    before a head is started, not from a health answer given by the other program. (SO_REUSEADDR, as
    the head's own sockets: connections of an earlier head still in TIME_WAIT do not count.)"""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ConfigError(f"{what} port {port} on {host} is already in use ({exc.strerror or exc}): another "
                              "dcf head or another program listens there; choose another port "
                              "(e.g. dcf up --http-port N)") from None


def poll_head(url: str, probe: Callable[[Client], bool], timeout: float, what: str, *,
              proc: subprocess.Popen[bytes] | None = None, token: str | None = None,
              context: Callable[[], str] = str) -> None:
    """Ask ``probe`` (a Client on ``url``) every 50 ms until it is true. An unreachable head counts as
    false; ``proc`` (the head's process) exiting is DcfError, ``timeout`` WaitTimeout, each naming
    ``what`` and ``context()`` (where the logs are)."""
    end = time.monotonic() + timeout
    with Client(url, token=token, timeout=5, reconnect_wait=0) as client:
        while time.monotonic() < end:
            if proc is not None and proc.poll() is not None:
                raise DcfError(f"{what}: it exited with code {proc.returncode} {context()}".rstrip())
            try:
                if probe(client):
                    return
            except (HeadUnreachable, OSError):
                pass
            time.sleep(0.05)
    raise WaitTimeout(f"{what} within {timeout:.0f}s {context()}".rstrip())


def terminate(procs: Sequence[subprocess.Popen[bytes]], grace: float = 10.0) -> None:
    """SIGTERM every process still running (head and providers stop cleanly on it), then SIGKILL any that
    has not exited ``grace`` seconds later."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        with contextlib.suppress(ProcessLookupError):
            p.terminate()
    end = time.monotonic() + grace
    for p in live:
        try:
            p.wait(timeout=max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports free on 127.0.0.1 now: all held open at once while they are picked (one at a
    time, the OS may hand the same port out twice, and a head refuses equal ports)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket()
            socks.append(s)
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    except OSError as exc:
        raise DcfError(f"no free port on 127.0.0.1: {exc}") from None
    finally:
        for s in socks:
            s.close()


class LocalCluster:
    def __init__(self, providers: int = 2, *, http_port: int | None = None, state_dir: str | None = None,
                 amqp_url: str = "", threads: int | None = None, heartbeat: float | None = None,
                 head_args: list[str] | None = None, provider_args: list[str] | None = None,
                 log_dir: str | None = None, quiet: bool = True, env: dict[str, str] | None = None,
                 curve: bool = False, secure: bool = False) -> None:
        self.n_providers = providers
        self._tmp = None if state_dir else tempfile.TemporaryDirectory(prefix="dcf-")
        self.state_dir = Path(state_dir or self._tmp.name)  # type: ignore[union-attr]
        self.log_dir = Path(log_dir) if log_dir else self.state_dir / "logs"
        ports = free_ports(5)
        self.http_port = http_port or ports[0]
        self.ports = {"registration": ports[1], "task": ports[2], "result": ports[3]}
        self.rendezvous_port = ports[4]  # the head's only: the training rendezvous (allreduce)
        self.amqp_url = amqp_url
        self.threads = threads if threads is not None else max(1, (os.cpu_count() or 1) // max(1, providers))
        #: seconds between heartbeats (default: the head option table's)
        self.heartbeat = heartbeat if heartbeat is not None else HeadSettings.defaults().heartbeat_interval
        self.head_args = head_args or []
        self.provider_args = provider_args or []
        self.quiet = quiet
        self.env = {**os.environ, **(env or {})}
        self.head: subprocess.Popen[bytes] | None = None
        self.providers: list[subprocess.Popen[bytes]] = []
        self._logs: list[IO[bytes]] = []
        #: the head's own secure default (no security flags: token and keys created in its state dir)
        self.secure = secure
        #: CURVE: keys in STATE_DIR/keys, one key pair per provider, each on the head's allow-list
        self.key_dir: Path | None = self.state_dir / config.KEY_DIR if curve or secure else None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def api_token(self) -> str:
        """The head's API token: the one it created in its state dir (``secure``), the one given in
        ``head_args`` (``--api-token``) or its environment (``DCF_API_TOKEN``); "" for none."""
        if self.secure:
            return config.local_api_token(self.state_dir)
        for i, arg in enumerate(self.head_args):
            if arg == "--api-token" and i + 1 < len(self.head_args):
                return self.head_args[i + 1]
            if arg.startswith("--api-token="):
                return arg.split("=", 1)[1]
        return self.env.get("DCF_API_TOKEN", "")

    def port_args(self) -> list[str]:
        return ["--registration-port", str(self.ports["registration"]), "--task-port", str(self.ports["task"]),
                "--result-port", str(self.ports["result"]), "--heartbeat-interval", str(self.heartbeat)]

    def _spawn(self, args: list[str], log_name: str) -> subprocess.Popen[bytes]:
        out: Any = None
        try:
            if self.quiet:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                out = open(self.log_dir / f"{log_name}.log", "ab")  # noqa: SIM115 (closed in stop)
                self._logs.append(out)
            return subprocess.Popen([sys.executable, *args], stdout=out, stderr=out, env=self.env)
        except OSError as exc:
            raise DcfError(f"cannot start the local {log_name}: {exc}") from None

    def start_head(self, timeout: float = 30.0) -> None:
        args = ["-m", "head_node", "--host", "127.0.0.1", "--http-port", str(self.http_port),
                "--state-dir", str(self.state_dir), *self.port_args(), "--rendezvous-port",
                str(self.rendezvous_port), *self.head_args]
        if self.amqp_url:
            args += ["--amqp-url", self.amqp_url]
        if not self.secure:  # loopback only (--host 127.0.0.1 above): see the module's docstring
            args.append("--insecure")
        if self.key_dir is not None and not self.secure:
            security.generate_head(self.key_dir)
            (self.key_dir / "allowed").mkdir(exist_ok=True)
            args += ["--curve-secret-key", str(self.key_dir / "head.key_secret"),
                     "--curve-allow", str(self.key_dir / "allowed")]
        check_port_free(self.http_port)
        self.head = self._spawn(args, "head")
        self._wait(self._our_head_answers, timeout, "the head did not come up", self.head)

    def _our_head_answers(self, client: Client) -> bool:
        """The head answering is the one started here: its run id (``epoch``) is the one it wrote in
        this cluster's state dir, not another head's that took the port meanwhile."""
        token = self.api_token  # read each time: a secure head writes its token file on its first start
        try:  # the epoch is only given with the token
            reply = client.http.get("/v1/health", headers={"Authorization": f"Bearer {token}"} if token else {})
            epoch = reply.json().get("epoch") if reply.status_code == 200 else None
        except (httpx.HTTPError, ValueError):
            return False
        return epoch is not None and epoch == layout.read_marker(self.state_dir)

    def add_provider(self, *extra: str) -> subprocess.Popen[bytes]:
        i = len(self.providers)
        args = ["-m", "provider_node", "--head", "127.0.0.1", "--threads", str(self.threads),
                "--name", f"local-{i}", *self.port_args(), *self.provider_args]
        if self.key_dir is not None and "--curve-secret-key" not in extra:
            secret, _ = security.generate_provider(self.key_dir, f"local-{i}")
            args += ["--curve-secret-key", str(secret), "--curve-server-key", str(self.key_dir / "head.key")]
        args += extra
        proc = self._spawn(args, f"provider-{i}")
        self.providers.append(proc)
        return proc

    def start(self, timeout: float = 60.0) -> LocalCluster:
        try:
            self.start_head(timeout)
            for _ in range(self.n_providers):
                self.add_provider()
            self.wait_ready(self.n_providers, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, count: int, timeout: float = 60.0) -> None:
        def ready(c: Client) -> bool:
            return sum(1 for n in c.nodes() if n["state"] == "ready") >= count
        self._wait(ready, timeout, f"{count} providers did not become ready")

    def _wait(self, probe: Any, timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None) -> None:
        poll_head(self.url, probe, timeout, what, proc=proc, token=self.api_token or None,
                  context=lambda: f"(logs in {self.log_dir})")

    def kill_head(self) -> None:
        if self.head is not None:
            self.head.kill()
            self.head.wait()

    def stop(self) -> None:
        terminate([p for p in [*self.providers, self.head] if p is not None])  # SIGTERM: they stop cleanly
        for f in self._logs:
            f.close()
        self._logs.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
