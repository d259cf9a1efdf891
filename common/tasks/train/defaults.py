"""The parameters of a ``train`` job and their defaults, as plain data: what the CLI shows without
importing numpy or the task (``params.py`` checks them)."""

from __future__ import annotations

from typing import Any

OPTIMIZERS = ("sgd", "adam", "adadelta")
SCHEDULES = ("none", "step", "cosine")
STRATEGIES = ("sync", "async", "local-sgd", "allreduce")
#: the most providers a job may wait for at its start barrier (``min_providers``): the cap the API puts
#: on a job's ``nodes`` (head_node/http/models.py); more is a mistake (422), not a cluster to wait for
MAX_MIN_PROVIDERS = 100_000
#: the start barrier's default timeout, in seconds: torchrun's rendezvous default (0: wait forever)
START_TIMEOUT_S = 900.0

#: allreduce: the most seconds one collective (or forming the group) may block a member
COLLECTIVE_TIMEOUT_S = 60.0

TRAIN_DEFAULTS: dict[str, Any] = {
    "model": "cnn", "model_args": {}, "epochs": 1, "batch_size": 64, "optimizer": "sgd", "lr": 0.05,
    "momentum": 0.0, "weight_decay": 0.0, "schedule": "none", "lr_step": 10, "gamma": 0.1, "seed": 0,
    "sync": "sync", "max_staleness": 2, "local_steps": 4, "checkpoint_every": 50, "classes": 0,
    "dataset": "", "dataset_hash": "", "min_providers": 1, "start_timeout": START_TIMEOUT_S,
    "round_steps": 10, "collective_timeout": COLLECTIVE_TIMEOUT_S,
}
