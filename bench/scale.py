#!/usr/bin/env python3
"""Benchmark: how one head scales with the number of providers.

    .venv/bin/python bench/scale.py [--sizes 10,100,500] [--duration 20] [--procs 4] [--repeats 5]
                                    [--heartbeat 1.0] [--quick] [--profile DIR]

For each N it starts a fresh head (``python -m head_node``: embedded store, loopback ports only, a
temporary state dir, ``--heartbeat-interval 1``) and N simulated providers that speak the real
protocol (docs/PROTOCOL.md) from a few worker processes. Each simulated provider has its own DEALER
acting as a REQ (it sends the empty delimiter frame itself) for register and heartbeat, its own SUB
subscribed to its provider id, and its own PUSH for ack and result; one worker runs all of its
providers on one ZeroMQ context with one poller. Frames are built and parsed by common/protocol.py.
The providers compute their matmul subtasks for real (numpy) and answer ``ack`` then ``result``.

Measured, per N:
  * registration: wall time from sending the N ``register`` requests (sockets opened and connected at
    that moment, as a starting provider does) to all N ``ready`` in GET /v1/nodes;
  * head CPU per heartbeat: the head process's CPU time (user + system, all its threads) over
    --duration seconds of N providers heartbeating every --heartbeat seconds, as % of one core and
    as µs per answered heartbeat; beside it the head's idle CPU, measured before any provider came;
  * overhead per subtask: the median end-to-end time (upload, submit, wait, download) of one matmul
    job (A: N*8 x 64, B: 64 x 64, float64) split over the N providers (``nodes=N``: N subtasks of
    8 rows) against the same job on 1 provider (``nodes=1``), both checked against numpy:
    (t_N - t_1) / N. The head's own time (job started to finished) is shown too.

Prints one table, the curve over N (is each per-unit cost flat, i.e. the total linear?), and last
one JSON line. Targets: 500 providers at 1 s heartbeats cost the head <= 10 % of one core; a job over
100 providers adds <= 1 ms per subtask. With --profile DIR, py-spy (if installed) records the head
during the heartbeat window and the jobs into DIR (collapsed stacks, then ``--svg`` flame graphs are
easy to make from them). Not a test: nothing here fails on a timing (tests/integration/
test_scale_bench.py runs ``--quick`` as a smoke test). Every process it starts runs in a session of
its own and is killed with its process group when the run ends, whatever happens.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import queue
import random
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import zmq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import __version__, protocol  # noqa: E402
from common.errors import DcfError  # noqa: E402
from common.tasks import wire  # noqa: E402

HOST = "127.0.0.1"
ROWS_PER_PROVIDER = 8
K = 64
N_COLS = 64
REQUEST_TIMEOUT_S = 2.5  # Lazy Pirate: a request unanswered this long is sent again on a new socket
CONTROL_MAX_MESSAGE = 1 << 20  # the control REQ's ZMQ_MAXMSGSIZE (PROTOCOL.md §1)
LOOP_WAKEUP_S = 0.5
MEMORY_BYTES = 1 << 30
#: what each simulated provider claims. Low on purpose: the head gives a job only as many providers as keep
#: each share at least rows.MIN_SHARE_SECONDS of work at the claimed speed, and the job here is small
#: (N*8 rows); at 0.01 GFLOP/s every 8-row share is worth its own subtask, so the job spans all N
GFLOPS = 0.01
#: targets of issue 10, item 6
CPU_TARGET_N, CPU_TARGET_PCT = 500, 10.0
OVERHEAD_TARGET_N, OVERHEAD_TARGET_MS = 100, 1.0


# ==== the simulated providers (one worker process runs many) ========================================
@dataclass(eq=False)
class SimProvider:
    """One simulated provider: its id, its three sockets and where its session stands."""

    index: int
    name: str
    pid: str = field(default_factory=lambda: uuid.uuid4().hex)
    dealer: zmq.Socket | None = None
    sub: zmq.Socket | None = None
    push: zmq.Socket | None = None
    registered: bool = False
    interval: float = 0.0
    next_heartbeat: float = math.inf
    pending: str | None = None  # the request in flight (register / heartbeat), None when idle
    sent_at: float = 0.0
    register_at: float = math.inf  # when to (re-)register, if not registered
    backoff: float = 1.0

    @property
    def topic(self) -> bytes:
        return self.pid.encode()


class Worker:
    """Runs ``count`` simulated providers on one context and one poller; obeys commands on stdin
    (``go``: open the sockets and register; ``stats``: print the counters; ``stop``) and answers each
    with one JSON line on stdout."""

    def __init__(self, ports: dict[str, int], count: int, worker: int, seed: int) -> None:
        self.ports = ports
        self.ctx = zmq.Context()
        self.ctx.setsockopt(zmq.MAX_SOCKETS, 3 * count + 64)
        self.providers = [SimProvider(i, f"sim-{worker}-{i}") for i in range(count)]
        self.owner: dict[zmq.Socket, SimProvider] = {}
        self.poller = zmq.Poller()
        self.stdin = sys.stdin.fileno()
        self.poller.register(self.stdin, zmq.POLLIN)
        self.rng = random.Random(seed)
        self.counts: Counter[str] = Counter()
        self.stopping = False
        self.inbox = b""
        self.host = socket.gethostname()
        self.os = f"{platform.system()} {platform.release()}"

    def endpoint(self, port: str) -> str:
        return f"tcp://{HOST}:{self.ports[port]}"

    # ---- sockets and requests -----------------------------------------------------------------
    def _dealer(self, p: SimProvider) -> None:
        if p.dealer is not None:
            self.poller.unregister(p.dealer)
            del self.owner[p.dealer]
            p.dealer.close(linger=0)
        dealer = self.ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.MAXMSGSIZE, CONTROL_MAX_MESSAGE)
        dealer.connect(self.endpoint("registration"))
        p.dealer = dealer
        self.owner[dealer] = p
        self.poller.register(dealer, zmq.POLLIN)

    def open(self, p: SimProvider) -> None:
        """What a starting provider does (PROTOCOL.md §6 step 1): SUB to its topic, PUSH, then REQ."""
        sub = self.ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 1000)
        sub.connect(self.endpoint("task"))
        sub.setsockopt(zmq.SUBSCRIBE, p.topic)
        push = self.ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(self.endpoint("result"))
        p.sub, p.push = sub, push
        self.owner[sub] = p
        self.poller.register(sub, zmq.POLLIN)
        self._dealer(p)

    def request(self, p: SimProvider, kind: str, now: float) -> None:
        if kind == "register":
            frames = protocol.encode("register", {
                "provider_id": p.pid, "name": p.name, "host": self.host, "os": self.os, "device_kind": "cpu",
                "device_name": "simulated", "memory_bytes": MEMORY_BYTES, "cores": 1, "task_types": ["matmul"],
                "dtypes": ["float32", "float64"], "version": __version__, "gflops": GFLOPS})
        else:
            frames = protocol.encode("heartbeat", {"provider_id": p.pid, "running": [], "queued": 0})
        assert p.dealer is not None
        p.dealer.send_multipart([b"", *frames])  # the REQ envelope's empty delimiter, sent by hand
        p.pending, p.sent_at = kind, now
        self.counts[f"{kind}_sent"] += 1

    def on_reply(self, p: SimProvider, frames: list[bytes], now: float) -> None:
        if len(frames) != 2 or frames[0] != b"":
            self.counts["bad_replies"] += 1
            return
        try:
            msg = protocol.decode(frames[1:], max_bytes=0)
        except DcfError:
            self.counts["bad_replies"] += 1
            return
        p.pending = None
        if msg.type == "registered":
            first = not p.registered
            p.registered, p.backoff = True, 1.0
            p.interval = float(msg["heartbeat_interval_s"])
            # providers start at different times: the first heartbeat at a random phase of the interval
            p.next_heartbeat = now + (self.rng.uniform(0.05, 1.0) * p.interval if first else p.interval)
            self.counts["registered"] += 1
        elif msg.type == "heartbeat_ack":
            self.counts["heartbeat_acked"] += 1
        elif msg.type == "error":  # §6 step 4: not registered any more
            self.counts[f"error_{msg['code']}"] += 1
            p.registered = False
            p.next_heartbeat = math.inf
            if msg["code"] == "unknown_provider":
                p.register_at, p.backoff = now, 1.0
            else:
                p.register_at, p.backoff = now + p.backoff, min(60.0, p.backoff * 2)

    # ---- subtasks ---------------------------------------------------------------------------------
    def on_subtask(self, p: SimProvider, frames: list[zmq.Frame]) -> None:
        if frames[0].bytes != p.topic:
            self.counts["wrong_topic"] += 1
            return
        try:
            msg = protocol.decode(frames[1:], expect=protocol.TASK_CHANNEL_TYPES)
        except DcfError:
            self.counts["bad_subtasks"] += 1
            return  # dropped without an ack: the head re-sends after its ack timeout
        if msg.type == "cancel":  # a simulated subtask runs to its end at once: nothing queued to drop
            self.counts["cancels"] += 1
            return
        key = {"job_id": msg["job_id"], "subtask": msg["subtask"], "attempt": msg["attempt"],
               "epoch": msg["epoch"], "provider_id": p.pid}
        self.send(p, protocol.encode("ack", key))
        self.counts["subtasks"] += 1
        if msg["task_type"] != "matmul":
            self.send(p, protocol.encode("failed", {**key, "error": f"unknown task type {msg['task_type']!r:.40}",
                                                    "retryable": True}))
            return
        t0 = time.perf_counter()
        try:
            params = protocol.check_fields("matmul subtask params", msg["params"], wire.ROWS)
            a, b = msg.arrays
            if a.ndim != 2 or b.ndim != 2 or a.shape != (params["rows"], b.shape[0]) or a.dtype != b.dtype:
                raise ValueError(f"operands {a.dtype}{list(a.shape)} and {b.dtype}{list(b.shape)} do not fit "
                                 f"{params['rows']} rows")
            c = np.matmul(a, b)
        except DcfError as exc:  # params that do not fit the schema: another attempt cannot succeed
            self.send(p, protocol.encode("failed", {**key, "error": exc.message[:500], "retryable": False}))
            return
        except Exception as exc:
            self.send(p, protocol.encode("failed", {**key, "error": f"{type(exc).__name__}: {exc}"[:500],
                                                    "retryable": True}))
            return
        elapsed = time.perf_counter() - t0
        stats = {"nonfinite": int(c.size - np.count_nonzero(np.isfinite(c))), "device": "cpu"}
        self.send(p, protocol.encode("result", {**key, "elapsed_s": elapsed, "stats": stats}, [c]))
        self.counts["results"] += 1

    def send(self, p: SimProvider, frames: list[Any]) -> None:
        assert p.push is not None
        try:
            p.push.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:  # no connection yet: dropped, the head's timers re-send
            self.counts["push_dropped"] += 1

    # ---- the loop ---------------------------------------------------------------------------------
    def due(self, now: float) -> float:
        """Send what is due (heartbeats, re-registrations, Lazy Pirate re-sends); the next deadline."""
        nxt = now + LOOP_WAKEUP_S
        for p in self.providers:
            if p.dealer is None:
                continue
            if p.pending is not None:
                if now - p.sent_at >= REQUEST_TIMEOUT_S:  # reply lost: new socket, same request
                    self.counts["timeouts"] += 1
                    self._dealer(p)
                    self.request(p, p.pending, now)
                nxt = min(nxt, p.sent_at + REQUEST_TIMEOUT_S)
            elif p.registered:
                if now >= p.next_heartbeat:
                    self.request(p, "heartbeat", now)
                    p.next_heartbeat = max(p.next_heartbeat + p.interval, now)
                else:
                    nxt = min(nxt, p.next_heartbeat)
            elif now >= p.register_at:
                self.request(p, "register", now)
            else:
                nxt = min(nxt, p.register_at)
        return nxt

    def command(self, line: str) -> None:
        cmd = line.strip()
        if cmd == "go":
            t0 = time.monotonic()
            for p in self.providers:
                self.open(p)
                self.request(p, "register", time.monotonic())
            self.reply({"went": len(self.providers), "open_s": time.monotonic() - t0})
        elif cmd == "stats":
            self.reply(dict(self.counts))
        elif cmd == "stop":
            self.stopping = True

    def read_commands(self) -> None:
        chunk = os.read(self.stdin, 4096)
        if not chunk:  # end of stdin: the bench went away
            self.stopping = True
            return
        self.inbox += chunk
        while b"\n" in self.inbox:
            line, self.inbox = self.inbox.split(b"\n", 1)
            self.command(line.decode())

    @staticmethod
    def reply(data: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(data) + "\n")
        sys.stdout.flush()

    def run(self) -> None:
        self.reply({"up": len(self.providers)})
        try:
            nxt = time.monotonic()
            while not self.stopping:
                wait_ms = max(0, int((nxt - time.monotonic()) * 1000) + 1)
                for sock, _ in self.poller.poll(wait_ms):
                    if sock == self.stdin:
                        self.read_commands()
                        continue
                    self.drain(sock)
                nxt = self.due(time.monotonic())
        finally:
            self.ctx.destroy(linger=0)

    def drain(self, sock: zmq.Socket) -> None:
        p = self.owner.get(sock)
        if p is None:
            return
        for _ in range(1000):  # bounded: other sockets get their turn
            try:
                if sock is p.sub:
                    self.on_subtask(p, sock.recv_multipart(flags=zmq.NOBLOCK, copy=False))
                else:
                    self.on_reply(p, sock.recv_multipart(flags=zmq.NOBLOCK), time.monotonic())
            except zmq.Again:
                return


def worker_main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", type=int, required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--ports", required=True, help="registration,task,result")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    reg, task, result = (int(x) for x in args.ports.split(","))
    Worker({"registration": reg, "task": task, "result": result}, args.count, args.worker, args.seed).run()


# ==== the bench's side: processes ====================================================================
def raise_fd_limit() -> None:
    """Each provider holds three connections: lift the soft limit on open files to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else 1 << 20, hard))


