"""Unit tests of common/protocol.py: frame encoding, decoding and validation (no sockets)."""

from __future__ import annotations

import uuid

import msgpack
import numpy as np
import pytest

from common import protocol
from common.errors import ProtocolError, TooLarge, ValidationError, VersionMismatch
from common.protocol import (
    MAX_ARRAYS,
    MAX_HEADER_BYTES,
    MAX_NDIM,
    PROTOCOL_VERSION,
    WIRE_DTYPES,
    check_id,
    decode,
    encode,
    wire_dtype,
)


def hexid() -> str:
    return uuid.uuid4().hex


def result_fields(**over):
    fields = {"job_id": hexid(), "subtask": 0, "attempt": 1, "epoch": hexid(),
              "provider_id": hexid(), "elapsed_s": 0.25, "stats": {"nonfinite": 0}}
    fields.update(over)
    return fields


def register_fields(**over):
    fields = {"provider_id": hexid(), "name": "p1", "host": "h", "os": "linux", "device_kind": "cpu",
              "device_name": "x86", "memory_bytes": 1 << 30, "cores": 4, "task_types": ["matmul"],
              "dtypes": ["float32", "float64"], "version": "0.1.0", "gflops": 12.5}
    fields.update(over)
    return fields


def raw_header(**header) -> bytes:
    """A hand-made header (bypasses encode's checks), as a peer could send it."""
    base = {"v": PROTOCOL_VERSION, "type": "ok", "arrays": []}
    base.update(header)
    return msgpack.packb(base, use_bin_type=True)


def as_wire(frames):
    """What arrives after a network hop: every frame as its own bytes object."""
    return [bytes(f) for f in frames]


# ---- round trips ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "int64", "uint8", "int8", "bool",
                                   "float16"])
def test_round_trip_array_dtypes(dtype):
    arr = (np.arange(12).reshape(3, 4) % 5).astype(dtype)
    msg = decode(as_wire(encode("result", result_fields(), [arr])), expect={"result"})
    assert msg.type == "result"
    assert len(msg.arrays) == 1
    out = msg.arrays[0]
    assert out.dtype == arr.dtype
    assert out.shape == (3, 4)
    np.testing.assert_array_equal(out, arr)


def test_round_trip_fields_preserved():
    fields = result_fields(stats={"nonfinite": 3, "note": "x"})
    msg = decode(as_wire(encode("result", fields)))
    assert msg.fields == fields
    assert msg["job_id"] == fields["job_id"]
    assert msg.get("missing", 7) == 7
    assert msg.arrays == []


def test_round_trip_several_arrays_and_shapes():
    arrays: list[np.ndarray] = [np.random.default_rng(0).standard_normal((5, 7)),
              np.arange(6, dtype=np.float32),
              np.zeros((2, 0), dtype=np.float64),
              np.ones((2, 1, 3), dtype=np.int64)]
    msg = decode(as_wire(encode("subtask", {"job_id": hexid(), "subtask": 1, "attempt": 2,
                                            "epoch": hexid(), "task_type": "matmul",
                                            "params": {"row0": 0, "rows": 5}}, arrays)))
    assert [a.shape for a in msg.arrays] == [a.shape for a in arrays]
    for got, want in zip(msg.arrays, arrays, strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)


def test_round_trip_empty_message_type():
    frames = encode("ok")
    assert len(frames) == 1
    msg = decode(frames)
    assert msg.type == "ok" and msg.fields == {} and msg.arrays == []


def test_topic_frame_is_prepended():
    topic = hexid().encode()
    frames = encode("ok", topic=topic)
    assert frames[0] == topic
    assert decode(frames[1:]).type == "ok"


def test_non_contiguous_array_is_sent_in_c_order():
    base = np.arange(20, dtype=np.float64).reshape(4, 5)
    view = base[:, ::2]  # not contiguous
    fortran = np.asfortranarray(base)
    msg = decode(as_wire(encode("result", result_fields(), [view, fortran])))
    np.testing.assert_array_equal(msg.arrays[0], view)
    np.testing.assert_array_equal(msg.arrays[1], base)
    assert msg.arrays[1].flags.c_contiguous


