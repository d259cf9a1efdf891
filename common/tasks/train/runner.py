"""Provider side of training and inference: builds a job's model once and runs it on the device."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from ...errors import ValidationError
from ..base import Device
from . import models


class ModelRunner:
    """Provider side: builds a job's model once and runs it on the device."""

    @staticmethod
    def model(sub: Mapping[str, Any], device: Device) -> models.FlatView:
        cache = device.cache
        key = ("model", sub["job_id"], sub["model"], repr(sub.get("model_args")))
        if key in cache:
            hit: models.FlatView = cache[key]  # the device's cache holds any task type's values
            return hit
        module = models.build_model(sub["model"], sub["input_shape"], sub["classes"], sub.get("model_args"))
        if device.kind != "cpu":
            module = module.to(device.torch_device())
        net = models.FlatView(module)
        cache[key] = net
        while len(cache) > 16:  # models of old jobs
            cache.pop(next(iter(cache)))
        return net


    @staticmethod
    def data(device: Device, data: Mapping[str, str], name: str) -> np.ndarray:
        """A dataset array (``name``: x or y): one of this provider's own datasets (``local``), or mapped from
        the head's state dir or fetched once, then cached by content."""
        if "local" in data:
            try:
                held = device.local(data["local"])
            except KeyError:
                raise ValidationError(f"this provider holds no dataset with key {data['local']}") from None
            return held[name if data.get("split") != "test" else f"{name}_test"]
        return device.fetch(data[name], f"{data['key']}:{name}")

    @staticmethod
    def tensors(device: Device, x: np.ndarray, y: np.ndarray | None = None) -> tuple[Any, Any]:
        import torch

        dev = device.torch_device() if device.kind != "cpu" else None
        with warnings.catch_warnings():  # the data is a read-only mapping, and training never writes to it
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tx = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
            ty = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64)) if y is not None else None
        if dev is not None:
            tx = tx.to(dev)
            ty = ty.to(dev) if ty is not None else None
        return tx, ty


def has_torch() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None
