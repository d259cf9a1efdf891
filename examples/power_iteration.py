"""A multi-round task type: the dominant eigenvector of a square matrix by power iteration.

Each round the rows of ``a`` are spread over the ready providers (shares by speed); every
provider computes its rows of ``y = a @ v``; when the round is complete the planner normalises
``y`` into the next ``v`` and plans the next round, until ``v`` moves less than ``tol`` or
``max_iterations`` rounds have run. It is the shape of any iterative solver on dcf: the planner
holds the iterate, the providers hold nothing between rounds.

Load it on the head and every provider with ``--plugins examples.power_iteration`` (or the
``dcf.tasks`` entry point ``examples.power_iteration:TASK``); submit with
``Client.submit("power_iteration", {"a": blob_id}, {"max_iterations": 200, "tol": 1e-10})``.
Outputs: ``vector`` (float64, n) and, in the job's stats, ``power_iteration.eigenvalue`` (the
Rayleigh quotient ``v·Av``) and ``power_iteration.iterations``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from common.errors import ValidationError
from common.tasks import ArrayMeta, Device, JobContext, Planner, ProviderSpec, SubtaskPlan, TaskType, register
from common.tasks.rows import check_block, provider_shares

DEFAULTS: dict[str, Any] = {"max_iterations": 100, "tol": 1e-9, "seed": 0}


def check_params(params: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(params) - set(DEFAULTS)
    if unknown:
        raise ValidationError(f"power_iteration: unknown parameters {sorted(unknown)}")
    p = {**DEFAULTS, **params}
    iters, tol, seed = p["max_iterations"], p["tol"], p["seed"]
    if isinstance(iters, bool) or not isinstance(iters, int) or not 1 <= iters <= 100_000:
        raise ValidationError(f"max_iterations must be an integer in 1..100000, got {iters!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (math.isfinite(tol) and tol > 0):
        raise ValidationError(f"tol must be a positive number, got {tol!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValidationError(f"seed must be a non-negative integer, got {seed!r}")
    return p


class PowerIterationPlanner(Planner):
    """Round k: rows of ``a @ v_k`` over the workers; the round's blocks make ``v_{k+1}``."""

    def __init__(self, job: JobContext) -> None:
        self.p = check_params(job.params)
        self.a = job.operands["a"]
        self.out = job.results["vector"]
        n: int = self.a.shape[0]
        self.v = np.random.default_rng(self.p["seed"]).standard_normal(n)
        self.v /= np.linalg.norm(self.v)
        self.y = np.zeros(n)
        self.round = 0  # rounds completed
        self.expect = 0  # blocks of the current round
        self.got: set[int] = set()  # row offsets of the current round merged
        self.eigenvalue = float("nan")
        self.change = float("inf")

    def plan(self, providers: Sequence[ProviderSpec], outstanding: int, now: float) -> list[SubtaskPlan]:
        if self.finished or outstanding:
            return []
        if self.expect:  # the round in flight is complete: next iterate
            self._next_iterate()
            if self.finished:
                return []
        n = self.a.shape[0]
        plans, row0 = [], 0
        for provider, rows in provider_shares(n, providers):
            plans.append(SubtaskPlan(provider.provider_id, {"round": self.round, "row0": row0, "rows": rows},
                                     cost=2.0 * rows * n))
            row0 += rows
        self.expect, self.got = len(plans), set()
        return plans

    def _next_iterate(self) -> None:
        norm = float(np.linalg.norm(self.y))
        if norm == 0.0:
            raise ValidationError("a @ v is zero: the matrix has no dominant eigenvector from this start")
        self.eigenvalue = float(self.v @ self.y)  # Rayleigh quotient (v has unit norm)
        new = self.y / norm
        if float(new @ self.v) < 0:  # a negative eigenvalue flips the sign every round
            new = -new
        self.change = float(np.linalg.norm(new - self.v))
        self.v = new
        self.round += 1
        self.expect = 0
        if self.change < self.p["tol"] or self.round >= self.p["max_iterations"]:
            self.out[:] = self.v
            self.finished = True

    def subtask_inputs(self, sub_params: Mapping[str, Any]) -> list[np.ndarray]:
        r0, rows = sub_params["row0"], sub_params["rows"]
        return [self.a[r0:r0 + rows], self.v]

    def check_result(self, sub_params: Mapping[str, Any], arrays: Sequence[np.ndarray]) -> None:
        check_block("power_iteration", arrays, "float64", (sub_params["rows"],))
        if not np.isfinite(arrays[0]).all():
            raise ValidationError("power_iteration result holds non-finite values")

    def merge(self, sub_params: Mapping[str, Any], arrays: Sequence[np.ndarray], now: float) -> None:
        if sub_params["round"] != self.round or sub_params["row0"] in self.got:
            return  # a duplicate (speculative copy) of a block already merged
        r0, rows = sub_params["row0"], sub_params["rows"]
        self.y[r0:r0 + rows] = arrays[0]
        self.got.add(r0)

    def progress(self) -> tuple[int, int]:
        return self.round, self.p["max_iterations"]

    def summary(self) -> dict[str, Any]:
        return {"power_iteration": {"eigenvalue": self.eigenvalue, "iterations": self.round,
                                    "last_change": self.change}}


class PowerIteration(TaskType):
    name = "power_iteration"
    inputs = ("a",)

    def validate(self, params: Mapping[str, Any], inputs: Mapping[str, ArrayMeta]) -> dict[str, ArrayMeta]:
        check_params(params)
        a = inputs["a"]
        if len(a.shape) != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 1:
            raise ValidationError(f"power_iteration: a must be a non-empty square matrix, got {list(a.shape)}")
        if a.dtype not in ("float32", "float64"):
            raise ValidationError(f"power_iteration: a must be float32 or float64, got {a.dtype}")
        return {"vector": ArrayMeta("float64", (a.shape[0],))}

    def eligible(self, provider: ProviderSpec, params: Mapping[str, Any],
                 inputs: Mapping[str, ArrayMeta]) -> str | None:
        return None if "float64" in provider.dtypes else f"{provider.device_kind} provider has no float64"

    def planner(self, job: JobContext) -> Planner:
        return PowerIterationPlanner(job)

    def run(self, sub_params: Mapping[str, Any], arrays: Sequence[np.ndarray], device: Device) -> list[np.ndarray]:
        rows, v = arrays
        return [np.asarray(rows, dtype=np.float64) @ np.asarray(v, dtype=np.float64)]


#: the registered instance; the ``dcf.tasks`` entry point is ``examples.power_iteration:TASK``
TASK = register(PowerIteration())
