#!/usr/bin/env python3
"""Benchmark: tiny jobs on dcf next to Ray, Celery and Dask, in one run, interleaved run by run.

    .venv/bin/python bench/tasks.py [--tasks 10000] [--rounds 3] [--latency-calls 200]
        [--stores embedded,rabbitmq] [--peers ray,celery,dask] [--peers-python /path/python-with-ray...]
        [--anchors ../shared/anchors]

It mirrors the anchors' tiny-task suite (../shared/anchors/b1_tasks_dask.py, b2_tasks_ray.py,
b3_tasks_celery.py): 10,000 tiny jobs with every result gathered in the driver, and the round
trip of one job (median of 200 sequential calls after 20 warm-up calls). dcf's tiny job is a 4x4
float64 matmul (the peers' is x -> x+1), on a local head with 2 providers of 1 thread each,
accepted durably (embedded: committed to the job store; rabbitmq: confirmed by the broker).

dcf is measured three ways:
  * batch:      ``Client.map("matmul", [...])``: 1000 jobs per request, then gathered (and forgotten);
  * one by one: ``Client.submit_async(...)`` once per job (as Ray's ``.remote``), then ``Client.gather``;
                the client's outbox sends each job at once while a request is free (4 in flight) and
                the jobs submitted meanwhile together in the next (user_client/outbox.py);
  * round trip: ``Client.matmul(A, B)``: one request (submit, wait, result inline).
Each round runs dcf (every store) and then each peer once; the ratios are per round, and their
median is printed. Not a test: nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from user_client import Client  # noqa: E402
from user_client.local import LocalCluster  # noqa: E402

AMQP_URL = os.environ.get("DCF_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
PEER_SCRIPTS = {"ray": ("b2_tasks_ray.py",), "celery": ("b3_tasks_celery.py",),
                "dask": ("b1_tasks_dask.py", "--worker-saturation", "inf")}


def dcf_round(client: Client, tasks: int, latency_calls: int) -> dict[str, float]:
    a = np.arange(16, dtype=np.float64).reshape(4, 4)
    want = a @ a
    jobs = [{"a": a, "b": a}] * tasks
    client.map("matmul", jobs[:1000])  # warm-up
    t = time.perf_counter()
    out = client.map("matmul", jobs)
    batch_s = time.perf_counter() - t
    assert len(out) == tasks and np.array_equal(out[-1]["c"], want)
    t = time.perf_counter()
    futures = [client.submit_async("matmul", {"a": a, "b": a}) for _ in range(tasks)]
    out = client.gather(futures, forget=True)
    one_s = time.perf_counter() - t
    assert len(out) == tasks and np.array_equal(out[0]["c"], want)
    for _ in range(20):
        client.matmul(a, a)
    lat = []
    for _ in range(latency_calls):
        t = time.perf_counter()
        c = client.matmul(a, a)
        lat.append(time.perf_counter() - t)
    assert np.array_equal(c, want)
    return {"batch_jobs_per_s": tasks / batch_s, "one_by_one_jobs_per_s": tasks / one_s,
            "round_trip_ms": statistics.median(lat) * 1e3}


def peer_round(python: str, anchors: Path, peer: str, tasks: int, latency_calls: int) -> dict[str, float] | None:
    script, *extra = PEER_SCRIPTS[peer]
    cmd = [python, str(anchors / script), "--tasks", str(tasks), "--repeats", "1",
           "--latency-calls", str(latency_calls), *extra]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HOME": os.environ.get("DCF_BENCH_HOME", "/tmp/dcf-bench"),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # Ray on loopback only: its node address is 127.0.0.1
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=anchors, env=env)
    except subprocess.TimeoutExpired:
        print(f"  {peer}: timed out", file=sys.stderr)
        return None
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        print(f"  {peer}: exit {done.returncode}: {done.stderr[-400:]}", file=sys.stderr)
        return None
    res = json.loads(lines[-1])
    return {"jobs_per_s": res["tasks"] / res["throughput_s"]["median"],
            "round_trip_ms": res["latency_s"]["median"] * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--latency-calls", type=int, default=200)
    ap.add_argument("--stores", default="embedded,rabbitmq")
    ap.add_argument("--peers", default="ray,celery", help="any of ray, celery, dask ('' for none)")
    ap.add_argument("--peers-python", default="/work/peers/bin/python", help="a python with ray, celery, dask")
    ap.add_argument("--anchors", type=Path, default=ROOT.parent / "shared" / "anchors")
    args = ap.parse_args()
    stores = [s for s in args.stores.split(",") if s]
    peers = [p for p in args.peers.split(",") if p] if Path(args.peers_python).exists() else []
    rows: dict[str, list[dict[str, float]]] = {}
    clusters = {s: LocalCluster(2, threads=1, amqp_url=AMQP_URL if s == "rabbitmq" else "") for s in stores}
    try:
        for cluster in clusters.values():
            cluster.start()
        for r in range(args.rounds):
            for store, cluster in clusters.items():
                with Client(cluster.url) as client:
                    rows.setdefault(f"dcf {store}", []).append(dcf_round(client, args.tasks, args.latency_calls))
                print(f"round {r + 1}: dcf {store}: {json.dumps(rows[f'dcf {store}'][-1])}", flush=True)
            for peer in peers:
                res = peer_round(args.peers_python, args.anchors, peer, args.tasks, args.latency_calls)
                if res is not None:
                    rows.setdefault(peer, []).append(res)
                    print(f"round {r + 1}: {peer}: {json.dumps(res)}", flush=True)
    finally:
        for cluster in clusters.values():
            cluster.stop()
    report(rows)


def report(rows: dict[str, list[dict[str, float]]]) -> None:
    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in rows[name])

    print(f"\n{'system':<16} {'batch jobs/s':>13} {'1-by-1 jobs/s':>14} {'round trip ms':>14}")
    for name in rows:
        if name.startswith("dcf"):
            print(f"{name:<16} {med(name, 'batch_jobs_per_s'):>13.0f} {med(name, 'one_by_one_jobs_per_s'):>14.0f} "
                  f"{med(name, 'round_trip_ms'):>14.2f}")
        else:
            print(f"{name:<16} {'':>13} {med(name, 'jobs_per_s'):>14.0f} {med(name, 'round_trip_ms'):>14.2f}")
    summary: dict[str, Any] = {"bench": "tasks", "medians": {
        n: {k: statistics.median(r[k] for r in runs) for k in runs[0]} for n, runs in rows.items()}}
    for peer in (p for p in rows if not p.startswith("dcf")):
        for name in (n for n in rows if n.startswith("dcf")):
            pairs = list(zip(rows[name], rows[peer], strict=False))
            ratios = {
                "batch_vs_peer": [d["batch_jobs_per_s"] / p["jobs_per_s"] for d, p in pairs],
                "one_by_one_vs_peer": [d["one_by_one_jobs_per_s"] / p["jobs_per_s"] for d, p in pairs],
                "round_trip_vs_peer": [d["round_trip_ms"] / p["round_trip_ms"] for d, p in pairs]}
            text = ", ".join(f"{k} {' '.join(f'{x:.2f}' for x in v)} (median {statistics.median(v):.2f})"
                             for k, v in ratios.items())
            print(f"{name} / {peer} per round: {text}")
            summary[f"{name} / {peer}"] = {k: statistics.median(v) for k, v in ratios.items()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
