"""matmul: C = A @ B, rows of A split over providers in proportion to their throughput."""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import ValidationError, WrongResult
from . import wire
from .base import ArrayMeta, Device, JobContext, Planner, ProviderSpec, SplitPlanner, SplitTask, SubtaskPlan, checkpoint
from .registry import register
from .rows import MEMORY_FRACTION, check_block, fits_rows, place_rows, proportional_rows, row_blocks, row_chunks
from .verify import EXACT_MAX_TERMS, Freivalds, exact_check

__all__ = ["MEMORY_FRACTION", "MatMul", "MatMulPlanner", "proportional_rows"]

DTYPES = ("float32", "float64")


class MatMul(SplitTask):
    name = "matmul"
    inputs = ("a", "b")
    params_schema = wire.ROWS
    progress_unit = "rows"

    def units(self, sub_params: Mapping[str, Any]) -> int:
        return int(sub_params["rows"])

    def planner(self, job: JobContext) -> Planner:
        return MatMulPlanner(self, job)

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
              providers: Sequence[ProviderSpec]) -> list[SubtaskPlan]:
        a, b = inputs["a"], inputs["b"]
        m, k = a.shape
        n = b.shape[1]
        item = np.dtype(a.dtype).itemsize
        blocks = row_blocks(m, providers, (k + n) * item, fixed_bytes=k * n * item,
                            what=f"matmul: b ({k}x{n} {a.dtype}) with a row of a and c", flops_per_row=2.0 * k * n)
        return [SubtaskPlan(w.provider_id, {"row0": r0, "rows": rows}, cost=2.0 * rows * k * n)
                for w, r0, rows in blocks]

    def fits(self, provider: ProviderSpec, sub_params: Mapping[str, Any], inputs: Mapping[str, ArrayMeta]) -> bool:
        a, b = inputs["a"], inputs["b"]
        item = np.dtype(a.dtype).itemsize
        return fits_rows(provider, sub_params["rows"], (a.shape[1] + b.shape[1]) * item, b.shape[0] * b.shape[1] * item)

    def subtask_inputs(self, sub_params: Mapping[str, Any],
                       inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        r0, rows = sub_params["row0"], sub_params["rows"]
        return [inputs["a"][r0:r0 + rows], inputs["b"]]

    def check_result(self, sub_params: Mapping[str, Any], outputs: Mapping[str, ArrayMeta],
                     arrays: Sequence[np.ndarray]) -> None:
        c = outputs["c"]
        check_block("matmul", arrays, c.dtype, (sub_params["rows"], c.shape[1]))

    def merge(self, sub_params: Mapping[str, Any], arrays: Sequence[np.ndarray],
              outputs: Mapping[str, np.ndarray]) -> None:
        place_rows(outputs["c"], sub_params, arrays[0])

    def run(self, sub_params: Mapping[str, Any], arrays: Sequence[np.ndarray],
            device: Device) -> list[np.ndarray]:
        a, b = arrays
        out = np.empty((a.shape[0], b.shape[1]), dtype=np.result_type(a, b))
        if device.kind == "cpu":
            _blocks(a, b, out, device)
            return [out]
        import torch

        dev = device.torch_device()
        with warnings.catch_warnings():  # frames are read-only; the copy to the GPU is the copy
            warnings.simplefilter("ignore", UserWarning)
            ta = torch.from_numpy(a).to(dev)
            tb = torch.from_numpy(b).to(dev)
        rows = a.shape[0]
        for r0, r1 in row_chunks(rows, 2.0 * a.shape[1] * b.shape[1]):
            out[r0:r1] = torch.matmul(ta[r0:r1], tb).cpu().numpy()
            checkpoint(device, r1, rows)
        return [out]

    def run_into(self, sub_params: Mapping[str, Any], arrays: Sequence[np.ndarray],
                 outputs: Mapping[str, np.ndarray], device: Device) -> list[np.ndarray]:
        if device.kind != "cpu":
            return super().run_into(sub_params, arrays, outputs, device)
        r0, rows = sub_params["row0"], sub_params["rows"]
        block = outputs["c"][r0:r0 + rows]
        _blocks(arrays[0], arrays[1], block, device)  # BLAS writes into the shared result file
        return [block]


#: where each job's Freivalds vector r comes from. r must be unknown to every provider (one that knew it could
#: return a wrong block that passes): the generator is seeded from the OS (``secrets``) once per head process,
#: never from a job's id or params, which providers see or could guess, and nothing of it is stored or sent.
#: Every job draws its own r from it (a planner rebuilt after a restart draws another); one generator, not one
#: per job, because seeding one costs ~15 us, a quarter of what checking a tiny job costs
_SECRET = np.random.default_rng(secrets.randbits(128))


class MatMulPlanner(SplitPlanner):
    """The single-round planner, and Freivalds' check of every block before it is accepted
    (common/tasks/verify.py): a provider is not trusted to return the right numbers."""

    #: the head calls ``check_result(sub_params, [])`` for a block a co-located provider wrote in place
    checks_in_place = True
    #: every block's values are checked: ``--verify-rate`` never runs one twice
    checks_values = True

    def __init__(self, task: SplitTask, job: JobContext) -> None:
        super().__init__(task, job)
        self._freivalds: Freivalds | None = None
        self.rejected = 0  # blocks refused by the check
        self._unverified: dict[int, int] = {}  # row0 -> rows of that block the check could not verify

    def check_result(self, sub_params: Mapping[str, Any], arrays: Sequence[np.ndarray]) -> None:
        r0, rows = int(sub_params["row0"]), int(sub_params["rows"])
        if arrays:  # over the network: count, dtype and shape first
            super().check_result(sub_params, arrays)
            block = arrays[0]
        else:  # written in place into the job's output file by a co-located provider
            block = self.job.results["c"][r0:r0 + rows]
        a, b = self.job.operands["a"][r0:r0 + rows], self.job.operands["b"]
        exact = rows * b.shape[0] * b.shape[1] <= EXACT_MAX_TERMS
        if exact:  # a small block: recomputed (cheaper than Freivalds' vectors)
            found = exact_check(a, b, block)
        else:
            if self._freivalds is None:  # B r once per job, at its first result
                self._freivalds = Freivalds.of(b, _SECRET)
            found = self._freivalds.check(a, block)
        if not found.ok:
            self.rejected += 1
            check = "the exact check" if exact else "Freivalds' check"
            raise WrongResult(f"matmul result rows {r0}..{r0 + rows - 1}"
                              f"{' (written in place)' if not arrays else ''} failed {check}: {found.describe(r0)}")
        self._unverified[r0] = found.unverified

    def summary(self) -> dict[str, Any]:
        return {"verify": {"method": "freivalds", "blocks_rejected": self.rejected,
                           "rows_unverified": sum(self._unverified.values())}}


def _blocks(a: np.ndarray, b: np.ndarray, out: np.ndarray, device: Device) -> None:
    """``out = a @ b`` by blocks of rows; after each block, ``checkpoint`` (progress, and a cancel stops
    it there: SubtaskCancelled)."""
    rows = a.shape[0]
    for r0, r1 in row_chunks(rows, 2.0 * a.shape[1] * b.shape[1]):
        np.matmul(a[r0:r1], b, out=out[r0:r1])
        checkpoint(device, r1, rows)


register(MatMul())
