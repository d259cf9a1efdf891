"""Training and inference task types: ``train`` (data-parallel, driven round by round by the
head's trainer, head_node/training.py) and ``predict`` (split rows, run the model, merge by offset).

Provider side of ``train``, one subtask kind per round kind:
  grad   params vector + sample indices -> [sum of per-sample gradients (float32), [loss_sum, n, correct]]
  eval   params vector + index range of the test split -> [[loss_sum, n, correct]]
  local  params vector + K batches of indices -> [params after K local SGD steps, [loss_sum, n, correct]]
Datasets are not sent with subtasks: they are blobs the provider maps (co-located) or fetches once
and keeps by content hash. Models come from common/models.py by name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import models
from .errors import NotFound, ValidationError
from .rows import check_block, place_rows, worker_shares
from .tasks import ArrayMeta, Device, SubtaskPlan, TaskType, Worker, register

OPTIMIZERS = ("sgd", "adam", "adadelta")
SCHEDULES = ("none", "step", "cosine")
STRATEGIES = ("sync", "async", "local-sgd")

TRAIN_DEFAULTS: dict[str, Any] = {
    "model": "cnn", "model_args": {}, "epochs": 1, "batch_size": 64, "optimizer": "sgd", "lr": 0.05,
    "momentum": 0.0, "weight_decay": 0.0, "schedule": "none", "lr_step": 10, "gamma": 0.1, "seed": 0,
    "sync": "sync", "max_staleness": 2, "local_steps": 4, "checkpoint_every": 50, "classes": 0,
    "dataset": "", "dataset_hash": "",
}


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
    _int(p, "classes", 0, 10_000)
    for key in ("lr", "momentum", "weight_decay", "gamma"):
        v = p[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValidationError(f"{key} must be a finite non-negative number, got {v!r}")
    if p["lr"] <= 0:
        raise ValidationError("lr must be positive")
    if not isinstance(p["model_args"], dict):
        raise ValidationError("model_args must be an object")
    return p


def _int(p: dict[str, Any], key: str, lo: int, hi: int, msg: str | None = None) -> None:
    v = p[key]
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValidationError(msg or f"{key} must be an integer in {lo}..{hi}, got {v!r}")


def _check_dataset(inputs: Mapping[str, ArrayMeta], pairs: Sequence[tuple[str, str]]) -> None:
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


class _ModelRunner:
    """Provider side: builds a job's model once and runs it on the device."""

    @staticmethod
    def model(sub: Mapping[str, Any], device: Device) -> models.FlatView:
        cache = getattr(device, "cache", None)
        key = ("model", sub["job_id"], sub["model"], repr(sub.get("model_args")))
        if cache is not None and key in cache:
            return cache[key]
        module = models.build_model(sub["model"], sub["input_shape"], sub["classes"], sub.get("model_args"))
        if device.kind != "cpu":
            module = module.to(device.torch_device())
        net = models.FlatView(module)
        if cache is not None:
            cache[key] = net
            while len(cache) > 16:  # models of old jobs
                cache.pop(next(iter(cache)))
        return net

    @staticmethod
    def data(device: Device, data: Mapping[str, str], name: str) -> np.ndarray:
        """A dataset array: mapped from the head's state dir or fetched once, then cached by content."""
        fetch = getattr(device, "fetch", None)
        if fetch is None:
            raise ValidationError("this provider cannot fetch datasets")
        return fetch(data[name], f"{data['key']}:{name}")

    @staticmethod
    def tensors(device: Device, x: np.ndarray, y: np.ndarray | None = None) -> tuple[Any, Any]:
        import torch

        dev = device.torch_device() if device.kind != "cpu" else None
        tx = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        ty = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)) if y is not None else None
        if dev is not None:
            tx = tx.to(dev)
            ty = ty.to(dev) if ty is not None else None
        return tx, ty


def _has_torch() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


