"""The checksums of stored files: every blob and job output in a head's state dir has a digest of its bytes
(header included) beside it, in ``.<file name>.<algorithm>`` (one line: ``<algorithm> <hex digest>``), written
before the file is published and checked before its bytes are served or used (PROTOCOL.md 12.6).

The algorithm is XXH3-128 (``xxhash``): a check against disk corruption and stray writes, not a signature
(whoever can write the state dir can write both files). It runs at about 28 GB/s here, SHA-256 (the digest
before) at 1.6 GB/s: a 1000² float64 job's operands and result are hashed 4 times (adopt A and B, publish C,
the client reading C), 19 ms of SHA-256 against 1 ms; a 4096² job, 320 ms against 18 ms. Files whose digest
is a SHA-256 (written by an earlier head) are still checked against it.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from pathlib import Path
from typing import Any

ALGORITHM = "xxh3_128"
#: the digest earlier heads wrote (``.<name>.sha256``), still read and checked
LEGACY = "sha256"
_HEX_LENGTH = {ALGORITHM: 32, LEGACY: 64}


def digest_path(path: Path, algorithm: str = ALGORITHM) -> Path:
    """Where the digest of a stored file is kept: a hidden file beside it."""
    return path.with_name(f".{path.name}.{algorithm}")


def file_digest(path: Path, algorithm: str = ALGORITHM) -> str:
    """The hex digest of a file's bytes, read through a mapping (no copy)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return _hasher(algorithm, b"")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return _hasher(algorithm, mapped)


def new_hash() -> Any:
    """An incremental hash of ``ALGORITHM`` (``update(bytes)``, ``hexdigest()``): a file's digest as its
    bytes are written, with no second read."""
    import xxhash

    return xxhash.xxh3_128()


def _hasher(algorithm: str, data: bytes | mmap.mmap) -> str:
    if algorithm == LEGACY:
        return hashlib.sha256(data).hexdigest()
    import xxhash

    return str(xxhash.xxh3_128(data).hexdigest())


def digest_line(digest: str, algorithm: str = ALGORITHM) -> str:
    return f"{algorithm} {digest}\n"


def read_digest(path: Path) -> tuple[str, str] | None:
    """(algorithm, hex digest) recorded for ``path``: its ``xxh3_128`` file, else a ``sha256`` one; None if
    there is neither (a file stored before checksums existed); ``("", "")`` if the file is unreadable or
    not a digest of its algorithm."""
    for algorithm in (ALGORITHM, LEGACY):
        try:
            text = digest_path(path, algorithm).read_text()
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError):
            return "", ""
        algo, _, digest = text.strip().partition(" ")
        if algo != algorithm or len(digest) != _HEX_LENGTH[algorithm]:
            return "", ""
        return algo, digest
    return None


def mismatch(path: Path) -> str | None:
    """Why ``path``'s bytes do not match the digest recorded beside it ("its checksum file is unreadable", or
    the two digests' heads), or None: they match, or no digest was recorded (a file stored before checksums
    existed). The file is hashed only when a digest was read."""
    recorded = read_digest(path)
    if recorded is None:
        return None
    algorithm, expected = recorded
    if not expected:  # an unreadable digest file is no proof either
        return "its checksum file is unreadable"
    actual = file_digest(path, algorithm)
    return None if actual == expected else f"{algorithm} {actual[:16]}..., stored {expected[:16]}..."


def remove_digests(path: Path) -> None:
    """A stored file's digest files, of either algorithm, removed (the file is deleted or replaced)."""
    for algorithm in (ALGORITHM, LEGACY):
        digest_path(path, algorithm).unlink(missing_ok=True)
