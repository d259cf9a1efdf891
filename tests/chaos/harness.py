"""Chaos tooling shared by tests/chaos and bench/soak.py: the figures collector, waiting and checking
helpers, a watcher of the head's events that survives head restarts, a slow-link TCP proxy and
RabbitMQ broker control. Nothing here asserts on its own except the ``check_*`` helpers, which record
the outcome in the figures first and then raise ``AssertionError``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlparse, urlunparse

import httpx
import numpy as np

from common.errors import DcfError
from tests.conftest import amqp_reachable
from tests.linkpipe import delayed_pipe
from user_client import Client
from user_client.local import LocalCluster, free_port

#: every random choice of the chaos suite derives from this seed (DCF_CHAOS_SEED to replay a run)
SEED = int(os.environ.get("DCF_CHAOS_SEED", "20261122"))
RABBITMQ_API = os.environ.get("DCF_TEST_RABBITMQ_API", "http://127.0.0.1:15672")
RABBITMQ_AUTH = ("guest", "guest")


# ---- figures ------------------------------------------------------------------------------------
@dataclass
class Figures:
    """What a chaos run measured. ``jobs_lost`` and ``wrong_results`` must stay 0."""

    seed: int = SEED
    seed_from: str = "DCF_CHAOS_SEED"
    jobs_run: int = 0
    jobs_lost: int = 0
    wrong_results: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    #: (seconds from kill -9 to the head listing the provider as dead, the target for that heartbeat)
    detections: list[tuple[float, float]] = field(default_factory=list)
    #: other durations worth reporting, by name (head recovery, broker reconnect, ...)
    timings: dict[str, list[float]] = field(default_factory=dict)
    #: other counts worth reporting, by name (results verified, wrong results caught, attempts refused, ...)
    counts: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def fault(self, kind: str) -> None:
        self.faults[kind] += 1

    def job(self, outcome: str) -> None:
        """outcome: ok, lost (an accepted job that never completed) or wrong (a result that differs)."""
        self.jobs_run += 1
        if outcome == "lost":
            self.jobs_lost += 1
        elif outcome == "wrong":
            self.wrong_results += 1

    def detected(self, seconds: float, heartbeat: float) -> None:
        self.detections.append((seconds, 3 * heartbeat + 1.0))

    def timing(self, name: str, seconds: float) -> None:
        self.timings.setdefault(name, []).append(seconds)

    def count(self, name: str, n: int = 1) -> None:
        self.counts[name] += n

    @property
    def empty(self) -> bool:
        return not (self.jobs_run or self.faults)

    def as_dict(self) -> dict[str, Any]:
        det = [d for d, _ in self.detections]
        return {
            "seed": self.seed, "wall_s": round(time.monotonic() - self.started, 1), "jobs_run": self.jobs_run,
            "faults": dict(self.faults), "faults_total": sum(self.faults.values()), "jobs_lost": self.jobs_lost,
            "wrong_results": self.wrong_results,
            "detection_s": {"n": len(det), "max": round(max(det), 3) if det else None,
                            "median": round(statistics.median(det), 3) if det else None,
                            "target_max": round(max(t for _, t in self.detections), 3) if det else None,
                            "over_target": sum(1 for d, t in self.detections if d > t)},
            "timings_s": {k: {"n": len(v), "max": round(max(v), 3), "median": round(statistics.median(v), 3)}
                          for k, v in sorted(self.timings.items())},
            "counts": dict(sorted(self.counts.items())),
            "notes": self.notes,
        }

    def lines(self) -> list[str]:
        d = self.as_dict()
        rows: list[tuple[str, str, str]] = [
            ("jobs run", str(d["jobs_run"]), ""),
            ("faults injected", str(d["faults_total"]), ""),
        ]
        rows += [(f"  {kind}", str(n), "") for kind, n in sorted(self.faults.items())]
        rows += [("jobs lost", str(d["jobs_lost"]), "must be 0" + ("" if not d["jobs_lost"] else "  << FAIL")),
                 ("wrong results", str(d["wrong_results"]),
                  "must be 0" + ("" if not d["wrong_results"] else "  << FAIL"))]
        det = d["detection_s"]
        if det["n"]:
            ok = "" if not det["over_target"] else f"  << {det['over_target']} over target"
            rows += [(f"dead-provider detection, max (n={det['n']})", f"{det['max']:.2f} s",
                      f"<= {det['target_max']:.2f} s (3 heartbeat intervals + 1 s){ok}"),
                     ("dead-provider detection, median", f"{det['median']:.2f} s", "")]
        else:
            rows.append(("dead-provider detection", "not measured", ""))
        for name, t in d["timings_s"].items():
            rows.append((f"{name} (max / median, n={t['n']})", f"{t['max']:.2f} / {t['median']:.2f} s", ""))
        rows += [(name, str(n), "") for name, n in d["counts"].items()]
        width = max(len(r[0]) for r in rows)
        vwidth = max(len(r[1]) for r in rows)
        out = [f"seed {self.seed} ({self.seed_from}), {d['wall_s']:.0f} s"]
        out += [f"{a.ljust(width)}  {b.rjust(vwidth)}  {c}".rstrip() for a, b, c in rows]
        out += [f"note: {n}" for n in self.notes]
        return out

    def dump(self, path: str | os.PathLike[str] | None = None) -> None:
        """Write the figures as JSON to ``path`` (default: $DCF_CHAOS_FIGURES, if set)."""
        path = path or os.environ.get("DCF_CHAOS_FIGURES")
        if path:
            with open(path, "w") as f:
                json.dump(self.as_dict(), f, indent=2)


# ---- waiting and checking -----------------------------------------------------------------------
def wait_for(pred: Callable[[], Any], timeout: float, what: str, poll: float = 0.05) -> float:
    """Poll ``pred`` until it is true; the seconds it took. Errors of an unreachable head count as false."""
    t0 = time.monotonic()
    while True:
        try:
            if pred():
                return time.monotonic() - t0
        except DcfError:
            pass
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)


def operands(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.standard_normal((n, n)), rng.standard_normal((n, n))


def node(client: Client, name: str) -> dict[str, Any] | None:
    for row in client.nodes():
        if row["name"] == name:
            return row
    return None


def provider_name(index: int) -> str:
    """The name LocalCluster.add_provider gives its provider number ``index``."""
    return f"local-{index}"


def live_providers(cluster: LocalCluster) -> list[int]:
    return [i for i, p in enumerate(cluster.providers) if p.poll() is None]


def ready_providers(cluster: LocalCluster, client: Client) -> list[int]:
    """Providers whose process runs and whom the head lists as ready (a victim the head knows about)."""
    ready = {row["name"] for row in client.nodes() if row["state"] == "ready"}
    return [i for i in live_providers(cluster) if provider_name(i) in ready]


def kill_provider(cluster: LocalCluster, index: int) -> float:
    """kill -9 one provider; returns the monotonic time of the kill."""
    proc = cluster.providers[index]
    t = time.monotonic()
    proc.kill()
    proc.wait()
    return t


def measure_detection(client: Client, name: str, t_kill: float, heartbeat: float, figures: Figures,
                      timeout: float = 30.0) -> float:
    """Poll GET /v1/nodes until the head lists ``name`` as dead; record and return the seconds since the kill."""
    def dead() -> bool:
        row = node(client, name)
        return row is not None and row["state"] == "dead"
    wait_for(dead, timeout, f"the head to mark {name} dead", poll=0.02)
    seconds = time.monotonic() - t_kill
    figures.detected(seconds, heartbeat)
    return seconds


@dataclass
class MatmulJob:
    job_id: str
    a: np.ndarray
    b: np.ndarray


def submit_matmul(client: Client, rng: np.random.Generator, n: int) -> MatmulJob:
    a, b = operands(rng, n)
    return MatmulJob(client.submit_matmul(a, b), a, b)


def check_matmul(client: Client, job: MatmulJob, figures: Figures, timeout: float = 90.0) -> dict[str, Any]:
    """Wait for an accepted job; count it as ok, lost (not done in time) or wrong; raise if not ok."""
    try:
        view = client.wait(job.job_id, timeout=timeout)
    except (TimeoutError, DcfError) as exc:
        figures.job("lost")
        raise AssertionError(f"job {job.job_id} did not complete: {exc}") from None
    got = np.array(client.result(job.job_id))
    if got.shape != (job.a.shape[0], job.b.shape[1]) or not np.allclose(got, job.a @ job.b, rtol=1e-9,
                                                                          atol=1e-9):
        figures.job("wrong")
        raise AssertionError(f"job {job.job_id}: the result differs from numpy")
    figures.job("ok")
    return view


def appears_once(client: Client, job_ids: list[str]) -> None:
    """Every job is listed exactly once by GET /v1/jobs, and done."""
    listed = Counter(j["job_id"] for j in client.jobs(limit=10_000))
    states = {j["job_id"]: j["state"] for j in client.jobs(limit=10_000)}
    wrong = {j: listed[j] for j in job_ids if listed[j] != 1}
    assert not wrong, f"jobs not listed exactly once: {wrong}"
    not_done = {j: states[j] for j in job_ids if states[j] != "done"}
    assert not not_done, f"jobs listed but not done: {not_done}"


# ---- the head's events, across head restarts ----------------------------------------------------
class EventWatcher:
    """Follows GET /v1/stream in a thread and reconnects after a head restart. Each head process numbers
    its events from 1, so an event is identified by (head epoch, seq); on every (re)connection the first
    message's recent events fill what happened while disconnected."""

    def __init__(self, url: str, period: float = 1.0) -> None:
        self.url = url
        self.period = period
        self.events: dict[tuple[str, int], dict[str, Any]] = {}
        self.lock = threading.Lock()
        self.stop_flag = threading.Event()
        self.thread = threading.Thread(target=self._run, name="event-watcher", daemon=True)
        self.connections = 0

    def __enter__(self) -> EventWatcher:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.stop_flag.set()
        self.thread.join(timeout=10)

    def _run(self) -> None:
        while not self.stop_flag.is_set():
            try:
                with httpx.Client(timeout=httpx.Timeout(5.0, read=max(5.0, 3 * self.period)),
                                  trust_env=False) as http, \
                        http.stream("GET", f"{self.url}/v1/stream", params={"period": self.period}) as resp:
                    if resp.status_code != 200:
                        raise httpx.TransportError(f"HTTP {resp.status_code}")
                    self.connections += 1
                    self._read(resp)
            except (httpx.HTTPError, json.JSONDecodeError, KeyError):
                pass
            self.stop_flag.wait(0.05)

    def _read(self, resp: httpx.Response) -> None:
        epoch = ""
        name, data = "", ""
        for line in resp.iter_lines():
            if self.stop_flag.is_set():
                return
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data += line[5:].strip()
            elif not line and data:
                msg = json.loads(data)
                if name == "snapshot":
                    epoch = msg["snapshot"]["epoch"]
                    for ev in msg.get("recent_events", []):
                        self._add(epoch, ev)
                elif name == "event" and epoch:
                    self._add(epoch, msg)
                name, data = "", ""

    def _add(self, epoch: str, ev: dict[str, Any]) -> None:
        with self.lock:
            self.events.setdefault((epoch, int(ev["seq"])), {**ev, "epoch": epoch})

    def count(self, kind: str) -> Counter[str]:
        with self.lock:
            return Counter(e.get("job_id", "") for e in self.events.values() if e["kind"] == kind)

    def kinds(self, job_id: str) -> list[str]:
        with self.lock:
            return [e["kind"] for _, e in sorted(self.events.items(), key=lambda kv: kv[1]["ts"])
                    if e.get("job_id") == job_id]

    def node_lost(self, name: str, after: float = 0.0) -> dict[str, Any] | None:
        """The first ``node.lost`` event of the provider called ``name`` stamped at or after ``after``
        (the head's wall clock, ``time.time()`` on this machine); None while there is none."""
        with self.lock:
            lost = sorted((e for e in self.events.values() if e["kind"] == "node.lost" and e.get("name") == name
                           and e["ts"] >= after), key=lambda e: e["ts"])
        return lost[0] if lost else None


