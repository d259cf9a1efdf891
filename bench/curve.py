#!/usr/bin/env python3
"""Benchmark: what CURVE (encryption + authentication of the ZeroMQ traffic) costs.

    .venv/bin/python bench/curve.py [--sizes 1000 2048] [--repeats 5]

Runs the same matmul jobs over the wire (``--shared-files off``: every array crosses the head's
ZeroMQ sockets) on two local clusters of 2 providers, one without keys and one with CURVE keys,
interleaved job by job, and prints medians and the ratio CURVE / plain measured in the same run.
Not a test: nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from user_client import Client  # noqa: E402
from user_client.local import LocalCluster  # noqa: E402


def one_job(client: Client, a: np.ndarray, b: np.ndarray) -> float:
    t0 = time.perf_counter()
    job = client.submit_matmul(a, b)
    client.wait(job)
    c = client.result(job)
    elapsed = time.perf_counter() - t0
    client.delete(job)
    assert c.shape == (a.shape[0], b.shape[1])
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 2048])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    def cluster(curve: bool = False) -> LocalCluster:
        return LocalCluster(2, threads=1, provider_args=["--shared-files", "off"], curve=curve)

    with cluster() as plain, cluster(curve=True) as curve, \
            Client(plain.url, shared_files="off") as cp, Client(curve.url, shared_files="off") as cc:
        print(f"{'n':>6} {'plain s':>9} {'CURVE s':>9} {'ratio':>7}")
        for n in args.sizes:
            rng = np.random.default_rng(n)
            a, b = rng.standard_normal((n, n)), rng.standard_normal((n, n))
            np.testing.assert_allclose(cc.matmul(a, b), a @ b, rtol=1e-9)  # warm-up and a check
            cp.matmul(a, b)
            times: dict[str, list[float]] = {"plain": [], "curve": []}
            for _ in range(args.repeats):
                times["plain"].append(one_job(cp, a, b))
                times["curve"].append(one_job(cc, a, b))
            p, c = statistics.median(times["plain"]), statistics.median(times["curve"])
            print(f"{n:>6} {p:>9.3f} {c:>9.3f} {c / p:>6.2f}x", flush=True)


if __name__ == "__main__":
    main()
