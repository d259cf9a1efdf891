#!/usr/bin/env python3
"""Benchmark: matmul over shaped links between "hosts" in network namespaces (tests/netbed/harness.py).

    sudo .venv/bin/python bench/netbed.py [--n 4096] [--rates 10gbit 1gbit] [--repeats 3] [--providers 2]

A head and ``--providers`` provider hosts, each in its own network namespace, plugged into one switch; no
provider shares the head's state dir, so every array crosses a link, as in a lab of separate machines.
For each rate every host's link (the head's too) is shaped with tbf in both directions, then ``--repeats``
jobs run, each on fresh operands (uploaded before the clock starts: a provider's operand cache cannot
help). Each job is timed from submit to done; the result stays on the head.

Printed per rate: the median job time; the bytes each link carried (the switch's counters: Ethernet
frames, headers included); the transfer limit, the busiest direction of the busiest link divided by the
rate (no schedule can beat it); time against that limit; and the head's bytes against the minimum
A + K*B + C. numpy (2 threads, one process) is measured in the same run as the compute floor. ``unshaped``
is the same bed with no qdisc (the veths' own speed, CPU-bound here). Not a test: nothing passes or fails.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.netbed import harness  # noqa: E402
from tests.netbed.harness import NetBed  # noqa: E402
from user_client import Client  # noqa: E402

_RATE = re.compile(r"^(\d+(?:\.\d+)?)(k|m|g)?bit$")


def rate_bits(text: str) -> int | None:
    """``10gbit`` -> 10e9; ``unshaped`` -> None."""
    if text == "unshaped":
        return None
    m = _RATE.match(text.lower())
    if m is None:
        raise argparse.ArgumentTypeError(f"{text!r}: a rate like 1gbit, 100mbit, or 'unshaped'")
    return int(float(m.group(1)) * {None: 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2)])


def numpy_seconds(n: int, repeats: int) -> float:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "_numpy_baseline.py"), "2", str(n), str(repeats)],
                         capture_output=True, text=True, check=True)
    return float(statistics.median(json.loads(out.stdout)["times"]))


def one_job(bed: NetBed, client: Client, rng: np.random.Generator, n: int) -> tuple[float, dict[str, dict[str, int]],
                                                                                   dict[str, float]]:
    """Seconds from submit to done, the bytes each host's link carried meanwhile, the shares."""
    a, b = rng.standard_normal((n, n)), rng.standard_normal((n, n))
    inputs = {"a": client.upload(a)["blob_id"], "b": client.upload(b)["blob_id"]}
    hosts = list(bed.hosts.values())
    before = {h.name: bed.link_bytes(h) for h in hosts}
    t0 = time.perf_counter()
    job = client.submit("matmul", inputs)
    view = client.wait(job, timeout=900)
    seconds = time.perf_counter() - t0
    moved = {h.name: {k: v - before[h.name][k] for k, v in bed.link_bytes(h).items()} for h in hosts}
    if view["state"] != "done":
        raise SystemExit(f"job {job} ended {view['state']}: {view.get('error')}")
    got = client.result(job)
    if not np.allclose(got[:64], a[:64] @ b, rtol=1e-9, atol=1e-9):  # a sample of rows, checked
        raise SystemExit(f"job {job}: the result differs from numpy")
    client.delete(job)
    return seconds, moved, view.get("shares", {})


def run_rate(bed: NetBed, client: Client, label: str, rate: int | None, n: int, repeats: int,
             base: float) -> dict[str, float | str]:
    for h in bed.hosts.values():
        bed.shape(h, rate)
    rng = np.random.default_rng(0)
    one_job(bed, client, rng, min(n, 1024))  # warm-up: connections, the providers' first measurement
    runs = [one_job(bed, client, rng, n) for _ in range(repeats)]
    t = statistics.median(r[0] for r in runs)
    moved = runs[-1][1]
    busiest = max(max(m.values()) for m in moved.values())
    limit = busiest * 8 / rate if rate else float("nan")
    operand = n * n * 8
    k = len(bed.providers())
    head = moved["head"]
    print(f"\n{label}: median {t:.2f} s over {repeats} jobs ({', '.join(f'{r[0]:.2f}' for r in runs)}); "
          f"{t / base:.2f}x numpy ({base:.2f} s)")
    for name, m in moved.items():
        print(f"  link {name:5}: to it {m['to_host'] / 1e6:8.1f} MB, from it {m['from_host'] / 1e6:8.1f} MB")
    print(f"  head's link: {(head['to_host'] + head['from_host']) / 1e6:.1f} MB against the minimum A + K*B + C = "
          f"{(2 + k) * operand / 1e6:.1f} MB (K = {k})")
    if rate:
        print(f"  transfer limit (busiest direction {busiest / 1e6:.1f} MB at {rate / 1e9:g} Gbit/s): {limit:.2f} s; "
              f"job time {t / limit:.2f}x that limit")
    print(f"  shares {runs[-1][2]}")
    return {"link": label, "seconds": t, "limit": limit, "numpy": base}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--rates", nargs="+", default=["10gbit", "1gbit"], help="tbf rates, or 'unshaped'")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--providers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads per provider")
    args = ap.parse_args()
    rates = [(text, rate_bits(text)) for text in args.rates]
    why = harness.problem()
    if why is not None:
        raise SystemExit(f"the network test bed cannot be built here: {why}")
    base = numpy_seconds(args.n, args.repeats)
    rows = []
    with NetBed(args.providers, threads=args.threads) as bed:
        client = bed.client(timeout=900)
        print(f"n = {args.n} float64, {args.providers} provider hosts x {args.threads} BLAS thread, "
              f"numpy 2 threads {base:.2f} s")
        for label, rate in rates:
            rows.append(run_rate(bed, client, label, rate, args.n, args.repeats, base))
    print("\n| link | median s | transfer limit s | vs limit | vs numpy |\n|---|---|---|---|---|")
    for r in rows:
        lim = float(r["limit"])
        vs = f"{float(r['seconds']) / lim:.2f}x" if lim == lim else "-"
        print(f"| {r['link']} | {float(r['seconds']):.2f} | {lim:.2f} | {vs} | "
              f"{float(r['seconds']) / float(r['numpy']):.2f}x |")


if __name__ == "__main__":
    main()
