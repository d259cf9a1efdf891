"""train: data-parallel training of a PyTorch model, planned round by round on the head.

The task registers itself when ``common.tasks.train.task`` is imported (the registry imports it
by name, like any plugin); importing this package alone (e.g. for ``defaults``) loads nothing else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .task import TrainTask as TrainTask

__all__ = ["TrainTask"]


def __getattr__(name: str) -> Any:
    if name == "TrainTask":
        from .task import TrainTask

        return TrainTask
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
