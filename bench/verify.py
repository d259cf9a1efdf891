#!/usr/bin/env python3
"""Benchmark: the cost of Freivalds' check of matmul results (common/tasks/verify.py) against the matmul.

    .venv/bin/python bench/verify.py [--n 4096] [--dtype float64] [--repeats 5] [--threads 2] [--blocks 2]

In one process, with ``--threads`` BLAS threads for both: the time of ``np.matmul(A, B)`` (n x n x n), and
the time of checking that whole job as the head does (``MatMulPlanner.check_result`` for each of
``--blocks`` blocks of rows, the first one building ``B r``). Prints medians over ``--repeats`` runs, the
ratio, and what the check can see: the smallest error of one element it always catches, against the
size of a typical entry, and how far the right result stays inside its tolerance. Not a test: nothing
here passes or fails.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import tasks  # noqa: E402
from common.tasks import ArrayMeta  # noqa: E402
from common.tasks.base import JobContext  # noqa: E402
from common.tasks.matmul import MatMulPlanner  # noqa: E402
from common.tasks.verify import Freivalds, row_norms_and_product  # noqa: E402


def planner(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> MatMulPlanner:
    task = tasks.get("matmul")
    inputs = {"a": ArrayMeta(a.dtype.name, a.shape), "b": ArrayMeta(b.dtype.name, b.shape)}
    job = JobContext("bench", {}, inputs, task.validate({}, inputs), {"a": a, "b": b}, {}, {"c": c}, Path("."))
    p = task.planner(job)
    assert isinstance(p, MatMulPlanner)
    return p


def check_job(a: np.ndarray, b: np.ndarray, c: np.ndarray, blocks: int) -> float:
    """Seconds to check every block of a job (a fresh planner: B r is computed again)."""
    p = planner(a, b, c)
    m = a.shape[0]
    t0 = time.perf_counter()
    for r0 in range(0, m, -(-m // blocks)):
        rows = min(-(-m // blocks), m - r0)
        p.check_result({"row0": r0, "rows": rows}, [c[r0:r0 + rows]])
    return time.perf_counter() - t0


def sight(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> tuple[float, float, float]:
    """(smallest error of one element always caught, median |entry| of C, max |C r - A B r| / tolerance)."""
    f = Freivalds.of(b, np.random.default_rng(0))
    norms, ay = row_norms_and_product(a, f.y)
    tol = norms * f.slope + f.offset
    diff = np.abs(c.astype(np.float64) @ f.r - ay)
    return float(tol.max() / 0.5), float(np.median(np.abs(c))), float((diff / tol).max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--blocks", type=int, default=2, help="blocks of rows the job is checked in (its subtasks)")
    args = ap.parse_args()
    rng = np.random.default_rng(1)
    a = rng.standard_normal((args.n, args.n)).astype(args.dtype)
    b = rng.standard_normal((args.n, args.n)).astype(args.dtype)
    c = np.empty((args.n, args.n), dtype=args.dtype)
    matmul, check = [], []
    with threadpool_limits(args.threads):
        np.matmul(a, b, out=c)  # warm-up (pages, BLAS buffers)
        check_job(a, b, c, args.blocks)
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            np.matmul(a, b, out=c)
            matmul.append(time.perf_counter() - t0)
            check.append(check_job(a, b, c, args.blocks))
        caught, entry, margin = sight(a, b, c)
    mm, ck = statistics.median(matmul), statistics.median(check)
    paired = statistics.median(x / y for x, y in zip(check, matmul, strict=True))
    print(f"n={args.n} {args.dtype}, {args.threads} BLAS threads, {args.blocks} blocks, "
          f"{args.repeats} repeats (medians)")
    print(f"  matmul         {mm:8.3f} s   (min {min(matmul):.3f}, max {max(matmul):.3f})")
    print(f"  check (job)    {ck:8.3f} s   (min {min(check):.3f}, max {max(check):.3f})")
    print(f"  check / matmul {100 * ck / mm:8.2f} %   (of each run, median: {100 * paired:.2f} %; target <= 3 %)")
    print(f"  one element off by more than {caught:.3g} is always caught (median |entry| {entry:.3g}, "
          f"{caught / entry:.2g} of it); the right result used at most {margin:.2g} of its tolerance")


if __name__ == "__main__":
    main()
