"""A multi-host test bed in Linux network namespaces (issue 13 item 3; docs/NETBED.md).

Every "host" is a network namespace of its own: the head's (``dcfnb-PID-head``) and one per provider
(``dcfnb-PID-p1``, ...). Each is plugged by a veth pair into a bridge in a "switch" namespace
(``dcfnb-PID-sw``), so the providers reach the head and each other (``--sync allreduce``) at layer 2 on
one private /24 (``10.213.7.0/24``: the head .1, provider ``pK`` .(10+K)) that exists only inside
these namespaces. Nothing is configured in the root namespace: the veths are created in the switch
namespace with their peer moved straight into the host's, so no interface, address or route ever
appears there, and deleting the namespaces deletes the links.

* Each provider runs in the mount namespace ``ip netns exec`` gives it, with a tmpfs mounted over the
  head's state dir: the head's marker file is not there, so the co-located file shortcut
  (provider_node/shared.py) cannot apply and every array crosses the provider's link.
* The test process (root namespace) reaches the head's REST API through :class:`ApiForwarder`: it
  listens on 127.0.0.1 and opens each upstream connection from a thread that has entered the head's
  network namespace (``setns``), so it connects to 10.213.7.1 inside the bed, never outside it.
* Links are shaped with what this kernel has (no ``netem``): ``tbf`` on both ends of a host's veth
  for bandwidth, ``iptables -m statistic --mode random`` in the host for loss, ``iptables -j DROP``
  for a partition, ``ip link set down`` on the switch port for an unplugged cable, and a user-space
  delaying proxy (tests/netbed/delayproxy.py, run in the provider's namespace) for latency.

The head runs with ``--insecure``: every port it binds is on 10.213.7.1, an address only processes in
this bed's namespaces can reach. Cleanup (``stop``, also on failure) ends every process it started
(by pid), then every process still in its namespaces, deletes the namespaces and its temp dir; at
start it removes the leftovers of an earlier run whose process is gone (``dcfnb-PID-*``).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from common.errors import DcfError
from user_client import Client
from user_client.local import free_port, poll_head, terminate

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "dcfnb-"
SUBNET = "10.213.7"  # the bed's private /24: assigned only inside its namespaces
HEAD_ADDR = f"{SUBNET}.1"
HTTP_PORT = 8080
HEAD_PORTS = {"registration": 5555, "task": 5556, "result": 5557, "rendezvous": 5558}
REQUIRED = os.environ.get("DCF_NETBED_REQUIRED", "") not in ("", "0")
KEEP = os.environ.get("DCF_NETBED_KEEP", "") not in ("", "0")  # keep the logs dir (its path is printed)
CLONE_NEWNET = 0x40000000
_NAME = re.compile(rf"^{PREFIX}(\d+)-[a-z0-9]+$")


class NetBedUnavailable(RuntimeError):
    """This machine cannot build the bed (not root, no ``ip netns``, no ``tc``, no ``iptables``)."""


# ---- commands -----------------------------------------------------------------------------------
def _run(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise DcfError(f"{' '.join(cmd)} failed ({done.returncode}): {(done.stderr or done.stdout).strip()}")
    return done


def _iptables_binary(ns: str) -> str | None:
    """The iptables that works inside a namespace: the nft backend, else the legacy one."""
    for exe in ("iptables", "iptables-legacy"):
        if shutil.which(exe) and _run("ip", "netns", "exec", ns, exe, "-S", check=False).returncode == 0:
            return exe
    return None


def problem() -> str | None:
    """Why the bed cannot be built here, or None."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "the network test bed needs root (ip netns, tc, iptables)"
    for exe in ("ip", "tc", "mount"):
        if shutil.which(exe) is None:
            return f"`{exe}` is not installed"
    if shutil.which("iptables") is None and shutil.which("iptables-legacy") is None:
        return "iptables is not installed (apt-get install iptables)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    try:
        done = _run("ip", "netns", "add", probe, check=False)
        if done.returncode != 0:
            return f"`ip netns add` failed: {done.stderr.strip()}"
        if _iptables_binary(probe) is None:
            return "iptables does not work inside a network namespace (nft and legacy backends tried)"
        tbf = _run("tc", "-n", probe, "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "1gbit", "burst", "64kb",
                   "latency", "50ms", check=False)
        if tbf.returncode != 0:
            return f"the tbf qdisc does not work: {tbf.stderr.strip()}"
    finally:
        _run("ip", "netns", "del", probe, check=False)
    return None