# ---- zero copy ------------------------------------------------------------------------------
def test_encode_does_not_copy_contiguous_arrays():
    arr = np.arange(12, dtype=np.float64).reshape(3, 4)
    frames = encode("result", result_fields(), [arr])
    buf = np.frombuffer(frames[1], dtype=np.uint8)
    assert np.shares_memory(buf, arr)


def test_decode_does_not_copy_the_frame():
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    frames = as_wire(encode("result", result_fields(), [arr]))
    payload = frames[1]
    out = decode(frames).arrays[0]
    assert np.shares_memory(out, np.frombuffer(payload, dtype=np.uint8))
    assert not out.flags.writeable  # a view of an immutable bytes frame
    assert not out.flags.owndata


def test_encode_decode_in_process_shares_the_original_memory():
    arr = np.arange(30, dtype=np.float64).reshape(5, 6)
    out = decode(encode("result", result_fields(), [arr])).arrays[0]
    assert np.shares_memory(out, arr)


def test_decode_reads_zmq_like_frames_with_buffer_attribute():
    class FakeFrame:
        def __init__(self, data: bytes) -> None:
            self.buffer = memoryview(data)

    arr = np.arange(4, dtype=np.float64)
    frames = [FakeFrame(f) for f in as_wire(encode("result", result_fields(), [arr]))]
    out = decode(frames).arrays[0]
    np.testing.assert_array_equal(out, arr)
    assert np.shares_memory(out, np.frombuffer(frames[1].buffer, dtype=np.uint8))


# ---- byte order and dtypes ---------------------------------------------------------------------
def test_big_endian_array_is_converted_to_little_endian():
    arr = np.arange(6, dtype=">f8").reshape(2, 3)
    frames = encode("result", result_fields(), [arr])
    header = msgpack.unpackb(frames[0])
    assert header["arrays"] == [{"dtype": "<f8", "shape": [2, 3]}]
    out = decode(as_wire(frames)).arrays[0]
    assert out.dtype.str == "<f8"
    np.testing.assert_array_equal(out, arr)


def test_big_endian_declared_on_the_wire_is_rejected():
    header = raw_header(arrays=[{"dtype": ">f8", "shape": [2]}])
    with pytest.raises(ProtocolError, match="not allowed"):
        decode([header, b"\0" * 16])


@pytest.mark.parametrize("dtype", ["complex128", "object", "U3", "S4", "datetime64[s]", "uint32"])
def test_encode_rejects_dtypes_outside_allow_list(dtype):
    arr = np.zeros(2, dtype=dtype)
    with pytest.raises(ProtocolError, match="cannot be sent"):
        encode("result", result_fields(), [arr])


@pytest.mark.parametrize("dtype", ["|O", "<c16", "<U3", "<u4", "float64", "f8", 5, None])
def test_decode_rejects_dtypes_outside_allow_list(dtype):
    header = raw_header(arrays=[{"dtype": dtype, "shape": [1]}])
    with pytest.raises(ProtocolError):
        decode([header, b"\0" * 8])


@pytest.mark.parametrize("dtype", [["<f8"], {"a": 1}])
def test_decode_rejects_unhashable_dtype_descriptor(dtype):
    header = raw_header(arrays=[{"dtype": dtype, "shape": [1]}])
    with pytest.raises(ProtocolError):
        decode([header, b"\0" * 8])


def test_wire_dtype_names():
    assert wire_dtype("float64") == "<f8"
    assert wire_dtype(np.dtype(">f4")) == "<f4"
    assert wire_dtype("bool") == "|b1"
    assert wire_dtype("uint8") == "|u1"
    for name in WIRE_DTYPES:
        assert wire_dtype(name) == name
    with pytest.raises(ProtocolError):
        wire_dtype("complex64")


# ---- garbage and truncation --------------------------------------------------------------------
@pytest.mark.parametrize("garbage", [b"", b"\xc1", b"\xff\xfe\xfd", b"hello world", b"\x93NUMPY",
                                     msgpack.packb({"v": 1, "type": "ok"}) + b"trailing"])
