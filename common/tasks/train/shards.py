"""Training on data that stays on the providers (``--dataset provider:NAME``): the virtual dataset.

Providers started with ``--data NAME=PATH.npz`` report each dataset's name, sample counts, feature shape,
label range and content key at registration (PROTOCOL.md 5.1); nothing else of it leaves their machine.
A train job on ``provider:NAME`` trains on the concatenation of the distinct shards (by content key) that
the providers ready at its start hold under that name, in key order: a global batch plan over (shard,
index) pairs, so each step's gradient is the exact sum of per-sample gradients over the batch, whichever
provider computes which shard. Two providers holding the same key hold the same data: either serves it.
Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...errors import ValidationError
from ...protocol import LocalData
from ..base import ProviderSpec

#: ``dataset`` of a train job whose data stays on the providers: ``provider:NAME``
PROVIDER_PREFIX = "provider:"


def provider_dataset(params: Mapping[str, Any]) -> str | None:
    """NAME of a ``provider:NAME`` dataset, or None (the job uploads its data)."""
    value = params.get("dataset")
    if isinstance(value, str) and value.startswith(PROVIDER_PREFIX):
        return value[len(PROVIDER_PREFIX):]
    return None


def check_name(name: str) -> None:
    if not 0 < len(name) <= 64:
        raise ValidationError(f"dataset provider:{name}: the name must be 1-64 characters")


@dataclass(frozen=True)
class Shards:
    """The virtual dataset: its shards in key order and where each starts in the global sample order."""

    name: str
    shards: tuple[LocalData, ...]

    @classmethod
    def found(cls, name: str, providers: Sequence[ProviderSpec]) -> Shards | None:
        """The distinct shards these providers hold under ``name`` (None: none holds it); ValidationError
        when they do not fit together (feature shapes differ)."""
        by_key = {d.key: d for w in providers for d in w.datasets if d.name == name}
        if not by_key:
            return None
        shards = tuple(by_key[k] for k in sorted(by_key))
        shapes = {d.shape for d in shards}
        if len(shapes) > 1:
            listed = ", ".join(f"{d.key[:8]} {list(d.shape)}" for d in shards)
            raise ValidationError(f"dataset provider:{name}: its shards have different feature shapes ({listed})")
        return cls(name, shards)

    @classmethod
    def from_record(cls, name: str, record: Sequence[Mapping[str, Any]]) -> Shards:
        """The shards a checkpoint recorded (``record``): a resumed job trains on the same ones."""
        return cls(name, tuple(LocalData(r["name"], r["key"], int(r["samples"]), int(r["test_samples"]),
                                         tuple(r["shape"]), (int(r["labels"][0]), int(r["labels"][1])))
                               for r in record))

    def record(self) -> list[dict[str, Any]]:
        return [{"name": d.name, "key": d.key, "samples": d.samples, "test_samples": d.test_samples,
                 "shape": list(d.shape), "labels": list(d.labels)} for d in self.shards]

    @property
    def samples(self) -> int:
        return sum(d.samples for d in self.shards)

    @property
    def test_samples(self) -> int:
        return sum(d.test_samples for d in self.shards)

    @property
    def shape(self) -> list[int]:
        return list(self.shards[0].shape)

    @property
    def labels(self) -> tuple[int, int]:
        return min(d.labels[0] for d in self.shards), max(d.labels[1] for d in self.shards)

    @property
    def key(self) -> str:
        """32 hex digits naming the virtual dataset (its shards' keys in order)."""
        import hashlib

        return hashlib.sha256(":".join(d.key for d in self.shards).encode()).hexdigest()[:32]

    def split(self, batch: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """(shard number, local indices) of the shards a batch of global indices touches, in shard order;
        the local indices keep the batch's order."""
        out, start = [], 0
        for j, d in enumerate(self.shards):
            mask = (batch >= start) & (batch < start + d.samples)
            if mask.any():
                out.append((j, batch[mask] - start))
            start += d.samples
        return out

    def holders(self, providers: Sequence[ProviderSpec]) -> list[list[ProviderSpec]]:
        """For each shard, the ready providers holding it (in the order given: least loaded first)."""
        return [[w for w in providers if any(d.key == shard.key for d in w.datasets)] for shard in self.shards]

    def missing(self, providers: Sequence[ProviderSpec]) -> str | None:
        """Why a step cannot run now (a shard no ready provider holds), or None."""
        for shard, held in zip(self.shards, self.holders(providers), strict=True):
            if not held:
                return (f"waiting for shard {shard.key[:8]} of dataset {self.name} ({shard.samples} samples): no "
                        "provider holding it is ready, and its data exists nowhere else")
        return None
