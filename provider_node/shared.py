"""Co-located fast path: a provider on the head's machine maps the head's state dir.

After registering, the provider reads the head's marker file in the ``state_dir`` the
head announced and writes a proof file there; when the head finds the proof, it sends
this provider subtasks by reference (blob ids, output names) and the provider writes
results straight into the job's output file: no array crosses a socket, the page cache
is shared. Files are mapped per subtask and released right after, so a deleted job's
files are freed at once.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from common import layout


class SharedFiles:
    def __init__(self, root: Path, incarnation: str) -> None:
        self.root = root
        self.incarnation = incarnation  # of the head that wrote the marker ("epoch" on the wire)

    @classmethod
    def probe(cls, state_dir: str, incarnation: str, provider_id: str) -> SharedFiles | None:
        """SharedFiles if this process can read the head's marker and write in its state dir
        (the proof file the head checks before sending anything by reference)."""
        root = Path(state_dir)
        if layout.read_marker(root) != incarnation or not os.access(root / "jobs", os.W_OK):
            return None
        try:  # owner-only, as every file in the head's state dir
            fd = os.open(layout.locality_proof_path(root, provider_id), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(incarnation)
        except OSError:
            return None
        return cls(root, incarnation)

    def inputs(self, blob_ids: dict[str, str]) -> dict[str, np.ndarray]:
        return {name: np.load(layout.blob_path(self.root, bid), mmap_mode="r", allow_pickle=False)
                for name, bid in blob_ids.items()}

    def outputs(self, job_id: str, names: list[str], incarnation: str) -> dict[str, np.ndarray]:
        """The job's output files, mapped for this subtask only (once the head publishes a
        result, its part file is gone and a late attempt cannot open it)."""
        return {name: np.load(layout.output_part_path(self.root, job_id, name, incarnation), mmap_mode="r+",
                              allow_pickle=False) for name in names}
