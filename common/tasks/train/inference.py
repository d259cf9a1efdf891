"""Reading a trained model file (state_dict saved by a train job, metadata .json beside it)
into the flat float32 parameter vector a predict job sends. Loads with weights_only=True."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ValidationError
from . import models


def load_model_file(path: str | os.PathLike[str]) -> tuple[dict[str, Any], np.ndarray]:
    import torch

    path = Path(path)
    meta_path = path.with_suffix(".json")
    if not path.exists():
        raise ValidationError(f"{path}: no such file")
    if not meta_path.exists():
        raise ValidationError(f"{meta_path}: the model's metadata (written beside it by `dcf submit train`) "
                              "is missing")
    try:
        meta = json.loads(meta_path.read_text())
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:
        raise ValidationError(f"{path}: not a dcf model ({type(exc).__name__}: {exc})") from None
    for key in ("model", "input_shape", "classes"):
        if key not in meta:
            raise ValidationError(f"{meta_path}: missing {key!r}")
    net = models.build_model(meta["model"], meta["input_shape"], meta["classes"], meta.get("model_args"))
    try:
        net.load_state_dict(state)
    except Exception as exc:
        raise ValidationError(f"{path}: weights do not fit model {meta['model']}: {exc}") from None
    return meta, models.flat_parameters(net).numpy()