def free_ports(count: int) -> list[int]:
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind((HOST, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def kill_group(proc: subprocess.Popen[Any], grace: float = 5.0) -> None:
    """SIGTERM the process's group (it leads a session of its own), SIGKILL what is left after ``grace``."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # also anything the leader left behind in its group
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)


def clean_env() -> dict[str, str]:
    """This environment without DCF_* settings: the head gets everything from its flags."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCF_")}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


class WorkerProc:
    """One worker process and a thread that reads its JSON lines."""

    def __init__(self, index: int, count: int, ports: list[int], log: IO[bytes]) -> None:
        self.count = count
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", str(index), "--count", str(count),
             "--ports", ",".join(map(str, ports)), "--seed", str(index)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=clean_env(), cwd=ROOT,
            start_new_session=True)
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with contextlib.suppress(ValueError):
                self.lines.put(json.loads(raw))
        self.lines.put(None)

    def send(self, cmd: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd.encode() + b"\n")
        self.proc.stdin.flush()

    def answer(self, timeout: float) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"worker {self.proc.pid} did not answer within {timeout:.0f} s") from None
        if line is None:
            raise RuntimeError(f"worker {self.proc.pid} exited with code {self.proc.wait()}")
        return line

    def stop(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.send("stop")
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=3)
        kill_group(self.proc, grace=2)
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                if stream is not None:
                    stream.close()


