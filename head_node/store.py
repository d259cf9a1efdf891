"""The head's durable state on disk (claim-check store).

* ``BlobStore``: operands and results as ``.npy`` files in ``STATE_DIR/blobs`` and
  ``STATE_DIR/jobs/<job_id>/``. Bulk data never goes through RabbitMQ: queue
  messages hold blob ids.
* ``JobStore``: one SQLite table of jobs (WAL, synchronous=FULL): spec, state,
  timings and final figures. Used from the head's event-loop thread only.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import sqlite3
import stat
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import msgpack
import numpy as np

from common import digests, layout, security
from common.arrays import ArrayMeta
from common.errors import ConfigError, DcfError, NoSpace, NotFound, TooLarge, ValidationError
from common.npyfmt import MAX_NPY_HEADER, parse_npy_header

log = logging.getLogger("dcf.head.store")


def replace_file(tmp: Path, final: Path, fsync: bool) -> None:
    """Rename a finished file into place; with ``fsync`` its data and its directory entry reach the disk."""
    if fsync:
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    os.replace(tmp, final)
    if fsync:
        fsync_dir(final.parent)


# ---- room in the state dir ------------------------------------------------------------------
#: what an out-of-space error says, whatever ran out (files or the job store): clients and tests match it
NO_SPACE = "no space left in the state dir"
#: the space kept free in the state dir's file system: a new blob or output file that would leave less is
#: refused (``NoSpace``), so that what needs little but must not fail has room: the job store's commits
#: (a job's outcome, a deletion that frees space), digest files, the head's start. 1/50 of the file system,
#: at least 4 MiB (SQLite's WAL grows to ~4 MiB between checkpoints), at most 64 MiB.
RESERVE_MIN = 4 << 20
RESERVE_MAX = 64 << 20
#: errno values that mean the file system (or the user's quota) is full
_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def reserve_bytes(total: int) -> int:
    """The space kept free on a file system of ``total`` bytes."""
    return min(RESERVE_MAX, max(RESERVE_MIN, total // 50))


def no_space(root: Path, what: str, detail: str = "") -> NoSpace:
    """The one error for a full state dir: what did not fit, and what to do."""
    return NoSpace(f"{NO_SPACE} ({root}): no room for {what}{f' ({detail})' if detail else ''}; delete "
                   "finished jobs (dcf delete) or free space on its file system")


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk is full: an OSError ENOSPC/EDQUOT, or SQLite's SQLITE_FULL
    ("database or disk is full")."""
    if isinstance(exc, OSError):
        return exc.errno in _FULL_ERRNOS
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", None) == 13 or "disk is full" in str(exc)  # SQLITE_FULL
    return False


@contextlib.contextmanager
def disk_full_is_no_space(root: Path, what: str) -> Iterator[None]:
    """Turn an ENOSPC (or SQLITE_FULL) raised inside into ``NoSpace`` naming ``what``; other errors pass."""
    try:
        yield
    except (OSError, sqlite3.Error) as exc:
        if is_disk_full(exc):
            raise no_space(root, what, str(exc)) from None
        raise


def check_room(root: Path, nbytes: int, what: str) -> None:
    """NoSpace unless ``nbytes`` more fit in the state dir's file system with its reserve still free."""
    try:
        st = os.statvfs(root)
    except (OSError, AttributeError):  # no statvfs (Windows): the allocation itself says
        return
    free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    keep = reserve_bytes(total)
    if nbytes + keep > free:
        raise no_space(root, f"{what} of {_mib(nbytes)}", f"{_mib(free)} free, {_mib(keep)} of it kept in reserve")


def preallocate(root: Path, fd: int, size: int, what: str) -> None:
    """Reserve the blocks of the first ``size`` bytes of an open file now (``posix_fallocate``): a file
    written later through a memory map cannot then meet a full disk, which is SIGBUS, the end of the process,
    not an error. ENOSPC here is ``NoSpace``. A file system that cannot preallocate keeps the file as it is
    (sparse: the space check before, ``check_room``, is then the only guard)."""
    if size <= 0 or not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if is_disk_full(exc):
            raise no_space(root, f"{what} of {_mib(size)}", exc.strerror or str(exc)) from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        log.warning("cannot preallocate %s in %s (%s): written sparse", what, root, exc.strerror)


