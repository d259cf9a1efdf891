"""The RabbitMQ job message (common/protocol.py: encode_job_message, decode_job_message) and how
the AMQP queue treats a malformed one (head_node/jobqueue.py). No broker: a fake message."""

from __future__ import annotations

import asyncio
import math
import uuid
from pathlib import Path
from typing import Any

import msgpack
import pytest

from common.errors import ProtocolError, TooLarge, VersionMismatch
from common.jobs import JobRecord
from common.protocol import (
    JOB_SIGNATURE_HEADER,
    MAX_JOB_MESSAGE_BYTES,
    decode_job_message,
    encode_job_message,
    job_message,
    sign_job_message,
)
from head_node.jobqueue import AmqpQueue
from head_node.store import JobStore

JOB_ID = "1f2e3d4c5b6a79880123456789abcdef"
BLOB_A = "0123456789abcdef0123456789abcdef"
BLOB_B = "fedcba9876543210fedcba9876543210"


def record(**over: Any) -> dict[str, Any]:
    """A job's queue message as the head writes it (``JobRecord.message()``)."""
    rec = JobRecord(job_id=JOB_ID, type="matmul", params={"note": "x"},
                    inputs={"a": {"blob": BLOB_A, "dtype": "float32", "shape": [4, 3]},
                            "b": {"blob": BLOB_B, "dtype": "float32", "shape": [3, 2]}},
                    outputs={"c": {"dtype": "float32", "shape": [4, 2]}}, nodes=None,
                    created_at=1700000000.25).message()
    rec.update(over)
    return rec


def legacy_body(rec: dict[str, Any]) -> bytes:
    """What head_node/jobqueue.py's encode_record put on the queue before the codec moved."""
    return msgpack.packb({"v": 1, **rec}, use_bin_type=True)


def raw(**over: Any) -> bytes:
    """A hand-made message (bypasses the encoder's checks); ``None`` removes a field."""
    body = {"v": 1, **record()}
    for key, value in over.items():
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    return msgpack.packb(body, use_bin_type=True)


# ---- the bytes on the queue ---------------------------------------------------------------------
def test_encode_writes_the_same_bytes_as_before():
    for rec in (record(), record(nodes=3), record(type="train", params={"epochs": 2, "lr": 0.1})):
        assert encode_job_message(rec) == legacy_body(rec)


#: record() on the queue, byte for byte: msgpack map of 8, "v": 1 first, then the fields in
#: JobRecord.message() order; strings as str (fixstr / str8), created_at as float64 (0xcb)
GOLDEN = bytes.fromhex(
    "88a17601a66a6f625f6964d92031663265336434633562366137393838303132"
    "33343536373839616263646566a474797065a66d61746d756ca6706172616d73"
    "81a46e6f7465a178a6696e7075747382a16183a4626c6f62d920303132333435"
    "3637383961626364656630313233343536373839616263646566a56474797065"
    "a7666c6f61743332a57368617065920403a16283a4626c6f62d9206665646362"
    "613938373635343332313066656463626139383736353433323130a564747970"
    "65a7666c6f61743332a57368617065920302a76f75747075747381a16382a564"
    "74797065a7666c6f61743332a57368617065920402a56e6f646573c0aa637265"
    "617465645f6174cb41d954fc40100000")


def test_golden_bytes():
    assert encode_job_message(record()) == GOLDEN
    assert decode_job_message(GOLDEN) == record()


def test_round_trip():
    for rec in (record(), record(nodes=1), record(nodes=100_000), record(created_at=0)):
        assert decode_job_message(encode_job_message(rec)) == rec


def test_round_trip_through_the_record_type():
    rec = record(nodes=2)
    assert JobRecord.from_message(decode_job_message(encode_job_message(rec))).message() == rec


def test_messages_already_in_a_queue_decode():
    rec = record()
    assert decode_job_message(legacy_body(rec)) == rec
    without_nodes = {k: v for k, v in rec.items() if k != "nodes"}
    assert decode_job_message(legacy_body(without_nodes))["nodes"] is None


def test_unknown_fields_are_ignored_and_dropped():
    decoded = decode_job_message(raw(priority=5, future={"x": 1}))
    assert "priority" not in decoded and "future" not in decoded
    assert decoded == record()


def test_encode_checks_what_it_writes():
    with pytest.raises(ProtocolError):
        encode_job_message(record(job_id="not-an-id"))
    with pytest.raises(TooLarge):
        encode_job_message(record(params={"pad": "x" * MAX_JOB_MESSAGE_BYTES}))


# ---- malformed messages ---------------------------------------------------------------------------
@pytest.mark.parametrize("body", [b"", b"\xc1", b"hello", b"\x93\x01\x02", legacy_body(record()) + b"x",
                                  msgpack.packb({1: 2, "v": 1})])
def test_garbage(body):
    with pytest.raises(ProtocolError):
        decode_job_message(body)


