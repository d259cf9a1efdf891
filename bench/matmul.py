#!/usr/bin/env python3
"""Benchmark: dcf matmul against numpy (and optionally Ray/Dask) in the same run.

    .venv/bin/python bench/matmul.py [--sizes 1000 4096] [--repeats 5] [--anchors ../shared/anchors
                                      --anchors-python /path/to/python-with-ray-and-dask]

Times, with 2 local providers (1 BLAS thread each, so 2 threads in all):
  * api:  ``Client(url).matmul(A, B)`` with in-memory arrays (submit, wait, fetch);
  * cli:  ``dcf submit matmul --a A.npy --b B.npy -o C.npy`` as a whole command;
  * numpy in one process with 2 BLAS threads, measured in the same run.
Each dcf path runs twice: co-located (providers and client share the head's state dir,
the default on one machine) and over the wire (``DCF_SHARED_FILES=off``: every array
crosses a socket). Prints medians, ratios to numpy and the bytes moved against the
minimum A + K*B + C between head and providers. Not a test: nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from user_client import Client  # noqa: E402
from user_client.local import LocalCluster  # noqa: E402

PROVIDERS = 2


def numpy_baseline(n: int, repeats: int, threads: int = 2) -> list[float]:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "_numpy_baseline.py"), str(threads), str(n),
                          str(repeats)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["times"]


def time_api(client: Client, a: np.ndarray, b: np.ndarray, repeats: int) -> tuple[list[float], dict]:
    ref = a @ b
    c = client.matmul(a, b)  # warm-up (and a correctness check)
    assert np.allclose(c, ref), "dcf result differs from numpy"
    times, view = [], {}
    for _ in range(repeats):
        t0 = time.perf_counter()
        job = client.submit_matmul(a, b)
        view = client.wait(job)
        client.result(job)
        times.append(time.perf_counter() - t0)
        client.delete(job)
    return times, view


def time_cli(url: str, a_path: Path, b_path: Path, c_path: Path, repeats: int, env: dict) -> list[float]:
    cmd = [sys.executable, "-m", "user_client", "--head", url, "submit", "matmul", "--a", str(a_path), "--b",
           str(b_path), "-o", str(c_path)]
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=ROOT)
        if i:  # the first run is a warm-up
            times.append(time.perf_counter() - t0)
    return times


def anchor(anchors: Path, python: str, script: str, n: int, repeats: int) -> float | None:
    try:
        out = subprocess.run([python, str(anchors.resolve() / script), "--sizes", str(n), "--repeats", str(repeats)],
                             capture_output=True, text=True, timeout=600, cwd=anchors.resolve(),
                             env={"PATH": "/usr/bin:/bin", "HOME": tempfile.mkdtemp(),
                                  "RAY_USAGE_STATS_ENABLED": "0",
                                  # Ray on loopback only (its node address is 127.0.0.1, not the VM's)
                                  "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
        lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
        if not lines:
            raise RuntimeError(f"exit {out.returncode}, printed no result: {out.stderr.strip()[-300:]}")
        return float(json.loads(lines[-1])["sizes"][str(n)]["median"])
    except Exception as exc:  # optional comparison: report and go on
        print(f"  ({script} failed: {exc})")
        return None


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 4096])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--modes", nargs="+", default=["shared", "wire"], choices=["shared", "wire"])
    ap.add_argument("--no-cli", action="store_true")
    ap.add_argument("--anchors", type=Path, help="the anchors folder (a2_matmul_dask.py, a3_matmul_ray.py)")
    ap.add_argument("--anchors-python", help="a python with ray and dask for the anchors")
    args = ap.parse_args()

    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="dcf-bench-"))
    for n in args.sizes:
        rng = np.random.default_rng(0)
        a, b = rng.standard_normal((n, n)), rng.standard_normal((n, n))
        np.save(tmp / "a.npy", a)
        np.save(tmp / "b.npy", b)
        base = med(numpy_baseline(n, args.repeats))
        print(f"\nn = {n}: numpy, 2 threads: {base:.4f} s ({2 * n**3 / base / 1e9:.1f} GFLOP/s)")
        rows.append((n, "numpy 2 threads", base, base))
        minimum = a.nbytes + PROVIDERS * b.nbytes + a.nbytes  # A + K*B + C
        for mode in args.modes:
            env = {"DCF_SHARED_FILES": "auto" if mode == "shared" else "off"}
            import os
            full_env = {**os.environ, **env}
            with LocalCluster(PROVIDERS, threads=1, env=env) as cl, \
                    Client(cl.url, timeout=300, shared_files=env["DCF_SHARED_FILES"]) as client:
                times, view = time_api(client, a, b, args.repeats)
                t = med(times)
                stats = view.get("stats", {})
                moved = stats.get("bytes_out", 0) + stats.get("bytes_in", 0)
                print(f"  dcf api, {mode:6}: {t:.4f} s = {t / base:.2f}x numpy, "
                      f"{2 * n**3 / t / 1e9:.1f} GFLOP/s; head<->providers over sockets {moved / 1e6:.1f} MB "
                      f"(minimum A+K*B+C = {minimum / 1e6:.1f} MB, ratio {moved / minimum:.2f}); "
                      f"shares {view.get('shares')}")
                rows.append((n, f"dcf api ({mode})", t, base))
                if not args.no_cli:
                    tc = med(time_cli(cl.url, tmp / "a.npy", tmp / "b.npy", tmp / "c.npy", max(1, args.repeats // 2),
                                      full_env))
                    print(f"  dcf cli, {mode:6}: {tc:.4f} s = {tc / base:.2f}x numpy (whole command, "
                          f"Python start-up included)")
                    rows.append((n, f"dcf cli ({mode})", tc, base))
        if args.anchors and args.anchors_python:
            for name, script in (("ray 2 tasks", "a3_matmul_ray.py"), ("dask 2 procs", "a2_matmul_dask.py")):
                ta = anchor(args.anchors, args.anchors_python, script, n, args.repeats)
                if ta is not None:
                    print(f"  {name}: {ta:.4f} s = {ta / base:.2f}x numpy")
                    rows.append((n, name, ta, base))
    print("\n| n | system | median s | vs numpy 2 threads |\n|---|---|---|---|")
    for n, name, t, base in rows:
        print(f"| {n} | {name} | {t:.4f} | {t / base:.2f}x |")


if __name__ == "__main__":
    main()
