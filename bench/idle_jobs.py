"""What never-run jobs cost an idle head (issue 14 A7): submit N tiny matmul jobs to a head with no
provider, then read the head's memory and its CPU over ``--seconds`` while nothing runs.

    PYTHONPATH=. python bench/idle_jobs.py --jobs 4000 --size 4
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import psutil

from user_client import Client
from user_client.local import LocalCluster


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=4000)
    ap.add_argument("--size", type=int, default=4, help="the operands are SIZE x SIZE float64 (inline)")
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    with LocalCluster(0, heartbeat=1.0, head_args=["--max-jobs", str(max(args.jobs, 1))]) as cl, \
            Client(cl.url) as c:
        assert cl.head is not None
        head = psutil.Process(cl.head.pid)
        before = head.memory_info().rss
        a = np.ones((args.size, args.size))
        for start in range(0, args.jobs, 500):
            c.submit_many([{"type": "matmul", "inputs": {"a": a, "b": a}}] * min(500, args.jobs - start))
        time.sleep(2)
        after = head.memory_info().rss
        t0 = sum(head.cpu_times()[:2])
        time.sleep(args.seconds)
        busy = sum(head.cpu_times()[:2]) - t0
    print(f"{args.jobs} queued {args.size}x{args.size} jobs, no provider: head RSS {before / 2**20:.0f} -> "
          f"{after / 2**20:.0f} MiB ({(after - before) / max(1, args.jobs) / 1024:.1f} KiB a job); idle CPU "
          f"{100 * busy / args.seconds:.1f}% of a core over {args.seconds:g} s")


if __name__ == "__main__":
    main()
