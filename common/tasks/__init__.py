"""Task types: the interface (base), the registry, and the built-ins (matmul, predict, train),
which register themselves through the registry like any plugin.

The names below are loaded on first use (PEP 562), so that importing a light submodule (e.g.
``common.tasks.train.defaults`` for the CLI) does not load numpy and the interface.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names, re-exported, for type checkers
    from .base import ArrayMeta as ArrayMeta
    from .base import Device as Device
    from .base import Effect as Effect
    from .base import JobContext as JobContext
    from .base import Metrics as Metrics
    from .base import Planner as Planner
    from .base import ProviderSpec as ProviderSpec
    from .base import SaveFile as SaveFile
    from .base import SplitPlanner as SplitPlanner
    from .base import SplitTask as SplitTask
    from .base import SubtaskCancelled as SubtaskCancelled
    from .base import SubtaskPlan as SubtaskPlan
    from .base import TaskType as TaskType
    from .base import checkpoint as checkpoint
    from .registry import get as get
    from .registry import load_plugins as load_plugins
    from .registry import names as names
    from .registry import register as register

_FROM_BASE = ("ArrayMeta", "Device", "Effect", "JobContext", "Metrics", "Planner", "ProviderSpec", "SaveFile",
              "SplitPlanner", "SplitTask", "SubtaskCancelled", "SubtaskPlan", "TaskType", "checkpoint")
_FROM_REGISTRY = ("get", "load_plugins", "names", "register")
__all__ = [*_FROM_BASE, *_FROM_REGISTRY]


def __getattr__(name: str) -> Any:
    if name in _FROM_BASE:
        value = getattr(importlib.import_module(".base", __name__), name)
    elif name in _FROM_REGISTRY:
        value = getattr(importlib.import_module(".registry", __name__), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # looked up once
    return value
