"""Find the compute device (CUDA, then MPS, then CPU), describe it, and measure its speed.

``ComputeDevice`` describes the hardware; ``TaskDevice`` is what the provider hands to a task
type's ``run``: the hardware, a per-process cache and the dataset blobs (``common.tasks.Device``).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import psutil

from common.errors import DeviceError
from common.tasks.base import SubtaskCancelled

from .blobs import BlobSource


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        return None
    return torch


@dataclass
class ComputeDevice:
    kind: str  # cpu | cuda | mps
    name: str
    memory_bytes: int
    dtypes: tuple[str, ...]
    index: int = 0

    def torch_device(self) -> Any:
        torch = _torch()
        if torch is None:
            raise DeviceError("torch is not installed")
        return torch.device(f"cuda:{self.index}" if self.kind == "cuda" else self.kind)

    def available_memory(self) -> int:
        if self.kind == "cuda":
            free, _total = _torch().cuda.mem_get_info(self.index)
            return int(free)
        return int(psutil.virtual_memory().available)


class TaskDevice:
    """The ``common.tasks.Device`` a provider runs subtasks on."""

    def __init__(self, hardware: ComputeDevice, blobs: BlobSource, head_host: str = "127.0.0.1",
                 local: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> None:
        self.hardware = hardware
        self.kind = hardware.kind
        self.head_host = head_host
        self._local = dict(local or {})
        #: per-process cache for task types (built models), bounded by its users
        self.cache: MutableMapping[Any, Any] = {}
        self._blobs = blobs

    def torch_device(self) -> Any:
        return self.hardware.torch_device()

    def fetch(self, blob_id: str, key: str) -> np.ndarray:
        """A dataset blob, mapped or fetched once, cached by its content ``key``."""
        return self._blobs.fetch(blob_id, key)

    def local(self, key: str) -> Mapping[str, np.ndarray]:
        """A dataset of ``--data``, by content key."""
        return self._local[key]


#: a running subtask reports its progress to the head at most this often
REPORT_EVERY_S = 0.25


class SubtaskDevice:
    """The ``Device`` one subtask runs on: the provider's (kind, cache, datasets), plus ``checkpoint``, which
    the task calls between blocks (``common.tasks.checkpoint``): it raises ``SubtaskCancelled`` once ``stop()``
    says so (the head cancelled the job, the provider is shutting down), and hands ``report`` the progress
    at most every REPORT_EVERY_S (never for a subtask shorter than that)."""

    def __init__(self, base: TaskDevice, stop: Callable[[], bool],
                 report: Callable[[int, int], None] | None = None, now: Callable[[], float] = time.monotonic) -> None:
        self._base = base
        self.kind = base.kind
        self.cache = base.cache
        self.head_host = base.head_host
        self._stop = stop
        self._report = report
        self._now = now
        self._last = now()

    def torch_device(self) -> Any:
        return self._base.torch_device()

    def fetch(self, blob_id: str, key: str) -> np.ndarray:
        return self._base.fetch(blob_id, key)

    def local(self, key: str) -> Mapping[str, np.ndarray]:
        return self._base.local(key)

    def checkpoint(self, done: int, total: int) -> None:
        if self._stop():
            raise SubtaskCancelled("stopped")
        if self._report is None or done >= total:
            return
        now = self._now()
        if now - self._last >= REPORT_EVERY_S:
            self._last = now
            self._report(done, total)


def detect(requested: str = "auto") -> ComputeDevice:
    """The device to compute on. ``requested`` is auto, cpu, cuda or mps."""
    torch: Any = _torch() if requested != "cpu" else None
    cuda_ok = torch is not None and torch.cuda.is_available()
    mps_ok = torch is not None and getattr(torch.backends, "mps", None) is not None \
        and torch.backends.mps.is_available()
    why = "" if torch is not None else " (torch is not installed)"
    if requested == "cuda" and not cuda_ok:
        raise DeviceError(f"--device cuda: no CUDA device{why}")
    if requested == "mps" and not mps_ok:
        raise DeviceError(f"--device mps: no Apple MPS device{why}")
    if requested in ("auto", "cuda") and cuda_ok:
        props = torch.cuda.get_device_properties(0)
        return ComputeDevice("cuda", props.name, int(props.total_memory), ("float32", "float64"))
    if requested in ("auto", "mps") and mps_ok:
        # MPS has no float64; unified memory: report the system's.
        return ComputeDevice("mps", "Apple MPS", int(psutil.virtual_memory().total), ("float32",))
    return ComputeDevice("cpu", cpu_name(), int(psutil.virtual_memory().total), ("float32", "float64"))


def cpu_name() -> str:
    name = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return name or "cpu"


def benchmark_gflops(device: ComputeDevice, n: int = 384, repeats: int = 5) -> float:
    """Short start-up benchmark: best-of float32/64 matmul throughput, in GFLOP/s."""
    dtype = "float64" if "float64" in device.dtypes else "float32"
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(dtype)
    b = rng.standard_normal((n, n)).astype(dtype)
    if device.kind == "cpu":
        def step() -> None:
            np.matmul(a, b)
    else:
        torch = _torch()
        dev = device.torch_device()
        ta, tb = torch.from_numpy(a).to(dev), torch.from_numpy(b).to(dev)
        n = max(n, 2048)
        ta = torch.randn(n, n, device=dev, dtype=ta.dtype)
        tb = torch.randn(n, n, device=dev, dtype=tb.dtype)
        sync = torch.cuda.synchronize if device.kind == "cuda" else torch.mps.synchronize

        def step() -> None:
            torch.matmul(ta, tb)
            sync()
    step()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / max(best, 1e-9) / 1e9
