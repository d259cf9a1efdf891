"""Head.submit against a queue that delivers a job's message before it confirms the publish (RabbitMQ
may): the delivery waits for the confirm; a refused publish never runs the job and leaves no row."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common import config
from common.errors import QueueUnavailable
from common.protocol.batch import JobSpec
from head_node.jobqueue import EmbeddedQueue
from head_node.server import Head


class EarlyDeliveryQueue(EmbeddedQueue):
    """Delivers each published job at once, then confirms it or (refuse=True) fails the publish."""

    def __init__(self, store: Any, refuse: bool) -> None:
        super().__init__(store)
        self.refuse = refuse
        self.acked: list[str] = []

    async def publish_many(self, records: list[dict[str, Any]]) -> None:
        for record in records:
            self._deliver_now(record["job_id"], record)
        await asyncio.sleep(0)
        if self.refuse:
            raise QueueUnavailable("the job queue did not confirm the job (TimeoutError); try again")

    def _deliver_now(self, job_id: str, record: dict[str, Any]) -> None:
        async def ack() -> None:
            self.acked.append(job_id)

        assert self.deliver is not None
        self.deliver(record, ack)  # the consumer sees it before the confirm arrives


def _head(tmp_path: Path, refuse: bool) -> Head:
    cfg = config.resolve(argparse.Namespace(), config.HEAD_OPTIONS, env={"DCF_STATE_DIR": str(tmp_path)})
    head = Head(cfg)
    head.queue = head.jobs.queue = EarlyDeliveryQueue(head.store, refuse)
    return head


def _row(head: Head, job_id: str) -> dict[str, Any]:
    row = head.store.get(job_id)
    assert row is not None, f"no row for job {job_id}"
    return row


def _spec(head: Head) -> JobSpec:
    a, b = np.ones((4, 3)), np.ones((3, 2))
    return JobSpec("matmul", {"a": head.blobs.put_array(a), "b": head.blobs.put_array(b)}, {}, {}, None)


@pytest.mark.parametrize("refuse", [False, True])
def test_a_delivery_before_the_confirm_waits_for_it(tmp_path: Path, refuse: bool) -> None:
    async def scenario() -> None:
        head = _head(tmp_path, refuse)
        await head.queue.start(head.jobs.deliver)
        try:
            if refuse:
                with pytest.raises(QueueUnavailable):
                    await head.submit(_spec(head))
                await asyncio.sleep(0.01)
                assert head.state.jobs == {} and head.jobs.active == {}, "a refused job was started"
                assert head.store.list() == []
                assert isinstance(head.queue, EarlyDeliveryQueue)
                (job_id,) = head.queue.acked  # its early delivery was acked, so it is not redelivered
                assert head.store.is_deleted(job_id)
            else:
                job_id = await head.submit(_spec(head))
                assert job_id in head.state.jobs and job_id in head.jobs.active
                assert _row(head, job_id)["accepted"]
                assert head.jobs.parked == {}
        finally:
            head.store.close()

    asyncio.run(scenario())


def test_a_broken_torch_fails_the_training_job_instead_of_leaving_it_queued(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch is imported on a thread before the first training job; an install that raises something
    else than ImportError (OSError: a missing CUDA library...) fails the job with that reason."""
    import head_node.lifecycle as lifecycle

    def broken(name: str) -> Any:
        raise OSError("libcudnn.so.9: cannot open shared object file")

    monkeypatch.setattr(lifecycle.importlib, "import_module", broken)

    async def scenario() -> None:
        head = _head(tmp_path, refuse=False)
        head.queue = head.jobs.queue = EmbeddedQueue(head.store)
        await head.queue.start(head.jobs.deliver)
        try:
            arrays: dict[str, np.ndarray] = {
                "x": np.zeros((100, 64), dtype=np.float32), "y": np.arange(100, dtype=np.int64) % 3,
                "x_test": np.zeros((4, 64), dtype=np.float32), "y_test": np.arange(4, dtype=np.int64) % 3}
            inputs = {n: {"blob": head.blobs.put_array(a)} for n, a in arrays.items()}
            record = {"job_id": "d" * 32, "type": "train", "params": {"model": "logreg"}, "created_at": 0.0,
                      "nodes": None, "inputs": inputs, "outputs": {}}
            acks: list[int] = []

            async def ack() -> None:
                acks.append(1)

            head.store.insert(record, accepted=True)
            head.jobs.deliver(record, ack)
            for _ in range(100):
                await asyncio.sleep(0.02)
                if _row(head, "d" * 32)["state"] == "failed":
                    break
            row = _row(head, "d" * 32)
            assert row["state"] == "failed" and "libcudnn" in row["error"], row
            assert acks == [1]
        finally:
            head.store.close()

    asyncio.run(scenario())