def stats_of(workers: list[WorkerProc]) -> Counter[str]:
    for w in workers:
        w.send("stats")
    total: Counter[str] = Counter()
    for w in workers:
        total.update(w.answer(30))
    return total


def _stat_times(path: str) -> tuple[str, float, float]:
    """(comm, utime s, stime s) of a /proc/.../stat file."""
    with open(path) as f:
        text = f.read()
    comm = text[text.index("(") + 1:text.rindex(")")]
    fields = text.rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return comm, int(fields[11]) / tick, int(fields[12]) / tick


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all its threads), from /proc/PID/stat."""
    _, user, system = _stat_times(f"/proc/{pid}/stat")
    return user + system


def cpu_by_thread(pid: int) -> dict[str, float]:
    """CPU seconds of the process by kind: ``user``, ``sys`` and per thread name (``main`` for the
    Python main thread; libzmq's I/O thread is ``ZMQbg/IO/0``)."""
    _, user, system = _stat_times(f"/proc/{pid}/stat")
    out: dict[str, float] = {"user": user, "sys": system}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError, ValueError):
                comm, u, s = _stat_times(f"/proc/{pid}/task/{tid}/stat")
                name = "main" if int(tid) == pid else f"thread {comm}"
                out[name] = out.get(name, 0.0) + u + s
    return out


