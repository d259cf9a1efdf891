"""The optimizers of a ``train`` job and their state as flat float32 vectors (the wire form).

The head builds the job's optimizer (``make_optimizer``) and, for ``--sync allreduce``, so does every member
of the training group: the head sends the state it holds (``export_state``) with a round, and rank 0 sends
the state after the round back (``import_state`` on the head). Each optimizer's per-parameter state is a
fixed list of tensors shaped like the parameters (``state_keys``), one flat vector per key in parameter
order; its step count is the job's global step, which both sides know, so it never travels. No state yet
(before the first step) is a list of empty vectors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ...errors import ValidationError

#: optimizer -> its per-parameter state tensors (torch's names), besides the step count
STATE_KEYS: dict[str, tuple[str, ...]] = {
    "sgd": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq"), "adadelta": ("square_avg", "acc_delta")}
#: optimizers that keep a per-parameter ``step`` count in their state
COUNTS_STEPS = frozenset({"adam", "adadelta"})


def make_optimizer(name: str, params: Any, p: Mapping[str, Any]) -> Any:
    import torch

    if name == "sgd":
        return torch.optim.SGD(params, lr=p["lr"], momentum=p["momentum"], weight_decay=p["weight_decay"])
    if name == "adam":
        return torch.optim.Adam(params, lr=p["lr"], weight_decay=p["weight_decay"])
    return torch.optim.Adadelta(params, lr=p["lr"], weight_decay=p["weight_decay"])


def state_keys(name: str, momentum: float) -> tuple[str, ...]:
    """The state vectors of this optimizer (plain SGD keeps none)."""
    if name == "sgd" and momentum == 0:
        return ()
    return STATE_KEYS[name]


def export_state(optimizer: Any, name: str, momentum: float) -> list[np.ndarray]:
    """One float32 vector per state key, parameters in order; empty vectors before the first step."""
    import torch

    params = [p for group in optimizer.param_groups for p in group["params"]]
    keys = state_keys(name, momentum)
    if not params or any(key not in optimizer.state.get(params[0], {}) for key in keys):
        return [np.zeros(0, dtype=np.float32) for _ in keys]
    return [torch.cat([optimizer.state[p][key].detach().reshape(-1).to(torch.float32).cpu() for p in params])
            .numpy().copy() for key in keys]


def import_state(optimizer: Any, name: str, momentum: float, vectors: Sequence[np.ndarray], steps: int) -> None:
    """Set the optimizer's state from ``export_state``'s vectors, ``steps`` steps into training."""
    import torch

    params = [p for group in optimizer.param_groups for p in group["params"]]
    keys = state_keys(name, momentum)
    if len(vectors) != len(keys):
        raise ValidationError(f"optimizer {name} needs {len(keys)} state vectors, got {len(vectors)}")
    optimizer.state.clear()
    if not keys or all(v.size == 0 for v in vectors):
        return
    total = sum(p.numel() for p in params)
    for key, vec in zip(keys, vectors, strict=True):
        if vec.shape != (total,) or vec.dtype != np.float32:
            raise ValidationError(f"optimizer state {key} must be float32 of {total} values, got {vec.dtype} "
                                  f"{list(vec.shape)}")
    flat = [torch.from_numpy(np.array(v)) for v in vectors]  # one copy: the state is the optimizer's own
    offset = 0
    for p in params:
        n = p.numel()
        state: dict[str, Any] = {key: f[offset:offset + n].view_as(p).to(p.device).clone()
                                 for key, f in zip(keys, flat, strict=True)}
        if name in COUNTS_STEPS:
            state["step"] = torch.tensor(float(steps))
        optimizer.state[p] = state
        offset += n
