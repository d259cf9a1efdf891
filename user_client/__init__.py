"""The dcf client: ``Client`` (Python API) and the ``dcf`` command line."""

from .client import Client

__all__ = ["Client"]
