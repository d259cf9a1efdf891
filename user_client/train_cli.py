"""`dcf submit train` and `dcf submit predict`."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import ConfigError, TaskError
from common.jobs import JobState

from .arrays import load_npy_any, save_npy
from .client import TERMINAL, Client
from .paths import check_output

TRAIN_KEYS = ("model", "epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay", "schedule",
              "lr_step", "gamma", "seed", "sync", "max_staleness", "local_steps", "checkpoint_every",
              "min_providers", "start_timeout", "round_steps", "collective_timeout")


def _dataset(args: argparse.Namespace) -> Any:
    if args.dataset.startswith("provider:") and not args.dataset_file:
        return args.dataset  # the providers' own data (dcf-provider --data NAME=PATH.npz): nothing to upload
    from common.tasks.train import datasets

    if args.dataset_file:
        try:
            data = open(args.dataset_file, "rb").read()  # noqa: SIM115
        except OSError as exc:
            raise ConfigError(f"{args.dataset_file}: {exc.strerror or exc}") from None
        return datasets.from_npz(data, args.dataset_file)
    return datasets.load(args.dataset, seed=args.seed, size=args.synthetic_size,
                         features=args.synthetic_features, classes=args.synthetic_classes)


def submit_train(args: argparse.Namespace, client: Client, emit: Callable[..., None]) -> int:
    from .cli import following

    try:
        model_args = json.loads(args.model_args)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--model-args is not JSON: {exc}") from None
    check_output(args.output)
    check_output(Path(args.output).with_suffix(".json"), "-o (the model's metadata beside it)")
    params = {key: getattr(args, key) for key in TRAIN_KEYS}
    params["model_args"] = model_args
    dataset = _dataset(args)
    t0 = time.monotonic()
    with client:
        job = client.submit_train(dataset, nodes=args.nodes, **params)
        if args.no_wait:
            emit(args, {"job_id": job, "state": JobState.QUEUED.value}, job)
            return 0
        with following(job, announce=not args.json):
            view = _follow_training(client, job, show=not args.json and sys.stderr.isatty())
            if view["state"] != JobState.DONE:
                raise TaskError(f"job {job} {view['state']}: {view.get('error') or ''}")
            meta = client.save_model(job, args.output)
    wall = time.monotonic() - t0
    metrics = meta["metrics"]
    text = (f"job {job}: done in {wall:.1f} s (upload to model saved; training itself {meta['seconds']:.1f} s), "
            f"{meta['steps']} steps\n"
            f"test accuracy {metrics['test_accuracy']:.4f}, test loss {metrics['test_loss']:.4f}\n"
            f"wrote {args.output} and its metadata beside it")
    emit(args, {"job_id": job, "state": JobState.DONE.value, **meta, "wall_seconds": round(wall, 3)}, text)
    return 0


def _follow_training(client: Client, job: str, show: bool) -> dict[str, Any]:
    """Wait for a training job, with a bar of the job's progress (the number ``dcf status`` and
    ``dcf jobs`` show) and its latest metrics."""
    from .cli import progress_unit

    bar = None
    told = False
    try:
        while True:
            view = client.watch(job, wait=0.5)
            prog = view["progress"]
            last = (view.get("stats", {}).get("training") or {}).get("last") or {}
            if show and bar is None:
                from tqdm import tqdm

                bar = tqdm(desc="training", unit=f" {progress_unit(prog)}", file=sys.stderr, dynamic_ncols=True)
            if bar is not None:
                bar.unit = f" {progress_unit(prog)}"  # a queued job's view does not know it yet
                bar.total = prog["total"] or None
                bar.update(prog["done"] - bar.n)
                if last:
                    bar.set_postfix_str(f"epoch {last['epoch']} loss {last['loss']:.4f} acc {last['accuracy']:.3f} "
                                        f"{last['samples_per_s']:.0f} samples/s", refresh=True)
                elif view.get("waiting"):
                    bar.set_postfix_str(view["waiting"], refresh=True)
            elif view.get("waiting") and not told:
                print(f"dcf: job {job} {view['waiting']}", file=sys.stderr)
                told = True
            if view["state"] in TERMINAL:
                return view
    finally:
        if bar is not None:
            bar.close()


def submit_predict(args: argparse.Namespace, client: Client, emit: Callable[..., None]) -> int:
    from .cli import following

    check_output(args.output)
    x = load_npy_any(args.data)
    with client:
        job = client.submit_predict(args.model, x, nodes=args.nodes)
        with following(job, announce=not args.json):
            client.wait(job)
            preds = np.array(client.result(job))
    save_npy(args.output, preds)
    emit(args, {"job_id": job, "output": args.output, "count": int(preds.size)},
         f"job {job}: {preds.size} predictions written to {args.output}")
    return 0
