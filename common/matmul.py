"""matmul: C = A @ B, rows of A split over providers in proportion to their throughput."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .errors import ValidationError
from .tasks import ArrayMeta, Device, SubtaskPlan, TaskType, Worker, register

DTYPES = ("float32", "float64")
#: fraction of a provider's reported memory a subtask may use
MEMORY_FRACTION = 0.5


def proportional_rows(total: int, weights: Sequence[float]) -> list[int]:
    """Split ``total`` rows in proportion to ``weights`` (largest remainder); every share >= 0."""
    wsum = float(sum(weights))
    exact = [total * w / wsum for w in weights]
    rows = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: exact[i] - rows[i], reverse=True)
    for i in order[: total - sum(rows)]:
        rows[i] += 1
    return rows


class MatMul(TaskType):
    name = "matmul"
    inputs = ("a", "b")

    def validate(self, params: Mapping[str, Any], inputs: Mapping[str, ArrayMeta]) -> dict[str, ArrayMeta]:
        if set(inputs) != set(self.inputs):
            raise ValidationError("matmul needs exactly two inputs, 'a' and 'b'")
        a, b = inputs["a"], inputs["b"]
        for name, meta in (("a", a), ("b", b)):
            if len(meta.shape) != 2:
                raise ValidationError(f"matmul: {name} must be 2-D, got shape {list(meta.shape)}")
            if 0 in meta.shape:
                raise ValidationError(f"matmul: {name} is empty (shape {list(meta.shape)})")
            if meta.dtype not in DTYPES:
                raise ValidationError(f"matmul: {name} has dtype {meta.dtype}; use float32 or float64")
        if a.dtype != b.dtype:
            raise ValidationError(f"matmul: a is {a.dtype} but b is {b.dtype}; give both the same dtype")
        if a.shape[1] != b.shape[0]:
            raise ValidationError(f"matmul: shapes {list(a.shape)} and {list(b.shape)} do not align "
                                  f"({a.shape[1]} != {b.shape[0]})")
        return {"c": ArrayMeta(a.dtype, (a.shape[0], b.shape[1]))}

    def split(self, params: Mapping[str, Any], inputs: Mapping[str, ArrayMeta],
              workers: Sequence[Worker]) -> list[SubtaskPlan]:
        a, b = inputs["a"], inputs["b"]
        m, k = a.shape
        n = b.shape[1]
        item = np.dtype(a.dtype).itemsize
        workers = list(workers)[: max(1, min(len(workers), m))]
        shares = proportional_rows(m, [w.gflops for w in workers])
        plans: list[SubtaskPlan] = []
        row0 = 0
        for worker, rows in zip(workers, shares, strict=True):
            if rows == 0:
                continue
            budget = int(worker.memory_bytes * MEMORY_FRACTION) - k * n * item
            per_row = (k + n) * item
            if budget < per_row:
                raise ValidationError(
                    f"matmul: b ({k}x{n} {a.dtype}) does not fit the memory of provider "
                    f"{worker.provider_id[:8]} ({worker.memory_bytes} bytes)")
            chunk = max(1, min(rows, budget // per_row))
            for start in range(row0, row0 + rows, chunk):
                count = min(chunk, row0 + rows - start)
                plans.append(SubtaskPlan(worker.provider_id, {"row0": start, "rows": count},
                                         cost=2.0 * count * k * n))
            row0 += rows
        return plans

    def fits(self, worker: Worker, sub_params: Mapping[str, Any], inputs: Mapping[str, ArrayMeta]) -> bool:
        a, b = inputs["a"], inputs["b"]
        item = np.dtype(a.dtype).itemsize
        need = (sub_params["rows"] * (a.shape[1] + b.shape[1]) + b.shape[0] * b.shape[1]) * item
        return need <= worker.memory_bytes * MEMORY_FRACTION

    def subtask_inputs(self, sub_params: Mapping[str, Any],
                       inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        r0, rows = sub_params["row0"], sub_params["rows"]
        return [inputs["a"][r0:r0 + rows], inputs["b"]]

    def check_result(self, sub_params: Mapping[str, Any], outputs: Mapping[str, ArrayMeta],
                     arrays: Sequence[np.ndarray]) -> None:
        c = outputs["c"]
        want = (sub_params["rows"], c.shape[1])
        if len(arrays) != 1:
            raise ValidationError(f"matmul result must be one array, got {len(arrays)}")
        got = arrays[0]
        if got.dtype.name != c.dtype or tuple(got.shape) != want:
            raise ValidationError(f"matmul result is {got.dtype.name}{list(got.shape)}, "
                                  f"expected {c.dtype}{list(want)}")

    def merge(self, sub_params: Mapping[str, Any], arrays: Sequence[np.ndarray],
              outputs: Mapping[str, np.ndarray]) -> None:
        r0, rows = sub_params["row0"], sub_params["rows"]
        outputs["c"][r0:r0 + rows] = arrays[0]

    def run(self, sub_params: Mapping[str, Any], arrays: Sequence[np.ndarray],
            device: Device) -> list[np.ndarray]:
        a, b = arrays
        if device.kind == "cpu":
            return [np.matmul(a, b)]
        import torch

        dev = device.torch_device()
        with warnings.catch_warnings():  # frames are read-only; the copy to the GPU is the copy
            warnings.simplefilter("ignore", UserWarning)
            ta = torch.from_numpy(a).to(dev)
            tb = torch.from_numpy(b).to(dev)
        return [torch.matmul(ta, tb).cpu().numpy()]

    def run_into(self, sub_params: Mapping[str, Any], arrays: Sequence[np.ndarray],
                 outputs: Mapping[str, np.ndarray], device: Device) -> list[np.ndarray]:
        if device.kind != "cpu":
            return super().run_into(sub_params, arrays, outputs, device)
        r0, rows = sub_params["row0"], sub_params["rows"]
        block = outputs["c"][r0:r0 + rows]
        np.matmul(arrays[0], arrays[1], out=block)  # BLAS writes into the shared result file
        return [block]


register(MatMul())