# ---- checksums ------------------------------------------------------------------------------
def write_digest(path: Path, digest: str, fsync: bool) -> None:
    """Record ``digest`` (common/digests.py) for the file ``path`` (before that file is renamed into place); a
    digest of the earlier algorithm left beside it goes."""
    final = digests.digest_path(path)
    tmp = final.with_name(final.name + ".part")
    tmp.write_text(digests.digest_line(digest))
    replace_file(tmp, final, fsync)
    digests.digest_path(path, digests.LEGACY).unlink(missing_ok=True)


def _signature(path: Path) -> tuple[int, int, int, int]:
    """What changes whenever a file's bytes are written through the file system (ctime cannot be set
    back): inode, size, mtime and ctime."""
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def fsync_dir(path: Path) -> None:
    if os.name == "posix":
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class BlobWriter:
    """Receives a .npy file in chunks, validating its header first and its length last."""

    def __init__(self, store: BlobStore, max_bytes: int, admit: Callable[[int], None] | None = None) -> None:
        self.store = store
        self.admit = admit  # told the file's size once its header is read; raises to refuse it
        self.blob_id = uuid.uuid4().hex
        self.tmp = store.blob_dir / f".{self.blob_id}.part"
        self.file: BinaryIO = open(self.tmp, "wb")  # noqa: SIM115 (closed in finish/abort)
        self.head = b""
        self.meta: ArrayMeta | None = None
        self.expected = 0
        self.received = 0
        self.max_bytes = max_bytes
        self.hash = digests.new_hash()  # of every byte written: the blob's digest, with no second read

    def feed(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.received > self.max_bytes:
            raise TooLarge(f"upload exceeds {self.max_bytes} bytes")
        if self.meta is None:
            self.head += chunk
            parsed = parse_npy_header(self.head)
            if parsed is None:
                if len(self.head) > MAX_NPY_HEADER + 16:
                    raise ValidationError("malformed .npy header")
                return
            self.meta, hlen = parsed
            self.expected = hlen + self.meta.nbytes
            if self.expected > self.max_bytes:
                raise TooLarge(f"array of {self.meta.nbytes} bytes exceeds the {self.max_bytes} byte limit")
            if self.admit is not None:  # the quota of unused uploads (uploads.UnusedBlobs)
                self.admit(self.expected)
            # the whole file's room, now: a full state dir refuses the upload before its bytes come
            check_room(self.store.root, self.expected, "an upload")
            preallocate(self.store.root, self.file.fileno(), self.expected, "an upload")
            chunk, self.head = self.head, b""
        if self.received > self.expected:
            raise ValidationError(f"body longer than the .npy header declares ({self.expected} bytes)")
        with disk_full_is_no_space(self.store.root, "an upload"):
            self.file.write(chunk)
        self.hash.update(chunk)

    def finish(self, fsync: bool) -> tuple[str, ArrayMeta]:
        if self.meta is None or self.received != self.expected:
            raise ValidationError(f"truncated .npy upload: got {self.received} of "
                                  f"{self.expected or 'unknown'} bytes")
        final = self.store.blob_path(self.blob_id)
        with disk_full_is_no_space(self.store.root, "an upload"):
            self.file.close()  # its last buffered bytes are written here
            write_digest(final, self.hash.hexdigest(), fsync)
            replace_file(self.tmp, final, fsync)  # with fsync: bytes and name
        self.store.metas[self.blob_id] = self.meta
        self.store.trust(final)
        return self.blob_id, self.meta

    def abort(self) -> None:
        with contextlib.suppress(OSError):  # a full disk may refuse the buffered rest: the file goes anyway
            self.file.close()
        self.tmp.unlink(missing_ok=True)
        digests.remove_digests(self.store.blob_path(self.blob_id))


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blob_dir = root / "blobs"
        self.job_dir = root / "jobs"
        self.incoming_dir = root / "incoming"
        for d in (self.root, self.blob_dir, self.job_dir, self.incoming_dir):
            security.private_dir(d)  # 0700: operands and results are the users' data
        for stale in self.incoming_dir.iterdir():  # left by clients that died mid-write
            stale.unlink(missing_ok=True)
        self.metas: dict[str, ArrayMeta] = {}
        for part in self.blob_dir.glob(".*.part"):  # uploads cut off by a crash
            part.unlink(missing_ok=True)
        #: files whose digest this head wrote or checked -> their signature then (``verify``)
        self.verified: dict[Path, tuple[int, int, int, int]] = {}

    def blob_path(self, blob_id: str) -> Path:
        return layout.blob_path(self.root, blob_id)

    def writer(self, max_bytes: int, admit: Callable[[int], None] | None = None) -> BlobWriter:
        return BlobWriter(self, max_bytes, admit)

    def adopt(self, upload_id: str, max_bytes: int, fsync: bool) -> tuple[str, ArrayMeta]:
        """Take a .npy file a co-located client wrote into ``incoming/``: validate it like an
        upload (header, dtype, exact length; a regular file, not a link), then move it in."""
        path = layout.incoming_path(self.root, upload_id)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            raise NotFound(f"no incoming file {upload_id}") from None
        if not stat.S_ISREG(st.st_mode):
            path.unlink(missing_ok=True)
            raise ValidationError("incoming upload is not a regular file")
        try:
            with open(path, "rb") as f:
                if os.name == "posix":  # written with the client's umask: the head's blobs are owner-only
                    with contextlib.suppress(PermissionError):  # another user's file keeps its mode
                        os.fchmod(f.fileno(), 0o600)
                parsed = parse_npy_header(f.read(MAX_NPY_HEADER + 16))
                if parsed is None:
                    raise ValidationError("truncated .npy header")
                meta, hlen = parsed
                if hlen + meta.nbytes > max_bytes:
                    raise TooLarge(f"array of {meta.nbytes} bytes exceeds the {max_bytes} byte limit")
                if st.st_size != hlen + meta.nbytes:
                    raise ValidationError(f"truncated .npy file: {st.st_size} bytes, header says "
                                          f"{hlen + meta.nbytes}")
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        blob_id = uuid.uuid4().hex
        final = self.blob_path(blob_id)
        try:
            with disk_full_is_no_space(self.root, "an upload"):
                write_digest(final, digests.file_digest(path), fsync)  # one read of a file the client just wrote
                replace_file(path, final, fsync)
        except NoSpace:
            path.unlink(missing_ok=True)
            digests.remove_digests(final)
            raise
        self.metas[blob_id] = meta
        self.trust(final)
        return blob_id, meta

    def meta(self, blob_id: str) -> ArrayMeta:
        if blob_id in self.metas:
            return self.metas[blob_id]
        path = self.blob_path(blob_id)
        try:
            with open(path, "rb") as f:
                parsed = parse_npy_header(f.read(MAX_NPY_HEADER + 16))
        except FileNotFoundError:
            raise NotFound(f"no blob {blob_id}") from None
        if parsed is None:
            raise ValidationError(f"blob {blob_id} is damaged")
        self.metas[blob_id] = parsed[0]
        return parsed[0]

    def open(self, blob_id: str) -> np.ndarray:
        """The blob mapped read-only, its checksum verified (ValidationError if it is corrupt)."""
        self.meta(blob_id)
        path = self.blob_path(blob_id)
        self.verify(path, f"blob {blob_id}")
        return np.load(path, mmap_mode="r", allow_pickle=False)

    def put_array(self, arr: np.ndarray) -> str:
        """Store an in-process array (used by tests and the head itself)."""
        blob_id = uuid.uuid4().hex
        path = self.blob_path(blob_id)
        tmp = path.with_name(f".{blob_id}.part")
        arr = np.ascontiguousarray(arr)
        check_room(self.root, arr.nbytes, "an array")
        try:
            with disk_full_is_no_space(self.root, "an array"):
                with open(tmp, "wb") as f:
                    np.save(f, arr, allow_pickle=False)
                write_digest(path, digests.file_digest(tmp), fsync=False)
                replace_file(tmp, path, fsync=False)
        except BaseException:
            tmp.unlink(missing_ok=True)
            digests.remove_digests(path)
            raise
        self.trust(path)
        return blob_id

    def delete_blob(self, blob_id: str) -> bool:
        self.metas.pop(blob_id, None)
        path = self.blob_path(blob_id)
        existed = path.exists()
        path.unlink(missing_ok=True)
        digests.remove_digests(path)
        self.verified.pop(path, None)
        return existed

    # ---- checksums ------------------------------------------------------------------------
    def trust(self, path: Path) -> None:
        """``path`` was just written with its digest: no need to hash it again while it is unchanged."""
        with contextlib.suppress(OSError):
            self.verified[path] = _signature(path)

    def verify(self, path: Path, what: str, error: type[DcfError] = ValidationError) -> None:
        """Raise ``error`` ("<what> is corrupt: checksum mismatch") unless the file's bytes have the
        digest recorded for them. Hashed when this head has not written or checked the file yet (after
        a restart) or it changed since (size, mtime or ctime: any write through the file system);
        otherwise free. A file stored before checksums existed (no digest) is taken as it is."""
        try:
            sig = _signature(path)
        except FileNotFoundError:
            raise NotFound(f"{what} is missing from the state dir") from None
        if self.verified.get(path) == sig:
            return
        why = digests.mismatch(path)
        if why is not None:
            log.error("%s is corrupt: checksum mismatch (%s; %s)", what, path, why)
            raise error(f"{what} is corrupt: checksum mismatch ({why}); its bytes are not served")
        self.verified[path] = sig

    # ---- job outputs -----------------------------------------------------------------
    def output_path(self, job_id: str, name: str) -> Path:
        return layout.output_path(self.root, job_id, name)

    def create_outputs(self, job_id: str, metas: dict[str, ArrayMeta], incarnation: str) -> dict[str, np.ndarray]:
        """Fresh output files for a job run by this head incarnation (older runs' files are removed), their
        blocks allocated before they are mapped: results written into them (by the head, or by a co-located
        provider that maps them too) cannot meet a full disk. NoSpace, with no file left, if they do not fit."""
        folder = layout.job_dir(self.root, job_id)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(".*.part"):
            stale.unlink(missing_ok=True)
        paths = {name: layout.output_part_path(self.root, job_id, name, incarnation) for name in metas}
        try:
            check_room(self.root, sum(m.nbytes for m in metas.values()), "the job's output files")
            return {name: self._output_file(paths[name], meta) for name, meta in metas.items()}
        except BaseException:
            for path in paths.values():
                path.unlink(missing_ok=True)
            raise

    def _output_file(self, path: Path, meta: ArrayMeta) -> np.ndarray:
        """One output file, mapped, with its whole length allocated before anything is written through the map
        (numpy's ``open_memmap(mode="w+")`` makes a sparse file, whose first write to a page with no block is
        SIGBUS; its own header and last byte are plain writes, so a full disk there is ENOSPC)."""
        with disk_full_is_no_space(self.root, "the job's output files"):
            arr = np.lib.format.open_memmap(path, mode="w+", dtype=meta.dtype, shape=meta.shape)
            with open(path, "rb+") as f:
                preallocate(self.root, f.fileno(), os.fstat(f.fileno()).st_size, "the job's output files")
        return arr

    def commit_outputs(self, job_id: str, arrays: dict[str, np.ndarray], incarnation: str, fsync: bool,
                       copy: bool = False) -> None:
        """Flush and atomically publish the outputs of a finished job. ``copy``: a co-located
        provider may still hold the part file mapped (an attempt still out), so publish a copy
        (a new inode it cannot write into) instead of renaming."""
        for name, arr in arrays.items():
            part = layout.output_part_path(self.root, job_id, name, incarnation)
            final = self.output_path(job_id, name)
            with disk_full_is_no_space(self.root, "the job's result"):
                if copy:
                    tmp = final.with_name(f".{name}.copy")
                    try:
                        size = os.stat(part).st_size
                        check_room(self.root, size, "a copy of the job's result")
                        shutil.copyfile(part, tmp)  # write(), not a map: a full disk is ENOSPC, never SIGBUS
                    except BaseException:
                        tmp.unlink(missing_ok=True)
                        raise
                    part.unlink(missing_ok=True)
                    part = tmp
                if fsync:  # without it the shared page cache already holds every byte
                    arr.flush()  # type: ignore[attr-defined]
                    with open(part, "rb+") as f:
                        os.fsync(f.fileno())
                write_digest(final, digests.file_digest(part), fsync)  # the bytes assembled, before they are published
            os.replace(part, final)
            self.trust(final)
        if fsync:
            fsync_dir(layout.job_dir(self.root, job_id))

    def delete_job(self, job_id: str) -> None:
        folder = layout.job_dir(self.root, job_id)
        shutil.rmtree(folder, ignore_errors=True)
        for path in [p for p in list(self.verified) if p.parent == folder]:
            self.verified.pop(path, None)


_COLUMNS = ("job_id", "type", "params", "inputs", "outputs", "nodes", "state", "accepted",
            "created_at", "started_at", "finished_at", "error", "stats", "inline", "results")
_JSON_COLUMNS = ("params", "inputs", "outputs", "stats")
#: the rows of accepted jobs not finished yet, oldest first (``unfinished``, ``unfinished_ids``)
_UNFINISHED = "accepted = 1 AND state IN ('queued', 'running') ORDER BY created_at"
#: name -> raw bytes, as msgpack (small inputs sent with the job; small results kept in the row)
_BYTES_COLUMNS = ("inline", "results")


#: the job store's file in the state dir
STORE_FILE = "jobs.sqlite3"
#: how long a tombstone is kept: longer than any redelivery delay (RabbitMQ's consumer timeout is 30 min)
TOMBSTONE_SECONDS = 30 * 24 * 3600
#: a job id prefix: lowercase hex digits
_HEX = re.compile("[0-9a-f]+")

@dataclass(frozen=True)
class Outcome:
    """A job's row as a batch reply reads it: the columns it needs, decoded on demand."""

    state: str
    error: str | None
    outputs_json: str
    results_packed: bytes | None
    stats_json: str
    has_blobs: bool  # it has blob inputs (their files may have to go with it)

    def results(self) -> dict[str, bytes]:
        return msgpack.unpackb(self.results_packed, raw=False) if self.results_packed else {}

    def outputs(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.outputs_json)
        return out

    def files(self) -> list[str]:
        return list(json.loads(self.stats_json or "{}").get("files") or [])


Schedule = Callable[[Callable[[], None]], object]
#: called after a group commit with whether it reached the database
AfterCommit = Callable[[bool], None]


class JobStore:
    """One SQLite table of jobs. With ``group_commit(schedule)`` (the head: ``loop.call_soon``)
    writes gather in one transaction that commits once the current turn of the event loop is
    over, however many requests wrote in it; ``after_commit`` runs what must wait for it (a
    submitter's reply, a queue ack). Without it every write commits at once."""

    def __init__(self, path: Path, fsync: bool = False, accept_empty: bool = False) -> None:
        """Open (or create) the store. ConfigError, in one line with what to do, when the file is not
        a readable SQLite database, or when it lost the jobs this state dir held (``check_identity``;
        ``accept_empty``: go on without them, saying so)."""
        self.path = path
        self.fsync = fsync
        self.marker = identity_path(path)
        try:
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            lost = self.check_identity()  # before anything is written to a file that may be evidence
            if lost and not accept_empty:
                self.db.close()
                raise ConfigError(f"{lost}: refusing to start without the jobs it accepted. Restore {path.name} "
                                  f"(and its -wal file) from a backup, or start with --accept-empty-store to go "
                                  f"on without them (docs/RELIABILITY.md)")
            self._open(fsync)
        except sqlite3.DatabaseError as exc:
            with contextlib.suppress(Exception):
                self.db.close()
            raise ConfigError(f"the job store {path} is unreadable ({exc}): move {path.name}* aside (keep it: "
                              f"`sqlite3 {path.name} .recover` may save rows) and restart with "
                              "--accept-empty-store, or restore it from a backup") from None
        self._marked = False
        if lost:
            log.warning("%s; starting with an empty job store as --accept-empty-store asks: the jobs it "
                        "accepted are forgotten", lost)
        if lost or not self.is_empty():  # a store that has (or had) jobs is marked at once
            self._mark()

    # ---- identity: an emptied or replaced store is noticed -----------------------------------
    def check_identity(self) -> str | None:
        """Why this database is not the job store this state dir had (None: it is, or nothing says
        otherwise). The store's id lives in its ``meta`` table and, once it held a job, in the marker
        file beside it (``.jobs.sqlite3.id``): a database emptied (``truncate -s 0``), deleted, replaced,
        or cut short by a lost -wal file, has another id or none. A state dir from before the marker:
        job folders in ``jobs/`` with no job in the store."""
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        store_id = None
        if "meta" in tables:
            row = self.db.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()
            store_id = row[0] if row else None
        try:
            marked: str | None = self.marker.read_text().strip()
        except FileNotFoundError:
            marked = None
        empty = "jobs" not in tables or self.is_empty()
        if marked is not None and marked != store_id:
            state = "is empty" if empty else "is another store"
            return (f"the job store {self.path} {state}, but this state dir's jobs were accepted into store "
                    f"{marked[:12]!r} ({self.marker.name})")
        if marked is None and empty:
            folders = _job_folders(self.path.parent)
            if folders:
                return (f"the job store {self.path} has no jobs, but {self.path.parent / 'jobs'} holds "
                        f"{folders} job folders")
        return None

    def is_empty(self) -> bool:
        """No job row and no tombstone: nothing was ever stored (or what was is gone)."""
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        return all(t not in tables or self.db.execute(f"SELECT 1 FROM {t} LIMIT 1").fetchone() is None
                   for t in ("jobs", "tombstones"))

    def _mark(self) -> None:
        """Write the marker: this state dir's jobs are in the store of this id (fsync'ed with --fsync)."""
        row = self.db.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()
        tmp = self.marker.with_name(self.marker.name + ".part")
        tmp.write_text(row[0])
        replace_file(tmp, self.marker, self.fsync)
        self._marked = True

    def _open(self, fsync: bool) -> None:
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit is in the OS before it returns (survives a crash of the
        # process); FULL also fsyncs it (survives power loss).
        self.db.execute(f"PRAGMA synchronous={'FULL' if fsync else 'NORMAL'}")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS jobs (job_id TEXT PRIMARY KEY, type TEXT NOT NULL, "
            "params TEXT NOT NULL, inputs TEXT NOT NULL, outputs TEXT NOT NULL, nodes INTEGER, "
            "state TEXT NOT NULL, accepted INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, "
            "started_at REAL, finished_at REAL, error TEXT, stats TEXT NOT NULL DEFAULT '{}', "
            "inline BLOB, results BLOB)")
        have = {row[1] for row in self.db.execute("PRAGMA table_info(jobs)")}
        for column in _BYTES_COLUMNS:  # a state dir written before these columns existed
            if column not in have:
                self.db.execute(f"ALTER TABLE jobs ADD COLUMN {column} BLOB")
        # the client's idempotency key of a submission, and the fingerprint of what it submitted: a
        # retry with the same key (its reply was lost) is answered with this job, never a second one
        for column in ("idem_key", "idem_hash"):
            if column not in have:
                self.db.execute(f"ALTER TABLE jobs ADD COLUMN {column} TEXT")
        self.db.execute("CREATE UNIQUE INDEX IF NOT EXISTS jobs_by_idem_key ON jobs (idem_key) "
                        "WHERE idem_key IS NOT NULL")
        # tombstones: ids of deleted or refused jobs, so that a queue message redelivered later
        # (after a broker outage, a lost publisher confirm) never brings the job back
        self.db.execute("CREATE TABLE IF NOT EXISTS tombstones (job_id TEXT PRIMARY KEY, at REAL NOT NULL)")
        self.db.execute("DELETE FROM tombstones WHERE at < ?", (time.time() - TOMBSTONE_SECONDS,))
        self.db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self.db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('store_id', ?)", (uuid.uuid4().hex,))
        self._schedule: Schedule | None = None
        self._after: list[AfterCommit] = []
        self._pending = False

    def close(self) -> None:
        if self.db.in_transaction:
            self.commit()
        self.db.close()

    # ---- group commit ---------------------------------------------------------------------
    def group_commit(self, schedule: Schedule) -> None:
        self._schedule = schedule

    def _write(self, sql: str, args: tuple[Any, ...] | list[tuple[Any, ...]], many: bool = False) -> None:
        if self._schedule is not None and not self.db.in_transaction:
            self.db.execute("BEGIN")
        if many:
            self.db.executemany(sql, args)
        else:
            self.db.execute(sql, args)
        if self._schedule is not None and not self._pending:
            self._pending = True
            self._schedule(self.commit)

    def commit(self) -> None:
        """End the open transaction; then run what waited for it (with False if it failed: the
        transaction's writes are gone, and whoever waited must not claim them)."""
        self._pending = False
        ok = True
        if self.db.in_transaction:
            try:
                self.db.execute("COMMIT")
            except sqlite3.Error:
                log.exception("job store commit failed; its writes are rolled back")
                ok = False
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute("ROLLBACK")
        after, self._after = self._after, []
        for callback in after:
            try:
                callback(ok)
            except Exception:
                log.exception("error after a job store commit")

    def after_commit(self, callback: AfterCommit) -> None:
        """``callback(ok)`` once what was written so far is committed (at once if it is)."""
        if self._pending or self.db.in_transaction:
            self._after.append(callback)
        else:
            callback(True)

    # ---- writes ---------------------------------------------------------------------------
    def insert(self, record: dict[str, Any], accepted: bool) -> None:
        self.insert_many([record], accepted)

    def insert_many(self, records: Sequence[dict[str, Any]], accepted: bool,
                    keys: Sequence[tuple[str, str] | None] = ()) -> None:
        """New rows; ``keys``: per record, its (idempotency key, fingerprint) or None (see
        ``by_idempotency_key``; look a key up before inserting it: a taken key is an error here)."""
        if not self._marked:  # the first job: from now on an emptied store is noticed at start
            self._mark()
        keyed = list(keys) or [None] * len(records)
        self._write(
            "INSERT OR IGNORE INTO jobs (job_id, type, params, inputs, outputs, nodes, state, accepted, "
            "created_at, inline, idem_key, idem_hash) VALUES (?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?)",
            [(r["job_id"], r["type"], json.dumps(r["params"]), json.dumps(r["inputs"]), json.dumps(r["outputs"]),
              r.get("nodes"), int(accepted), r["created_at"], _pack_bytes(r.get("inline")),
              *(k if k is not None else (None, None))) for r, k in zip(records, keyed, strict=True)],
            many=True)

    def by_idempotency_key(self, keys: Sequence[str]) -> dict[str, tuple[str, str, bool]]:
        """The stored jobs submitted with these idempotency keys: key -> (job id, fingerprint,
        accepted). A key is kept as long as its job's row: deleting the job frees it."""
        found: dict[str, tuple[str, str, bool]] = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start:start + 500]
            cur = self.db.execute("SELECT idem_key, job_id, idem_hash, accepted FROM jobs "
                                  f"WHERE idem_key IN ({', '.join('?' * len(chunk))})", chunk)
            for key, job_id, fingerprint, accepted in cur:
                found[key] = (job_id, fingerprint or "", bool(accepted))
        return found

    def mark_accepted(self, job_id: str) -> None:
        self._write("UPDATE jobs SET accepted = 1 WHERE job_id = ?", (job_id,))

    def mark_accepted_many(self, job_ids: Sequence[str]) -> None:
        self._write("UPDATE jobs SET accepted = 1 WHERE job_id = ?", [(j,) for j in job_ids], many=True)

    def update(self, job_id: str, **fields: Any) -> None:
        cols = [c for c in fields if c in _COLUMNS and c != "job_id"]
        values = [json.dumps(fields[c]) if c in _JSON_COLUMNS
                  else _pack_bytes(fields[c]) if c in _BYTES_COLUMNS else fields[c] for c in cols]
        sql = "UPDATE jobs SET " + ", ".join(f"{c} = ?" for c in cols) + " WHERE job_id = ?"
        self._write(sql, (*values, job_id))

    def get(self, job_id: str) -> dict[str, Any] | None:
        cur = self.db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE job_id = ?", (job_id,))
        row = cur.fetchone()
        return self._row(row) if row else None

    def ids_with_prefix(self, prefix: str, limit: int = 11) -> list[str]:
        """Ids of stored jobs that start with ``prefix`` (lowercase hex), at most ``limit``, in
        order: a range scan of the primary key (``LIKE`` would not use its index)."""
        if not prefix or not _HEX.fullmatch(prefix):
            return []
        rows = self.db.execute("SELECT job_id FROM jobs WHERE job_id >= ? AND job_id < ? ORDER BY job_id LIMIT ?",
                               (prefix, prefix + "~", limit))  # "~" sorts after every hex digit
        return [row[0] for row in rows]

    def outcomes(self, job_ids: Sequence[str]) -> dict[str, Outcome]:
        """What a batch reply needs of each job found (state, error, small results, output names),
        without decoding the rest of its row."""
        found: dict[str, Outcome] = {}
        for start in range(0, len(job_ids), 500):  # SQLite's limit on host parameters is 999 or more
            chunk = job_ids[start:start + 500]
            cur = self.db.execute("SELECT job_id, state, error, outputs, results, stats, inputs FROM jobs "
                                  f"WHERE job_id IN ({', '.join('?' * len(chunk))})", chunk)
            for job_id, state, error, outputs, results, stats, inputs in cur:
                found[job_id] = Outcome(state, error, outputs, results, stats, '"blob"' in inputs)
        return found

    def list(self, state: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        sql = f"SELECT {', '.join(_COLUMNS)} FROM jobs"
        args: tuple[Any, ...] = ()
        if state:
            sql += " WHERE state = ?"
            args = (state,)
        sql += " ORDER BY created_at DESC LIMIT ?"
        return [self._row(r) for r in self.db.execute(sql, (*args, limit))]

    def unfinished(self) -> Iterator[dict[str, Any]]:
        cur = self.db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE {_UNFINISHED}")
        for row in cur.fetchall():
            yield self._row(row)

    def unfinished_ids(self) -> tuple[str, ...]:
        """The ids of ``unfinished()``, oldest first: the cheap form, for a frequent look."""
        return tuple(r[0] for r in self.db.execute(f"SELECT job_id FROM jobs WHERE {_UNFINISHED}"))

    def discard_unaccepted(self) -> int:
        """Submissions cut off before their id was returned (a head crash between the row and the
        queue's confirm): no job for anyone. Tombstoned, so that a message published for one after
        all is dropped when it arrives."""
        ids = [r[0] for r in self.db.execute("SELECT job_id FROM jobs WHERE accepted = 0")]
        for job_id in ids:
            self.delete(job_id)
        return len(ids)

    def blob_ids_in_use(self) -> set[str]:
        """The blobs some stored job (in any state, accepted or not yet) names among its inputs."""
        used: set[str] = set()
        for (inputs,) in self.db.execute("SELECT inputs FROM jobs"):
            for meta in (json.loads(inputs) if inputs else {}).values():
                if isinstance(meta, dict) and isinstance(meta.get("blob"), str):
                    used.add(meta["blob"])
        return used

    def blob_in_use(self, blob_id: str, except_job: str) -> bool:
        cur = self.db.execute("SELECT 1 FROM jobs WHERE job_id != ? AND inputs LIKE ? LIMIT 1",
                              (except_job, f"%{blob_id}%"))
        return cur.fetchone() is not None

    def delete(self, job_id: str) -> None:
        """Forget a job for good: its row goes, a tombstone stays (one transaction)."""
        self.delete_many([job_id])

    def delete_many(self, job_ids: Sequence[str]) -> None:
        grouped = self._schedule is not None
        if not grouped:
            self.db.execute("BEGIN")
        now = time.time()
        self._write("INSERT OR REPLACE INTO tombstones (job_id, at) VALUES (?, ?)", [(j, now) for j in job_ids],
                    many=True)
        self._write("DELETE FROM jobs WHERE job_id = ?", [(j,) for j in job_ids], many=True)
        if not grouped:
            self.db.execute("COMMIT")

    def is_deleted(self, job_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM tombstones WHERE job_id = ?", (job_id,)).fetchone() is not None

    @staticmethod
    def _row(row: tuple[Any, ...]) -> dict[str, Any]:
        out = dict(zip(_COLUMNS, row, strict=True))
        for c in _JSON_COLUMNS:
            out[c] = json.loads(out[c]) if out[c] else {}
        for c in _BYTES_COLUMNS:
            out[c] = msgpack.unpackb(out[c], raw=False) if out[c] else {}
        out["accepted"] = bool(out["accepted"])
        return out


def identity_path(db_path: Path) -> Path:
    """The marker beside a job store: the id of the store this state dir's jobs were accepted into."""
    return db_path.with_name(f".{db_path.name}.id")


def _job_folders(root: Path) -> int:
    """How many job folders (named by a job id) the state dir's ``jobs/`` holds."""
    try:
        return sum(1 for p in (root / "jobs").iterdir() if p.is_dir() and _HEX.fullmatch(p.name))
    except OSError:
        return 0


def check_state_dir(state_dir: Path, accept_empty: bool) -> None:
    """The head's start-up check of its job store (``JobStore``'s, with ``accept_empty`` given):
    ConfigError, one line, for an unreadable store or one that lost this state dir's jobs."""
    path = state_dir / STORE_FILE
    if path.exists() or identity_path(path).exists():
        JobStore(path, accept_empty=accept_empty).close()


def _pack_bytes(value: dict[str, bytes] | None) -> bytes | None:
    return msgpack.packb(value, use_bin_type=True) if value else None
