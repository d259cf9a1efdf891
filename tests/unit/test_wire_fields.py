"""check_fields, the schema check a task type uses for its subtask params, and the fetch/blob
exchange of the registration channel (common/protocol.py)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from common.errors import ProtocolError, TooLarge
from common.protocol import (
    DEFAULT_MAX_MESSAGE_BYTES,
    Field,
    blob_reply,
    check_fields,
    decode,
    encode,
)

JOB = "1f2e3d4c5b6a79880123456789abcdef"
BLOB = "0123456789abcdef0123456789abcdef"

#: the kind of schema a task type writes for its subtask params (here: like train's)
DATA = {"x": Field((str,), is_id=True), "y": Field((str,), is_id=True), "key": Field((str,), max_len=80)}
PARAMS = {
    "kind": Field((str,), choices=frozenset({"grad", "eval", "local"})),
    "job_id": Field((str,), is_id=True),
    "round": Field((int,)),
    "input_shape": Field((list,), max_len=8, items=(int,)),
    "lr": Field((int, float), required=False),
    "data": Field((dict,), fields=DATA),
}


def params(**over: Any) -> dict[str, Any]:
    base = {"kind": "grad", "job_id": JOB, "round": 11, "input_shape": [1, 8, 8], "lr": 0.05,
            "data": {"x": BLOB, "y": BLOB, "key": "ab" * 16 + "-train"}}
    base.update(over)
    return base


def test_valid_params_pass_and_come_back_as_a_copy():
    p = params(extra="kept")
    out = check_fields("train subtask params", p, PARAMS)
    assert out == p and out is not p


def test_optional_field_may_be_missing():
    p = params()
    del p["lr"]
    assert check_fields("p", p, PARAMS) == p


@pytest.mark.parametrize("field", ["kind", "job_id", "round", "input_shape", "data"])
def test_required_fields(field):
    p = params()
    del p[field]
    with pytest.raises(ProtocolError, match=f"p: missing field '{field}'"):
        check_fields("p", p, PARAMS)


@pytest.mark.parametrize("over, match", [
    ({"kind": "train"}, "must be one of"),
    ({"kind": 1}, "must be str, got int"),
    ({"job_id": "X" * 32}, "32 lowercase hex digits"),
    ({"round": -1}, "must not be negative"),
    ({"round": True}, "got bool"),
    ({"round": 1.0}, "must be int, got float"),
    ({"lr": math.nan}, "must be finite"),
    ({"lr": "0.1"}, r"must be int\|float, got str"),
    ({"input_shape": [1, -8]}, r"'input_shape'\[1\] must not be negative"),
    ({"input_shape": [1, True]}, r"'input_shape'\[1\] must be int, got bool"),
    ({"input_shape": [1] * 9}, "at most 8"),
    ({"input_shape": (1, 8)}, "must be list, got tuple"),
    ({"data": [BLOB]}, "must be dict, got list"),
    ({"data": {"x": BLOB, "key": "k"}}, r"p\.data: missing field 'y'"),
    ({"data": {"x": BLOB, "y": "nope", "key": "k"}}, r"p\.data: field 'y' must be 32 lowercase hex"),
    ({"data": {"x": BLOB, "y": BLOB, "key": "k" * 81}}, "at most 80"),
])
def test_each_rule(over, match):
    with pytest.raises(ProtocolError, match=match):
        check_fields("p", params(**over), PARAMS)


@pytest.mark.parametrize("data", [None, [], "params", 5])
def test_not_a_map(data):
    with pytest.raises(ProtocolError, match="must be a map"):
        check_fields("p", data, PARAMS)


def test_null_is_a_type_of_its_own():
    schema = {"nodes": Field((int, type(None)))}
    assert check_fields("m", {"nodes": None}, schema) == {"nodes": None}
    with pytest.raises(ProtocolError, match=r"must be int\|null, got str"):
        check_fields("m", {"nodes": "3"}, schema)


def test_message_schemas_use_the_same_rules():
    with pytest.raises(ProtocolError, match="heartbeat: field 'queued' must not be negative"):
        encode("heartbeat", {"provider_id": BLOB, "running": [], "queued": -1})


# ---- fetch and its blob reply -------------------------------------------------------------------
def test_fetch_may_carry_max_bytes():
    for extra in ({}, {"max_bytes": 0}, {"max_bytes": 1 << 20}):
        msg = decode(encode("fetch", {"provider_id": BLOB, "blob_id": BLOB, **extra}))
        assert msg.get("max_bytes") == extra.get("max_bytes")
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ProtocolError):
            encode("fetch", {"provider_id": BLOB, "blob_id": BLOB, "max_bytes": bad})


def test_blob_reply_carries_the_array():
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    for cap in (None, arr.nbytes, 1 << 30):
        msg = decode(blob_reply(BLOB, arr, cap))
        assert msg.type == "blob" and msg["blob_id"] == BLOB
        np.testing.assert_array_equal(msg.arrays[0], arr)


def test_blob_larger_than_the_providers_cap_is_refused():
    arr = np.zeros(1000, dtype=np.float64)
    msg = decode(blob_reply(BLOB, arr, arr.nbytes - 1), max_bytes=0)
    assert msg.type == "error" and msg["code"] == TooLarge.code
    assert "8000 bytes" in msg["message"] and "7999" in msg["message"]


def test_blob_larger_than_any_message_is_refused():
    huge = np.broadcast_to(np.zeros(1, dtype=np.uint8), (DEFAULT_MAX_MESSAGE_BYTES + 1,))  # no memory used
    for cap in (None, DEFAULT_MAX_MESSAGE_BYTES * 2):
        msg = decode(blob_reply(BLOB, huge, cap), max_bytes=0)
        assert msg.type == "error" and msg["code"] == "too_large"
