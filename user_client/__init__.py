"""The dcf client: ``Client`` (Python API) and the ``dcf`` command line.

``Client`` is loaded on first use, so that ``dcf --help`` does not import httpx and numpy."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .client import Client as Client

__all__ = ["Client"]


def __getattr__(name: str) -> Any:
    if name == "Client":
        from .client import Client

        return Client
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
