"""Row splitting shared by the task types that cut their work by rows (matmul, predict, training
batches, the rowstats example): shares in proportion to speed, cut to fit memory, checked and merged
by row offset."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..arrays import dtype_name
from ..errors import ValidationError
from .base import ProviderSpec

#: fraction of a provider's reported memory one subtask may use
MEMORY_FRACTION = 0.5
#: the least compute (seconds at the provider's speed) a share must hold to be worth a subtask of its
#: own: a subtask costs the head, the wire and the provider about a millisecond whatever its size, so
#: a job smaller than this per provider goes to fewer providers (a tiny one to the fastest alone)
MIN_SHARE_SECONDS = 0.002


def proportional_rows(total: int, weights: Sequence[float]) -> list[int]:
    """Split ``total`` rows in proportion to ``weights`` (largest remainder); every share >= 0."""
    wsum = float(sum(weights))
    exact = [total * w / wsum for w in weights]
    rows = [int(x) for x in exact]
    order = sorted(range(len(weights)), key=lambda i: exact[i] - rows[i], reverse=True)
    for i in order[: total - sum(rows)]:
        rows[i] += 1
    return rows


def provider_shares(count: int, providers: Sequence[ProviderSpec],
                    flops_per_row: float = 0.0) -> list[tuple[ProviderSpec, int]]:
    """(worker, rows) for the workers that get a non-empty share of ``count`` rows, by speed. With
    ``flops_per_row``, only as many workers (fastest first) as keep every share at least
    ``MIN_SHARE_SECONDS`` of work."""
    providers = list(providers)[: max(1, min(len(providers), count, _worth(count * flops_per_row, providers)))]
    shares = proportional_rows(count, [w.gflops for w in providers])
    return [(w, n) for w, n in zip(providers, shares, strict=True) if n]


def _worth(flops: float, providers: Sequence[ProviderSpec]) -> int:
    """How many of ``providers`` (fastest first) ``flops`` of work keeps busy for MIN_SHARE_SECONDS each."""
    if flops <= 0:
        return len(providers)
    used, speed = 1, providers[0].gflops * 1e9 if providers else 1.0
    for w in providers[1:]:
        if flops / (speed + w.gflops * 1e9) < MIN_SHARE_SECONDS:
            break
        used, speed = used + 1, speed + w.gflops * 1e9
    return used


def row_blocks(count: int, providers: Sequence[ProviderSpec], bytes_per_row: int, fixed_bytes: int = 0,
               what: str = "a row", flops_per_row: float = 0.0) -> list[tuple[ProviderSpec, int, int]]:
    """(worker, first row, rows): shares by speed (as many workers as the work is worth, see
    ``provider_shares``), each cut into blocks that fit half the worker's memory beside
    ``fixed_bytes`` (data every block needs, e.g. matmul's B)."""
    def budget(provider: ProviderSpec) -> int:
        return int(provider.memory_bytes * MEMORY_FRACTION) - fixed_bytes

    fit = [w for w in providers if budget(w) >= bytes_per_row]  # one too small for a row gets no share
    if not fit:
        most = max(providers, key=lambda w: w.memory_bytes) if providers else None
        raise ValidationError(f"{what} does not fit the memory of any provider"
                              + (f" (the largest reports {most.memory_bytes} bytes)" if most else ""))
    blocks = []
    row0 = 0
    for provider, rows in provider_shares(count, fit, flops_per_row):
        chunk = max(1, min(rows, budget(provider) // bytes_per_row))
        for start in range(row0, row0 + rows, chunk):
            blocks.append((provider, start, min(chunk, row0 + rows - start)))
        row0 += rows
    return blocks


#: a long subtask computes its rows in blocks of about this many flops (at least MIN_BLOCK_ROWS rows), and
#: between blocks reports its progress and looks whether it must stop (``base.checkpoint``)
BLOCK_FLOPS = 2e9
MIN_BLOCK_ROWS = 128


def row_chunks(rows: int, flops_per_row: float) -> list[tuple[int, int]]:
    """(start, stop) of the blocks ``rows`` rows are computed in: one block for a small subtask; blocks
    of BLOCK_FLOPS (at least MIN_BLOCK_ROWS rows, enough for BLAS to run at full speed) otherwise."""
    per = max(MIN_BLOCK_ROWS, int(BLOCK_FLOPS // max(flops_per_row, 1.0)))
    return [(start, min(rows, start + per)) for start in range(0, rows, per)] or [(0, 0)]


def fits_rows(provider: ProviderSpec, rows: int, bytes_per_row: int, fixed_bytes: int = 0) -> bool:
    return rows * bytes_per_row + fixed_bytes <= provider.memory_bytes * MEMORY_FRACTION


def check_block(task: str, arrays: Sequence[np.ndarray], dtype: str, shape: tuple[int, ...]) -> None:
    """Raise ValidationError unless ``arrays`` is exactly one array of this dtype and shape."""
    if len(arrays) != 1:
        raise ValidationError(f"{task} result must be one array, got {len(arrays)}")
    got = arrays[0]
    if dtype_name(got.dtype) != dtype or tuple(got.shape) != tuple(shape):
        raise ValidationError(f"{task} result is {got.dtype.name}{list(got.shape)}, expected {dtype}{list(shape)}")


def place_rows(out: np.ndarray, sub_params: Mapping[str, Any], block: np.ndarray) -> None:
    r0, rows = sub_params["row0"], sub_params["rows"]
    out[r0:r0 + rows] = block