def cpu_split(before: dict[str, float], after: dict[str, float], wall: float) -> dict[str, float]:
    """% of one core by kind over ``wall`` seconds (threads that came or went count from 0)."""
    return {k: round(100 * (after[k] - before.get(k, 0.0)) / wall, 2) for k in after}


class Profiler:
    """py-spy recording the head, when --profile is given and py-spy is installed."""

    def __init__(self, directory: Path | None, pid: int, log: IO[bytes], native: bool = False) -> None:
        self.directory = directory
        self.native = native  # C frames too (libzmq, uvloop); py-spy then pauses the head for each sample
        self.pid = pid
        self.log = log
        self.exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, name: str) -> None:
        if self.directory is None or not Path(self.exe).exists():
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [self.exe, "record", "--pid", str(self.pid), "--rate", "200", "--format", "raw", "--threads",
             *(["--native"] if self.native else ["--nonblocking"]), "-o", str(self.directory / f"{name}.txt")],
            stdout=self.log, stderr=self.log, start_new_session=True)
        time.sleep(0.5)  # it attaches

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its file on Ctrl-C
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            kill_group(self.proc, grace=1)
        self.proc = None


# ==== one size ======================================================================================
@dataclass
class Result:
    n: int
    procs: int
    registration_s: float = math.nan
    #: the slowest worker's time to open its providers' sockets and send their registers
    sockets_open_s: float = math.nan
    #: one GET /v1/nodes with N providers, ms (median of 5)
    get_nodes_ms: float = math.nan
    idle_cpu_pct: float = math.nan
    head_cpu_pct: float = math.nan
    heartbeats: int = 0
    heartbeats_per_s: float = math.nan
    us_per_heartbeat: float = math.nan
    t1_s: float = math.nan
    tn_s: float = math.nan
    head_t1_s: float = math.nan
    head_tn_s: float = math.nan
    overhead_ms_per_subtask: float = math.nan
    providers_used: int = 0
    #: the heartbeat window's head CPU by kind (user, sys) and by thread, % of one core
    head_cpu_split_pct: dict[str, float] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in self.__dict__.items():
            out[k] = None if isinstance(v, float) and not math.isfinite(v) else (round(v, 6) if isinstance(v, float)
                                                                                 else v)
        return out