class TrainTask(TaskType):
    """Data-parallel training. The head's trainer plans each round (head_node/training.py)."""

    name = "train"
    inputs = ("x", "y", "x_test", "y_test")

    def available(self) -> bool:
        return _has_torch()

    def validate(self, params: Mapping[str, Any], inputs: Mapping[str, ArrayMeta]) -> dict[str, ArrayMeta]:
        if set(inputs) != set(self.inputs):
            raise ValidationError(f"train needs inputs {list(self.inputs)}")
        p = train_params(params)
        _check_dataset(inputs, (("x", "y"), ("x_test", "y_test")))
        n = inputs["x"].shape[0]
        if p["batch_size"] > n:
            raise ValidationError(f"batch size {p['batch_size']} is larger than the training set ({n} samples)")
        return {}

    def eligible(self, worker: Worker, params: Mapping[str, Any], inputs: Mapping[str, ArrayMeta]) -> str | None:
        return None  # float32 everywhere, gradients come back as CPU float32

    def split(self, params: Mapping[str, Any], inputs: Mapping[str, ArrayMeta],
              workers: Sequence[Worker]) -> list[SubtaskPlan]:
        raise ValidationError("train jobs are planned by the head's trainer, not split once")

    def subtask_inputs(self, sub_params: Mapping[str, Any], inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        raise ValidationError("train subtask inputs come from the head's trainer")

    def check_result(self, sub_params: Mapping[str, Any], outputs: Mapping[str, ArrayMeta],
                     arrays: Sequence[np.ndarray]) -> None:
        kind = sub_params["kind"]
        want = 1 if kind == "eval" else 2
        if len(arrays) != want or arrays[-1].shape != (3,) or arrays[-1].dtype != np.float64:
            raise ValidationError(f"train {kind} result must be {want} arrays ending with [loss, n, correct]")
        if kind != "eval" and (arrays[0].dtype != np.float32 or arrays[0].shape != (sub_params["n_params"],)):
            raise ValidationError(f"train {kind} result vector must be float32 of {sub_params['n_params']} values")

    def merge(self, sub_params: Mapping[str, Any], arrays: Sequence[np.ndarray],
              outputs: Mapping[str, np.ndarray]) -> None:
        raise ValidationError("train results are merged by the head's trainer")

    def run(self, sub_params: Mapping[str, Any], arrays: Sequence[np.ndarray], device: Device) -> list[np.ndarray]:
        import torch
        import torch.nn.functional as F

        flat = _ModelRunner.model(sub_params, device)
        flat.load(arrays[0])
        net = flat.model
        kind = sub_params["kind"]
        data = sub_params["data"]
        x_all = _ModelRunner.data(device, data, "x")
        y_all = _ModelRunner.data(device, data, "y")
        if kind == "eval":
            r0, rows = sub_params["row0"], sub_params["rows"]
            x, y = _ModelRunner.tensors(device, x_all[r0:r0 + rows], y_all[r0:r0 + rows])
            with torch.no_grad():
                out = net(x)
                loss = F.cross_entropy(out, y, reduction="sum")
            return [metrics_array(float(loss), rows, int((out.argmax(1) == y).sum()))]
        idx = np.asarray(arrays[1], dtype=np.int64)
        if kind == "grad":
            x, y = _ModelRunner.tensors(device, x_all[idx], y_all[idx])
            flat.zero_grad()
            out = net(x)
            loss = F.cross_entropy(out, y, reduction="sum")
            loss.backward()
            correct = int((out.argmax(1) == y).sum())
            return [flat.gradients_numpy(), metrics_array(float(loss.detach()), len(idx), correct)]
        if kind == "local":
            steps = idx.reshape(sub_params["local_steps"], -1)
            opt = torch.optim.SGD(net.parameters(), lr=sub_params["lr"])
            loss_sum, correct = 0.0, 0
            for batch in steps:
                x, y = _ModelRunner.tensors(device, x_all[batch], y_all[batch])
                flat.zero_grad()
                out = net(x)
                loss = F.cross_entropy(out, y)
                loss.backward()
                opt.step()
                loss_sum += float(loss.detach()) * len(batch)
                correct += int((out.argmax(1) == y).sum())
            return [flat.parameters_numpy(), metrics_array(loss_sum, idx.size, correct)]
        raise ValidationError(f"unknown train subtask kind {kind!r}")


class PredictTask(TaskType):
    """Inference: rows of X split over providers by speed; predictions merged by row offset."""

    name = "predict"
    inputs = ("x", "weights")

    def available(self) -> bool:
        return _has_torch()

    def validate(self, params: Mapping[str, Any], inputs: Mapping[str, ArrayMeta]) -> dict[str, ArrayMeta]:
        if set(inputs) != set(self.inputs):
            raise ValidationError("predict needs inputs 'x' and 'weights'")
        x, w = inputs["x"], inputs["weights"]
        if len(x.shape) < 2 or x.dtype not in ("float32", "float64"):
            raise ValidationError(f"predict: x must be float of shape (samples, features...), got {x.dtype} "
                                  f"{list(x.shape)}")
        if w.dtype != "float32" or len(w.shape) != 1:
            raise ValidationError("predict: weights must be the model's flat float32 parameter vector")
        for key in ("model", "input_shape", "classes"):
            if key not in params:
                raise ValidationError(f"predict: missing parameter {key!r}")
        if params["model"] not in models.model_names():
            raise NotFound(f"unknown model {params['model']!r}")
        if list(params["input_shape"]) != list(x.shape[1:]):
            raise ValidationError(f"predict: the model takes inputs of shape {list(params['input_shape'])}, "
                                  f"x has {list(x.shape[1:])}")
        return {"predictions": ArrayMeta("int64", (x.shape[0],))}

    def eligible(self, worker: Worker, params: Mapping[str, Any], inputs: Mapping[str, ArrayMeta]) -> str | None:
        return None

    def split(self, params: Mapping[str, Any], inputs: Mapping[str, ArrayMeta],
              workers: Sequence[Worker]) -> list[SubtaskPlan]:
        plans, row0 = [], 0
        n_params = inputs["weights"].shape[0]
        for worker, count in worker_shares(inputs["x"].shape[0], workers):
            plans.append(SubtaskPlan(worker.provider_id, {"row0": row0, "rows": count, **dict(params)},
                                     cost=2.0 * count * n_params))
            row0 += count
        return plans

    def subtask_inputs(self, sub_params: Mapping[str, Any], inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        r0, rows = sub_params["row0"], sub_params["rows"]
        return [inputs["x"][r0:r0 + rows], inputs["weights"]]

    def check_result(self, sub_params: Mapping[str, Any], outputs: Mapping[str, ArrayMeta],
                     arrays: Sequence[np.ndarray]) -> None:
        check_block("predict", arrays, "int64", (sub_params["rows"],))

    def merge(self, sub_params: Mapping[str, Any], arrays: Sequence[np.ndarray],
              outputs: Mapping[str, np.ndarray]) -> None:
        place_rows(outputs["predictions"], sub_params, arrays[0])

    def run(self, sub_params: Mapping[str, Any], arrays: Sequence[np.ndarray], device: Device) -> list[np.ndarray]:
        import torch

        net = models.build_model(sub_params["model"], sub_params["input_shape"], sub_params["classes"],
                                 sub_params.get("model_args"))
        if device.kind != "cpu":
            net = net.to(device.torch_device())
        x, weights = arrays
        models.load_flat(net, torch.from_numpy(np.array(weights, dtype=np.float32)).to(next(net.parameters()).device))
        tx, _ = _ModelRunner.tensors(device, np.asarray(x, dtype=np.float32))
        with torch.no_grad():
            return [net(tx).argmax(1).cpu().numpy().astype(np.int64)]


register(TrainTask())
register(PredictTask())
