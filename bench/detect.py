#!/usr/bin/env python3
"""Benchmark: how fast the head notices a provider that died or went silent.

    .venv/bin/python bench/detect.py [--heartbeat 5.0] [--kills 5] [--stops 3] [--stop-heartbeat S]

One local cluster (``user_client.local.LocalCluster``: a head and providers over loopback, embedded
store). Each ``kill`` run kill -9s a ready provider and times, from the kill, the head's ``node.lost``
event for it (its ``ts``, the head's clock, followed on GET /v1/stream; head and bench share the
machine's clock); a replacement is started and waited for before the next run. Each ``stop`` run
SIGSTOPs a provider instead (a hung process: its sockets stay open, it answers nothing), times its
``node.lost``, then SIGCONTs and kills it. Prints one line per run, the median (min, max) of each kind
and one JSON line. The heartbeat interval is the head's ``--heartbeat-interval`` (default 5 s, the
production default); ``--stop-heartbeat`` runs the stop runs on a cluster of their own with that
interval. Not a test: nothing here fails on a timing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.chaos.harness import EventWatcher, provider_name, ready_providers, wait_for  # noqa: E402
from user_client import Client  # noqa: E402
from user_client.local import LocalCluster  # noqa: E402


def one_run(cl: LocalCluster, c: Client, watcher: EventWatcher, how: str, budget: float) -> dict[str, Any]:
    """Fault one ready provider (``kill``: SIGKILL; ``stop``: SIGSTOP); seconds until its node.lost."""
    victim = ready_providers(cl, c)[0]
    name, proc = provider_name(victim), cl.providers[victim]
    t0 = time.time()
    if how == "kill":
        proc.kill()
    else:
        os.kill(proc.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: watcher.node_lost(name, t0) is not None, budget, f"node.lost of {name}", poll=0.01)
    finally:
        if how == "stop":
            os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait()
    event = watcher.node_lost(name, t0)
    assert event is not None
    return {"how": how, "seconds": event["ts"] - t0, "reason": event.get("reason", "")}


def run_kind(how: str, runs: int, heartbeat: float) -> list[dict[str, Any]]:
    out = []
    with LocalCluster(2, heartbeat=heartbeat, threads=1) as cl, Client(cl.url) as c, \
            EventWatcher(cl.url, period=0.5) as watcher:
        wait_for(lambda: watcher.connections > 0, 30, "the event stream")
        for i in range(runs):
            time.sleep(heartbeat * (i % 3) / 3)  # land at several points of the heartbeat cycle
            r = one_run(cl, c, watcher, how, budget=10 * heartbeat + 10)
            r["heartbeat"] = heartbeat
            out.append(r)
            print(f"  {how:4s} run {i + 1}: node.lost after {r['seconds']:.3f} s ({r['reason']}; heartbeat "
                  f"{heartbeat:g} s)", flush=True)
            cl.add_provider()
            cl.wait_ready(2, timeout=60)
    return out


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    secs = [r["seconds"] for r in rows]
    return {"n": len(secs), "median_s": round(statistics.median(secs), 3), "min_s": round(min(secs), 3),
            "max_s": round(max(secs), 3), "reasons": sorted({r["reason"] for r in rows})}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heartbeat", type=float, default=5.0, help="the head's heartbeat interval, s (5)")
    ap.add_argument("--kills", type=int, default=5, help="kill -9 runs (5)")
    ap.add_argument("--stops", type=int, default=3, help="SIGSTOP runs (3; 0: none)")
    ap.add_argument("--stop-heartbeat", type=float, default=None,
                    help="heartbeat interval of the SIGSTOP runs (default: --heartbeat)")
    args = ap.parse_args(argv)
    results: dict[str, Any] = {}
    if args.kills:
        print(f"kill -9 -> node.lost, heartbeat {args.heartbeat:g} s:", flush=True)
        results["kill"] = summary(run_kind("kill", args.kills, args.heartbeat))
        results["kill"]["heartbeat_s"] = args.heartbeat
    if args.stops:
        hb = args.stop_heartbeat or args.heartbeat
        print(f"SIGSTOP -> node.lost, heartbeat {hb:g} s:", flush=True)
        results["stop"] = summary(run_kind("stop", args.stops, hb))
        results["stop"]["heartbeat_s"] = hb
        results["stop"]["intervals"] = round(results["stop"]["median_s"] / hb, 2)
    for how, s in results.items():
        what = "kill -9" if how == "kill" else "SIGSTOP"
        print(f"{what:8s} -> node.lost: median {s['median_s']:.3f} s (min {s['min_s']:.3f}, max {s['max_s']:.3f}, "
              f"n={s['n']}, heartbeat {s['heartbeat_s']:g} s, {', '.join(s['reasons'])})")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
