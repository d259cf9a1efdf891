"""Which task types this process knows: built-ins and plugins register the same way, by module."""

from __future__ import annotations

import importlib
import logging

from ..errors import ConfigError, NotFound
from .base import TaskType

log = logging.getLogger(__name__)

#: the built-in task types: modules imported like a plugin's, each registers what it defines
BUILTIN_MODULES = ("common.tasks.matmul", "common.tasks.predict", "common.tasks.train.task")

_REGISTRY: dict[str, TaskType] = {}
_builtins_loaded = False


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
    global _builtins_loaded
    if _builtins_loaded:
        return
    _builtins_loaded = True
    for module in BUILTIN_MODULES:
        importlib.import_module(module)


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
