"""The head's REST API: ``create_app(head)``, built in ``head_node/http/`` (a router per area)."""

from __future__ import annotations

from .http.app import create_app

__all__ = ["create_app"]