def wait_for(probe: Any, timeout: float, what: str, poll: float, proc: subprocess.Popen[Any]) -> float:
    t0 = time.monotonic()
    end = t0 + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{what}: the head exited with code {proc.returncode}")
        with contextlib.suppress(DcfError):
            if probe():
                return time.monotonic() - t0
        time.sleep(poll)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def one_job(client: Any, a: np.ndarray, b: np.ndarray, nodes: int) -> tuple[float, float, int]:
    """(seconds end to end, seconds on the head from start to finish, providers that computed it)."""
    t0 = time.perf_counter()
    job = client.submit_matmul(a, b, nodes=nodes)
    view = client.wait(job, timeout=120)
    c = client.result(job)
    elapsed = time.perf_counter() - t0
    client.delete(job)
    if not np.allclose(c, a @ b, rtol=1e-10, atol=1e-10):
        raise RuntimeError(f"job {job} on {nodes} providers: the result differs from numpy")
    head_s = float(view["finished_at"]) - float(view["started_at"])
    return elapsed, head_s, len(view.get("shares") or {})


def run_size(n: int, args: argparse.Namespace, tmp: Path) -> Result:
    procs = max(1, min(args.procs, n))
    res = Result(n, procs)
    ports = free_ports(4)
    http_port, reg, task, result = ports
    state = tmp / f"n{n}"
    state.mkdir()
    log = open(tmp / f"n{n}.log", "ab")  # noqa: SIM115 (closed in the finally below)
    head: subprocess.Popen[bytes] | None = None
    workers: list[WorkerProc] = []
    profiler: Profiler | None = None
    from user_client import Client

    try:
        head = subprocess.Popen(
            [sys.executable, "-m", "head_node", "--host", HOST, "--http-port", str(http_port), "--state-dir",
             str(state), "--registration-port", str(reg), "--task-port", str(task), "--result-port", str(result),
             "--heartbeat-interval", str(args.heartbeat), "--insecure"],  # loopback; simulated providers: no keys
            stdout=log, stderr=log, env=clean_env(), cwd=ROOT, start_new_session=True)
        hp = head
        with Client(f"http://{HOST}:{http_port}", timeout=60) as client:
            wait_for(client.health, 60, "the head to come up", 0.05, hp)
            profiler = Profiler(args.profile, hp.pid, log, args.profile_native)
            # the head's CPU with nobody connected
            c0, w0 = cpu_seconds(hp.pid), time.monotonic()
            time.sleep(args.idle)
            res.idle_cpu_pct = 100 * (cpu_seconds(hp.pid) - c0) / (time.monotonic() - w0)

            counts = [n // procs + (1 if i < n % procs else 0) for i in range(procs)]
            workers = [WorkerProc(i, c, [reg, task, result], log) for i, c in enumerate(counts)]
            for w in workers:
                w.answer(60)  # up
            # ---- registration
            profiler.start(f"registration-n{n}")
            t0 = time.monotonic()
            for w in workers:
                w.send("go")

            def all_ready() -> bool:
                return sum(1 for row in client.nodes() if row["state"] == "ready") >= n

            wait_for(all_ready, args.register_timeout, f"{n} providers to be ready", 0.05, hp)
            res.registration_s = time.monotonic() - t0
            profiler.stop()
            res.sockets_open_s = max(float(w.answer(30)["open_s"]) for w in workers)
            nodes_ms = []
            for _ in range(5):  # what one GET /v1/nodes costs with N providers (the poll above)
                t = time.perf_counter()
                client.nodes()
                nodes_ms.append(1e3 * (time.perf_counter() - t))
            res.get_nodes_ms = statistics.median(nodes_ms)
            # ---- heartbeats: nothing else talks to the head in this window
            time.sleep(args.heartbeat * 1.5)  # every provider past its first (random-phase) heartbeat
            profiler.start(f"heartbeats-n{n}")
            s0 = time.monotonic()
            before = stats_of(workers)
            s0 = (s0 + time.monotonic()) / 2  # the counters' window runs from mid-call to mid-call
            c0, w0, split0 = cpu_seconds(hp.pid), time.monotonic(), cpu_by_thread(hp.pid)
            time.sleep(args.duration)
            c1, w1, split1 = cpu_seconds(hp.pid), time.monotonic(), cpu_by_thread(hp.pid)
            s1 = time.monotonic()
            after = stats_of(workers)
            s1 = (s1 + time.monotonic()) / 2
            res.head_cpu_split_pct = cpu_split(split0, split1, w1 - w0)
            profiler.stop()
            res.heartbeats = after["heartbeat_acked"] - before["heartbeat_acked"]
            res.heartbeats_per_s = res.heartbeats / (s1 - s0)
            res.head_cpu_pct = 100 * (c1 - c0) / (w1 - w0)
            if res.heartbeats:
                res.us_per_heartbeat = 1e4 * res.head_cpu_pct / res.heartbeats_per_s
            # ---- one job over N providers against the same job on 1
            rng = np.random.default_rng(n)
            a = rng.standard_normal((n * ROWS_PER_PROVIDER, K))
            b = rng.standard_normal((K, N_COLS))
            one_job(client, a, b, n)  # warm-up: the head's first job imports and opens what it needs
            one_job(client, a, b, 1)
            profiler.start(f"jobs-n{n}")
            t1s: list[tuple[float, float, int]] = []
            tns: list[tuple[float, float, int]] = []
            for _ in range(args.repeats):  # interleaved, so drift hits both alike
                t1s.append(one_job(client, a, b, 1))
                tns.append(one_job(client, a, b, n))
            profiler.stop()
            res.t1_s = statistics.median(t for t, _, _ in t1s)
            res.tn_s = statistics.median(t for t, _, _ in tns)
            res.head_t1_s = statistics.median(h for _, h, _ in t1s)
            res.head_tn_s = statistics.median(h for _, h, _ in tns)
            res.providers_used = min(u for _, _, u in tns)
            res.overhead_ms_per_subtask = 1e3 * (res.tn_s - res.t1_s) / n
            final = stats_of(workers)
            res.errors = {k: v for k, v in sorted(final.items())
                          if k.startswith(("error_", "bad_", "timeouts", "push_dropped", "wrong_topic"))}
        return res
    finally:
        if profiler is not None:
            profiler.stop()
        if head is not None:
            kill_group(head)
        for w in workers:
            w.stop()
        log.close()


# ==== report =========================================================================================
def fmt(v: float, spec: str) -> str:
    return "-" if not math.isfinite(v) else format(v, spec)


def table(results: list[Result], heartbeat: float) -> list[str]:
    head = (f"{'N':>5} {'procs':>5} {'register s':>10} {'GET nodes ms':>12} {'idle %':>7} {'head CPU %':>10} "
            f"{'hb/s':>7} {'us/hb':>7} {'t_1 ms':>8} {'t_N ms':>8} {'head t_N ms':>11} {'ms/subtask':>10} {'used':>5}")
    out = [f"head CPU at {heartbeat:g} s heartbeats; (t_N - t_1) / N per subtask; medians of the repeats", head,
           "-" * len(head)]
    for r in results:
        out.append(f"{r.n:>5} {r.procs:>5} {fmt(r.registration_s, '.3f'):>10} {fmt(r.get_nodes_ms, '.1f'):>12} "
                   f"{fmt(r.idle_cpu_pct, '.2f'):>7} "
                   f"{fmt(r.head_cpu_pct, '.2f'):>10} {fmt(r.heartbeats_per_s, '.1f'):>7} "
                   f"{fmt(r.us_per_heartbeat, '.1f'):>7} {fmt(1e3 * r.t1_s, '.1f'):>8} {fmt(1e3 * r.tn_s, '.1f'):>8} "
                   f"{fmt(1e3 * r.head_tn_s, '.1f'):>11} {fmt(r.overhead_ms_per_subtask, '.3f'):>10} "
                   f"{r.providers_used:>5}")
    for r in results:
        if r.head_cpu_split_pct:
            parts = ", ".join(f"{k} {v:.2f}" for k, v in r.head_cpu_split_pct.items() if v or k in ("user", "sys"))
            out.append(f"  N={r.n}: head CPU in the heartbeat window, % of one core: {parts}; sockets opened and "
                       f"registers sent in {fmt(r.sockets_open_s, '.3f')} s"
                       + (f"; provider-side errors: {r.errors}" if r.errors else ""))
    return out


#: name -> (what it is, unit of its slope, the total as a function of one result, noise floor of a slope)
CURVES: dict[str, tuple[str, str, Any, float]] = {
    "registration": ("registration time", "ms per provider", lambda r: 1e3 * r.registration_s, 0.5),
    "heartbeat_cpu": ("head CPU while heartbeating, less its idle CPU",
                      "us of CPU per s per provider (= per heartbeat at 1 s)",
                      lambda r: 1e4 * (r.head_cpu_pct - r.idle_cpu_pct), 50.0),
    "job_head": ("head time of the job, N providers less 1", "ms per subtask",
                 lambda r: 1e3 * (r.head_tn_s - r.head_t1_s), 0.2),
    "job_end_to_end": ("end-to-end time of the job, N providers less 1", "ms per subtask",
                       lambda r: 1e3 * (r.tn_s - r.t1_s), 0.2),
}


def growth(results: list[Result]) -> dict[str, Any]:
    """Each total over N and its marginal cost (slope) between neighbouring sizes. The total grows
    linearly when the slope stays flat: the last one at most 2x the first (or under a noise floor).
    With two sizes only, the slope from 0 to the first size stands in for the first slope."""
    if len(results) < 2:
        return {}
    out: dict[str, Any] = {}
    for name, (what, unit, total, floor) in CURVES.items():
        ys = [float(total(r)) for r in results]
        if not all(math.isfinite(y) for y in ys):
            continue
        xs = [0, *(r.n for r in results)] if len(results) == 2 else [r.n for r in results]
        ys = [0.0, *ys] if len(results) == 2 else ys
        slopes = [(ys[i + 1] - ys[i]) / (xs[i + 1] - xs[i]) for i in range(len(xs) - 1)]
        first, last = slopes[0], slopes[-1]
        out[name] = {"what": what, "unit": unit, "n": [r.n for r in results],
                     "totals": [round(float(total(r)), 3) for r in results],
                     "slopes": [round(v, 4) for v in slopes],
                     "linear": last <= max(2 * first, floor)}
    return out


def targets(results: list[Result]) -> dict[str, Any]:
    by_n = {r.n: r for r in results}
    cpu = by_n.get(CPU_TARGET_N)
    over = by_n.get(OVERHEAD_TARGET_N)
    return {
        "cpu_500_at_1s_le_10pct": (None if cpu is None or not math.isfinite(cpu.head_cpu_pct)
                                   else cpu.head_cpu_pct <= CPU_TARGET_PCT),
        "overhead_100_le_1ms_per_subtask": (None if over is None or not math.isfinite(over.overhead_ms_per_subtask)
                                            else over.overhead_ms_per_subtask <= OVERHEAD_TARGET_MS),
    }


def plot(results: list[Result], path: Path) -> str | None:
    """A PNG of the per-unit costs over N, only if matplotlib is already installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ns = [r.n for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, ys, label in ((axes[0], [r.registration_s for r in results], "registration s"),
                          (axes[1], [r.head_cpu_pct for r in results], "head CPU % at 1 s heartbeats"),
                          (axes[2], [r.overhead_ms_per_subtask for r in results], "ms per subtask")):
        ax.plot(ns, ys, "o-")
        ax.set_xlabel("providers")
        ax.set_title(label)
    fig.tight_layout()
    fig.savefig(path)
    return str(path)


def parse_sizes(text: str) -> list[int]:
    sizes = sorted({int(x) for x in text.replace(" ", "").split(",") if x})
    if not sizes or sizes[0] < 1:
        raise argparse.ArgumentTypeError("sizes: a comma-separated list of positive ints")
    return sizes


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker_main(argv)
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=parse_sizes, default=[10, 100, 500], help="provider counts (10,100,500)")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of the heartbeat CPU window (20)")
    ap.add_argument("--heartbeat", type=float, default=1.0, help="the head's heartbeat interval, s (1)")
    ap.add_argument("--procs", type=int, default=4, help="worker processes for the simulated providers (4)")
    ap.add_argument("--repeats", type=int, default=5, help="timed jobs per kind and size; the median (5)")
    ap.add_argument("--idle", type=float, default=3.0, help="seconds of the idle-head CPU baseline (3)")
    ap.add_argument("--register-timeout", type=float, default=180.0, help="seconds to wait for all ready")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 2 s window, 1 repeat, 0.5 s idle")
    ap.add_argument("--profile", type=Path, default=None, help="record the head with py-spy into this folder")
    ap.add_argument("--profile-native", action="store_true", help="with --profile: C frames too (slows the head)")
    ap.add_argument("--plot", type=Path, default=None, help="PNG of the curve (only if matplotlib is installed)")
    args = ap.parse_args(argv)
    if args.quick:
        args.duration, args.repeats, args.idle = min(args.duration, 2.0), 1, min(args.idle, 0.5)
    raise_fd_limit()
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="dcf-scale-") as tmp:
        try:
            for n in args.sizes:
                print(f"N={n}: ...", file=sys.stderr, flush=True)
                results.append(run_size(n, args, Path(tmp)))
        except BaseException:
            for name in sorted(os.listdir(tmp)):  # the processes' logs, for whoever reads the failure
                if name.endswith(".log"):
                    text = (Path(tmp) / name).read_text(errors="replace")
                    print(f"---- {name} (last lines)\n" + "\n".join(text.splitlines()[-30:]), file=sys.stderr)
            raise
    lines = table(results, args.heartbeat)
    g = growth(results)
    t = targets(results)
    lines.append("")
    if g:
        lines.append("curve over N (totals; marginal cost between neighbouring sizes):")
    for v in g.values():
        totals = ", ".join(f"{t:g}" for t in v["totals"])
        slopes = " -> ".join(f"{x:.3g}" for x in v["slopes"])
        lines.append(f"  {v['what']} at N={','.join(map(str, v['n']))}: {totals}; marginal {slopes} {v['unit']}: "
                     f"{'linear' if v['linear'] else 'grows faster than linear'}")
    lines.append(f"target: {CPU_TARGET_N} providers at 1 s heartbeats <= {CPU_TARGET_PCT:g} % of one core: "
                 + {True: "met", False: "NOT met", None: "not measured"}[t["cpu_500_at_1s_le_10pct"]])
    lines.append(f"target: a job over {OVERHEAD_TARGET_N} providers adds <= {OVERHEAD_TARGET_MS:g} ms per subtask: "
                 + {True: "met", False: "NOT met", None: "not measured"}[t["overhead_100_le_1ms_per_subtask"]])
    png = plot(results, args.plot) if args.plot is not None and len(results) > 1 else None
    if png:
        lines.append(f"plot: {png}")
    print("\n".join(lines))
    print(json.dumps({"bench": "scale", "heartbeat_s": args.heartbeat, "duration_s": args.duration,
                      "repeats": args.repeats, "sizes": [r.n for r in results],
                      "results": [r.as_dict() for r in results], "growth": g, "targets": t}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
