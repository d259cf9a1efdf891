"""Named model registry for training and inference jobs. Code never travels: head and
providers build the same model from a name and JSON arguments.

Built in: ``logreg`` (linear), ``mlp`` (hidden sizes, ReLU) and ``cnn`` (two 3x3 conv
layers, max-pool, two linear layers; for square single-channel images such as digits).
More through the ``dcf.models`` entry-point group or ``register_model``: a function
``build(input_shape, n_classes, **args) -> torch.nn.Module``. Models must be deterministic
(no dropout, no batch norm statistics) so data-parallel training matches one process.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ...errors import NotFound, ValidationError

Builder = Callable[..., Any]
#: the most parameters a job's model may have (float32: 200 MB of parameters, as much again per gradient
#: and optimizer state, on the head and on every provider): a few bytes of ``model_args`` must not cost GBs
MAX_PARAMETERS = 50_000_000
_MODELS: dict[str, Builder] = {}


def register_model(name: str, builder: Builder) -> Builder:
    _MODELS[name] = builder
    return builder


def model_names() -> list[str]:
    _load_entry_points()
    return sorted(_MODELS)


def build_model(name: str, input_shape: Sequence[int], n_classes: int, args: dict[str, Any] | None = None,
                seed: int | None = None) -> Any:
    """The model, sized first (``count_parameters``), initialised from ``seed`` (torch.manual_seed) when given."""
    import torch

    count_parameters(name, input_shape, n_classes, args)
    if seed is not None:
        torch.manual_seed(seed)
    return _build(name, input_shape, n_classes, args)


def count_parameters(name: str, input_shape: Sequence[int], n_classes: int, args: dict[str, Any] | None = None) -> int:
    """The model's parameter count, sized on torch's ``meta`` device (no memory behind it); ValidationError
    past ``MAX_PARAMETERS``: a huge model is refused, not allocated."""
    import torch

    _load_entry_points()
    if name not in _MODELS:
        raise NotFound(f"unknown model {name!r}; known: {', '.join(sorted(_MODELS))}")
    with torch.device("meta"):
        size = n_parameters(_build(name, input_shape, n_classes, args))
    if size > MAX_PARAMETERS:
        raise ValidationError(f"model {name} with arguments {args or {}} has {size:,} parameters; a job's model may "
                              f"have at most {MAX_PARAMETERS:,}")
    return size


def _build(name: str, input_shape: Sequence[int], n_classes: int, args: dict[str, Any] | None) -> Any:
    try:
        return _MODELS[name](tuple(input_shape), n_classes, **(args or {}))
    except TypeError as exc:
        raise ValidationError(f"model {name}: bad arguments {args}: {exc}") from None


def _logreg(input_shape: tuple[int, ...], n_classes: int) -> Any:
    from torch import nn

    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), n_classes))


def _mlp(input_shape: tuple[int, ...], n_classes: int, hidden: Sequence[int] = (128, 64)) -> Any:
    from torch import nn

    if not hidden or not all(isinstance(h, int) and 0 < h <= 65536 for h in hidden):
        raise ValidationError("mlp: hidden must be a list of positive layer sizes")
    layers: list[Any] = [nn.Flatten()]
    width = math.prod(input_shape)
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)


def _cnn(input_shape: tuple[int, ...], n_classes: int, channels: Sequence[int] = (16, 32), hidden: int = 64) -> Any:
    from torch import nn

    if len(input_shape) == 1:  # flat square images, e.g. 64 pixels of an 8x8 digit
        side = math.isqrt(input_shape[0])
        if side * side != input_shape[0]:
            raise ValidationError(f"cnn needs square images; {input_shape[0]} features are not a square")
        input_shape = (1, side, side)
    if len(input_shape) == 2:
        input_shape = (1, *input_shape)
    if len(input_shape) != 3 or input_shape[1] % 2 or input_shape[2] % 2:
        raise ValidationError(f"cnn needs (channels, height, width) with even sides, got {input_shape}")
    c, h, w = input_shape
    c1, c2 = channels
    return nn.Sequential(
        _Reshape((c, h, w)),
        nn.Conv2d(c, c1, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(c2 * (h // 2) * (w // 2), hidden), nn.ReLU(), nn.Linear(hidden, n_classes))


def _Reshape(shape: tuple[int, ...]) -> Any:  # noqa: N802 (a module factory)
    from torch import nn

    class Reshape(nn.Module):
        def forward(self, x: Any) -> Any:
            return x.reshape(x.shape[0], *shape)

    return Reshape()


register_model("logreg", _logreg)
register_model("mlp", _mlp)
register_model("cnn", _cnn)

_entry_points_loaded = False


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    from importlib.metadata import entry_points

    for ep in entry_points(group="dcf.models"):
        try:
            register_model(ep.name, ep.load())
        except Exception as exc:  # a broken plugin must not break the built-in models
            import logging

            logging.getLogger(__name__).error("model plugin %s failed to load: %s", ep.name, exc)


def flat_parameters(model: Any) -> Any:
    """All parameters as one float32 CPU vector (the wire form)."""
    import torch

    return torch.cat([p.detach().reshape(-1).to(torch.float32).cpu() for p in model.parameters()])


def load_flat(model: Any, flat: Any) -> None:
    """Copy a flat float32 vector into the model's parameters."""
    import torch

    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            n = p.numel()
            p.copy_(flat[offset:offset + n].view_as(p))
            offset += n
    if offset != flat.numel():
        raise ValidationError(f"parameter vector has {flat.numel()} values, the model needs {offset}")


class FlatView:
    """Rebinds a float32 model's parameters and gradients as views into two flat buffers, so that
    loading a parameter vector, reading the gradient vector or zeroing gradients is one memcpy.
    Never call ``model.zero_grad(set_to_none=True)`` on it: use ``zero_grad`` here."""

    def __init__(self, model: Any) -> None:
        import torch

        params = list(model.parameters())
        if any(p.dtype != torch.float32 for p in params):
            raise ValidationError("models must be float32")
        total = sum(p.numel() for p in params)
        device = params[0].device
        self.model = model
        self.params = torch.zeros(total, dtype=torch.float32, device=device)
        self.grads = torch.zeros(total, dtype=torch.float32, device=device)
        offset = 0
        for p in params:
            count = p.numel()
            self.params[offset:offset + count].copy_(p.detach().reshape(-1))
            p.data = self.params[offset:offset + count].view_as(p)
            p.grad = self.grads[offset:offset + count].view_as(p)
            offset += count

    def load(self, flat: np.ndarray) -> None:
        import torch

        if flat.shape != (self.params.numel(),):
            raise ValidationError(f"parameter vector has {flat.size} values, the model needs {self.params.numel()}")
        self.params.copy_(torch.from_numpy(np.asarray(flat, dtype=np.float32)))

    def zero_grad(self) -> None:
        self.grads.zero_()

    def parameters_numpy(self) -> np.ndarray:
        return self.params.detach().cpu().numpy().copy()

    def gradients_numpy(self) -> np.ndarray:
        return self.grads.detach().cpu().numpy().copy()


def n_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())
