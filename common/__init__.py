"""Shared pieces of dcf: wire protocol, schemas, configuration, logging, task types."""

__version__ = "0.1.0"