def test_garbage_header_is_protocol_error(garbage):
    with pytest.raises(ProtocolError):
        decode([garbage])


def test_empty_message():
    with pytest.raises(ProtocolError, match="empty"):
        decode([])


@pytest.mark.parametrize("value", [[1, 2], "str", 5, None, True])
def test_header_must_be_a_map(value):
    with pytest.raises(ProtocolError):
        decode([msgpack.packb(value)])


def test_header_with_non_string_keys():
    with pytest.raises(ProtocolError):
        decode([msgpack.packb({1: 1, "v": 1, "type": "ok"})])


def test_truncated_header():
    header = encode("register", register_fields())[0]
    for cut in (1, len(header) // 2, len(header) - 1):
        with pytest.raises(ProtocolError):
            decode([header[:cut]])


def test_truncated_array_buffer():
    arr = np.arange(10, dtype=np.float64)
    frames = as_wire(encode("result", result_fields(), [arr]))
    with pytest.raises(ProtocolError, match="needs 80 bytes"):
        decode([frames[0], frames[1][:-1]])
    with pytest.raises(ProtocolError):
        decode([frames[0], frames[1] + b"\0"])


def test_missing_buffer_frame():
    frames = as_wire(encode("result", result_fields(), [np.zeros(2), np.zeros(3)]))
    with pytest.raises(ProtocolError, match="declares 2 arrays but 1"):
        decode(frames[:2])


def test_extra_buffer_frame():
    frames = as_wire(encode("result", result_fields(), [np.zeros(2)]))
    with pytest.raises(ProtocolError, match="declares 1 arrays but 2"):
        decode(frames + [b"\0" * 16])


# ---- version ---------------------------------------------------------------------------------
@pytest.mark.parametrize("version", [0, 2, 99, "1", None, -1])
def test_wrong_version(version):
    with pytest.raises(VersionMismatch):
        decode([raw_header(v=version)])


def test_missing_version():
    with pytest.raises(VersionMismatch):
        decode([msgpack.packb({"type": "ok", "arrays": []})])


def test_version_mismatch_is_a_protocol_error():
    assert issubclass(VersionMismatch, ProtocolError)
    with pytest.raises(ProtocolError) as info:
        decode([raw_header(v=2)])
    assert info.value.code == "bad_version"


@pytest.mark.parametrize("version", [True, 1.0])
def test_version_must_be_an_int(version):
    # PROTOCOL.md §3: `v` is an int; a bool or a float is not version 1
    with pytest.raises(VersionMismatch):
        decode([raw_header(v=version)])


# ---- message types and schemas -----------------------------------------------------------------
def test_unknown_type():
    with pytest.raises(ProtocolError, match="unknown message type"):
        decode([raw_header(type="launch_missiles")])
    with pytest.raises(ProtocolError, match="unknown message type"):
        encode("launch_missiles", {})


@pytest.mark.parametrize("mtype", [5, None, ["ok"], b"ok"])
def test_type_must_be_a_string(mtype):
    with pytest.raises(ProtocolError):
        decode([raw_header(type=mtype)])


def test_expect_filters_message_types():
    frames = encode("result", result_fields())
    assert decode(frames, expect={"result", "ack"}).type == "result"
    assert decode(frames, expect=("result",)).type == "result"
    with pytest.raises(ProtocolError, match="not accepted"):
        decode(frames, expect={"ack", "failed"})
    with pytest.raises(ProtocolError, match="not accepted"):
        decode(frames, expect=set())


def test_expect_is_checked_before_the_schema():
    # a malformed message of an unexpected type is refused for its type
    header = raw_header(type="register")  # missing every field
    with pytest.raises(ProtocolError, match="not accepted"):
        decode([header], expect={"ok"})


def test_missing_required_field():
    fields = result_fields()
    del fields["attempt"]
    with pytest.raises(ProtocolError, match="missing field 'attempt'"):
        encode("result", fields)
    with pytest.raises(ProtocolError, match="missing field 'attempt'"):
        decode([raw_header(type="result", **fields)])


@pytest.mark.parametrize(("mtype", "fields", "name", "good", "bad"), [
    ("result", result_fields, "in_place", True, 1),
    ("heartbeat", lambda: {"provider_id": hexid(), "running": [], "queued": 0}, "local_epoch", hexid(), 5),
    ("registered", lambda: {"provider_id": hexid(), "epoch": hexid(), "heartbeat_interval_s": 5.0},
     "state_dir", "/srv/dcf", None),
    ("cancel", lambda: {"job_id": hexid(), "epoch": hexid()}, "subtask", 3, "3"),
])
def test_optional_fields(mtype, fields, name, good, bad):
    """PROTOCOL.md §12: optional fields may be absent, but are type-checked when present."""
    base = fields()
    assert name not in decode(encode(mtype, base)).fields
    assert decode(encode(mtype, {**base, name: good}))[name] == good
    with pytest.raises(ProtocolError, match=name):
        decode([raw_header(type=mtype, **{**base, name: bad})])


def test_unknown_fields_are_kept_and_ignored():
    fields = result_fields(future_field=[1, 2, 3])
    msg = decode(encode("result", fields))
    assert msg["future_field"] == [1, 2, 3]


@pytest.mark.parametrize(("name", "value"), [
    ("subtask", "0"), ("subtask", 1.5), ("attempt", None), ("job_id", 5), ("epoch", b"x" * 32),
    ("stats", [1]), ("elapsed_s", "1.0"), ("provider_id", ["a"]),
])
def test_wrong_field_types(name, value):
    fields = result_fields(**{name: value})
    with pytest.raises(ProtocolError, match=name):
        decode([raw_header(type="result", **fields)])
    with pytest.raises(ProtocolError, match=name):
        encode("result", fields)


@pytest.mark.parametrize(("mtype", "name", "fields"), [
    ("result", "subtask", result_fields), ("result", "attempt", result_fields),
    ("register", "memory_bytes", register_fields), ("register", "cores", register_fields),
    ("register", "gflops", register_fields), ("result", "elapsed_s", result_fields),
])
def test_bool_where_int_expected(mtype, name, fields):
    with pytest.raises(ProtocolError, match="got bool"):
        decode([raw_header(type=mtype, **fields(**{name: True}))])
    with pytest.raises(ProtocolError, match="got bool"):
        encode(mtype, fields(**{name: False}))


def test_bool_field_accepts_only_bool():
    fields = {"job_id": hexid(), "subtask": 0, "attempt": 1, "epoch": hexid(), "provider_id": hexid(),
              "error": "boom", "retryable": True}
    assert decode(encode("failed", fields))["retryable"] is True
    with pytest.raises(ProtocolError, match="retryable"):
        decode([raw_header(type="failed", **{**fields, "retryable": 1})])


@pytest.mark.parametrize("name", ["subtask", "attempt"])
def test_negative_ints_rejected(name):
    with pytest.raises(ProtocolError, match="negative"):
        decode([raw_header(type="result", **result_fields(**{name: -1}))])


def test_negative_int_in_register():
    with pytest.raises(ProtocolError, match="negative"):
        encode("register", register_fields(memory_bytes=-1))


def test_zero_ints_accepted():
    assert decode(encode("result", result_fields(subtask=0, attempt=0)))["subtask"] == 0


def test_int_accepted_where_number_expected():
    msg = decode(encode("register", register_fields(gflops=12)))
    assert msg["gflops"] == 12


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_floats_rejected(value):
    with pytest.raises(ProtocolError, match="finite"):
        decode([raw_header(type="result", **result_fields(elapsed_s=value))])
    with pytest.raises(ProtocolError, match="finite"):
        encode("register", register_fields(gflops=value))


# ---- sizes and array descriptors -----------------------------------------------------------------
def test_header_too_large_on_encode():
    # PROTOCOL.md 9: an oversized header has its own code, too_large (not bad_message)
    with pytest.raises(TooLarge, match="exceeds") as info:
        encode("error", {"code": "x", "message": "m" * (MAX_HEADER_BYTES + 1)})
    assert info.value.code == "too_large"


def test_header_too_large_on_decode():
    header = raw_header(type="error", code="x", message="m" * MAX_HEADER_BYTES)
    assert len(header) > MAX_HEADER_BYTES
    with pytest.raises(TooLarge, match="exceeds") as info:
        decode([header])
    assert info.value.code == "too_large"


def test_header_of_exactly_the_limit_is_accepted():
    base = raw_header(type="error", code="x", message="")
    pad = MAX_HEADER_BYTES - len(base) - 2  # str8 -> str16 adds 2 bytes of length
    header = raw_header(type="error", code="x", message="m" * pad)
    assert len(header) == MAX_HEADER_BYTES
    assert decode([header])["message"] == "m" * pad
    with pytest.raises(TooLarge):
        decode([raw_header(type="error", code="x", message="m" * (pad + 1))])


def test_error_frames_truncate_message():
    msg = decode(protocol.error_frames("oops", "m" * (MAX_HEADER_BYTES * 2)))
    assert msg.type == "error" and msg["code"] == "oops"
    assert len(msg["message"]) == 500


def test_too_many_arrays_on_encode():
    arrays = [np.zeros(1)] * (MAX_ARRAYS + 1)
    with pytest.raises(ProtocolError, match="at most"):
        encode("result", result_fields(), arrays)
    frames = encode("result", result_fields(), [np.zeros(1)] * MAX_ARRAYS)
    assert len(decode(frames).arrays) == MAX_ARRAYS


def test_too_many_arrays_on_decode():
    n = MAX_ARRAYS + 1
    header = raw_header(arrays=[{"dtype": "<f8", "shape": [1]}] * n)
    with pytest.raises(ProtocolError, match="at most"):
        decode([header] + [b"\0" * 8] * n)


@pytest.mark.parametrize("arrays", ["x", {"dtype": "<f8"}, 5, None])
def test_arrays_must_be_a_list(arrays):
    with pytest.raises(ProtocolError):
        decode([raw_header(arrays=arrays)])


@pytest.mark.parametrize("meta", [
    "<f8", ["<f8", [1]], {"dtype": "<f8"}, {"shape": [1]},
    {"dtype": "<f8", "shape": 8}, {"dtype": "<f8", "shape": [-1]}, {"dtype": "<f8", "shape": [1.0]},
    {"dtype": "<f8", "shape": [True]}, {"dtype": "<f8", "shape": ["1"]},
    {"dtype": "<f8", "shape": [1] * (MAX_NDIM + 1)}, {"dtype": "<f8", "shape": [2**40]},
])
def test_bad_array_descriptors(meta):
    with pytest.raises(ProtocolError):
        decode([raw_header(arrays=[meta]), b"\0" * 8])


def test_max_ndim_accepted():
    header = raw_header(arrays=[{"dtype": "<f8", "shape": [1] * MAX_NDIM}])
    assert decode([header, b"\0" * 8]).arrays[0].shape == (1,) * MAX_NDIM


@pytest.mark.parametrize("shape", [[2**39, 2**39], [2**39] * 8, [1000, 1000, 1000, 1000]])
def test_absurd_declared_shape_vs_small_buffer(shape):
    header = raw_header(arrays=[{"dtype": "<f8", "shape": shape}])
    with pytest.raises((TooLarge, ProtocolError)):
        decode([header, b"\0" * 8])


def test_declared_shape_larger_than_buffer_under_limit():
    header = raw_header(arrays=[{"dtype": "<f8", "shape": [1000, 1000]}])
    with pytest.raises(ProtocolError, match="needs 8000000 bytes, frame has 8"):
        decode([header, b"\0" * 8])


def test_max_bytes_limit():
    arr = np.zeros(10, dtype=np.float64)
    frames = encode("result", result_fields(), [arr])
    assert decode(frames, max_bytes=80).arrays[0].shape == (10,)
    with pytest.raises(TooLarge):
        decode(frames, max_bytes=79)
    with pytest.raises(TooLarge):
        decode(frames, max_bytes=0)
    assert issubclass(TooLarge, ValidationError)


def test_max_bytes_is_a_total_over_all_arrays():
    frames = encode("result", result_fields(), [np.zeros(5), np.zeros(5)])
    decode(frames, max_bytes=80)
    with pytest.raises(TooLarge):
        decode(frames, max_bytes=79)


def test_max_bytes_zero_allows_messages_without_arrays():
    assert decode(encode("register", register_fields()), max_bytes=0).type == "register"


def test_zero_d_shape_is_one_element():
    header = raw_header(arrays=[{"dtype": "<f8", "shape": []}])
    out = decode([header, np.float64(2.5).tobytes()]).arrays[0]
    assert out.shape == () and out == 2.5


def test_arrays_key_may_be_omitted():
    header = msgpack.packb({"v": PROTOCOL_VERSION, "type": "ok"})
    assert decode([header]).arrays == []
    with pytest.raises(ProtocolError, match="declares 0 arrays but 1"):
        decode([header, b"\0" * 8])


def test_extra_keys_in_array_descriptor_are_ignored():
    header = raw_header(arrays=[{"dtype": "<i4", "shape": [2], "note": "x"}])
    out = decode([header, np.array([1, 2], dtype="<i4").tobytes()]).arrays[0]
    np.testing.assert_array_equal(out, [1, 2])


def test_invalid_utf8_string_is_protocol_error():
    good = encode("error", {"code": "abc", "message": "m"})[0]
    bad = good.replace(b"\xa3abc", b"\xa3\xff\xfe\xfd")
    assert bad != good
    with pytest.raises(ProtocolError, match="not msgpack"):
        decode([bad])


def test_empty_array_with_empty_buffer():
    out = decode(as_wire(encode("result", result_fields(), [np.zeros((0, 4))]))).arrays[0]
    assert out.shape == (0, 4)


# ---- ids ---------------------------------------------------------------------------------------
def test_check_id_accepts_lowercase_hex():
    value = hexid()
    assert check_id(value) == value


@pytest.mark.parametrize("value", [
    "", "a" * 31, "a" * 33, "A" * 32, "g" * 32, uuid.uuid4().hex.upper(), str(uuid.uuid4()),
    None, 5, b"a" * 32, ["a" * 32], " " + "a" * 31,
])
def test_check_id_rejects(value):
    with pytest.raises(ProtocolError, match="provider_id"):
        check_id(value, "provider_id")


def test_check_id_rejects_trailing_newline():
    with pytest.raises(ProtocolError):
        check_id(hexid() + "\n")


# ---- cancel, progress, cancelled (PROTOCOL.md 5.2, 5.3, 6.1) ---------------------------------------
def test_cancel_progress_and_cancelled_round_trip_on_their_sockets():
    job, epoch = hexid(), hexid()
    frames = encode("cancel", {"job_id": job, "epoch": epoch}, topic=b"t" * 32)
    assert frames[0] == b"t" * 32 and len(frames) == 2  # a topic and a header, no arrays
    msg = decode(frames[1:], expect=protocol.TASK_CHANNEL_TYPES)
    assert msg.type == "cancel" and msg["job_id"] == job and msg.get("subtask") is None
    key = {k: v for k, v in result_fields().items() if k in ("job_id", "subtask", "attempt", "epoch", "provider_id")}
    progress = decode(encode("progress", {**key, "done": 128, "total": 3000}), expect=("progress",))
    assert (progress["done"], progress["total"]) == (128, 3000)
    assert decode(encode("cancelled", key), expect=("cancelled",)).fields == key
    with pytest.raises(ProtocolError, match="missing field 'total'"):
        decode([raw_header(type="progress", **key, done=1)])
    with pytest.raises(ProtocolError, match="negative"):
        decode([raw_header(type="progress", **key, done=-1, total=5)])
    with pytest.raises(ProtocolError, match="not accepted"):  # a provider's SUB takes only these two
        decode(encode("progress", {**key, "done": 1, "total": 2}), expect=protocol.TASK_CHANNEL_TYPES)
