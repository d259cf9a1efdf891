"""predict: rows of X split over providers by speed, the model run on each block, predictions merged
by row offset. The model comes from the train package's registry (train/models.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import NotFound, ValidationError
from . import wire
from .base import ArrayMeta, Device, ProviderSpec, SplitTask, SubtaskPlan, checkpoint
from .registry import register
from .rows import check_block, place_rows, provider_shares, row_chunks
from .train import models
from .train.runner import ModelRunner, has_torch


class PredictTask(SplitTask):
    """Inference: rows of X split over providers by speed; predictions merged by row offset."""

    name = "predict"
    inputs = ("x", "weights")
    params_schema = wire.PREDICT
    progress_unit = "rows"

    def units(self, sub_params: Mapping[str, Any]) -> int:
        return int(sub_params["rows"])

    def available(self) -> bool:
        return has_torch()

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

    def eligible(self, provider: ProviderSpec, params: Mapping[str, Any],
                 inputs: Mapping[str, ArrayMeta]) -> str | None:
        return None

    def split(self, params: Mapping[str, Any], inputs: Mapping[str, ArrayMeta],
              providers: Sequence[ProviderSpec]) -> list[SubtaskPlan]:
        plans, row0 = [], 0
        n_params = inputs["weights"].shape[0]
        for provider, count in provider_shares(inputs["x"].shape[0], providers):
            plans.append(SubtaskPlan(provider.provider_id, {"row0": row0, "rows": count, **dict(params)},
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
        rows = len(x)
        out = np.empty(rows, dtype=np.int64)
        with torch.no_grad():  # by blocks of rows: progress, and a cancel stops it between blocks
            for r0, r1 in row_chunks(rows, 2.0 * weights.size):
                tx, _ = ModelRunner.tensors(device, np.asarray(x[r0:r1], dtype=np.float32))
                out[r0:r1] = net(tx).argmax(1).cpu().numpy()
                checkpoint(device, r1, rows)
        return [out]


register(PredictTask())
