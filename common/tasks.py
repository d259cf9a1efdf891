"""The task-type interface: split on the head, run on the provider, merge on the head.

matmul is built on it, and so is any user task (docs/TASKS.md has a worked example).
A task type is a stateless object; the head and every provider must have the same
task types installed: code never travels over the wire, only names, params and arrays.

Head side (pure functions of their arguments, no I/O):
  ``validate``  check params and input arrays, return the output arrays' metadata
  ``eligible``  can this provider run subtasks of this job (device, dtype)?
  ``split``     cut the job into subtasks, each given to one provider
  ``subtask_inputs``  the arrays sent with one subtask (views of the job's inputs)
  ``check_result`` / ``merge``  validate a subtask's result and place it in the outputs
Provider side:
  ``run``       compute one subtask on a device, return its result arrays
"""

from __future__ import annotations

import importlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np

from .errors import ConfigError, NotFound

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArrayMeta:
    dtype: str  # numpy name: "float32", "float64"
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = np.dtype(self.dtype).itemsize
        for d in self.shape:
            n *= d
        return n

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def of(cls, arr: np.ndarray) -> ArrayMeta:
        return cls(arr.dtype.name, tuple(int(d) for d in arr.shape))


@dataclass(frozen=True)
class Worker:
    """What the head's split sees of a ready provider."""

    provider_id: str
    gflops: float
    memory_bytes: int
    device_kind: str
    dtypes: frozenset[str]


@dataclass(frozen=True)
class SubtaskPlan:
    provider_id: str
    params: dict[str, Any]
    cost: float  # floating-point operations, for deadlines and load balancing


class Device(Protocol):
    """What a provider hands to ``TaskType.run``."""

    kind: str  # "cpu", "cuda" or "mps"

    def torch_device(self) -> Any: ...


class TaskType(ABC):
    name: ClassVar[str]
    #: names of the input arrays a job must give, in order
    inputs: ClassVar[tuple[str, ...]]

    @abstractmethod
    def validate(self, params: Mapping[str, Any], inputs: Mapping[str, ArrayMeta]) -> dict[str, ArrayMeta]:
        """Check a job; return name -> metadata of each output array. Raise ValidationError."""

    def eligible(self, worker: Worker, params: Mapping[str, Any],
                 inputs: Mapping[str, ArrayMeta]) -> str | None:
        """None if the worker can run this job's subtasks, else the reason it cannot."""
        dtypes = {m.dtype for m in inputs.values()}
        missing = dtypes - worker.dtypes
        if missing:
            return f"{worker.device_kind} provider does not support {', '.join(sorted(missing))}"
        return None

    def available(self) -> bool:
        """Can this process run the task's subtasks (e.g. is torch installed)? Providers only
        advertise the task types they can run."""
        return True

    def fits(self, worker: Worker, sub_params: Mapping[str, Any], inputs: Mapping[str, ArrayMeta]) -> bool:
        """Can this worker hold one already-split subtask (used when a subtask is re-assigned)?"""
        return True

    @abstractmethod
    def split(self, params: Mapping[str, Any], inputs: Mapping[str, ArrayMeta],
              workers: Sequence[Worker]) -> list[SubtaskPlan]:
        """Cut the job into subtasks over ``workers`` (all eligible, fastest first)."""

    @abstractmethod
    def subtask_inputs(self, sub_params: Mapping[str, Any],
                       inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """The arrays to send with one subtask; views, not copies, where possible."""

    @abstractmethod
    def check_result(self, sub_params: Mapping[str, Any], outputs: Mapping[str, ArrayMeta],
                     arrays: Sequence[np.ndarray]) -> None:
        """Raise ValidationError unless ``arrays`` is a valid result of this subtask."""

    @abstractmethod
    def merge(self, sub_params: Mapping[str, Any], arrays: Sequence[np.ndarray],
              outputs: Mapping[str, np.ndarray]) -> None:
        """Place a checked result into the job's output arrays."""

    @abstractmethod
    def run(self, sub_params: Mapping[str, Any], arrays: Sequence[np.ndarray],
            device: Device) -> list[np.ndarray]:
        """Provider side: compute one subtask."""

    def run_into(self, sub_params: Mapping[str, Any], arrays: Sequence[np.ndarray],
                 outputs: Mapping[str, np.ndarray], device: Device) -> list[np.ndarray]:
        """Provider side, co-located with the head: compute one subtask straight into the job's
        output arrays (memory-mapped files of the head's state dir). Returns what it wrote.
        The default runs ``run`` then ``merge``; override it to skip the copy."""
        results = self.run(sub_params, arrays, device)
        self.merge(sub_params, results, outputs)
        return results


_REGISTRY: dict[str, TaskType] = {}


def register(task: TaskType) -> TaskType:
    if not getattr(task, "name", None) or not isinstance(task.name, str):
        raise ConfigError("a task type needs a string `name`")
    known = _REGISTRY.get(task.name)
    if known is not None and type(known) is not type(task):
        raise ConfigError(f"task type {task.name!r} is already registered by {type(known).__module__}")
    _REGISTRY[task.name] = task
    return task


def get(name: str) -> TaskType:
    _ensure_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise NotFound(f"unknown task type {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def names() -> list[str]:
    _ensure_builtins()
    return sorted(_REGISTRY)


def _ensure_builtins() -> None:
    if "matmul" not in _REGISTRY:
        from . import matmul  # noqa: F401  (registers itself)
    if "train" not in _REGISTRY:
        from . import training  # noqa: F401  (registers train and predict; they need torch to run)


def load_plugins(modules: str = "") -> list[str]:
    """Import task-type plugins: the ``dcf.tasks`` entry points, then ``modules`` (comma list)."""
    _ensure_builtins()
    loaded = []
    from importlib.metadata import entry_points

    for ep in entry_points(group="dcf.tasks"):
        try:
            obj = ep.load()
            if not isinstance(obj, TaskType):
                log.error("task plugin %s is not a TaskType instance; ignored", ep.name)
                continue
            register(obj)
            loaded.append(ep.name)
        except Exception as exc:
            log.error("task plugin %s failed to load: %s", ep.name, exc)
    for mod in filter(None, (m.strip() for m in modules.split(","))):
        try:
            importlib.import_module(mod)
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"plugin module {mod!r} cannot be imported: {type(exc).__name__}: {exc}") from None
        loaded.append(mod)
    return loaded
