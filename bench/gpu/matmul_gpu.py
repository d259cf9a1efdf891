#!/usr/bin/env python3
"""GPU check, matmul: dcf's ``Client.matmul`` on one provider against torch's own matmul on the same device.

    python3 bench/gpu/matmul_gpu.py --device cuda --sizes 8192 16384 --json OUT/matmul.json

torch's time counts what dcf's provider must also do: host->device copies of A and B (from the same
pageable numpy arrays), the product, and the device->host copy of C; each part is also timed on its
own (synchronised). dcf's time is the whole ``Client.matmul`` call: upload, queue, the provider's
copies and product, the result back to the client. The ratio is dcf's time over torch's (target:
at most 1.25x, i.e. dcf at 80% of torch or better). Medians after one warm-up each.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from user_client import Client  # noqa: E402
from user_client.local import LocalCluster  # noqa: E402

TARGET_RATIO = 1.25  # dcf time / torch time; 1 / 1.25 = 80%


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # with-blocks run: the local cluster is stopped


def torch_matmul(a: np.ndarray, b: np.ndarray, device: str, repeats: int) -> tuple[dict[str, float], np.ndarray]:
    """Medians of (h2d, mm, d2h, total) seconds, and torch's C."""
    import torch

    dev = torch.device(device)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    parts: dict[str, list[float]] = {"h2d": [], "mm": [], "d2h": [], "total": []}
    c = np.empty(0, dtype=a.dtype)
    for i in range(repeats + 1):  # the first is a warm-up (cuBLAS handles, allocator)
        sync()
        t0 = time.perf_counter()
        ta = torch.from_numpy(a).to(dev)
        tb = torch.from_numpy(b).to(dev)
        sync()
        t1 = time.perf_counter()
        tc = torch.matmul(ta, tb)
        sync()
        t2 = time.perf_counter()
        c = tc.cpu().numpy()
        t3 = time.perf_counter()
        del ta, tb, tc
        if i:
            for key, t in (("h2d", t1 - t0), ("mm", t2 - t1), ("d2h", t3 - t2), ("total", t3 - t0)):
                parts[key].append(t)
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # leave the GPU's memory to the provider
    return {k: statistics.median(v) for k, v in parts.items()}, c


def dcf_matmul(client: Client, a: np.ndarray, b: np.ndarray, repeats: int,
               budget_s: float) -> tuple[list[float], np.ndarray]:
    """Times of ``Client.matmul`` after a warm-up; fewer than ``repeats`` once ``budget_s`` is spent (at least 1)."""
    t_start = time.perf_counter()
    c = client.matmul(a, b)  # warm-up: the provider's first product at this size
    times: list[float] = []
    while len(times) < repeats:
        t0 = time.perf_counter()
        c = client.matmul(a, b)
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - t_start + times[-1] > budget_s:
            break
    return times, c


def rate(flop: float, seconds: float) -> str:
    r = flop / seconds
    return f"{r / 1e12:.1f} TFLOP/s" if r >= 1e12 else f"{r / 1e9:.1f} GFLOP/s"


def close_enough(c: np.ndarray, ref: np.ndarray, rows: int = 64) -> float:
    """Largest difference over the first ``rows`` rows, relative to ref's largest value there."""
    d = np.abs(c[:rows].astype(np.float64) - ref[:rows])
    return float(d.max() / max(1e-30, float(np.abs(ref[:rows]).max())))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=40.0, help="dcf's timed runs at one size stop after this")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--log-dir", help="the local cluster's logs (default: its temporary state dir)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, _stop)

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("[matmul] FAILED: torch sees no CUDA device")
        return 1
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    print(f"[matmul] device {where}; torch {torch.__version__}; float32; "
          f"float32 matmul precision {torch.get_float32_matmul_precision()!r} (as the provider's)")
    rows: list[dict[str, Any]] = []
    failed = False
    with LocalCluster(1, heartbeat=0.5, provider_args=["--device", args.device], log_dir=args.log_dir) as cl, \
            Client(cl.url, timeout=600) as client:
        node = client.nodes()[0]
        print(f"[matmul] dcf provider: device {node.get('device')}, {node.get('gflops', 0):.0f} GFLOP/s at start-up")
        for n in args.sizes:
            rng = np.random.default_rng(n)
            a = rng.standard_normal((n, n), dtype=np.float32)
            b = rng.standard_normal((n, n), dtype=np.float32)
            flop = 2.0 * n**3
            tt, ref = torch_matmul(a, b, args.device, args.repeats)
            print(f"[matmul] n={n} torch: total {tt['total']:.4f} s = h2d {tt['h2d']:.4f} + matmul {tt['mm']:.4f} "
                  f"+ d2h {tt['d2h']:.4f}; {rate(flop, tt['mm'])} in the product, "
                  f"{rate(flop, tt['total'])} with transfers")
            times, c = dcf_matmul(client, a, b, args.repeats, args.budget_s)
            td = statistics.median(times)
            err = close_enough(c, ref)
            ratio = td / tt["total"]
            met = ratio <= TARGET_RATIO
            print(f"[matmul] n={n} dcf Client.matmul: {td:.4f} s (median of {len(times)}: "
                  f"{', '.join(f'{t:.3f}' for t in times)}); {rate(flop, td)}; "
                  f"max rel. difference to torch's C {err:.1e}")
            print(f"[matmul] n={n} RATIO dcf/torch = {ratio:.2f}x (dcf at {100 / ratio:.0f}% of torch; "
                  f"target <= {TARGET_RATIO}x, >= 80%): {'MET' if met else 'NOT MET'}")
            if err > 1e-3:
                print(f"[matmul] n={n} FAILED: dcf's C differs from torch's by {err:.1e}")
                failed = True
            rows.append({"n": n, "dtype": "float32", "device": where, "torch_s": tt, "dcf_s": td,
                         "dcf_times_s": times, "ratio": ratio, "percent_of_torch": 100 / ratio,
                         "target_met": met, "max_rel_diff": err})
            if args.json:  # after each size: a stage stopped at the next one keeps these
                args.json.write_text(json.dumps({"matmul": rows}, indent=1) + "\n")
            del a, b, c, ref
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