@pytest.mark.parametrize("value", [[1, 2], "job", 5, None])
def test_not_a_map(value):
    with pytest.raises(ProtocolError, match="map|version"):
        decode_job_message(msgpack.packb(value))


def test_too_large():
    body = raw(params={"pad": "x" * MAX_JOB_MESSAGE_BYTES})
    with pytest.raises(TooLarge):
        decode_job_message(body)


@pytest.mark.parametrize("version", [0, 2, "1", True, 1.0, [1]])
def test_bad_version(version):
    with pytest.raises(VersionMismatch):
        decode_job_message(raw(v=version))


def test_missing_version():
    body = msgpack.packb(record(), use_bin_type=True)
    with pytest.raises(VersionMismatch):
        decode_job_message(body)


@pytest.mark.parametrize("name", ["job_id", "type", "params", "inputs", "outputs", "created_at"])
def test_every_required_field(name):
    with pytest.raises(ProtocolError, match=f"missing field '{name}'"):
        decode_job_message(raw(**{name: None}))


@pytest.mark.parametrize("field, value", [
    ("job_id", 5), ("job_id", "A" * 32), ("job_id", "a" * 31), ("job_id", "a" * 32 + "\n"),
    ("job_id", uuid.uuid4().hex.upper()), ("job_id", b"a" * 32),
    ("type", 5), ("type", ["matmul"]), ("type", "t" * 65),
    ("params", [1]), ("params", "x"), ("params", 5),
    ("inputs", []), ("inputs", "a"), ("outputs", []), ("outputs", 5),
    ("nodes", 0), ("nodes", -1), ("nodes", True), ("nodes", 1.5), ("nodes", "2"),
    ("created_at", "now"), ("created_at", -1.0), ("created_at", math.nan), ("created_at", math.inf),
    ("created_at", True),
])
def test_bad_top_level_field(field, value):
    with pytest.raises(ProtocolError):
        decode_job_message(raw(**{field: value}))


GOOD_INPUT = {"blob": BLOB_A, "dtype": "float32", "shape": [4, 3]}


@pytest.mark.parametrize("meta", [
    "blob", [BLOB_A], {"dtype": "float32", "shape": [4, 3]}, {**GOOD_INPUT, "blob": "x" * 32},
    {**GOOD_INPUT, "blob": 7}, {**GOOD_INPUT, "dtype": "complex128"}, {**GOOD_INPUT, "dtype": "object"},
    {**GOOD_INPUT, "dtype": "<f4"}, {**GOOD_INPUT, "dtype": 5}, {k: v for k, v in GOOD_INPUT.items() if k != "dtype"},
    {**GOOD_INPUT, "shape": 12}, {**GOOD_INPUT, "shape": [-1, 3]}, {**GOOD_INPUT, "shape": [True, 3]},
    {**GOOD_INPUT, "shape": [4.0, 3]}, {**GOOD_INPUT, "shape": ["4"]}, {**GOOD_INPUT, "shape": [1] * 65},
    {**GOOD_INPUT, "shape": [2**40]}, {k: v for k, v in GOOD_INPUT.items() if k != "shape"},
])
def test_bad_input_descriptor(meta):
    with pytest.raises(ProtocolError):
        decode_job_message(raw(inputs={"a": meta}))


@pytest.mark.parametrize("meta", [
    {"dtype": "float32"}, {"shape": [4]}, {"dtype": "uint32", "shape": [4]}, {"dtype": "float32", "shape": [-4]},
    {"dtype": "float32", "shape": "4"}, None,
])
def test_bad_output_descriptor(meta):
    with pytest.raises(ProtocolError):
        decode_job_message(raw(outputs={"c": meta}))


@pytest.mark.parametrize("name", ["", "n" * 65])
def test_bad_input_names(name):
    with pytest.raises(ProtocolError, match="bad name"):
        decode_job_message(raw(inputs={name: GOOD_INPUT}))


@pytest.mark.parametrize("name", ["", "../c", "a b", "1c", "c.npy", "n" * 65])
def test_output_names_are_identifiers(name):
    with pytest.raises(ProtocolError, match="bad name"):
        decode_job_message(raw(outputs={name: {"dtype": "float64", "shape": [2]}}))


def test_too_many_arrays():
    many = {f"x{i}": GOOD_INPUT for i in range(65)}
    with pytest.raises(ProtocolError, match="at most 64"):
        decode_job_message(raw(inputs=many))


def test_every_job_dtype_accepted():
    for dtype in ("float16", "float32", "float64", "int8", "int32", "int64", "uint8", "bool"):
        rec = record(outputs={"c": {"dtype": dtype, "shape": [2]}})
        assert decode_job_message(encode_job_message(rec)) == rec


def test_params_values_are_the_task_types_to_check():
    # nested params are not the codec's business (the task type validates them on delivery)
    rec = record(params={"lr": -1.0, "model_args": {"hidden": [64, 32]}, "flag": True})
    assert decode_job_message(encode_job_message(rec))["params"] == rec["params"]


