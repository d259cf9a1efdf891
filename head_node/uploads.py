"""Uploads no job uses are not kept for ever (issue 14 A7: 300 MB of orphan uploads in 1 s, never
cleaned up, no quota).

A blob is *unused* while no job row names it among its inputs (a job that is deleted frees its blobs
then, ``Head.delete_job``). ``UnusedBlobs`` deletes unused blobs older than ``--blob-ttl`` seconds, with
the files a co-located client left in ``incoming/`` and never adopted, on every ``sweep``; and it
refuses an upload (``admit``) that would take the unused bytes past ``--max-unused-bytes``. The count is
the last sweep's plus what was uploaded since, so it only over-counts (a blob used since then); before
refusing, it sweeps to count exactly. Sweeps run on the event loop (a directory listing and one query):
no upload, adoption or submission interleaves with one, so a blob is never deleted between a job's
check of its inputs and the job's row.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from common.errors import NoSpace

from .store import BlobStore, JobStore

log = logging.getLogger("dcf.head.uploads")

#: the shortest and longest time between sweeps (seconds): half the TTL, within these bounds
MIN_SWEEP_S, MAX_SWEEP_S = 0.5, 60.0


@dataclass
class Sweep:
    """What one sweep found: unused blobs kept (count, bytes) and files deleted."""

    kept: int = 0
    kept_bytes: int = 0
    deleted: int = 0
    deleted_bytes: int = 0


class UnusedBlobs:
    def __init__(self, blobs: BlobStore, store: JobStore, ttl: float, max_bytes: int) -> None:
        self.blobs = blobs
        self.store = store
        self.ttl = ttl  # 0: unused blobs are kept until deleted (the quota still holds)
        self.max_bytes = max_bytes
        self.unused_bytes = 0  # at the last sweep
        self.added = 0  # uploaded since

    @property
    def interval(self) -> float:
        """Seconds between sweeps."""
        return min(MAX_SWEEP_S, max(MIN_SWEEP_S, self.ttl / 2)) if self.ttl else MAX_SWEEP_S

    def sweep(self, now: float) -> Sweep:
        """Delete the unused blobs and stray incoming files older than the TTL (``now``: wall time, the
        clock of file times); count the unused bytes left."""
        used = self.store.blob_ids_in_use()
        found = Sweep()
        cutoff = now - self.ttl if self.ttl else None
        for path, st in _files(self.blobs.blob_dir, ".npy"):
            blob_id = path.name[: -len(".npy")]
            if blob_id in used:
                continue
            if cutoff is not None and st.st_mtime < cutoff and self.blobs.delete_blob(blob_id):
                found.deleted += 1
                found.deleted_bytes += st.st_size
            else:
                found.kept += 1
                found.kept_bytes += st.st_size
        for path, st in _files(self.blobs.incoming_dir, ""):
            if cutoff is not None and st.st_mtime < cutoff:
                path.unlink(missing_ok=True)
                found.deleted += 1
                found.deleted_bytes += st.st_size
        self.unused_bytes, self.added = found.kept_bytes, 0
        if found.deleted:
            log.info("deleted %d uploads no job used for %.0f s (%d bytes); %d unused kept (%d bytes)",
                     found.deleted, self.ttl, found.deleted_bytes, found.kept, found.kept_bytes)
        return found

    def admit(self, nbytes: int, now: float) -> None:
        """NoSpace (507) unless an upload of ``nbytes`` keeps the unused bytes within the quota."""
        if self.unused_bytes + self.added + nbytes > self.max_bytes:
            self.sweep(now)  # the count only over-counts: count exactly before refusing
            if self.unused_bytes + nbytes > self.max_bytes:
                raise NoSpace(f"the head keeps at most {self.max_bytes} bytes of uploads that no job uses "
                              f"(--max-unused-bytes) and holds {self.unused_bytes}; submit jobs that use them, "
                              "delete them (DELETE /v1/blobs/{id}) or let them expire "
                              f"({f'--blob-ttl {self.ttl:g} s' if self.ttl else '--blob-ttl is 0: never'})")
        self.added += nbytes


def _files(folder: Path, suffix: str) -> list[tuple[Path, os.stat_result]]:
    """The regular, not hidden files of ``folder`` ending in ``suffix``, with their stat (a file that
    goes while it is listed is skipped)."""
    out = []
    with os.scandir(folder) as it:
        for entry in it:
            if entry.name.startswith(".") or not entry.name.endswith(suffix):
                continue
            try:
                if entry.is_file(follow_symlinks=False):
                    out.append((Path(entry.path), entry.stat(follow_symlinks=False)))
            except FileNotFoundError:
                continue
    return out
