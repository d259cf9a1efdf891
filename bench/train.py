#!/usr/bin/env python3
"""Benchmark: data-parallel training of the digits CNN, against torch.distributed DDP (gloo, 2
processes) and single-process PyTorch, in the same run; then sync vs allreduce vs async vs local-SGD.

    .venv/bin/python bench/train.py [--epochs 20] [--anchors ../shared/anchors]

Same setup as the DDP anchor: digits, X/16, 80/20 stratified split, SGD lr 0.05 momentum 0.9,
global batch 64, drop_last (22 steps an epoch). dcf: 2 local providers, 1 thread each.
Step time for dcf = wall time between two optimizer steps on the head (median; eval rounds
excluded; allreduce: a round's time over its steps, so the head's per-round work is in it).
DDP and single-process numbers come from the anchor script c_ddp_digits.py.
Not a test: nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.tasks.train import datasets  # noqa: E402
from user_client import Client  # noqa: E402
from user_client.local import LocalCluster  # noqa: E402

BASE: dict[str, Any] = {"model": "cnn", "batch_size": 64, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "seed": 0}


def anchor(anchors: Path, *args: str) -> dict | None:
    try:
        out = subprocess.run([sys.executable, str(anchors / "c_ddp_digits.py"), *args], capture_output=True,
                             text=True, timeout=900, cwd=anchors)
        return json.loads([x for x in out.stdout.splitlines() if x.startswith("{")][-1])
    except Exception as exc:  # optional comparison
        print(f"  (c_ddp_digits.py {' '.join(args)} failed: {exc})")
        return None


def run_dcf(client: Client, ds: datasets.Dataset, epochs: int, **params: Any) -> dict:
    t0 = time.perf_counter()
    job = client.submit_train(ds, epochs=epochs, **{**BASE, **params})
    view = client.wait(job, timeout=3600)
    wall = time.perf_counter() - t0
    tr = view["stats"]["training"]
    return {"step_ms": tr["step_ms_median"], "wall_s": wall, "test_acc": tr["test_accuracy"],
            "history": tr["history"]}


def time_to(history: list[dict], target: float) -> float | None:
    for h in history:
        if h["test_accuracy"] >= target:
            return h["elapsed_s"]
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--anchors", type=Path, help="the anchors folder (c_ddp_digits.py), for DDP and 1 process")
    ap.add_argument("--target", type=float, default=0.95, help="accuracy for time-to-accuracy")
    ap.add_argument("--repeats", type=int, default=3, help="dcf sync, allreduce and DDP runs, interleaved (medians)")
    ap.add_argument("--round-steps", type=int, default=11, help="allreduce: steps per round (11: half an epoch; a "
                    "round that starts an epoch is not timed, as the eval round before it is not a step)")
    args = ap.parse_args()
    if args.anchors:
        args.anchors = args.anchors.resolve()  # the anchor runs with its folder as the working directory
    ds = datasets.digits(0)
    rows = []
    syncs, allreduces, ddps = [], [], []
    with LocalCluster(2, threads=1, state_dir=tempfile.mkdtemp(prefix="dcf-bench-")) as cl, Client(cl.url) as c:
        run_dcf(c, ds, 1)  # warm-up: imports, model build, dataset caches
        for i in range(args.repeats):  # interleaved with DDP: both see the same machine noise
            syncs.append(run_dcf(c, ds, args.epochs))
            print(f"dcf sync, 2 providers, run {i + 1}: step {syncs[-1]['step_ms']:.2f} ms (median), "
                  f"{args.epochs} epochs in {syncs[-1]['wall_s']:.2f} s, test accuracy {syncs[-1]['test_acc']:.4f}")
            allreduces.append(run_dcf(c, ds, args.epochs, sync="allreduce", round_steps=args.round_steps))
            print(f"dcf allreduce, 2 providers, run {i + 1}: step {allreduces[-1]['step_ms']:.2f} ms (median), "
                  f"{args.epochs} epochs in {allreduces[-1]['wall_s']:.2f} s, "
                  f"test accuracy {allreduces[-1]['test_acc']:.4f}")
            if args.anchors:
                res = anchor(args.anchors, "--mode", "ddp", "--repeats", "1")
                if res:
                    ddps.append(res)
                    print(f"DDP gloo, run {i + 1}: step {1000 * res['step_s']['median']:.2f} ms")
        sync = sorted(syncs, key=lambda r: r["step_ms"])[len(syncs) // 2]
        rows.append(("dcf sync, 2 providers", sync["step_ms"], sync["wall_s"], sync["test_acc"]))
        allreduce = sorted(allreduces, key=lambda r: r["step_ms"])[len(allreduces) // 2]
        rows.append((f"dcf allreduce, 2 providers, rounds of {args.round_steps}", allreduce["step_ms"],
                     allreduce["wall_s"], allreduce["test_acc"]))
        strategies = {"sync": sync, "allreduce": allreduce}
        for name, extra in (("async", {"sync": "async", "max_staleness": 2}),
                            ("local-sgd", {"sync": "local-sgd", "local_steps": 4, "lr": 0.1})):
            strategies[name] = run_dcf(c, ds, args.epochs, **extra)
    if ddps:
        ddp = sorted(ddps, key=lambda r: r["step_s"]["median"])[len(ddps) // 2]
        rows.append(("DDP gloo, 2 procs x 1 thread", 1000 * ddp["step_s"]["median"], ddp["train_wall_s"]["median"],
                     sum(ddp["test_acc"]) / len(ddp["test_acc"])))
        for name, res, runs in (("sync", sync, syncs), ("allreduce", allreduce, allreduces)):
            ratios = sorted(r["step_ms"] / (1000 * d["step_s"]["median"]) for r, d in zip(runs, ddps, strict=False))
            print(f"dcf {name} step time = {res['step_ms'] / (1000 * ddp['step_s']['median']):.2f}x DDP's "
                  f"(medians of {len(runs)} interleaved runs each); per pair: "
                  f"{', '.join(f'{x:.2f}' for x in ratios)}, median {ratios[len(ratios) // 2]:.2f}")
    if args.anchors:
        single = anchor(args.anchors, "--mode", "single", "--threads", "2", "--repeats", "1")
        if single:
            rows.append(("1 process, 2 threads", 1000 * single["step_s"]["median"], single["train_wall_s"]["median"],
                         sum(single["test_acc"]) / len(single["test_acc"])))
    print("\n| system | step ms (median) | train wall s | test accuracy |\n|---|---|---|---|")
    for name, step, wall, acc in rows:
        print(f"| {name} | {step:.2f} | {wall:.2f} | {acc:.4f} |")
    print(f"\n| strategy | step ms | wall s | final test acc | s to {args.target:.0%} test acc |")
    print("|---|---|---|---|---|")
    for name, res in strategies.items():
        tta = time_to(res["history"], args.target)
        print(f"| {name} | {res['step_ms']:.2f} | {res['wall_s']:.2f} | {res['test_acc']:.4f} | "
              f"{'not reached' if tta is None else f'{tta:.2f}'} |")


if __name__ == "__main__":
    main()
