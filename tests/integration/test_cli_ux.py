"""What a new user meets first at the ``dcf`` CLI (issue 11): the real CLI in a subprocess against a
real head over loopback."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

from tests.conftest import ROOT
from user_client import Client
from user_client.local import LocalCluster, free_port

pytestmark = pytest.mark.integration

PLUGIN = ["--plugins", "tests.plugins.buggy"]
DEAD_URL = "http://127.0.0.1:9"  # nothing listens there: a command that used it would exit 3


def dcf(*args: str, url: str | None = DEAD_URL, timeout: float = 120,
        stdout: int | None = None) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess; DCF_HEAD_URL is ``url`` (by default a dead one: the tests give
    ``--head`` themselves where they mean the head to be found)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCF_")}
    if url:
        env["DCF_HEAD_URL"] = url
    return subprocess.run([sys.executable, "-m", "user_client", *args], env=env, timeout=timeout, cwd=ROOT,
                          text=True, stdout=stdout if stdout is not None else subprocess.PIPE,
                          stderr=subprocess.PIPE)


def popen(*args: str, url: str, **kw: object) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DCF_")} | {"DCF_HEAD_URL": url}
    return subprocess.Popen([sys.executable, "-m", "user_client", *args], env=env, cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)  # type: ignore[call-overload]


def wait_for(probe: object, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if probe():  # type: ignore[operator]
            return
        time.sleep(0.05)
    pytest.fail(f"{what} within {timeout:.0f}s")


@pytest.fixture(scope="module")
def fast() -> Iterator[LocalCluster]:
    """A head and 2 providers that compute at once (and know the buggy task type, to fail a job)."""
    with LocalCluster(2, heartbeat=0.5, threads=1, head_args=PLUGIN, provider_args=PLUGIN) as cl:
        yield cl


@pytest.fixture(scope="module")
def done_job(fast: LocalCluster) -> str:
    with Client(fast.url) as c:
        job = c.submit_matmul(np.eye(4), np.ones((4, 3)))
        c.wait(job, timeout=60)
        return job


# ---- item 3: options go anywhere; plain dcf; --version; --head without a scheme -------------------
def test_shared_options_go_before_or_after_the_command(fast: LocalCluster, done_job: str) -> None:
    for args in (("nodes", "--json", "--head", fast.url), ("--json", "nodes", "--head", fast.url),
                 ("--head", fast.url, "nodes", "--json"), ("--json", "--head", fast.url, "nodes")):
        r = dcf(*args)
        assert r.returncode == 0, (args, r.stderr)
        assert len(json.loads(r.stdout)) == 2, args
    r = dcf("status", done_job, "--json", "--head", fast.url)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["state"] == "done"
    r = dcf("jobs", "--head", fast.url)  # text: a table naming the job
    assert r.returncode == 0 and done_job in r.stdout, r.stderr
    # an option given before the command is not overwritten by the command's copy of it
    r = dcf("--head", fast.url, "--json", "jobs", "--limit", "5")
    assert r.returncode == 0 and isinstance(json.loads(r.stdout), list), r.stderr


def test_head_without_a_scheme_means_http(fast: LocalCluster) -> None:
    r = dcf("nodes", "--head", f"127.0.0.1:{fast.http_port}", "--json")
    assert r.returncode == 0, r.stderr
    r = dcf("nodes", "--head", "ftp://127.0.0.1:1")
    assert r.returncode == 2 and "--head" in r.stderr and "http://" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_plain_dcf_prints_help_and_version_prints_the_version() -> None:
    r = dcf()
    assert r.returncode == 0 and "usage: dcf" in r.stdout and "submit" in r.stdout, r.stderr
    r = dcf("--version")
    assert r.returncode == 0 and r.stdout.startswith("dcf ") and r.stdout.split()[1][0].isdigit(), r.stdout


# ---- item 4: the job id first; item 10: say what takes time ----------------------------------------
def test_submit_says_the_job_id_once_accepted_and_the_operands_it_makes(fast: LocalCluster,
                                                                         tmp_path: Path) -> None:
    out = tmp_path / "C.txt"
    r = dcf("submit", "matmul", "--size", "1024", "--dtype", "float32", "-o", str(out), "--head", fast.url,
            timeout=180)
    assert r.returncode == 0, r.stderr
    assert "making two 1024x1024 float32 matrices" in r.stderr
    accepted = [line for line in r.stderr.splitlines() if line.endswith(" accepted")]
    assert len(accepted) == 1, r.stderr
    job = accepted[0].split()[2]
    assert r.stdout.startswith(f"job {job}: done"), r.stdout
    # item 7: -o C.txt writes exactly C.txt (in .npy format), no C.txt.npy beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["C.txt"]
    assert np.load(out, allow_pickle=False).shape == (1024, 1024)
    r = dcf("--json", "submit", "matmul", "--size", "8", "--head", fast.url)  # JSON: the id in the object
    assert r.returncode == 0 and json.loads(r.stdout)["job_id"], r.stderr
    assert "accepted" not in r.stderr and "making" not in r.stderr


# ---- item 7: -o is checked before any work -------------------------------------------------------
def test_output_path_checked_before_any_work(fast: LocalCluster, done_job: str, tmp_path: Path) -> None:
    with Client(fast.url) as c:
        before = len(c.jobs(limit=1000))
    missing = tmp_path / "no" / "such" / "dir" / "C.npy"
    for args in (("submit", "matmul", "--size", "64", "-o", str(missing)),
                 ("submit", "matmul", "--size", "64", "-o", str(tmp_path))):
        r = dcf(*args, "--head", fast.url)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("dcf: error: -o "), r.stderr
    r = dcf("submit", "train", "--dataset", "synthetic", "-o", str(missing.with_suffix(".pt")), "--head", fast.url)
    assert r.returncode == 2 and "no such directory" in r.stderr, r.stderr
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((2, 64), dtype=np.float32))
    r = dcf("submit", "predict", "--model", str(tmp_path / "m.pt"), "--data", str(x), "-o", str(missing),
            "--head", fast.url)
    assert r.returncode == 2 and "no such directory" in r.stderr, r.stderr
    with Client(fast.url) as c:
        assert len(c.jobs(limit=1000)) == before  # nothing was submitted
    r = dcf("result", done_job, "-o", str(missing), "--head", fast.url)
    assert r.returncode == 2 and "no such directory" in r.stderr, r.stderr
    unwritable = Path("/proc/dcf-C.npy")  # refused even to root
    r = dcf("result", done_job, "-o", str(unwritable), "--head", fast.url)
    assert r.returncode == 2 and "cannot write" in r.stderr, r.stderr
    r = dcf("result", done_job, "-o", str(tmp_path / "C.out"), "--head", fast.url)
    assert r.returncode == 0, r.stderr
    np.testing.assert_allclose(np.load(tmp_path / "C.out", allow_pickle=False), np.ones((4, 3)))


# ---- item 9: dcf status exit codes ---------------------------------------------------------------
def test_status_exits_0_done_and_1_failed(fast: LocalCluster, done_job: str) -> None:
    with Client(fast.url) as c:
        failed = c.submit_many([{"type": "buggy", "inputs": {"x": np.ones((4, 4))}, "params": {"bug": "merge"}}])[0]
        wait_for(lambda: c.status(failed)["state"] == "failed", 60, "the buggy job to fail")
    for wait in ((), ("--wait",)):
        assert dcf("status", done_job, *wait, "--head", fast.url).returncode == 0
        r = dcf("status", failed, *wait, "--head", fast.url)
        assert r.returncode == 1, r.stderr
        assert "failed" in r.stdout and "error:" in r.stdout
        r = dcf("--json", "status", failed, *wait, "--head", fast.url)
        assert r.returncode == 1 and json.loads(r.stdout)["state"] == "failed"


# ---- item 12: a closed stdout, a missing optional dependency -------------------------------------
def test_closed_stdout_is_no_traceback(fast: LocalCluster, done_job: str) -> None:
    read, write = os.pipe()
    os.close(read)  # `dcf ... | head -c1` once head has exited: every write fails with EPIPE
    try:
        r = dcf("--json", "status", done_job, "--head", fast.url, stdout=write)
    finally:
        os.close(write)
    assert r.returncode == 0, r.stderr  # the job's code, whether or not the reader had gone: scriptable
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr


BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Block())
sys.argv = ["dcf", *{args!r}]
from user_client.cli import main
sys.exit(main())
"""


