"""Task types: the interface (base), the registry, and the built-ins (matmul, predict, train),
which register themselves through the registry like any plugin."""

from .base import (
    ArrayMeta,
    Device,
    Effect,
    JobContext,
    Metrics,
    Planner,
    ProviderSpec,
    SaveFile,
    SplitPlanner,
    SplitTask,
    SubtaskPlan,
    TaskType,
)
from .registry import get, load_plugins, names, register

__all__ = ["ArrayMeta", "Device", "Effect", "JobContext", "Metrics", "Planner", "SaveFile", "SplitPlanner",
           "SplitTask", "SubtaskPlan", "TaskType", "ProviderSpec", "get", "load_plugins", "names", "register"]
