"""Co-located fast path: a provider on the head's machine maps the head's state dir.

After registering, the provider reads the head's marker file in the ``state_dir`` the
head announced; if it holds the head's epoch, both see the same files. The head then
sends subtasks by reference (blob ids, output names) and the provider writes results
straight into the job's output file: no array crosses a socket, the page cache is shared.
"""

from __future__ import annotations

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
    def probe(cls, state_dir: str, epoch: str) -> SharedFiles | None:
        root = Path(state_dir)
        return cls(root, epoch) if layout.read_marker(root) == epoch else None

    def _map(self, path: Path, writable: bool) -> np.ndarray:
        if path in self._maps:
            self._maps.move_to_end(path)
            return self._maps[path]
        arr = np.load(path, mmap_mode="r+" if writable else "r", allow_pickle=False)
        self._maps[path] = arr
        while len(self._maps) > self.cache_size:
            self._maps.popitem(last=False)
        return arr

    def inputs(self, blob_ids: dict[str, str]) -> dict[str, np.ndarray]:
        return {name: self._map(layout.blob_path(self.root, bid), False) for name, bid in blob_ids.items()}

    def outputs(self, job_id: str, names: list[str], epoch: str) -> dict[str, np.ndarray]:
        return {name: self._map(layout.output_part_path(self.root, job_id, name, epoch), True)
                for name in names}

    def forget_job(self, job_id: str) -> None:
        for path in [p for p in self._maps if p.parent.name == job_id]:
            del self._maps[path]
