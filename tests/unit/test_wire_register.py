"""parse_register (common/protocol.py): a register message's fields become a ProviderHello, with
exactly the head's rules of PROTOCOL.md 5.1 (ranges, choices, list sizes, truncated texts)."""

from __future__ import annotations

import dataclasses
import math
import uuid
from typing import Any

import msgpack
import pytest

from common.errors import ProtocolError
from common.protocol import (
    DEVICE_KINDS,
    MAX_REGISTER_LIST,
    Message,
    ProviderHello,
    decode,
    encode,
    parse_register,
)

PID = "0123456789abcdef0123456789abcdef"


def fields(**over: Any) -> dict[str, Any]:
    base = {"provider_id": PID, "name": "gpu-box-0", "host": "gpu-box", "os": "Linux 6.8.0",
            "device_kind": "cuda", "device_name": "NVIDIA H100", "memory_bytes": 80 << 30, "cores": 32,
            "task_types": ["matmul", "train", "predict"], "dtypes": ["float32", "float64"],
            "version": "0.1.0", "gflops": 5000.0}
    base.update(over)
    return base


def wire(**over: Any) -> Message:
    """A register as the head receives it: encoded, then decoded."""
    return decode(encode("register", fields(**over)))


def raw_wire(**over: Any) -> Message:
    """A register a peer could send without dcf's encoder; ``None`` removes a field."""
    header = {"v": 1, "type": "register", "arrays": [], **fields()}
    for key, value in over.items():
        if value is None:
            header.pop(key)
        else:
            header[key] = value
    return decode([msgpack.packb(header, use_bin_type=True)])


# ---- valid messages --------------------------------------------------------------------------------
def test_a_reference_providers_register():
    hello = parse_register(wire())
    assert hello == ProviderHello(
        provider_id=PID, name="gpu-box-0", host="gpu-box", os="Linux 6.8.0", device_kind="cuda",
        device_name="NVIDIA H100", memory_bytes=80 << 30, cores=32,
        task_types=frozenset({"matmul", "train", "predict"}), dtypes=frozenset({"float32", "float64"}),
        version="0.1.0", gflops=5000.0)


def test_hello_is_frozen():
    hello = parse_register(wire())
    with pytest.raises(dataclasses.FrozenInstanceError):
        hello.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize("kind", DEVICE_KINDS)
def test_every_device_kind(kind):
    assert parse_register(wire(device_kind=kind)).device_kind == kind


@pytest.mark.parametrize("gflops, expected", [(1, 1.0), (0.001, 0.001), (9_999_999.0, 9_999_999.0), (12, 12.0)])
def test_gflops_int_or_float(gflops, expected):
    got = parse_register(wire(gflops=gflops)).gflops
    assert isinstance(got, float) and got == expected


def test_texts_are_truncated_not_refused():
    hello = parse_register(wire(name="n" * 100, host="h" * 200, os="o" * 100, device_name="d" * 200,
                                version="v" * 50))
    assert (hello.name, hello.host, hello.os) == ("n" * 64, "h" * 128, "o" * 64)
    assert (hello.device_name, hello.version) == ("d" * 128, "v" * 32)


def test_empty_name_becomes_the_ids_first_8_digits():
    assert parse_register(wire(name="")).name == PID[:8]


def test_lists_become_sets_and_may_be_empty_or_64_long():
    hello = parse_register(wire(task_types=["matmul", "matmul"], dtypes=[]))
    assert hello.task_types == frozenset({"matmul"}) and hello.dtypes == frozenset()
    many = [f"t{i}" for i in range(MAX_REGISTER_LIST)]
    assert len(parse_register(wire(task_types=many)).task_types) == MAX_REGISTER_LIST


def test_zero_memory_and_cores_are_accepted():
    hello = parse_register(wire(memory_bytes=0, cores=0))
    assert (hello.memory_bytes, hello.cores) == (0, 0)


def test_unknown_fields_are_ignored():
    assert parse_register(raw_wire(color="blue")) == parse_register(wire())


# ---- every bad field ---------------------------------------------------------------------------------
@pytest.mark.parametrize("gflops", [0, 0.0, -1.0, 1e7, 2e7])
def test_gflops_out_of_range(gflops):
    msg = raw_wire(gflops=gflops)  # -1.0 passes the codec (floats are only checked finite)
    with pytest.raises(ProtocolError, match="gflops must be positive"):
        parse_register(msg)


@pytest.mark.parametrize("gflops", [math.nan, math.inf, -math.inf, "fast", True, -1])
def test_gflops_not_a_finite_number(gflops):
    with pytest.raises(ProtocolError):
        parse_register(raw_wire(gflops=gflops))


@pytest.mark.parametrize("kind", ["gpu", "CPU", "", "rocm", "cuda:0"])
def test_device_kind_choices(kind):
    with pytest.raises(ProtocolError, match="device_kind must be cpu, cuda or mps"):
        parse_register(wire(device_kind=kind))


@pytest.mark.parametrize("name", ["task_types", "dtypes"])
@pytest.mark.parametrize("value", [["ok", 5], [None], [["nested"]], [f"t{i}" for i in range(MAX_REGISTER_LIST + 1)]])
def test_string_lists(name, value):
    with pytest.raises(ProtocolError, match=f"{name} must be a list of strings"):
        parse_register(wire(**{name: value}))


@pytest.mark.parametrize("bad_id", ["A" * 32, "a" * 31, "a" * 33, "g" * 32, "a" * 32 + "\n", " " + "a" * 31,
                                    "", uuid.uuid4().hex.upper()])
def test_provider_id_must_be_an_id(bad_id):
    with pytest.raises(ProtocolError, match="provider_id must be 32 lowercase hex digits"):
        parse_register(wire(provider_id=bad_id))


@pytest.mark.parametrize("field", list(fields()))
def test_every_field_is_required(field):
    with pytest.raises(ProtocolError, match=f"missing field '{field}'"):
        parse_register(Message("register", {k: v for k, v in fields().items() if k != field}))


@pytest.mark.parametrize("field, value", [
    ("name", 5), ("host", None), ("os", ["Linux"]), ("device_name", b"gpu"), ("version", 1.0),
    ("memory_bytes", -1), ("memory_bytes", 1.5), ("memory_bytes", True), ("cores", -2), ("cores", "8"),
    ("task_types", "matmul"), ("dtypes", {"float32": 1}), ("device_kind", 1),
])
def test_field_types(field, value):
    # a Message built by hand (not through decode) is checked too
    with pytest.raises(ProtocolError):
        parse_register(Message("register", fields(**{field: value})))


def test_only_a_register_is_parsed():
    with pytest.raises(ProtocolError, match="expected a register"):
        parse_register(Message("heartbeat", fields()))