# ---- the AMQP consumer: a malformed or unsigned message is logged and dropped ------------------------
KEY = b"k" * 43


class FakeMessage:
    def __init__(self, body: bytes, signature: object = "") -> None:
        self.body = body
        self.message_id = JOB_ID
        self.headers = {} if signature is None else {
            JOB_SIGNATURE_HEADER: signature or sign_job_message(body, KEY)}
        self.outcome: str | None = None

    async def ack(self) -> None:
        self.outcome = "ack"

    async def reject(self, requeue: bool = False) -> None:
        self.outcome = f"reject(requeue={requeue})"


def consume(tmp_path: Path, body: bytes, signature: object = "") -> tuple[FakeMessage, list[dict[str, Any]],
                                                                         JobStore]:
    store = JobStore(tmp_path / "jobs.sqlite3")
    queue = AmqpQueue("amqp://guest:guest@127.0.0.1/", store, KEY)
    delivered: list[dict[str, Any]] = []
    queue.deliver = lambda rec, ack: delivered.append(rec)
    message = FakeMessage(body, signature)
    asyncio.run(queue._on_message(message))
    return message, delivered, store


@pytest.mark.parametrize("signature", [None, "0" * 64, b"zz", 7, sign_job_message(b"another body", KEY),
                                       sign_job_message(encode_job_message(record()), b"another key" * 4)])
def test_a_job_message_without_the_heads_signature_never_runs(tmp_path, caplog, signature):
    message, delivered, store = consume(tmp_path, encode_job_message(record()), signature)
    assert message.outcome == "reject(requeue=False)"
    assert delivered == [] and store.list() == []
    assert f"{JOB_SIGNATURE_HEADER}" in caplog.text and "not published by a head" in caplog.text


def test_a_signed_message_changed_on_the_way_is_dropped(tmp_path):
    body = encode_job_message(record())
    tampered = encode_job_message(record(nodes=1))
    message, delivered, _ = consume(tmp_path, tampered, sign_job_message(body, KEY))
    assert message.outcome == "reject(requeue=False)" and delivered == []


def test_a_stored_row_gives_back_its_message(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    inputs = {**record()["inputs"], "a": {"dtype": "float32", "shape": [4, 3]}}
    rec = record(nodes=2, inputs=inputs, inline={"a": b"\0" * 48})
    store.insert(rec, accepted=True)
    row = store.get(JOB_ID)
    assert row is not None and job_message(row) == rec
    assert decode_job_message(encode_job_message(job_message(row))) == rec


def test_accepted_jobs_the_queue_does_not_deliver_are_published_again_in_time(tmp_path):
    store = JobStore(tmp_path / "jobs.sqlite3")
    queue = AmqpQueue("amqp://guest:guest@127.0.0.1/", store, KEY, prefetch=2, republish_after=10)
    ids = [uuid.uuid4().hex for _ in range(3)]
    for i, job_id in enumerate(ids):
        store.insert(record(job_id=job_id, created_at=1700000000.0 + i), accepted=True)
    store.insert(record(job_id=uuid.uuid4().hex), accepted=False)  # not accepted: not the queue's
    queue.held.add(ids[0])  # delivered, running
    assert queue.missing_jobs(100.0) == []  # first seen missing now
    assert queue.missing_jobs(109.0) == []
    assert [m["job_id"] for m in queue.missing_jobs(110.0)] == ids[1:]
    assert queue.missing_jobs(115.0) == []  # given another 10 s before the next try
    queue.held.add(ids[1])  # it came back after all
    assert [m["job_id"] for m in queue.missing_jobs(120.0)] == []  # full: the rest wait in the broker
    queue.held.discard(ids[0])
    store.update(ids[0], state="done")
    assert [m["job_id"] for m in queue.missing_jobs(121.0)] == []  # room again: ids[2] seen missing anew
    assert [m["job_id"] for m in queue.missing_jobs(131.0)] == [ids[2]]


@pytest.mark.parametrize("body", [b"garbage", raw(v=2), raw(job_id="x"), raw(nodes=0),
                                  raw(outputs={"../c": {"dtype": "float32", "shape": [1]}})])
def test_malformed_queue_message_is_logged_and_dropped(tmp_path, caplog, body):
    message, delivered, store = consume(tmp_path, body)
    assert message.outcome == "reject(requeue=False)"
    assert delivered == []
    assert store.list() == []
    assert "dropping malformed job message" in caplog.text


def test_valid_queue_message_is_stored_and_delivered(tmp_path):
    message, delivered, store = consume(tmp_path, encode_job_message(record(nodes=2)))
    assert delivered == [record(nodes=2)]
    assert message.outcome is None  # acked only once the job's outcome is stored
    row = store.get(JOB_ID)
    assert row is not None and row["nodes"] == 2 and row["type"] == "matmul"
