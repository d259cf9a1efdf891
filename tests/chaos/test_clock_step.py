"""The head's wall clock steps (issue 14 B7) with real processes over loopback.

The system clock is never touched: the head loads a test-only module (``--plugins``, written by this test
into its temporary folder) that replaces ``time.time`` in the head process by the real clock plus an offset
read from a file, as ``faketime`` would; the test writes the file to step the head's wall clock. Providers
and this test keep the real clock. Before the fix, +120 s marked both healthy providers dead at once and
-60 s held back the detection of a stopped provider by a minute."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.chaos.harness import Figures, check_matmul, node, provider_name, submit_matmul, wait_for
from user_client import Client
from user_client.local import LocalCluster

pytestmark = [pytest.mark.chaos, pytest.mark.integration]

HEARTBEAT = 0.5
FAKE_CLOCK = '''"""Test-only: time.time() of this process is the real clock plus the offset in $DCF_TEST_WALL_OFFSET."""
import os
import threading
import time

_real_time, _real_sleep = time.time, time.sleep
_path = os.environ["DCF_TEST_WALL_OFFSET"]
_offset = 0.0


def _follow() -> None:
    global _offset
    while True:
        try:
            with open(_path) as f:
                _offset = float(f.read().strip() or 0.0)
        except (OSError, ValueError):
            pass
        _real_sleep(0.01)


time.time = lambda: _real_time() + _offset
threading.Thread(target=_follow, name="fake-wall-clock", daemon=True).start()
'''


@pytest.fixture
def stepped(tmp_path: Path) -> Iterator[tuple[LocalCluster, Client, Path]]:
    (tmp_path / "dcf_fake_wall_clock.py").write_text(FAKE_CLOCK)
    offset = tmp_path / "offset"
    offset.write_text("0")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "DCF_TEST_WALL_OFFSET": str(offset)}
    with LocalCluster(2, heartbeat=HEARTBEAT, threads=1, env=env,
                      head_args=["--plugins", "dcf_fake_wall_clock"]) as cl, Client(cl.url) as c:
        yield cl, c, offset


def step(offset: Path, c: Client, seconds: float) -> None:
    """Set the head's wall clock ``seconds`` off the real one, and wait until the head reads it."""
    offset.write_text(str(seconds))
    wait_for(lambda: abs(c.http.get("/v1/metrics").json()["time"] - (time.time() + seconds)) < 2.0, 10,
             "the head's clock to step")


def counters(c: Client) -> dict[str, Any]:
    return c.http.get("/v1/metrics").json()["counters"]


def test_a_wall_clock_step_forward_marks_no_provider_dead(stepped: tuple[LocalCluster, Client, Path],
                                                          figures: Figures, nprng: np.random.Generator) -> None:
    cl, c, offset = stepped
    step(offset, c, 120.0)
    figures.fault("head wall clock stepped +120 s")
    time.sleep(6 * HEARTBEAT)  # a dozen ticks and heartbeats on the stepped clock
    states = {n["name"]: n["state"] for n in c.nodes()}
    got = counters(c)
    figures.notes.append(f"wall clock +120 s: providers {states}, providers_lost {got['providers_lost']}")
    assert got["providers_lost"] == 0 and set(states.values()) == {"ready"}, (states, got)
    assert all(0 <= n["last_heartbeat_s"] < 3 * HEARTBEAT for n in c.nodes())
    view = check_matmul(c, submit_matmul(c, nprng, 200), figures)
    # what users see is the wall clock's (stepped), durations are the monotonic clock's
    assert abs(view["started_at"] - (time.time() + 120.0)) < 30, view["started_at"]
    assert 0 <= view["stats"]["compute_s"] < 30


def test_a_wall_clock_step_back_does_not_delay_detecting_a_stopped_provider(
        stepped: tuple[LocalCluster, Client, Path], figures: Figures) -> None:
    cl, c, offset = stepped
    proc = cl.providers[1]
    name = provider_name(1)
    t_stop = time.monotonic()
    os.kill(proc.pid, signal.SIGSTOP)  # heartbeats stop; its sockets stay open (the "silent" rule)
    try:
        step(offset, c, -60.0)  # right after its last heartbeat was stamped
        figures.fault("head wall clock stepped -60 s, then a provider SIGSTOPped")
        wait_for(lambda: (node(c, name) or {}).get("state") == "dead", 90, f"the head to mark {name} dead",
                 poll=0.02)
        seconds = time.monotonic() - t_stop
        figures.timing("SIGSTOP to dead, wall clock stepped -60 s", seconds)
        assert seconds < 3 * HEARTBEAT + 1.5, f"{name} marked dead {seconds:.2f}s after SIGSTOP"
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert (node(c, provider_name(0)) or {}).get("state") == "ready"
