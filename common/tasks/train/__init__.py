"""train: data-parallel training of a PyTorch model, planned round by round on the head."""

from ..registry import register
from .task import TrainTask

register(TrainTask())

__all__ = ["TrainTask"]
