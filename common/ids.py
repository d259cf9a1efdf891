"""Ids on the wire and in the state dir: 32 lowercase hex digits (no numpy here: the state-dir
layout and the CLI use it)."""

from __future__ import annotations

import re

from .errors import ProtocolError

ID_RE = re.compile(r"[0-9a-f]{32}")  # use with fullmatch


def check_id(value: object, what: str = "id") -> str:
    if not isinstance(value, str) or not ID_RE.fullmatch(value):
        raise ProtocolError(f"{what} must be 32 lowercase hex digits, got {value!r:.60}")
    return value
