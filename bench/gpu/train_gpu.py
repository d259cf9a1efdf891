#!/usr/bin/env python3
"""GPU check, training: a short data-parallel training on 2 providers of one device, per sync mode.

    python3 bench/gpu/train_gpu.py --device cuda --modes sync allreduce --json OUT/train.json

The digits CNN (bench/train.py's setup: SGD lr 0.05 momentum 0.9, global batch 64), a few epochs,
``min_providers=2`` so both providers take part. Step time: the head's median between two optimizer
steps. A mode the head refuses (``allreduce`` before it exists) is reported "not available"; a job
that fails or outlasts ``--job-timeout`` is reported with its error (and the providers' NCCL lines).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from common.errors import DcfError, NotFound, ValidationError, WaitTimeout  # noqa: E402
from common.tasks.train import datasets  # noqa: E402
from user_client import Client  # noqa: E402
from user_client.local import LocalCluster  # noqa: E402

BASE: dict[str, Any] = {"model": "cnn", "batch_size": 64, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "seed": 0}


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # with-blocks run: the local cluster is stopped


def provider_lines(log_dir: Path, words: tuple[str, ...] = ("NCCL", "nccl", "Error", "error"),
                   most: int = 12) -> list[str]:
    out: list[str] = []
    for log in sorted(log_dir.glob("provider-*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if any(w in line for w in words):
                out.append(f"{log.name}: {line[:300]}")
    return out[-most:]


def run_mode(client: Client, ds: datasets.Dataset, mode: str, epochs: int, providers: int,
             timeout: float) -> dict[str, Any]:
    params = {**BASE, "sync": mode, "min_providers": providers, "start_timeout": timeout}
    t0 = time.perf_counter()
    try:
        job = client.submit_train(ds, nodes=providers, epochs=epochs, **params)
    except (ValidationError, NotFound) as exc:
        return {"mode": mode, "status": "not available", "error": str(exc)}
    try:
        view = client.wait(job, timeout=timeout)
    except WaitTimeout as exc:
        with contextlib.suppress(DcfError):
            client.cancel(job)
        return {"mode": mode, "status": "timed out", "error": str(exc)}
    except DcfError as exc:
        return {"mode": mode, "status": "failed", "error": str(exc)}
    tr = view["stats"]["training"]
    return {"mode": mode, "status": "ok", "step_ms": tr["step_ms_median"], "steps": tr["step"],
            "wall_s": time.perf_counter() - t0, "test_accuracy": tr["test_accuracy"], "shares": view.get("shares")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--providers", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=["sync", "allreduce"])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--job-timeout", type=float, default=60.0, help="seconds one training may take")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--log-dir", type=Path, help="the local cluster's logs")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, _stop)

    from common.tasks.train.defaults import STRATEGIES

    print(f"[train] sync modes this checkout's client knows: {', '.join(STRATEGIES)}")
    ds = datasets.digits(0)
    results: list[dict[str, Any]] = []
    env = {"NCCL_DEBUG": "WARN"}
    threads = 1 if args.device == "cpu" else None
    log_dir = args.log_dir
    with LocalCluster(args.providers, heartbeat=0.5, threads=threads, env=env,
                      provider_args=["--device", args.device],
                      log_dir=str(log_dir) if log_dir else None) as cl, Client(cl.url, timeout=120) as client:
        log_dir = cl.log_dir
        kinds = [n.get("device") for n in client.nodes()]
        print(f"[train] {args.providers} providers on devices {kinds}; digits CNN, {args.epochs} epochs, batch 64")
        for mode in args.modes:
            res = run_mode(client, ds, mode, args.epochs, args.providers, args.job_timeout)
            results.append(res)
            if res["status"] == "ok":
                print(f"[train] {mode}: STEP {res['step_ms']:.2f} ms (median over {res['steps']} steps), "
                      f"{res['wall_s']:.2f} s in all, test accuracy {res['test_accuracy']:.4f}")
            elif res["status"] == "not available":
                print(f"[train] {mode}: not available (the head refused it: {res['error']})")
            else:
                print(f"[train] {mode}: {res['status'].upper()}: {res['error']}")
                lines = provider_lines(log_dir)
                res["provider_log"] = lines
                if any("Duplicate GPU" in line for line in lines):
                    print("[train]   NCCL refuses two ranks on one GPU (NCCL >= 2.5): this needs 2 GPUs, "
                          "or gloo for ranks that share a device")
                for line in lines:
                    print(f"[train]   {line}")
    if args.json:
        args.json.write_text(json.dumps({"train": results}, indent=1) + "\n")
    return 0 if all(r["status"] in ("ok", "not available") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
