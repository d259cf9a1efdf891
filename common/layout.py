"""Where the head keeps operands and results in its state dir (the claim-check store).

Head and co-located providers share this layout: a provider on the head's machine that
can read the head's marker file maps operands and writes results straight into these
files (shared page cache, no copy over the wire). Names are always built from checked
ids here, never taken from a message as paths.
"""

from __future__ import annotations

from pathlib import Path

from .ids import check_id

MARKER = ".dcf-head"  # holds the running head's incarnation (its run id)


def blob_path(root: Path, blob_id: str) -> Path:
    return root / "blobs" / f"{check_id(blob_id, 'blob id')}.npy"


def incoming_path(root: Path, upload_id: str) -> Path:
    """Where a client on the head's machine writes a .npy file before asking the head to adopt it."""
    return root / "incoming" / f"{check_id(upload_id, 'upload id')}.npy"


def locality_proof_path(root: Path, provider_id: str) -> Path:
    """A provider proves it shares the state dir by writing the head's incarnation here."""
    return root / "incoming" / f"{check_id(provider_id, 'provider id')}.local"


def job_dir(root: Path, job_id: str) -> Path:
    return root / "jobs" / check_id(job_id, "job id")


def output_path(root: Path, job_id: str, name: str) -> Path:
    return job_dir(root, job_id) / f"{_name(name)}.npy"


def output_part_path(root: Path, job_id: str, name: str, incarnation: str) -> Path:
    """The file a running job's output is assembled in; one per head incarnation (run), so a provider
    still busy with a subtask from before a head restart cannot write into the new one."""
    return job_dir(root, job_id) / f".{_name(name)}.{check_id(incarnation, 'incarnation')}.part"


def _name(name: str) -> str:
    if not name.isidentifier() or len(name) > 64:
        raise ValueError(f"bad output name {name!r:.70}")
    return name


def read_marker(root: Path) -> str | None:
    try:
        return (root / MARKER).read_text().strip()
    except OSError:
        return None
