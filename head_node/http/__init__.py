"""The head's HTTP surface: FastAPI routers per area (``jobs``, ``blobs``, ``nodes``, ``ops``), one
shared bearer-token dependency (``deps``), pydantic bodies (``models``) and ``create_app``."""

from __future__ import annotations

from .app import create_app

__all__ = ["create_app"]
