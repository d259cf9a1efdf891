#!/usr/bin/env python3
"""Benchmark: the training strategies compared in one run (issue 12, item 5).

    .venv/bin/python bench/strategies.py [--anchors ../shared/anchors] [--rate 100e6] [--png curves.png]
        [--repeats 3] [--only sync,allreduce]

sync (parameter server), allreduce, async and local-SGD on the same data, for two models:
  * the digits CNN (2 providers), with DDP gloo (2 processes, the anchor c_ddp_digits.py) in the same run
    for the step-time ratio;
  * an MLP of about 10M parameters on seeded synthetic data (3 providers), where the head's link carries
    N gradients and N parameter copies per step under the parameter server.
Each over a clean loopback and over a slowed link: an asyncio proxy (tests/chaos/harness.py SlowLink) on the
head's registration, task and result ports that every provider goes through (a shared link of ``--rate``
bytes/s, ``--latency`` one-way delay). The providers send arrays over it (--shared-files off).

Reported per run: step time (median between optimizer steps), time to the target test accuracy, final
accuracy, and bytes on the head's link per step (what the head sent and received, from the job's stats).
allreduce's member-to-member traffic (gloo, a ring: 2(W-1)/W x 4 x n_params bytes per member per step) does not
cross the head's link and is not slowed by the proxy (members talk over loopback); it is computed and shown
beside it, so a reader can judge a real lab's links. A PNG of the loss curves is written with matplotlib when
it is installed. Not a test: nothing here passes or fails.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.tasks.train import datasets  # noqa: E402
from tests.chaos.harness import SlowLink  # noqa: E402
from user_client import Client  # noqa: E402
from user_client.local import LocalCluster  # noqa: E402

CNN: dict[str, Any] = {"model": "cnn", "batch_size": 64, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "seed": 0}
MLP: dict[str, Any] = {"model": "mlp", "model_args": {"hidden": [3072, 2048]}, "batch_size": 64, "optimizer": "sgd",
                       "lr": 0.02, "momentum": 0.9, "seed": 0}
STRATEGIES: dict[str, dict[str, Any]] = {
    "sync": {"sync": "sync"}, "allreduce": {"sync": "allreduce"},  # rounds of half an epoch (see main)
    "async": {"sync": "async", "max_staleness": 2}, "local-sgd": {"sync": "local-sgd", "local_steps": 4}}


@contextmanager
def cluster(providers: int, slow: tuple[float, float] | None) -> Iterator[tuple[LocalCluster, Client]]:
    with LocalCluster(0, threads=1, state_dir=tempfile.mkdtemp(prefix="dcf-bench-")) as cl, Client(cl.url) as c:
        if slow is None:
            for _ in range(providers):
                cl.add_provider("--shared-files", "off")
            cl.wait_ready(providers)
            yield cl, c
            return
        with SlowLink(cl.ports, latency=slow[1], rate=slow[0]) as link:
            for _ in range(providers):
                cl.add_provider(*link.provider_args(), "--shared-files", "off")
            cl.wait_ready(providers)
            yield cl, c


def run(c: Client, ds: datasets.Dataset, epochs: int, params: dict[str, Any], target: float,
        providers: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    job = c.submit_train(ds, epochs=epochs, min_providers=providers, **params)
    view = c.wait(job, timeout=3600)
    wall = time.perf_counter() - t0
    tr, stats = view["stats"]["training"], view["stats"]
    history = tr["history"]
    reached = next((h["elapsed_s"] for h in history if h["test_accuracy"] >= target), None)
    steps = max(1, tr["step"])
    return {"step_ms": tr["step_ms_median"], "wall_s": wall, "test_acc": tr["test_accuracy"], "to_target_s": reached,
            "head_bytes_per_step": (stats.get("bytes_in", 0) + stats.get("bytes_out", 0)) / steps,
            "loss": [h["train_loss"] for h in history], "test_loss": [h["test_loss"] for h in history]}


def ddp_step_ms(anchors: Path | None) -> float | None:
    if anchors is None:
        return None
    try:
        out = subprocess.run([sys.executable, str(anchors / "c_ddp_digits.py"), "--mode", "ddp", "--repeats", "1"],
                             capture_output=True, text=True, timeout=900, cwd=anchors)
        res = json.loads([x for x in out.stdout.splitlines() if x.startswith("{")][-1])
        return 1000.0 * float(res["step_s"]["median"])
    except Exception as exc:  # an optional comparison
        print(f"  (DDP anchor failed: {exc})")
        return None


def n_params(params: dict[str, Any], ds: datasets.Dataset) -> int:
    from common.tasks.train import models

    net = models.build_model(params["model"], ds.input_shape, ds.n_classes, params.get("model_args"))
    return models.n_parameters(net)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--anchors", type=Path, help="the anchors folder (c_ddp_digits.py), for DDP gloo")
    ap.add_argument("--cnn-epochs", type=int, default=20)
    ap.add_argument("--mlp-epochs", type=int, default=2)
    ap.add_argument("--mlp-samples", type=int, default=900, help="synthetic samples (80%% train: 11 steps an epoch)")
    ap.add_argument("--rate", type=float, default=100e6, help="the slowed link's bytes/s (shared by all providers)")
    ap.add_argument("--latency", type=float, default=0.002, help="the slowed link's one-way delay, seconds")
    ap.add_argument("--target", type=float, default=0.95, help="test accuracy for time-to-accuracy (CNN)")
    ap.add_argument("--png", type=Path, default=Path("strategies.png"))
    ap.add_argument("--only", default="", help="comma-separated subset of strategies")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each strategy per setup and link, interleaved")
    args = ap.parse_args()
    anchors = args.anchors.resolve() if args.anchors else None
    names = [s for s in STRATEGIES if not args.only or s in args.only.split(",")]
    digits = datasets.digits(0)
    synth = datasets.synthetic(0, args.mlp_samples, 1024, 10)
    setups = [("digits CNN", digits, CNN, 2, args.cnn_epochs), ("MLP ~10M", synth, MLP, 3, args.mlp_epochs)]
    links: list[tuple[str, tuple[float, float] | None]] = [
        ("loopback", None), (f"{args.rate / 1e6:g} MB/s, {1000 * args.latency:g} ms", (args.rate, args.latency))]
    results: list[tuple[str, str, str, dict[str, Any]]] = []
    ddp = []
    for model, ds, params, providers, epochs in setups:
        size = n_params(params, ds)
        print(f"== {model}: {size} parameters, {providers} providers, {epochs} epochs", flush=True)
        for link_name, slow in links:
            with cluster(providers, slow) as (_, c):
                run(c, ds, 1, {**params, **STRATEGIES["sync"]}, args.target, providers)  # warm-up
                # allreduce: rounds of half an epoch (a round that starts an epoch is not timed: an eval round is
                # before it)
                half = {"round_steps": max(1, len(ds.x_train) // params["batch_size"] // 2)}
                steps: dict[str, list[float]] = {}
                for _ in range(args.repeats):  # interleaved: sync, allreduce, ..., sync, allreduce, ...
                    for name in names:
                        extra = {**STRATEGIES[name], **(half if name == "allreduce" else {})}
                        res = run(c, ds, epochs, {**params, **extra}, args.target, providers)
                        if name == "allreduce":
                            res["member_bytes_per_step"] = 2 * (providers - 1) * 4 * size  # ring, all members
                        results.append((model, link_name, name, res))
                        steps.setdefault(name, []).append(res["step_ms"] or float("nan"))
                        print(f"  {link_name:>18} {name:>10}: step {res['step_ms'] or float('nan'):.2f} ms, "
                              f"wall {res['wall_s']:.2f} s, test acc {res['test_acc']:.4f}, "
                              f"head link {res['head_bytes_per_step'] / 1e6:.2f} MB/step", flush=True)
                        if model == "digits CNN" and slow is None and name in ("sync", "allreduce"):
                            ddp.append(ddp_step_ms(anchors))
                if "sync" in steps and "allreduce" in steps:
                    pairs = sorted(a / s for a, s in zip(steps["allreduce"], steps["sync"], strict=True))
                    print(f"  {model}, {link_name}: allreduce step / sync step per interleaved pair: "
                          f"{', '.join(f'{x:.2f}' for x in pairs)}, median {pairs[len(pairs) // 2]:.2f}", flush=True)
    print("\n| model | link | strategy | step ms | wall s | test acc | s to target | head link MB/step | "
          "member links MB/step |\n|---|---|---|---|---|---|---|---|---|")
    for model, link_name, name, res in results:
        tta = res["to_target_s"]
        member = res.get("member_bytes_per_step")
        print(f"| {model} | {link_name} | {name} | {res['step_ms'] or float('nan'):.2f} | {res['wall_s']:.2f} | "
              f"{res['test_acc']:.4f} | {'not reached' if tta is None else f'{tta:.2f}'} | "
              f"{res['head_bytes_per_step'] / 1e6:.2f} | {'' if member is None else f'{member / 1e6:.2f}'} |")
    ddp_ms = sorted(x for x in ddp if x)
    if ddp_ms:
        mid = ddp_ms[len(ddp_ms) // 2]
        for model, link_name, name, res in results:
            if model == "digits CNN" and link_name == "loopback" and name in ("sync", "allreduce") and res["step_ms"]:
                print(f"digits CNN {name} step = {res['step_ms'] / mid:.2f}x DDP gloo ({mid:.2f} ms, median of "
                      f"{len(ddp_ms)} runs in this run)")
    plot(results, args.png)


def plot(results: list[tuple[str, str, str, dict[str, Any]]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib is not installed: no PNG; pip install matplotlib)")
        return
    models = sorted({r[0] for r in results})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for m, link, name, res in results:
            if m == model:
                ax.plot(range(1, len(res["loss"]) + 1), res["loss"], label=f"{name} ({link})",
                        linestyle="-" if link == "loopback" else "--")
        ax.set_title(model)
        ax.set_xlabel("epoch")
        ax.set_ylabel("train loss")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