def dcf_without(blocked: set[str], *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a Python where importing ``blocked`` fails, as where they are not installed."""
    code = BLOCK.format(blocked=blocked, args=list(args))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={k: v for k, v in os.environ.items() if not k.startswith("DCF_")})


def test_a_missing_optional_dependency_is_one_line(tmp_path: Path) -> None:
    r = dcf_without({"sklearn"}, "submit", "train", "--dataset", "digits", "-o", str(tmp_path / "m.pt"),
                    "--head", DEAD_URL)
    assert r.returncode == 2, r.stderr
    assert r.stderr == "dcf: error: the digits dataset needs scikit-learn: pip install 'dcf[train]'\n"
    x = tmp_path / "x.npy"
    np.save(x, np.zeros((2, 4), dtype=np.float32))
    r = dcf_without({"torch"}, "submit", "predict", "--model", str(tmp_path / "m.pt"), "--data", str(x),
                    "-o", str(tmp_path / "p.npy"), "--head", DEAD_URL)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "PyTorch" in r.stderr and "pip install" in r.stderr, r.stderr


# ---- item 2 and 10: training in dcf status; the wall time of dcf submit train --------------------
def test_training_status_and_wall_time(fast: LocalCluster, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    model = tmp_path / "model.pt"
    t0 = time.monotonic()
    r = dcf("--json", "submit", "train", "--dataset", "synthetic", "--synthetic-size", "400", "--model", "logreg",
            "--epochs", "2", "-o", str(model), "--head", fast.url, timeout=240)
    wall = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["seconds"] <= out["wall_seconds"] <= wall  # the run's wall time, not the planner's seconds
    assert model.exists() and model.with_suffix(".json").exists()
    r = dcf("status", out["job_id"], "--head", fast.url)
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.strip().startswith("training:"))
    assert "epoch 2/2" in line and "step " in line and "loss " in line and "s elapsed" in line, line
    # the text says the wall time, and the planner's training time only as such
    t0 = time.monotonic()
    r = dcf("submit", "train", "--dataset", "synthetic", "--synthetic-size", "400", "--model", "logreg",
            "--epochs", "1", "-o", str(model), "--head", fast.url, timeout=240)
    wall = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    said = re.search(r"done in ([0-9.]+) s \(upload to model saved; training itself ([0-9.]+) s\)", r.stdout)
    assert said, r.stdout
    assert float(said[2]) <= float(said[1]) <= wall + 0.05, r.stdout


# ---- item 10: no bogus download rate for a result read from the shared state dir ------------------
def test_a_shared_result_reports_no_transfer(fast: LocalCluster) -> None:
    calls: list[tuple[int, int]] = []
    with Client(fast.url) as c:
        job = c.submit_matmul(np.eye(400), np.ones((400, 400)))  # a result file (above the inline limit)
        c.wait(job, timeout=60)
        assert c.shared_dir() is not None  # same machine: the result is mapped, nothing is transferred
        c.result(job, progress=lambda done, total: calls.append((done, total)))
        assert calls == []
    with Client(fast.url, shared_files="off") as c:
        c.result(job, progress=lambda done, total: calls.append((done, total)))
        assert calls and calls[-1][0] == calls[-1][1] > 0  # over HTTP: the bytes as they arrive


# ---- a head whose providers take their time: Ctrl-C, cancel, restart -----------------------------
@pytest.fixture(scope="module")
def slow() -> Iterator[LocalCluster]:
    """Providers that sleep 2 s before each subtask; the head runs with the boolean flags given
    without a value (item 8)."""
    with LocalCluster(2, heartbeat=0.3, threads=1, head_args=["--fsync", "--log-json"],
                      provider_args=["--delay", "2", "--log-json"]) as cl:
        yield cl


def test_boolean_flags_without_a_value(slow: LocalCluster) -> None:
    with Client(slow.url) as c:
        assert c._json("GET", "/v1/info")["fsync"] is True
    log = (slow.log_dir / "head.log").read_text().splitlines()
    assert log and all(json.loads(line) for line in log if line.startswith("{")), log[:3]
    assert any(line.startswith("{") for line in log), log[:3]


def test_status_of_a_running_job_is_0_and_of_a_cancelled_one_1(slow: LocalCluster) -> None:
    with Client(slow.url) as c:
        job = c.submit_matmul(np.eye(8), np.eye(8))
        assert dcf("status", job, "--head", slow.url).returncode == 0  # queued or running
        waiting = popen("status", job, "--wait", url=slow.url)
        c.cancel(job)
        assert waiting.wait(timeout=60) == 1, waiting.communicate()
        r = dcf("status", job, "--head", slow.url)
        assert r.returncode == 1 and "cancelled" in r.stdout, r.stderr


def test_dcf_cancel_by_prefix_reaches_the_providers_and_dcf_nodes_frees_them(slow: LocalCluster) -> None:
    r = dcf("--json", "submit", "matmul", "--size", "400", "--no-wait", "--head", slow.url)
    assert r.returncode == 0, r.stderr
    job = json.loads(r.stdout)["job_id"]

    def assigned() -> int:
        out = dcf("--json", "nodes", "--head", slow.url)
        return sum(n["assigned"] for n in json.loads(out.stdout))
    wait_for(lambda: assigned() > 0, 30, "the job's subtasks on the providers")
    r = dcf("cancel", job[:8], "--head", slow.url)
    assert r.returncode == 0 and f"{job} cancelled" in r.stdout, (r.stdout, r.stderr)
    logs = [slow.log_dir / f"provider-{i}.log" for i in range(2)]
    wait_for(lambda: any(job in p.read_text() and "cancelled by the head" in p.read_text() for p in logs), 30,
             "a provider to hear the cancel")
    wait_for(lambda: assigned() == 0, 30, "dcf nodes to show the providers free")
    r = dcf("status", job[:8], "--head", slow.url)
    assert r.returncode == 1 and "cancelled" in r.stdout


def test_ctrl_c_while_waiting_leaves_the_job_running(slow: LocalCluster) -> None:
    proc = popen("submit", "matmul", "--size", "16", url=slow.url)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert line.endswith(" accepted\n"), line
    job = line.split()[2]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert f"job {job} goes on; follow it with `dcf status {job} --wait`" in err
    with Client(slow.url) as c:
        assert c.wait(job, timeout=60)["state"] == "done"


def test_status_wait_rides_out_a_head_restart(slow: LocalCluster) -> None:
    with Client(slow.url) as c:
        job = c.submit_matmul(np.eye(8), np.ones((8, 8)))
        waiting = popen("status", job, "--wait", "--reconnect-wait", "60", url=slow.url)
        wait_for(lambda: c.status(job)["state"] == "running", 20, "the job to start")
        out, err = restart_head_under(waiting, slow)
        assert waiting.returncode == 0, err
        assert "reconnecting" in err and err.count("reconnecting") == 1, err
        assert "reconnected to the head" in err, err
        assert "done" in out
        np.testing.assert_allclose(c.result(job), np.ones((8, 8)))


def test_a_waiting_submit_rides_out_a_head_restart(slow: LocalCluster) -> None:
    with Client(slow.url) as c:
        before = {j["job_id"] for j in c.jobs(limit=10_000)}
        proc = popen("--json", "submit", "matmul", "--size", "16", "--seed", "3", "--check", "--reconnect-wait", "60",
                     url=slow.url)
        wait_for(lambda: any(j["state"] == "running" and j["job_id"] not in before for j in c.jobs()), 20,
                 "the submitted job to start")
        out, err = restart_head_under(proc, slow)
    assert proc.returncode == 0, err
    assert err.count("reconnecting") == 1 and "reconnected to the head" in err, err
    report = json.loads(out)
    assert report["state"] == "done" and report["check"] is True, report


def test_a_head_never_reached_is_not_waited_for() -> None:
    r = dcf("status", "0123abcd", "--wait", "--reconnect-wait", "600", timeout=60)  # nothing at DEAD_URL
    assert r.returncode == 3 and "reconnecting" not in r.stderr, r.stderr


def restart_head_under(proc: subprocess.Popen[str], cluster: LocalCluster) -> tuple[str, str]:
    """Once the waiting CLI ``proc`` has reached the head, kill the head and start it again; the CLI's output."""
    wait_for(lambda: connected(proc.pid, cluster.http_port), 30, "the waiting CLI to reach the head")
    cluster.kill_head()
    time.sleep(0.5)  # the waiting CLI finds the head gone
    cluster.start_head()
    return proc.communicate(timeout=90)


def connected(pid: int, port: int) -> bool:
    """Whether the process has a connection to ``port`` open (it reached the head)."""
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.NoSuchProcess:
        return False
    return any(c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED for c in conns)


# ---- item 5: a port in use --------------------------------------------------------------------------
def test_dcf_up_on_a_port_in_use_fails_at_once(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = dcf("up", "--providers", "1", "--http-port", str(port), "--state-dir", str(tmp_path), timeout=60)
        assert r.returncode == 2, r.stderr
        assert f"port {port}" in r.stderr and "already in use" in r.stderr and "head at" not in r.stdout
        # the head itself refuses the port too (when something takes it after the check)
        head = subprocess.run([sys.executable, "-m", "head_node", "--host", "127.0.0.1", "--http-port", str(port),
                               "--state-dir", str(tmp_path / "h"), "--registration-port", str(free_port()),
                               "--task-port", str(free_port()), "--result-port", str(free_port())],
                              capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert head.returncode == 1 and f"HTTP port {port}" in head.stderr, head.stderr
        assert not (tmp_path / "h" / ".dcf-head").exists()  # it failed before it touched its state dir


# ---- item 6: SIGTERM and SIGHUP stop dcf up and dcf demo ---------------------------------------------
def _started(proc: subprocess.Popen[str], marker: str) -> list[psutil.Process]:
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    line = ""
    while marker not in line and time.monotonic() < deadline:
        line = proc.stdout.readline()
        assert line or proc.poll() is None, "it exited early"
    return psutil.Process(proc.pid).children(recursive=True)


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_dcf_up_stops_its_head_and_providers_on(sig: signal.Signals, tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "user_client", "up", "--providers", "1", "--http-port",
                             str(free_port()), "--state-dir", str(tmp_path)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        children = _started(proc, "Ctrl-C")
        assert len(children) == 2  # head + 1 provider
        if sig == signal.SIGHUP:
            os.killpg(proc.pid, sig)  # a closing terminal hangs up its whole process group
        else:
            proc.send_signal(sig)  # to dcf up alone, as `kill PID` does
        assert proc.wait(timeout=30) == 0
        _, alive = psutil.wait_procs(children, timeout=15)
        assert not alive, f"still running after {sig.name}: {alive}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
def test_dcf_demo_stops_its_head_and_providers_on_sigterm() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "user_client", "demo", "--providers", "1", "--size", "3000"],
                            cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        children = _started(proc, "provider local-0")
        assert len(children) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        _, alive = psutil.wait_procs(children, timeout=15)
        assert not alive, f"still running after SIGTERM: {alive}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
