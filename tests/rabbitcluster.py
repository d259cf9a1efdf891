"""A RabbitMQ cluster of its own for a test: ``size`` nodes on this machine, each with its own node name, AMQP
and distribution ports (on 127.0.0.1 only) and data dir, joined into one cluster. Nodes can be killed
(SIGKILL to the Erlang VM) and started again with their data, rejoining the cluster.

Needs root (``rabbitmq-server`` switches to the ``rabbitmq`` user, whose Erlang cookie every node and
``rabbitmqctl`` then share) and the Debian ``rabbitmq-server`` package. The machine's own broker
(rabbit@localhost, port 5672) is left alone: the nodes read this module's config and env files, never
/etc/rabbitmq's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from user_client.local import free_ports

SERVER = "/usr/sbin/rabbitmq-server"
CTL = "/usr/sbin/rabbitmqctl"


def unavailable() -> str | None:
    """Why a cluster cannot be started here; None if it can."""
    if not (os.path.exists(SERVER) and os.path.exists(CTL)):
        return "rabbitmq-server is not installed"
    if os.geteuid() != 0:
        return "starting RabbitMQ nodes needs root (rabbitmq-server switches to the rabbitmq user)"
    return None


@dataclass
class Node:
    name: str  # e.g. dcfq1a2b3c@localhost
    port: int  # AMQP, on 127.0.0.1
    dist_port: int  # Erlang distribution, on 127.0.0.1
    home: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def pid_file(self) -> Path:
        return self.home / "pid"

    def env(self) -> dict[str, str]:
        return {**os.environ,
                "RABBITMQ_NODENAME": self.name, "RABBITMQ_NODE_PORT": str(self.port),
                "RABBITMQ_DIST_PORT": str(self.dist_port),
                "RABBITMQ_CONF_ENV_FILE": str(self.home / "rabbitmq-env.conf"),
                "RABBITMQ_CONFIG_FILE": str(self.home / "rabbitmq.conf"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.home / "enabled_plugins"),
                "RABBITMQ_MNESIA_BASE": str(self.home / "mnesia"), "RABBITMQ_LOG_BASE": str(self.home / "log"),
                "RABBITMQ_PID_FILE": str(self.pid_file),
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}"}


class RabbitCluster:
    def __init__(self, size: int = 3) -> None:
        # the nodes run as the rabbitmq user: their files live in a folder of theirs in /tmp (a test's tmp_path
        # is root's only), removed by ``stop``
        self.root = Path(tempfile.mkdtemp(prefix="dcf-rabbit-"))
        shutil.chown(self.root, "rabbitmq", "rabbitmq")
        tag = uuid.uuid4().hex[:6]
        ports = free_ports(2 * size)
        self.nodes = [Node(f"dcfq{i}{tag}@localhost", ports[2 * i], ports[2 * i + 1], self.root / f"node{i}")
                      for i in range(size)]

    @property
    def urls(self) -> str:
        """Every node's URL, comma-separated: what ``--amqp-url`` takes."""
        return ",".join(n.url for n in self.nodes)

    def ctl(self, node: Node, *args: str, timeout: float = 60.0) -> str:
        out = subprocess.run([CTL, "-q", "-n", node.name, *args], capture_output=True, text=True, timeout=timeout)
        if out.returncode != 0:
            raise RuntimeError(f"rabbitmqctl -n {node.name} {' '.join(args)}: {out.stderr.strip() or out.stdout}")
        return out.stdout

    def _write_files(self, node: Node) -> None:
        node.home.mkdir(parents=True, exist_ok=True)
        (node.home / "rabbitmq-env.conf").write_text("ERL_EPMD_ADDRESS=127.0.0.1\n")
        (node.home / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{node.port}\n"
                                                 "cluster_partition_handling = pause_minority\n")
        (node.home / "enabled_plugins").write_text("[].\n")
        shutil.chown(node.home, "rabbitmq", "rabbitmq")
        for path in node.home.rglob("*"):
            shutil.chown(path, "rabbitmq", "rabbitmq")

    def start_node(self, node: Node, timeout: float = 90.0) -> None:
        """Start (or start again, with its data) one node and wait until it serves."""
        self._write_files(node)
        node.pid_file.unlink(missing_ok=True)
        log = open(node.home / "server.out", "ab")  # noqa: SIM115 (the node keeps it)
        node.proc = subprocess.Popen([SERVER], env=node.env(), stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        end = time.monotonic() + timeout
        while True:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self.ctl(node, "await_startup", "--timeout", "30", timeout=40)
                return
            if node.proc.poll() is not None or time.monotonic() > end:
                tail = (node.home / "server.out").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"RabbitMQ node {node.name} did not start:\n{tail}")
            time.sleep(1)

    def start(self) -> RabbitCluster:
        """Every node, the others joined to the first."""
        first = self.nodes[0]
        self.start_node(first)
        for node in self.nodes[1:]:
            self.start_node(node)
            self.ctl(node, "stop_app")
            self.ctl(node, "join_cluster", first.name)
            self.ctl(node, "start_app")
        self.wait_members(len(self.nodes))
        return self

    def running_members(self, via: Node) -> list[str]:
        out = self.ctl(via, "cluster_status", "--formatter", "json")
        import json

        return list(json.loads(out).get("running_nodes", []))

    def wait_members(self, count: int, timeout: float = 60.0) -> None:
        end = time.monotonic() + timeout
        alive = [n for n in self.nodes if n.proc is not None and n.proc.poll() is None]
        while time.monotonic() < end:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired, ValueError):
                if len(self.running_members(alive[0])) >= count:
                    return
            time.sleep(0.5)
        raise RuntimeError(f"the cluster did not reach {count} running nodes")

    def kill(self, node: Node) -> None:
        """kill -9 of the node's Erlang VM (its pid file), then of what is left of its process group."""
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.kill(int(node.pid_file.read_text().strip()), signal.SIGKILL)
        if node.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.proc.wait(10)
        self._kill_strays(node)

    @staticmethod
    def _kill_strays(node: Node) -> None:
        """The VM runs in the session ``su`` made, outside the process group: find it by the node name in its
        environment."""
        mark = f"RABBITMQ_NODENAME={node.name}".encode()
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            with contextlib.suppress(OSError, ProcessLookupError):
                if mark in (proc / "environ").read_bytes().split(b"\0"):
                    os.kill(int(proc.name), signal.SIGKILL)

    def stop(self) -> None:
        for node in self.nodes:
            self.kill(node)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> RabbitCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
