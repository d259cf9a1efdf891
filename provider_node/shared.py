"""Co-located fast path: a provider on the head's machine maps the head's state dir.

After registering, the provider reads the head's marker file in the ``state_dir`` the
head announced; if it holds the head's epoch, both see the same files. The head then
sends subtasks by reference (blob ids, output names) and the provider writes results
straight into the job's output file: no array crosses a socket, the page cache is shared.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import numpy as np

from common import layout


class SharedFiles:
    def __init__(self, root: Path, epoch: str, cache_size: int = 8) -> None:
        self.root = root
        self.epoch = epoch
        self.cache_size = cache_size
        self._maps: OrderedDict[Path, np.ndarray] = OrderedDict()

    @classmethod
    def probe(cls, state_dir: str, epoch: str, provider_id: str) -> SharedFiles | None:
        """SharedFiles if this process can read the head's marker and write in its state dir
        (the proof file the head checks before sending anything by reference)."""
        root = Path(state_dir)
        if layout.read_marker(root) != epoch or not os.access(root / "jobs", os.W_OK):
            return None
        try:
            layout.locality_proof_path(root, provider_id).write_text(epoch)
        except OSError:
            return None
        return cls(root, epoch)

    def _map(self, path: Path) -> np.ndarray:
        if path in self._maps:
            self._maps.move_to_end(path)
            return self._maps[path]
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        self._maps[path] = arr
        while len(self._maps) > self.cache_size:
            self._maps.popitem(last=False)
        return arr

    def inputs(self, blob_ids: dict[str, str]) -> dict[str, np.ndarray]:
        return {name: self._map(layout.blob_path(self.root, bid)) for name, bid in blob_ids.items()}

    def outputs(self, job_id: str, names: list[str], epoch: str) -> dict[str, np.ndarray]:
        """The job's output files, mapped for this subtask only (never cached: once the head
        publishes a result, its part file is gone and a late attempt cannot open it)."""
        return {name: np.load(layout.output_part_path(self.root, job_id, name, epoch), mmap_mode="r+",
                              allow_pickle=False) for name in names}
