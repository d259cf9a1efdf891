"""What the HTTP routers need from the head: ``HeadApi``, met by ``head_node.server.Head``.

The routers are typed against this protocol, not against ``Head``, so they depend on the head's
facade (its public methods and a few read-only attributes) and on nothing behind it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from common.protocol.batch import JobSpec

from ..events import EventBus
from ..store import BlobStore


class HttpSettings(Protocol):
    """The head's settings the routers read."""

    @property
    def api_token(self) -> str | None: ...

    @property
    def max_upload_bytes(self) -> int: ...

    @property
    def fsync(self) -> bool: ...


class QueueStatus(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def is_connected(self) -> bool: ...


class HeadApi(Protocol):
    @property
    def cfg(self) -> HttpSettings: ...

    @property
    def incarnation(self) -> str: ...

    @property
    def root(self) -> Path: ...

    @property
    def fenced(self) -> str | None:
        """Why this head stopped serving as the active head (its leader lock lost); None while it serves."""
        ...

    @property
    def queue(self) -> QueueStatus: ...

    @property
    def blobs(self) -> BlobStore: ...

    @property
    def events(self) -> EventBus: ...

    @property
    def stopping(self) -> asyncio.Event:
        """Set once the head is stopping: open event streams end then."""

    def admit_upload(self, nbytes: int) -> None:
        """Raise NoSpace unless an upload of ``nbytes`` is within the quota of unused uploads."""

    async def submit(self, spec: JobSpec) -> str: ...

    async def submit_many(self, specs: list[JobSpec], wait: float) -> list[dict[str, Any]]: ...

    async def gather(self, job_ids: list[str], wait: float, forget: bool) -> list[dict[str, Any]]: ...

    def job_view(self, job_id: str) -> dict[str, Any]: ...

    def list_jobs(self, state: str | None, limit: int) -> list[dict[str, Any]]: ...

    async def wait(self, job_id: str, timeout: float) -> dict[str, Any]: ...

    def cancel(self, job_id: str) -> dict[str, Any]: ...

    async def delete(self, job_id: str) -> None: ...

    def result_file(self, job_id: str, name: str | None) -> Path | np.ndarray: ...

    def nodes(self) -> list[dict[str, Any]]: ...

    def node_view(self, provider_id: str) -> dict[str, Any]: ...

    def drain(self, provider_id: str, draining: bool = True) -> dict[str, Any]: ...

    def clear_quarantine(self, provider_id: str) -> dict[str, Any]: ...

    def snapshot(self) -> dict[str, Any]:
        """Everything the dashboard and /metrics show (``time``, ``uptime_s``, ``nodes``, ``jobs``,
        ``counters``, ``finished``, ...)."""
