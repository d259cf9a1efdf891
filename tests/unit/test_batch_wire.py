"""The batch API's msgpack bodies, inline job inputs in the queue message, the job store's group
commit and the providers' assignment ledger."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from common.errors import ProtocolError, TooLarge, ValidationError
from common.protocol import batch, decode_job_message, encode_job_message
from head_node.entities import Assignments
from head_node.store import JobStore


def test_arrays_round_trip_without_pickle() -> None:
    for arr in (np.arange(6, dtype=np.int32).reshape(2, 3), np.ones((2, 2, 2), dtype=np.float32)):
        body = batch.encode_batch_request([{"type": "matmul", "inputs": {"a": arr, "b": "e" * 32}}], wait=1.5)
        req = batch.decode_batch_request(body)
        assert req.wait == 1.5 and req.jobs[0].blobs == {"b": "e" * 32}
        got = req.jobs[0].inline["a"]
        assert got.dtype == arr.dtype and not got.flags.writeable
        np.testing.assert_array_equal(got, arr)


@pytest.mark.parametrize("bad, error", [
    ({"dtype": "object", "shape": [1], "data": b"x" * 8}, ProtocolError),
    ({"dtype": "float64", "shape": [0], "data": b""}, ProtocolError),
    ({"dtype": "float64", "shape": [2], "data": b"x" * 15}, ProtocolError),
    ({"dtype": "float64", "shape": [2], "data": "not bytes"}, ProtocolError),
    ({"dtype": "float64", "shape": [2], "data": b"x" * 16, "extra": 1}, ProtocolError),
    ({"dtype": "float64", "shape": [batch.MAX_INLINE_BYTES], "data": b"x" * (batch.MAX_INLINE_BYTES * 8)}, TooLarge),
])
def test_bad_inline_arrays_are_refused(bad: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        batch.unpack_array("a", bad)


def test_request_limits() -> None:
    with pytest.raises(TooLarge, match=str(batch.MAX_BATCH_JOBS)):
        batch.decode_batch_request(batch._pack({"v": 1, "jobs": [{"type": "t"}] * (batch.MAX_BATCH_JOBS + 1)}))
    with pytest.raises(ValidationError, match="params"):
        batch.decode_batch_request(batch._pack({"v": 1, "jobs": [{"type": "t", "params": {"x": b"bin"}}]}))
    with pytest.raises(ProtocolError, match="unknown fields"):
        batch.decode_batch_request(batch._pack({"v": 1, "jobs": [{"type": "t", "priority": 1}]}))
    with pytest.raises(ProtocolError, match="version"):
        batch.decode_gather_request(batch._pack({"v": 2, "job_ids": ["a" * 32]}))
    with pytest.raises(ProtocolError, match="forget"):
        batch.decode_gather_request(batch._pack({"v": 1, "job_ids": ["a" * 32], "forget": "yes"}))


def _record(**inline: bytes) -> dict[str, object]:
    return {"job_id": "a" * 32, "type": "matmul", "params": {}, "created_at": 1.0, "nodes": None,
            "inputs": {"a": {"dtype": "float64", "shape": [2, 2]}, "b": {"blob": "b" * 32, "dtype": "float64",
                                                                         "shape": [2, 2]}},
            "outputs": {"c": {"dtype": "float64", "shape": [2, 2]}}, **({"inline": inline} if inline else {})}


def test_inline_inputs_in_the_job_message() -> None:
    data = np.arange(4.0).tobytes()
    assert decode_job_message(encode_job_message(_record(a=data)))["inline"] == {"a": data}
    with pytest.raises(ProtocolError, match="neither"):
        encode_job_message(_record())
    with pytest.raises(ProtocolError, match="need 32"):
        encode_job_message(_record(a=data[:8]))
    with pytest.raises(ProtocolError, match="both"):
        encode_job_message(_record(a=data, b=data))


def test_group_commit_runs_waiters_after_one_commit(tmp_path: Path) -> None:
    scheduled: list[Callable[[], None]] = []
    store = JobStore(tmp_path / "jobs.sqlite3")
    store.group_commit(scheduled.append)
    rec = {**_record(a=b"\0" * 32)}
    store.insert(rec, accepted=True)
    store.update("a" * 32, state="done", results={"c": b"\1" * 32})
    seen: list[bool] = []
    store.after_commit(seen.append)
    assert len(scheduled) == 1 and seen == [] and store.db.in_transaction
    other = sqlite3.connect(tmp_path / "jobs.sqlite3")
    assert other.execute("SELECT COUNT(*) FROM jobs").fetchone() == (0,), "not visible to others before the commit"
    scheduled.pop()()
    assert seen == [True]
    assert other.execute("SELECT state FROM jobs").fetchone() == ("done",)
    row = store.get("a" * 32)
    assert row is not None and row["results"] == {"c": b"\1" * 32} and row["inline"] == {"a": b"\0" * 32}
    store.after_commit(seen.append)  # nothing pending: at once
    assert seen == [True, True]
    store.close()
    other.close()


def test_assignments_keep_their_sum() -> None:
    a = Assignments()
    a.add(("j", 0), 1.5)
    a.add(("j", 1), 0.5)
    a.add(("j", 1), 0.25)  # again: replaced, not added twice
    assert a.seconds == pytest.approx(1.75) and len(a) == 2 and ("j", 0) in a
    a.discard(("j", 0))
    a.discard(("x", 9))
    assert a.seconds == pytest.approx(0.25) and sorted(a) == [("j", 1)]
    a.clear()
    assert a.seconds == 0 and not a
