"""rowstats: per-row statistics of a 2-D array, a worked example of a dcf task type.

Job: input ``x`` (2-D, float32 or float64), param ``stats`` (a list drawn from
``mean``, ``std``, ``min``, ``max``, ``norm``). Output ``stats``: a float64 array of
shape ``(rows of x, len(stats))`` whose column ``j`` holds statistic ``stats[j]`` of
each row (``std`` is the population standard deviation, ``norm`` the Euclidean norm).

The rows of ``x`` are split over the providers in proportion to their measured speed,
the way matmul splits the rows of ``a``. docs/TASKS.md walks through this file.

Install it on the head *and* on every provider (``--plugins examples.rowstats``,
``DCF_PLUGINS=examples.rowstats``, or the ``dcf.tasks`` entry point ``examples.rowstats:TASK``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from common.errors import ValidationError
from common.tasks import ArrayMeta, Device, ProviderSpec, SplitTask, SubtaskPlan, register
from common.tasks.rows import check_block, fits_rows, place_rows, row_blocks

#: the statistics a job may ask for, in no particular order
STATS = ("mean", "std", "min", "max", "norm")
DTYPES = ("float32", "float64")
#: floating-point operations per element, per statistic (for the scheduler's cost estimates)
FLOPS_PER_ELEMENT = {"mean": 1.0, "std": 3.0, "min": 1.0, "max": 1.0, "norm": 2.0}
_PARAMS = frozenset({"stats"})


def row_stats(x: np.ndarray, stats: Sequence[str]) -> np.ndarray:
    """The statistics ``stats`` of each row of ``x`` with numpy: float64 ``(rows, len(stats))``."""
    x64 = np.asarray(x, dtype=np.float64)  # no copy for float64; float32 is summed in float64
    out = np.empty((x64.shape[0], len(stats)), dtype=np.float64)
    for j, stat in enumerate(stats):
        if stat == "mean":
            out[:, j] = x64.mean(axis=1)
        elif stat == "std":
            out[:, j] = x64.std(axis=1)
        elif stat == "min":
            out[:, j] = x64.min(axis=1)
        elif stat == "max":
            out[:, j] = x64.max(axis=1)
        elif stat == "norm":
            out[:, j] = np.linalg.norm(x64, axis=1)
        else:  # validate() keeps these out; a provider may still get a hand-made message
            raise ValidationError(f"rowstats: unknown statistic {stat!r}")
    return out


def _row_stats_torch(x: np.ndarray, stats: Sequence[str], device: Device) -> np.ndarray:
    """The same on a CUDA or MPS device with torch (imported only here: providers without a GPU
    never need it)."""
    import torch

    dev = device.torch_device()
    with warnings.catch_warnings():  # frames are read-only; the copy to the GPU is the copy
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(x).to(dev)
    if device.kind == "cuda":
        t = t.to(torch.float64)  # MPS has no float64: it stays in the input dtype there
    columns = []
    for stat in stats:
        if stat == "mean":
            columns.append(t.mean(dim=1))
        elif stat == "std":
            columns.append(t.std(dim=1, correction=0))
        elif stat == "min":
            columns.append(t.amin(dim=1))
        elif stat == "max":
            columns.append(t.amax(dim=1))
        elif stat == "norm":
            columns.append(torch.linalg.vector_norm(t, dim=1))
        else:
            raise ValidationError(f"rowstats: unknown statistic {stat!r}")
    return torch.stack(columns, dim=1).cpu().numpy().astype(np.float64, copy=False)


class RowStats(SplitTask):
    """Per-row statistics; rows split over providers in proportion to their gflops."""

    name = "rowstats"
    inputs = ("x",)

    # ---- head side: pure functions of their arguments ------------------------------------------
    def validate(self, params: Mapping[str, Any], inputs: Mapping[str, ArrayMeta]) -> dict[str, ArrayMeta]:
        """Check ``stats`` and ``x``; the output is ``stats``: float64 ``(rows, len(stats))``."""
        if set(inputs) != set(self.inputs):
            raise ValidationError("rowstats needs exactly one input, 'x'")
        unknown = sorted(set(params) - _PARAMS)
        if unknown:
            raise ValidationError(f"rowstats: unknown params {unknown}; it takes only 'stats'")
        stats = params.get("stats")
        if not isinstance(stats, (list, tuple)) or not stats:
            raise ValidationError(f"rowstats: 'stats' must be a non-empty list drawn from {list(STATS)}")
        bad = [s for s in stats if not isinstance(s, str) or s not in STATS]
        if bad:
            raise ValidationError(f"rowstats: unknown statistics {bad!r:.200}; choose from {list(STATS)}")
        dupes = sorted({s for s in stats if stats.count(s) > 1})
        if dupes:
            raise ValidationError(f"rowstats: statistics {dupes} are listed more than once")
        x = inputs["x"]
        if len(x.shape) != 2:
            raise ValidationError(f"rowstats: x must be 2-D, got shape {list(x.shape)}")
        if 0 in x.shape:
            raise ValidationError(f"rowstats: x is empty (shape {list(x.shape)})")
        if x.dtype not in DTYPES:
            raise ValidationError(f"rowstats: x has dtype {x.dtype}; use float32 or float64")
        return {"stats": ArrayMeta("float64", (x.shape[0], len(stats)))}

    def _row_bytes(self, x: ArrayMeta, n_stats: int) -> int:
        """Memory one row of a subtask needs on a provider: its input row and its result row."""
        return x.shape[1] * np.dtype(x.dtype).itemsize + n_stats * 8

    def _cost(self, rows: int, cols: int, stats: Sequence[str]) -> float:
        return rows * cols * sum(FLOPS_PER_ELEMENT[s] for s in stats)

    def split(self, params: Mapping[str, Any], inputs: Mapping[str, ArrayMeta],
              providers: Sequence[ProviderSpec]) -> list[SubtaskPlan]:
        """Rows in proportion to each worker's gflops, cut further where a share exceeds its memory."""
        x = inputs["x"]
        m, n = x.shape
        stats = list(params["stats"])
        blocks = row_blocks(m, providers, self._row_bytes(x, len(stats)),
                            what=f"rowstats: one row of x ({n} {x.dtype})")
        return [SubtaskPlan(w.provider_id, {"row0": r0, "rows": rows, "stats": stats}, cost=self._cost(rows, n, stats))
                for w, r0, rows in blocks]

    def fits(self, provider: ProviderSpec, sub_params: Mapping[str, Any], inputs: Mapping[str, ArrayMeta]) -> bool:
        """Whether a re-assigned subtask fits ``worker`` (the same budget as ``split``)."""
        return fits_rows(provider, sub_params["rows"], self._row_bytes(inputs["x"], len(sub_params["stats"])))

    def subtask_inputs(self, sub_params: Mapping[str, Any],
                       inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """The subtask's rows of ``x``: a view of the job's (memory-mapped) input."""
        r0, rows = sub_params["row0"], sub_params["rows"]
        return [inputs["x"][r0:r0 + rows]]

    def check_result(self, sub_params: Mapping[str, Any], outputs: Mapping[str, ArrayMeta],
                     arrays: Sequence[np.ndarray]) -> None:
        """One float64 array of shape ``(rows, len(stats))``, or ValidationError."""
        check_block("rowstats", arrays, "float64", (sub_params["rows"], outputs["stats"].shape[1]))

    def merge(self, sub_params: Mapping[str, Any], arrays: Sequence[np.ndarray],
              outputs: Mapping[str, np.ndarray]) -> None:
        """Place the subtask's rows at their offset in the job's output."""
        place_rows(outputs["stats"], sub_params, arrays[0])

    # ---- provider side ---------------------------------------------------------------------
    def run(self, sub_params: Mapping[str, Any], arrays: Sequence[np.ndarray],
            device: Device) -> list[np.ndarray]:
        """Compute the statistics of the subtask's rows: numpy on a CPU, torch on a GPU."""
        (x,) = arrays
        stats = sub_params["stats"]
        if device.kind == "cpu":
            return [row_stats(x, stats)]
        return [_row_stats_torch(x, stats, device)]

    # run_into is inherited: run, then merge into the shared output file. The result is a few
    # columns per row, so there is little copy to save by overriding it (matmul does override it).


#: the registered instance; the ``dcf.tasks`` entry point is ``examples.rowstats:TASK``
TASK = register(RowStats())
