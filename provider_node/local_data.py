"""The datasets a provider holds on its own disk (``--data NAME=PATH.npz,...``): loaded once at start-up,
described to the head at registration (name, sample counts, feature shape, label range, content key) and
used in place by train jobs with ``--dataset provider:NAME``. No sample of them leaves this machine."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import ConfigError, DcfError
from common.protocol import MAX_LOCAL_DATASETS, LocalData


@dataclass(frozen=True)
class Held:
    """One loaded dataset: its description for the head, and its arrays."""

    info: LocalData
    arrays: Mapping[str, np.ndarray]  # x, y, x_test, y_test (float32 features, int64 labels)


def parse_spec(spec: str) -> list[tuple[str, Path]]:
    """``NAME=PATH[,NAME=PATH...]`` -> [(name, path)]; ConfigError naming what is wrong."""
    pairs: list[tuple[str, Path]] = []
    for item in (part.strip() for part in spec.split(",")):
        if not item:
            continue
        name, sep, path = item.partition("=")
        name = name.strip()
        if not sep or not name or not path.strip():
            raise ConfigError(f"--data: {item!r} is not NAME=PATH.npz")
        if len(name) > 64 or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ConfigError(f"--data: dataset name {name!r}: use 1-64 letters, digits, '-', '_' or '.'")
        pairs.append((name, Path(path.strip())))
    if len({n for n, _ in pairs}) != len(pairs):
        raise ConfigError("--data: the same dataset name twice")
    if len(pairs) > MAX_LOCAL_DATASETS:
        raise ConfigError(f"--data: at most {MAX_LOCAL_DATASETS} datasets")
    return pairs


def load(spec: str) -> dict[str, Held]:
    """The datasets ``spec`` names, by content key; ConfigError (one line) for a file that is missing or
    not a usable .npz."""
    from common.tasks.train import datasets

    held: dict[str, Held] = {}
    for name, path in parse_spec(spec):
        try:
            ds = datasets.from_npz(path.read_bytes(), str(path))
        except OSError as exc:
            raise ConfigError(f"--data {name}: cannot read {path}: {exc.strerror or exc}") from None
        except DcfError as exc:
            raise ConfigError(f"--data {name}: {exc.message}") from None
        labels = np.concatenate([ds.y_train, ds.y_test])
        info = LocalData(name=name, key=ds.content_hash(), samples=len(ds.y_train), test_samples=len(ds.y_test),
                         shape=tuple(int(d) for d in ds.x_train.shape[1:]),
                         labels=(int(labels.min()), int(labels.max())))
        held[info.key] = Held(info, {"x": ds.x_train, "y": ds.y_train, "x_test": ds.x_test, "y_test": ds.y_test})
    return held


def wire(held: Mapping[str, Held]) -> list[dict[str, Any]]:
    """``register.datasets`` (PROTOCOL.md 5.1)."""
    return [{"name": h.info.name, "key": h.info.key, "samples": h.info.samples, "test_samples": h.info.test_samples,
             "shape": list(h.info.shape), "labels": list(h.info.labels)} for h in held.values()]
