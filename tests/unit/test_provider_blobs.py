"""Unit tests of provider_node/blobs.py and the provider's TaskDevice: dataset blobs for
``Device.fetch``, cached by content key, mapped from a shared state dir or asked of the head."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common import layout, tasks
from provider_node.blobs import BlobCache
from provider_node.device import ComputeDevice, TaskDevice
from provider_node.shared import SharedFiles

BLOB = "b" * 32
OTHER = "c" * 32


class FakeHead:
    """Answers blob requests with a distinct array each time, and counts them."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def request(self, blob_id: str) -> np.ndarray:
        self.asked.append(blob_id)
        return np.full(3, len(self.asked), dtype=np.float32)


def test_a_blob_is_asked_of_the_head_once_per_content_key() -> None:
    head = FakeHead()
    cache = BlobCache(head)
    first = cache.fetch(BLOB, "k1")
    assert cache.fetch(BLOB, "k1") is first
    assert cache.fetch(BLOB, "k2") is not first  # another key: another content
    assert head.asked == [BLOB, BLOB]


def test_the_least_recently_used_key_is_dropped() -> None:
    head = FakeHead()
    cache = BlobCache(head, entries=2)
    cache.fetch(BLOB, "a")
    cache.fetch(BLOB, "b")
    cache.fetch(BLOB, "a")  # "a" used last: "b" goes first
    cache.fetch(BLOB, "c")
    assert len(head.asked) == 3
    cache.fetch(BLOB, "a")
    assert len(head.asked) == 3
    cache.fetch(BLOB, "b")
    assert len(head.asked) == 4


def test_a_shared_state_dir_is_mapped_instead_of_asked(tmp_path: Path) -> None:
    (tmp_path / "blobs").mkdir()
    data = np.arange(6, dtype=np.float64).reshape(2, 3)
    np.save(layout.blob_path(tmp_path, OTHER), data)
    head = FakeHead()
    cache = BlobCache(head)
    cache.use_shared(SharedFiles(tmp_path, "1" * 32))
    got = cache.fetch(OTHER, "x")
    assert isinstance(got, np.memmap) and np.array_equal(got, data)
    cache.use_shared(None)
    cache.fetch(OTHER, "y")  # no longer shared: asked of the head
    assert head.asked == [OTHER]


def test_task_device_is_what_a_task_may_use() -> None:
    head = FakeHead()
    hardware = ComputeDevice("cpu", "test cpu", 1 << 30, ("float32", "float64"))
    device: tasks.Device = TaskDevice(hardware, BlobCache(head))  # mypy checks the protocol here
    assert device.kind == "cpu"
    assert float(device.fetch(BLOB, "k")[0]) == 1.0 and head.asked == [BLOB]
    device.cache["model"] = 1
    assert TaskDevice(hardware, BlobCache(head)).cache == {}  # one cache per device
