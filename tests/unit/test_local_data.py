"""Datasets that stay on the providers: ``--data`` parsing, ``register.datasets`` (PROTOCOL.md 5.1) and the
virtual dataset's batch plan (common/tasks/train/shards.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common.errors import ConfigError, ProtocolError, ValidationError
from common.protocol import LocalData, parse_register
from common.tasks import ProviderSpec
from common.tasks.train.shards import Shards, provider_dataset
from provider_node import local_data
from tests.unit.test_wire_register import wire

KEY_A, KEY_B = "a" * 32, "b" * 32


def entry(**over: Any) -> dict[str, Any]:
    return {"name": "digits", "key": KEY_A, "samples": 700, "test_samples": 175, "shape": [1, 8, 8],
            "labels": [0, 9], **over}


def test_register_carries_the_datasets_description() -> None:
    hello = parse_register(wire(datasets=[entry(), entry(name="other", key=KEY_B)]))
    assert hello.datasets == (LocalData("digits", KEY_A, 700, 175, (1, 8, 8), (0, 9)),
                              LocalData("other", KEY_B, 700, 175, (1, 8, 8), (0, 9)))
    assert parse_register(wire()).datasets == ()  # optional


@pytest.mark.parametrize("bad", [
    [entry(key="not-hex")], [entry(samples=0)], [entry(labels=[3])], [entry(name="")], [entry(), entry()],
    [entry(shape="8x8")], [{"name": "x"}], [entry()] * 17, ["digits"],
])
def test_a_malformed_datasets_entry_is_a_bad_register(bad: list[Any]) -> None:
    with pytest.raises(ProtocolError, match="datasets"):
        parse_register(wire(datasets=bad))


@pytest.mark.parametrize("spec,match", [("digits", "NAME=PATH"), ("=x.npz", "NAME=PATH"), ("a b=x.npz", "name"),
                                        ("a=x.npz,a=y.npz", "twice")])
def test_data_flag_errors_are_one_line(spec: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        local_data.parse_spec(spec)


def test_data_flag_loads_and_describes_a_file(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez(path, X=np.arange(40, dtype=np.float32).reshape(10, 4), y=np.arange(10) % 3)
    held = local_data.load(f"mine={path}")
    (only,) = held.values()
    assert only.info.name == "mine" and only.info.samples == 8 and only.info.test_samples == 2
    assert only.info.shape == (4,) and only.info.labels == (0, 2) and only.info.key in held
    assert local_data.wire(held)[0]["shape"] == [4]
    with pytest.raises(ConfigError, match="cannot read"):
        local_data.load(f"gone={tmp_path / 'nothing.npz'}")


def spec(pid: str, *data: LocalData) -> ProviderSpec:
    return ProviderSpec(pid, 1.0, 1 << 30, "cpu", frozenset({"float32"}), tuple(data))


def test_the_virtual_dataset_is_the_shards_in_key_order() -> None:
    a = LocalData("d", KEY_A, 5, 1, (2,), (0, 1))
    b = LocalData("d", KEY_B, 3, 1, (2,), (0, 4))
    found = Shards.found("d", [spec("p2", b), spec("p1", a), spec("p3", b)])  # p3: a replica of b
    assert found is not None and [s.key for s in found.shards] == [KEY_A, KEY_B]
    assert found.samples == 8 and found.labels == (0, 4)
    parts = found.split(np.array([7, 0, 5, 4, 2]))
    assert [(j, list(idx)) for j, idx in parts] == [(0, [0, 4, 2]), (1, [2, 0])]
    assert [[w.provider_id for w in h] for h in found.holders([spec("p2", b), spec("p1", a), spec("p3", b)])] \
        == [["p1"], ["p2", "p3"]]
    assert "exists nowhere else" in (found.missing([spec("p1", a)]) or "")
    assert Shards.from_record("d", found.record()) == found
    assert Shards.found("other", [spec("p1", a)]) is None


def test_shards_of_different_shapes_do_not_make_a_dataset() -> None:
    with pytest.raises(ValidationError, match="different feature shapes"):
        Shards.found("d", [spec("p1", LocalData("d", KEY_A, 5, 1, (2,), (0, 1))),
                           spec("p2", LocalData("d", KEY_B, 5, 1, (3,), (0, 1)))])


def test_provider_dataset_names() -> None:
    assert provider_dataset({"dataset": "provider:digits"}) == "digits"
    assert provider_dataset({"dataset": "digits"}) is None and provider_dataset({}) is None


def test_an_allreduce_member_cuts_its_indices_by_the_counts_of_each_step() -> None:
    from common.errors import TaskError
    from common.tasks.train.collective import _step_indices

    flat = np.arange(7, dtype=np.int64)
    steps = _step_indices({"steps": 3, "counts": [3, 0, 4]}, flat)
    assert [s.tolist() for s in steps] == [[0, 1, 2], [], [3, 4, 5, 6]]
    assert [s.tolist() for s in _step_indices({"steps": 2}, np.arange(4, dtype=np.int64))] == [[0, 1], [2, 3]]
    for bad in ([3, 3], [3, 0, 3], [8, -1, 0]):
        with pytest.raises(TaskError, match="do not cut"):
            _step_indices({"steps": len(bad), "counts": bad}, flat)


@pytest.mark.parametrize(("sync", "ok"), [("sync", True), ("allreduce", True), ("async", False), ("local-sgd", False)])
def test_provider_data_trains_with_sync_or_allreduce(sync: str, ok: bool) -> None:
    from common.tasks.train.task import TrainTask

    params = {"dataset": "provider:digits", "model": "cnn", "sync": sync}
    if ok:
        assert TrainTask().validate(params, {}) == {}
    else:
        with pytest.raises(ValidationError, match=f"{sync} is not supported on the providers' own data"):
            TrainTask().validate(params, {})
