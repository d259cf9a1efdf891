"""A task type with a bug where its params say (``{"bug": "<method>"}``), for the containment tests:
a task type's exception fails its own job (or, for its stats, loses them), never the head."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from common.tasks import ArrayMeta, Device, ProviderSpec, SplitTask, SubtaskPlan, register
from common.tasks.base import JobContext, Planner, SplitPlanner

BUGS = ("eligible", "split", "subtask_inputs", "check_result", "merge", "summary", "none")


class BuggyPlanner(SplitPlanner):
    def summary(self) -> dict[str, Any]:
        if self.job.params.get("bug") == "summary":
            raise ZeroDivisionError("summary bug")
        return {}


class Buggy(SplitTask):
    name = "buggy"
    inputs = ("x",)

    @staticmethod
    def _maybe(params: Mapping[str, Any], where: str) -> None:
        if params.get("bug") == where:
            raise TypeError(f"{where} bug")

    def validate(self, params: Mapping[str, Any], inputs: Mapping[str, ArrayMeta]) -> dict[str, ArrayMeta]:
        return {"y": inputs["x"]}

    def eligible(self, provider: ProviderSpec, params: Mapping[str, Any],
                 inputs: Mapping[str, ArrayMeta]) -> str | None:
        self._maybe(params, "eligible")
        return None

    def planner(self, job: JobContext) -> Planner:
        return BuggyPlanner(self, job)

    def split(self, params: Mapping[str, Any], inputs: Mapping[str, ArrayMeta],
              providers: Sequence[ProviderSpec]) -> list[SubtaskPlan]:
        self._maybe(params, "split")
        return [SubtaskPlan(providers[0].provider_id, {"bug": params.get("bug")}, 1.0)]

    def subtask_inputs(self, sub_params: Mapping[str, Any], inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        self._maybe(sub_params, "subtask_inputs")
        return [inputs["x"]]

    def check_result(self, sub_params: Mapping[str, Any], outputs: Mapping[str, ArrayMeta],
                     arrays: Sequence[np.ndarray]) -> None:
        self._maybe(sub_params, "check_result")

    def merge(self, sub_params: Mapping[str, Any], arrays: Sequence[np.ndarray],
              outputs: Mapping[str, np.ndarray]) -> None:
        self._maybe(sub_params, "merge")
        outputs["y"][...] = arrays[0]

    def run(self, sub_params: Mapping[str, Any], arrays: Sequence[np.ndarray], device: Device) -> list[np.ndarray]:
        return [np.array(arrays[0]) * 2]


TASK = register(Buggy())
