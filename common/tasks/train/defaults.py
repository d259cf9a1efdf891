"""The parameters of a ``train`` job and their defaults, as plain data: what the CLI shows without
importing numpy or the task (``params.py`` checks them)."""

from __future__ import annotations

from typing import Any

OPTIMIZERS = ("sgd", "adam", "adadelta")
SCHEDULES = ("none", "step", "cosine")
STRATEGIES = ("sync", "async", "local-sgd")

TRAIN_DEFAULTS: dict[str, Any] = {
    "model": "cnn", "model_args": {}, "epochs": 1, "batch_size": 64, "optimizer": "sgd", "lr": 0.05,
    "momentum": 0.0, "weight_decay": 0.0, "schedule": "none", "lr_step": 10, "gamma": 0.1, "seed": 0,
    "sync": "sync", "max_staleness": 2, "local_steps": 4, "checkpoint_every": 50, "classes": 0,
    "dataset": "", "dataset_hash": "",
}
