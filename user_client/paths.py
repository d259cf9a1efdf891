"""Output paths given with ``-o``, checked before any work is done (no numpy here: the CLI checks them
before it loads anything)."""

from __future__ import annotations

import os
from pathlib import Path

from common.errors import ConfigError


def check_output(path: str | os.PathLike[str], flag: str = "-o") -> Path:
    """``path`` if a file can be written there (exactly there: no suffix is added); ConfigError, one
    line naming the path, when its directory is missing or it cannot be written. The check really
    opens the file (without truncating it), so it also holds for root and read-only file systems;
    a file it had to create is removed again."""
    p = Path(path)
    if str(path) == "":
        raise ConfigError(f"{flag}: empty path")
    if p.is_dir():
        raise ConfigError(f"{flag} {p}: is a directory; give a file name")
    parent = p.parent
    if not parent.exists():
        raise ConfigError(f"{flag} {p}: no such directory: {parent}")
    if not parent.is_dir():
        raise ConfigError(f"{flag} {p}: {parent} is not a directory")
    existed = p.exists()
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT, 0o666)
    except OSError as exc:
        raise ConfigError(f"{flag} {p}: cannot write: {exc.strerror or exc}") from None
    os.close(fd)
    if not existed:
        p.unlink(missing_ok=True)
    return p
