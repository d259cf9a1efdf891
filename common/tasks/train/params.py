"""The parameters of a ``train`` job: defaults, choices and checks (one place for all of them)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ...arrays import ArrayMeta
from ...errors import NotFound, ValidationError
from . import models
from .defaults import MAX_MIN_PROVIDERS, OPTIMIZERS, SCHEDULES, STRATEGIES, TRAIN_DEFAULTS

__all__ = ["MAX_MIN_PROVIDERS", "OPTIMIZERS", "SCHEDULES", "STRATEGIES", "TRAIN_DEFAULTS", "train_params"]


def train_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Defaults filled in and every value checked; raises ValidationError/NotFound."""
    unknown = set(params) - set(TRAIN_DEFAULTS)
    if unknown:
        raise ValidationError(f"train: unknown parameters {sorted(unknown)}")
    p = {**TRAIN_DEFAULTS, **params}
    if p["model"] not in models.model_names():
        raise NotFound(f"unknown model {p['model']!r}; known: {', '.join(models.model_names())}")
    for key, choices in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("sync", STRATEGIES)):
        if p[key] not in choices:
            raise ValidationError(f"unknown {key} {p[key]!r}; choose one of {', '.join(choices)}")
    _int(p, "epochs", 1, 100_000)
    _int(p, "batch_size", 1, 10**7, "batch size must be a positive integer")
    _int(p, "seed", 0, 2**63 - 1)
    _int(p, "max_staleness", 0, 1000)
    _int(p, "local_steps", 1, 10_000)
    _int(p, "checkpoint_every", 1, 10**9)
    _int(p, "lr_step", 1, 100_000)
    _int(p, "round_steps", 1, 100_000)
    _int(p, "classes", 0, 10_000)
    _int(p, "min_providers", 1, MAX_MIN_PROVIDERS,
         f"min_providers must be an integer in 1..{MAX_MIN_PROVIDERS} (the most providers a job may use), "
         f"got {p['min_providers']!r}")
    for key in ("lr", "momentum", "weight_decay", "gamma", "start_timeout"):
        v = p[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValidationError(f"{key} must be a finite non-negative number, got {v!r}")
    if p["lr"] <= 0:
        raise ValidationError("lr must be positive")
    timeout = p["collective_timeout"]
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= 86_400:
        raise ValidationError(f"collective_timeout must be a number of seconds in (0, 86400], got {timeout!r}")
    if p["start_timeout"] > 10**9:
        raise ValidationError(f"start_timeout must be at most 1e9 seconds (0: wait forever), "
                              f"got {p['start_timeout']!r}")
    if not isinstance(p["model_args"], dict):
        raise ValidationError("model_args must be an object")
    return p


def _int(p: dict[str, Any], key: str, lo: int, hi: int, msg: str | None = None) -> None:
    v = p[key]
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValidationError(msg or f"{key} must be an integer in {lo}..{hi}, got {v!r}")


def check_dataset(inputs: Mapping[str, ArrayMeta], pairs: Sequence[tuple[str, str]]) -> None:
    for xname, yname in pairs:
        x, y = inputs[xname], inputs[yname]
        if x.dtype not in ("float32", "float64") or len(x.shape) < 2:
            raise ValidationError(f"{xname} must be float32 of shape (samples, features...), got {x.dtype} "
                                  f"{list(x.shape)}")
        if y.dtype not in ("int64", "int32") or len(y.shape) != 1:
            raise ValidationError(f"{yname} must be a 1-D integer array of labels, got {y.dtype} {list(y.shape)}")
        if x.shape[0] != y.shape[0]:
            raise ValidationError(f"{xname} has {x.shape[0]} samples but {yname} has {y.shape[0]} labels")
    if inputs["x"].shape[1:] != inputs["x_test"].shape[1:]:
        raise ValidationError(f"x_test has feature shape {list(inputs['x_test'].shape[1:])}, x has "
                              f"{list(inputs['x'].shape[1:])}")


def metrics_array(loss_sum: float, n: int, correct: int) -> np.ndarray:
    return np.array([loss_sum, n, correct], dtype=np.float64)
