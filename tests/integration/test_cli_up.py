"""`dcf up` runs a head and N providers in the foreground; Ctrl-C (SIGINT) stops them all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from tests.conftest import ROOT
from user_client import Client
from user_client.local import free_port

pytestmark = pytest.mark.integration


@pytest.mark.skipif(os.name != "posix", reason="sends SIGINT to a process group")
def test_dcf_up_serves_and_ctrl_c_stops_everything(tmp_path) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "user_client", "up", "--providers", "2", "--http-port", str(port),
                             "--state-dir", str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        line = ""
        assert proc.stdout is not None  # stdout=PIPE
        deadline = time.monotonic() + 60
        while "Ctrl-C" not in line and time.monotonic() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "dcf up exited early"
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) == 3  # head + 2 providers
        with Client(f"http://127.0.0.1:{port}") as c:
            assert len(c.nodes()) == 2
            a = np.arange(12.0).reshape(3, 4)
            np.testing.assert_allclose(c.matmul(a, a.T), a @ a.T)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        assert proc.wait(timeout=30) == 0
        gone, alive = psutil.wait_procs(children, timeout=15)
        assert not alive, f"still running after Ctrl-C: {alive}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
