"""A user model plugin: register a model builder under a name, install this module on the head and
on every provider (``--plugins examples.tiny_model`` / ``DCF_PLUGINS``, or a ``dcf.models`` entry
point), then train with ``--model tiny``. See docs/TRAINING.md."""

from __future__ import annotations

import math
from typing import Any

from common.tasks.train.models import register_model


def build_tiny(input_shape: tuple[int, ...], n_classes: int, width: int = 32) -> Any:
    """Flatten, one hidden layer of ``width`` tanh units, a linear classifier."""
    from torch import nn

    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.Tanh(),
                         nn.Linear(width, n_classes))


register_model("tiny", build_tiny)