def require() -> None:
    """pytest: skip when the bed cannot be built here; fail instead with DCF_NETBED_REQUIRED=1 (CI)."""
    import pytest

    why = problem()
    if why is None:
        return
    if REQUIRED:
        pytest.fail(f"{why} (DCF_NETBED_REQUIRED=1: the namespace test bed must run)")
    pytest.skip(why)


def _namespaces() -> list[str]:
    out = _run("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_ns_processes(ns: str) -> None:
    """SIGKILL whatever still runs in one of our namespaces (by pid, from ``ip netns pids``)."""
    for _ in range(5):  # bounded: a process may fork while we kill
        pids = [int(p) for p in _run("ip", "netns", "pids", ns, check=False).stdout.split() if p.isdigit()]
        pids = [p for p in pids if p != os.getpid()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


def remove_leftovers() -> list[str]:
    """Delete the namespaces and temp dirs of earlier runs whose process is gone; what was removed."""
    removed: list[str] = []
    for ns in _namespaces():
        m = _NAME.match(ns)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            _kill_ns_processes(ns)
            _run("ip", "netns", "del", ns, check=False)
            removed.append(ns)
    tmp = Path(tempfile.gettempdir())
    for d in tmp.glob(f"{PREFIX}*"):
        m = re.match(rf"^{PREFIX}(\d+)-", d.name)
        if m and d.is_dir() and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(str(d))
    return removed


# ---- entering a namespace from a thread ---------------------------------------------------------
_libc = ctypes.CDLL(None, use_errno=True)


def enter_netns(ns: str) -> None:
    """Move the calling thread (only it) into the network namespace ``ns``."""
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({ns}): {os.strerror(err)}")
    finally:
        os.close(fd)


def connect_in(ns: str, addr: tuple[str, int], timeout: float = 10.0) -> socket.socket:
    """A TCP connection to ``addr`` made from inside ``ns`` (the socket stays there, usable from any thread)."""
    got: dict[str, Any] = {}

    def target() -> None:
        try:
            enter_netns(ns)
            got["sock"] = socket.create_connection(addr, timeout=timeout)
        except OSError as exc:
            got["error"] = exc

    t = threading.Thread(target=target, name=f"connect-in-{ns}", daemon=True)
    t.start()
    t.join(timeout + 5)
    if "sock" not in got:
        raise got.get("error") or OSError(f"connect to {addr} in {ns} timed out")
    sock: socket.socket = got["sock"]
    sock.settimeout(None)
    return sock


class ApiForwarder:
    """127.0.0.1:PORT in the root namespace → ``addr`` in namespace ``ns`` (the head's REST API), one
    thread per connection. Nothing listens off loopback; upstream sockets live inside the bed."""

    def __init__(self, ns: str, addr: tuple[str, int]) -> None:
        self.ns = ns
        self.addr = addr
        self.port = free_port()
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.listener.settimeout(0.2)
        self.stopping = threading.Event()
        self.socks: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._accept, name="netbed-forwarder", daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="netbed-forward", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            up = connect_in(self.ns, self.addr, timeout=5)
        except OSError:
            conn.close()
            return
        with self.lock:
            self.socks |= {conn, up}
        sel = selectors.DefaultSelector()
        peer = {conn: up, up: conn}
        sel.register(conn, selectors.EVENT_READ)
        sel.register(up, selectors.EVENT_READ)
        try:
            while not self.stopping.is_set():
                for key, _ in sel.select(0.5):
                    src: socket.socket = key.fileobj  # type: ignore[assignment]
                    data = src.recv(1 << 16)
                    if not data:
                        return
                    peer[src].sendall(data)
        except OSError:
            pass
        finally:
            sel.close()
            with self.lock:
                self.socks -= {conn, up}
            for s in (conn, up):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self.stopping.set()
        self.listener.close()
        with self.lock:
            socks = list(self.socks)
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self.thread.join(timeout=5)


# ---- the bed ------------------------------------------------------------------------------------
@dataclass
class Host:
    """One "machine": a network namespace with one veth (``eth0``) on the bed's switch."""

    name: str  # "head", "p1", ...
    ns: str
    addr: str
    port: str  # the switch side of its veth, in the switch namespace
    proc: subprocess.Popen[bytes] | None = None
    extra: list[subprocess.Popen[bytes]] = field(default_factory=list)  # its delaying proxy
    rate_bit: int | None = None
    loss_pct: float = 0.0
    partitioned: bool = False
    plugged: bool = True

    @property
    def provider_name(self) -> str:
        return f"nb-{self.name}"


def _tbf_burst(rate_bit: int) -> int:
    """Bucket size: ~4 ms at the rate, at least 128 KiB (GSO packets of 64 KiB must fit)."""
    return max(128 * 1024, rate_bit // 8 // 250)


class NetBed:
    """A head and ``providers`` provider hosts, each in its own network namespace (module docstring).

    ``with NetBed(3) as bed:`` builds the namespaces, starts the head and the providers and waits until
    they are ready; ``bed.client()`` is a :class:`Client` on the head (through the forwarder)."""

    def __init__(self, providers: int = 3, *, heartbeat: float = 0.5, threads: int = 1,
                 head_args: Sequence[str] = (), provider_args: Sequence[str] = (), quiet: bool = True) -> None:
        self.n_providers = providers
        self.heartbeat = heartbeat
        self.threads = threads
        self.head_args = list(head_args)
        self.provider_args = list(provider_args)
        self.quiet = quiet
        self.tag = f"{PREFIX}{os.getpid()}"
        self.switch = f"{self.tag}-sw"
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.tag}-"))
        self.state_dir = self.dir / "head-state"
        self.state_dir.mkdir(mode=0o700)  # also the providers' mount point of an empty tmpfs
        self.hosts: dict[str, Host] = {}
        self.forwarder: ApiForwarder | None = None
        self._logs: list[IO[bytes]] = []
        self._clients: list[Client] = []
        self._iptables = "iptables"
        self.env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    "DCF_HEAD_URL": "", "DCF_API_TOKEN": "", "DCF_STATE_DIR": ""}

    # ---- life cycle ---------------------------------------------------------------------------
    def __enter__(self) -> NetBed:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 120.0) -> NetBed:
        try:
            remove_leftovers()
            self._build()
            self.start_head(timeout)
            for i in range(1, self.n_providers + 1):
                self.add_provider(f"p{i}")
            self.wait_ready(self.n_providers, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _build(self) -> None:
        if self.switch in _namespaces():
            self._delete_namespaces()
        _run("ip", "netns", "add", self.switch)
        _run("ip", "-n", self.switch, "link", "set", "lo", "up")
        _run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.switch, "link", "set", "br0", "up")
        self._add_host("head", HEAD_ADDR)
        iptables = _iptables_binary(self.hosts["head"].ns)
        if iptables is None:
            raise NetBedUnavailable("iptables does not work inside a network namespace")
        self._iptables = iptables

    def _add_host(self, name: str, addr: str) -> Host:
        host = Host(name=name, ns=f"{self.tag}-{name}", addr=addr, port=f"s-{name}")
        self.hosts[name] = host
        _run("ip", "netns", "add", host.ns)
        _run("ip", "-n", host.ns, "link", "set", "lo", "up")
        # created in the switch namespace, its peer moved straight into the host's: never in the root one
        _run("ip", "-n", self.switch, "link", "add", host.port, "type", "veth", "peer", "name", "eth0",
             "netns", host.ns)
        _run("ip", "-n", self.switch, "link", "set", host.port, "master", "br0", "up")
        _run("ip", "-n", host.ns, "addr", "add", f"{addr}/24", "dev", "eth0")
        _run("ip", "-n", host.ns, "link", "set", "eth0", "up")
        return host

    def _spawn(self, host: Host, cmd: list[str], log_name: str, hide_head_state: bool) -> subprocess.Popen[bytes]:
        out: Any = None
        if self.quiet:
            out = open(self.dir / f"{log_name}.log", "ab")  # noqa: SIM115 (closed in stop)
            self._logs.append(out)
        workdir = self.dir / host.name
        workdir.mkdir(exist_ok=True)
        env = {**self.env, "HOME": str(workdir), "TMPDIR": str(workdir)}
        if hide_head_state:  # its own mount namespace (ip netns exec): the head's state dir is an empty tmpfs
            script = f"mount -t tmpfs -o size=1m,mode=0700 dcfnb {self.state_dir} && exec \"$@\""
            cmd = ["sh", "-c", script, "sh", *cmd]
        return subprocess.Popen(["ip", "netns", "exec", host.ns, *cmd], stdout=out, stderr=out, env=env,
                                cwd=workdir)

    def start_head(self, timeout: float = 60.0) -> None:
        head = self.hosts["head"]
        args = ["-m", "head_node", "--host", HEAD_ADDR, "--http-port", str(HTTP_PORT), "--state-dir",
                str(self.state_dir), "--registration-port", str(HEAD_PORTS["registration"]),
                "--task-port", str(HEAD_PORTS["task"]), "--result-port", str(HEAD_PORTS["result"]),
                "--rendezvous-port", str(HEAD_PORTS["rendezvous"]), "--heartbeat-interval", str(self.heartbeat),
                "--insecure", *self.head_args]
        head.proc = self._spawn(head, [sys.executable, *args], "head", hide_head_state=False)
        if self.forwarder is None:
            self.forwarder = ApiForwarder(head.ns, (HEAD_ADDR, HTTP_PORT))
        self._wait(lambda c: bool(c.health()), timeout, "the head did not come up", head.proc)

    def add_provider(self, name: str, *extra: str, delay: float = 0.0) -> Host:
        """Start provider host ``name`` (``p4``, ...): its namespace (if new) and its provider process.
        ``delay``: seconds of one-way delay on each of its connections to the head, by a user-space proxy
        in its own namespace (on its own address, the head's port numbers: gloo's route stays right)."""
        host = self.hosts.get(name)
        if host is None:
            index = int(name[1:]) if name[1:].isdigit() else len(self.hosts)
            host = self._add_host(name, f"{SUBNET}.{10 + index}")
        head_host = HEAD_ADDR
        if delay > 0:
            ports = ",".join(str(p) for p in HEAD_PORTS.values())
            proxy = [sys.executable, "-m", "tests.netbed.delayproxy", "--listen", host.addr, "--target", HEAD_ADDR,
                     "--ports", ports, "--delay", str(delay)]
            host.extra.append(self._spawn(host, proxy, f"delayproxy-{name}", hide_head_state=True))
            head_host = host.addr
            self._wait_port(host, (host.addr, HEAD_PORTS["registration"]), 30)
        args = ["-m", "provider_node", "--head", head_host, "--threads", str(self.threads), "--name",
                host.provider_name, "--heartbeat-interval", str(self.heartbeat),
                "--registration-port", str(HEAD_PORTS["registration"]), "--task-port", str(HEAD_PORTS["task"]),
                "--result-port", str(HEAD_PORTS["result"]), *self.provider_args, *extra]
        host.proc = self._spawn(host, [sys.executable, *args], f"provider-{name}", hide_head_state=True)
        return host

    def stop_provider(self, name: str) -> None:
        host = self.hosts[name]
        for p in [host.proc, *host.extra]:
            if p is not None:
                terminate([p])
        host.proc, host.extra = None, []

    def stop(self) -> None:
        """End everything this bed started and delete its namespaces and files (safe to call twice)."""
        for c in self._clients:
            with contextlib.suppress(Exception):
                c.close()
        self._clients.clear()
        head = self.hosts.get("head")
        head_proc = head.proc if head is not None else None
        # the providers first (they leave cleanly while the head still answers), then the head
        terminate([p for h in self.hosts.values() for p in [h.proc, *h.extra] if p is not None and p is not head_proc])
        if head_proc is not None:
            terminate([head_proc])
        for h in self.hosts.values():
            h.proc, h.extra = None, []
        if self.forwarder is not None:
            self.forwarder.close()
            self.forwarder = None
        self._delete_namespaces()
        for f in self._logs:
            f.close()
        self._logs.clear()
        if KEEP:
            print(f"netbed: logs kept in {self.dir}", file=sys.stderr)
        else:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _delete_namespaces(self) -> None:
        mine = [ns for ns in _namespaces() if ns.startswith(f"{self.tag}-")]
        for ns in mine:
            _kill_ns_processes(ns)
        for ns in mine:
            _run("ip", "netns", "del", ns, check=False)
        self.hosts.clear()

    # ---- waiting ------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        assert self.forwarder is not None, "the bed is not started"
        return f"http://127.0.0.1:{self.forwarder.port}"

    def client(self, **kw: Any) -> Client:
        """A Client on the head's REST API (closed by ``stop``)."""
        c = Client(self.url, **{"timeout": 60.0, **kw})
        self._clients.append(c)
        return c

    def _wait(self, probe: Callable[[Client], bool], timeout: float, what: str,
              proc: subprocess.Popen[bytes] | None = None) -> None:
        poll_head(self.url, probe, timeout, what, proc=proc, context=lambda: "\n" + self.log_tail("head"))

    def _wait_port(self, host: Host, addr: tuple[str, int], timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with contextlib.suppress(OSError):
                connect_in(host.ns, addr, timeout=1).close()
                return
            time.sleep(0.1)
        raise TimeoutError(f"nothing listens on {addr} in {host.ns} after {timeout:.0f}s")

    def states(self) -> dict[str, set[str]]:
        """Provider name → the states of its rows in GET /v1/nodes (a re-registered provider has several)."""
        with Client(self.url, timeout=10, reconnect_wait=0) as c:
            out: dict[str, set[str]] = {}
            for row in c.nodes():
                out.setdefault(row["name"], set()).add(row["state"])
            return out

    def wait_ready(self, count: int, timeout: float = 120.0) -> None:
        names = {h.provider_name for n, h in self.hosts.items() if n != "head" and h.proc is not None}

        def ready(c: Client) -> bool:
            rows = [n for n in c.nodes() if n["state"] == "ready" and n["name"] in names]
            return len({n["name"] for n in rows}) >= count
        self._wait(ready, timeout, f"{count} providers did not become ready")

    def wait_state(self, name: str, states: set[str], timeout: float = 60.0) -> float:
        """Wait until provider host ``name`` has a row in one of ``states``; the seconds it took."""
        t0 = time.monotonic()
        prov = self.hosts[name].provider_name
        self._wait(lambda c: any(r["name"] == prov and r["state"] in states for r in c.nodes()), timeout,
                   f"{prov} to be {'/'.join(sorted(states))}")
        return time.monotonic() - t0

    # ---- links --------------------------------------------------------------------------------
    def _host(self, host: str | Host) -> Host:
        return host if isinstance(host, Host) else self.hosts[host]

    def shape(self, host: str | Host, rate_bit: int | None) -> None:
        """Both directions of ``host``'s link at ``rate_bit`` bits/s (tbf on each end of its veth);
        None: unshaped."""
        h = self._host(host)
        for ns, dev in ((self.switch, h.port), (h.ns, "eth0")):
            if rate_bit is None:
                _run("tc", "-n", ns, "qdisc", "del", "dev", dev, "root", check=False)
            else:
                _run("tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{rate_bit}bit",
                     "burst", str(_tbf_burst(rate_bit)), "latency", "100ms")
        h.rate_bit = rate_bit

    def _ipt(self, h: Host, *args: str) -> None:
        _run("ip", "netns", "exec", h.ns, self._iptables, *args)

    def loss(self, host: str | Host, pct: float) -> None:
        """Drop ``pct`` % of the packets ``host`` sends and of those it receives (iptables statistic); 0: none."""
        h = self._host(host)
        for chain in ("INPUT", "OUTPUT"):
            if h.loss_pct:
                self._ipt(h, "-D", chain, "-m", "statistic", "--mode", "random", "--probability",
                          f"{h.loss_pct / 100:.6f}", "-j", "DROP")
            if pct:
                self._ipt(h, "-A", chain, "-m", "statistic", "--mode", "random", "--probability",
                          f"{pct / 100:.6f}", "-j", "DROP")
        h.loss_pct = pct

    def partition(self, host: str | Host) -> None:
        """Drop every packet to and from ``host`` on its bed address (iptables DROP; the link stays up)."""
        h = self._host(host)
        if not h.partitioned:
            for chain, flag in (("INPUT", "-s"), ("OUTPUT", "-d")):
                self._ipt(h, "-I", chain, flag, f"{SUBNET}.0/24", "-j", "DROP")
            h.partitioned = True

    def heal(self, host: str | Host) -> None:
        h = self._host(host)
        if h.partitioned:
            for chain, flag in (("INPUT", "-s"), ("OUTPUT", "-d")):
                self._ipt(h, "-D", chain, flag, f"{SUBNET}.0/24", "-j", "DROP")
            h.partitioned = False

    def unplug(self, host: str | Host) -> None:
        """Pull ``host``'s cable: its switch port goes down (the host sees NO-CARRIER; no process is touched)."""
        h = self._host(host)
        _run("ip", "-n", self.switch, "link", "set", h.port, "down")
        h.plugged = False

    def plug(self, host: str | Host) -> None:
        h = self._host(host)
        _run("ip", "-n", self.switch, "link", "set", h.port, "up")
        h.plugged = True

    def carrier(self, host: str | Host) -> bool:
        """Whether ``host`` sees a carrier on its eth0."""
        h = self._host(host)
        info = json.loads(_run("ip", "-j", "-n", h.ns, "link", "show", "eth0").stdout)
        return "NO-CARRIER" not in info[0]["flags"]

    def link_bytes(self, host: str | Host) -> dict[str, int]:
        """Bytes the switch has sent to ``host`` (``to_host``) and received from it (``from_host``) on its
        link so far, Ethernet frames (headers included)."""
        h = self._host(host)
        info = json.loads(_run("ip", "-j", "-s", "-n", self.switch, "link", "show", h.port).stdout)
        stats = info[0]["stats64"]
        return {"to_host": int(stats["tx"]["bytes"]), "from_host": int(stats["rx"]["bytes"])}

    def exec(self, host: str | Host, *cmd: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a command on ``host`` (in its namespace), e.g. ``bed.exec("head", ".venv/bin/dcf", "nodes")``."""
        h = self._host(host)
        return subprocess.run(["ip", "netns", "exec", h.ns, *cmd], capture_output=True, text=True,
                              timeout=timeout, env={**self.env, "DCF_HEAD_URL": f"http://{HEAD_ADDR}:{HTTP_PORT}"},
                              cwd=ROOT)

    def client_cmd(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """The ``dcf`` CLI, run on the head's host against the head's bed address."""
        return self.exec("head", sys.executable, "-m", "user_client", *args, timeout=timeout)

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.dir / f"{name}.log"
        try:
            return f"--- {path.name} (last {chars} chars) ---\n" + path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def log_text(self, name: str) -> str:
        try:
            return (self.dir / f"{name}.log").read_text(errors="replace")
        except OSError:
            return ""

    def providers(self) -> list[Host]:
        return [h for n, h in self.hosts.items() if n != "head"]

    @contextlib.contextmanager
    def unplugged(self, host: str | Host) -> Iterator[Host]:
        self.unplug(host)
        try:
            yield self._host(host)
        finally:
            self.plug(host)