# ---- RabbitMQ -----------------------------------------------------------------------------------
def _rabbitmqctl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("rabbitmqctl")
    if exe is None:
        raise FileNotFoundError("rabbitmqctl")
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=timeout)


def rabbitmqctl_problem() -> str | None:
    """None if rabbitmqctl can control the local broker, else why not."""
    if shutil.which("rabbitmqctl") is None:
        return "rabbitmqctl is not installed"
    try:
        out = _rabbitmqctl("-q", "eval", "rabbit:is_running().", timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"rabbitmqctl failed: {exc}"
    if out.returncode != 0:
        return f"rabbitmqctl cannot reach the node ({out.returncode}): {(out.stderr or out.stdout).strip()[:200]}"
    return None


def broker_stop() -> subprocess.Popen[str]:
    """Start ``rabbitmqctl stop_app`` (it takes several seconds; the port closes early) and return it."""
    exe = shutil.which("rabbitmqctl")
    if exe is None:
        raise FileNotFoundError("rabbitmqctl")
    return subprocess.Popen([exe, "stop_app"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def broker_running() -> bool:
    """The RabbitMQ application is running (not only the Erlang node) and 5672 accepts connections."""
    try:
        out = _rabbitmqctl("-q", "eval", "rabbit:is_running().", timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.stdout.strip() == "true" and amqp_reachable()


def broker_start(timeout: float = 90.0) -> float:
    """start_app, then wait until the app is running and port 5672 accepts connections; the seconds it took."""
    t0 = time.monotonic()
    out = _rabbitmqctl("start_app", timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"rabbitmqctl start_app failed: {out.stderr.strip()[:300]}")
    _rabbitmqctl("await_startup", timeout=timeout)
    wait_for(broker_running, timeout, "the RabbitMQ app to run and accept connections on 5672", poll=0.2)
    return time.monotonic() - t0


def broker_queue_counts(name: str = "dcf.jobs", vhost: str = "/") -> tuple[int, int] | None:
    """(messages ready, messages unacknowledged) of a queue, live from rabbitmqctl; None if unknown."""
    out = _rabbitmqctl("-q", "list_queues", "-p", vhost, "name", "messages_ready", "messages_unacknowledged",
                       timeout=30)
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == name and parts[1].isdigit() and parts[2].isdigit():
            return int(parts[1]), int(parts[2])
    return None


class EventTap:
    """A queue bound to the ``dcf.events`` topic exchange of ``vhost`` (management API): it collects the job
    events every head publishes there, across head restarts."""

    def __init__(self, name: str, vhost: str = "/", routing_key: str = "job.#") -> None:
        self.name = name
        self.vhost = quote(vhost, safe="")
        self.http = httpx.Client(base_url=f"{RABBITMQ_API}/api", auth=RABBITMQ_AUTH, timeout=10, trust_env=False)
        self.messages: list[dict[str, Any]] = []
        v = self.vhost
        self.http.put(f"/exchanges/{v}/dcf.events", json={"type": "topic", "durable": True}).raise_for_status()
        self.http.put(f"/queues/{v}/{name}", json={"durable": False, "auto_delete": False}).raise_for_status()
        self.http.post(f"/bindings/{v}/e/dcf.events/q/{name}", json={"routing_key": routing_key}).raise_for_status()

    def drain(self) -> list[dict[str, Any]]:
        while True:
            got = self.http.post(f"/queues/{self.vhost}/{self.name}/get",
                                 json={"count": 500, "ackmode": "ack_requeue_false", "encoding": "auto"})
            got.raise_for_status()
            batch = got.json()
            for m in batch:
                self.messages.append({**json.loads(m["payload"]), "routing_key": m["routing_key"]})
            if len(batch) < 500:
                return self.messages

    def count(self, kind: str) -> Counter[str]:
        self.drain()
        return Counter(m.get("job_id", "") for m in self.messages if m["kind"] == kind)

    def close(self) -> None:
        with contextlib.suppress(httpx.HTTPError):
            self.http.delete(f"/queues/{self.vhost}/{self.name}")
        self.http.close()


def management_problem() -> str | None:
    try:
        with httpx.Client(timeout=5, trust_env=False) as http:
            http.get(f"{RABBITMQ_API}/api/overview", auth=RABBITMQ_AUTH).raise_for_status()
    except httpx.HTTPError as exc:
        return f"RabbitMQ management API not reachable at {RABBITMQ_API}: {exc}"
    return None


@contextlib.contextmanager
def private_vhost(url: str, name: str) -> Iterator[str]:
    """A RabbitMQ vhost of its own for the duration (management API): every head on a broker consumes the
    queue ``dcf.jobs`` of its vhost, so a head of another test run or deployment on the same vhost would take
    jobs it cannot serve (their operands live in another state dir). Yields ``url`` pointing at the vhost."""
    user = urlparse(url).username or "guest"
    vhost = quote(name, safe="")
    with httpx.Client(base_url=f"{RABBITMQ_API}/api", auth=RABBITMQ_AUTH, timeout=15, trust_env=False) as http:
        http.put(f"/vhosts/{vhost}").raise_for_status()
        http.put(f"/permissions/{vhost}/{quote(user, safe='')}",
                 json={"configure": ".*", "write": ".*", "read": ".*"}).raise_for_status()
        try:
            yield urlunparse(urlparse(url)._replace(path="/" + vhost))
        finally:
            with contextlib.suppress(httpx.HTTPError):
                http.delete(f"/vhosts/{vhost}")


def vhost_of(url: str) -> str:
    path = urlparse(url).path
    return path[1:] if len(path) > 1 else "/"


# ---- a slow link --------------------------------------------------------------------------------
class SlowLink:
    """An asyncio TCP proxy on its own thread: each port in ``targets`` gets a local listening port that
    forwards to 127.0.0.1:target. Both directions behave like a link of ``rate`` bytes/s with ``latency``
    seconds of one-way delay (bytes are queued, never dropped, and keep their order)."""

    def __init__(self, targets: dict[str, int], latency: float = 0.02, rate: float = 20e6) -> None:
        self.targets = targets
        self.latency = latency
        self.rate = rate
        self.ports = {name: free_port() for name in targets}
        self.bytes = Counter[str]()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="slow-link", daemon=True)
        self.servers: list[asyncio.base_events.Server] = []
        self.writers: set[asyncio.StreamWriter] = set()
        self.by_link: dict[str, set[asyncio.StreamWriter]] = {name: set() for name in targets}

    def __enter__(self) -> SlowLink:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> dict[str, int]:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self.loop).result(10)
        return self.ports

    def provider_args(self) -> list[str]:
        return ["--registration-port", str(self.ports["registration"]), "--task-port", str(self.ports["task"]),
                "--result-port", str(self.ports["result"])]

    def cut(self, name: str) -> int:
        """Close every open connection of the link ``name`` at both ends (each peer sees the TCP connection
        end, as in a transient network fault); new connections are forwarded again at once. How many."""
        async def close_all() -> int:
            writers = list(self.by_link[name])
            for w in writers:
                w.close()
            return len(writers) // 2

        return asyncio.run_coroutine_threadsafe(close_all(), self.loop).result(10)

    def stop(self) -> None:
        if not self.thread.is_alive():
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        if not self.thread.is_alive():
            self.loop.close()

    async def _shutdown(self) -> None:
        for server in self.servers:
            server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for w in list(self.writers):
            w.close()

    async def _listen(self) -> None:
        for name, target in self.targets.items():
            async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                             name: str = name, target: int = target) -> None:
                with contextlib.suppress(asyncio.CancelledError):  # stop(): end quietly
                    await self._connection(name, target, reader, writer)
            self.servers.append(await asyncio.start_server(accept, "127.0.0.1", self.ports[name]))

    async def _connection(self, name: str, target: int, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            writer.close()
            return
        self.writers |= {writer, up_writer}
        self.by_link[name] |= {writer, up_writer}
        try:
            await asyncio.gather(self._pipe(name, reader, up_writer), self._pipe(name, up_reader, writer))
        finally:
            for w in (writer, up_writer):
                self.writers.discard(w)
                self.by_link[name].discard(w)
                w.close()

    async def _pipe(self, name: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        def counted(n: int) -> None:
            self.bytes[name] += n
        await delayed_pipe(reader, writer, self.latency, self.rate, counted)
