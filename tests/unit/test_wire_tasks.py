"""The train and predict subtasks as docs/PROTOCOL.md §10.1 and §10.2 specify them: the params
the head's planners send (exactly the documented keys, checked with protocol.check_fields), the
arrays that go with them, and the result arrays the provider side returns and the head accepts."""

from __future__ import annotations

import uuid
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common.errors import ValidationError
from common.protocol import decode, encode
from common.tasks import wire

torch = pytest.importorskip("torch")

from common.arrays import ArrayMeta  # noqa: E402
from common.tasks.base import JobContext, ProviderSpec  # noqa: E402
from common.tasks.predict import PredictTask  # noqa: E402
from common.tasks.train.planner import TrainPlanner  # noqa: E402
from common.tasks.train.task import TrainTask  # noqa: E402


def hexid() -> str:
    return uuid.uuid4().hex


#: PROTOCOL.md §10.1: the kinds of train subtask and the keys each carries (async grad rounds add "batch")
KIND_KEYS = {"grad": set(), "async": {"batch"}, "local": {"local_steps", "lr"}, "eval": {"row0", "rows"}}


class FakeDevice:
    """A CPU device whose blobs are in-memory arrays (what fetch would return)."""

    kind = "cpu"
    head_host = "127.0.0.1"

    def local(self, key: str) -> dict:
        raise KeyError(key)  # holds no dataset of its own

    def __init__(self, blobs: dict[str, np.ndarray]) -> None:
        self.blobs = blobs
        self.cache: MutableMapping[Any, Any] = {}
        self.keys: list[str] = []

    def torch_device(self) -> Any:
        return torch.device("cpu")

    def fetch(self, blob_id: str, key: str) -> np.ndarray:
        self.keys.append(key)
        return self.blobs[blob_id]


def train_job(tmp_path: Path, **params: Any) -> tuple[TrainPlanner, FakeDevice, dict[str, str]]:
    rng = np.random.default_rng(0)
    data: dict[str, np.ndarray] = {"x": rng.standard_normal((64, 6)).astype(np.float32), "y": rng.integers(0, 3, 64),
            "x_test": rng.standard_normal((10, 6)).astype(np.float32), "y_test": rng.integers(0, 3, 10)}
    blob_ids = {name: hexid() for name in data}
    ctx = JobContext(job_id=hexid(), params={"model": "mlp", "model_args": {"hidden": [8]}, "batch_size": 16,
                                             **params},
                     inputs={}, outputs={}, operands=data, blob_ids=blob_ids, results={}, job_dir=tmp_path)
    device = FakeDevice({blob_ids[name]: arr for name, arr in data.items()})
    return TrainPlanner(ctx), device, blob_ids


def providers(n: int) -> list[ProviderSpec]:
    return [ProviderSpec(hexid(), 10.0 - i, 1 << 30, "cpu", frozenset({"float32"})) for i in range(n)]


def over_the_wire(params: dict[str, Any], arrays: list[np.ndarray]) -> tuple[dict[str, Any], list[np.ndarray]]:
    msg = decode(encode("subtask", {"job_id": hexid(), "subtask": 0, "attempt": 1, "epoch": hexid(),
                                    "task_type": "train", "params": params}, arrays))
    return msg["params"], msg.arrays


def check_train_subtask(planner: TrainPlanner, params: dict[str, Any], kind: str) -> list[np.ndarray]:
    assert set(params) == set(wire.TRAIN) | KIND_KEYS[kind], "the params are exactly the documented keys"
    TrainTask().check_params(params)  # what a provider checks before it runs the subtask
    arrays = planner.subtask_inputs(params)
    assert arrays[0].dtype == np.float32 and arrays[0].shape == (params["n_params"],)
    if params["kind"] == "eval":
        assert len(arrays) == 1
    else:
        assert len(arrays) == 2 and arrays[1].dtype == np.int64 and arrays[1].ndim == 1
    return arrays


def run_and_check(planner: TrainPlanner, device: FakeDevice, params: dict[str, Any],
                  arrays: list[np.ndarray]) -> list[np.ndarray]:
    wire_params, wire_arrays = over_the_wire(params, arrays)
    out = TrainTask().run(wire_params, wire_arrays, device)
    TrainTask.check_result(params, out)
    assert out[-1].dtype == np.float64 and out[-1].shape == (3,)
    if params["kind"] != "eval":
        assert len(out) == 2 and out[0].dtype == np.float32 and out[0].shape == (params["n_params"],)
    else:
        assert len(out) == 1
    return out


def test_sync_grad_round_and_eval_round(tmp_path: Path) -> None:
    planner, device, blob_ids = train_job(tmp_path)
    ws = providers(2)
    plans = planner.plan(ws, 0, 1.0)
    assert [p.params["shard"] for p in plans] == [0, 1] and len({p.params["round"] for p in plans}) == 1
    total = 0
    for plan in plans:
        arrays = check_train_subtask(planner, plan.params, "grad")
        n = arrays[1].size
        total += n
        assert plan.cost == 6 * n * plan.params["n_params"]
        assert plan.params["data"]["x"] == blob_ids["x"] and plan.params["data"]["key"].endswith("-train")
        out = run_and_check(planner, device, plan.params, arrays)
        assert out[-1][1] == n  # [loss_sum, n, correct]
        planner.merge(plan.params, out, 2.0)
    assert total == 16  # one global batch
    assert all(k.endswith(("-train:x", "-train:y")) for k in device.keys)
    for _ in range(3):  # the rest of the epoch (64 / 16 = 4 steps), then its eval round
        plans = planner.plan(ws, 0, 3.0)
        for plan in plans:
            if plan.params["kind"] == "grad":
                planner.merge(plan.params, run_and_check(planner, device, plan.params,
                                                         planner.subtask_inputs(plan.params)), 3.0)
    evals = planner.plan(ws, 0, 4.0)
    assert {p.params["kind"] for p in evals} == {"eval"}
    assert sum(p.params["rows"] for p in evals) == 10
    for plan in evals:
        arrays = check_train_subtask(planner, plan.params, "eval")
        assert plan.params["data"]["x"] == blob_ids["x_test"] and plan.params["data"]["key"].endswith("-test")
        out = run_and_check(planner, device, plan.params, arrays)
        assert out[0][1] == plan.params["rows"]


def test_local_sgd_round(tmp_path: Path) -> None:
    planner, device, _ = train_job(tmp_path, sync="local-sgd", local_steps=2)
    for plan in planner.plan(providers(2), 0, 1.0):
        arrays = check_train_subtask(planner, plan.params, "local")
        k = plan.params["local_steps"]
        assert k == 2 and arrays[1].size % k == 0
        n = arrays[1].size // k
        assert plan.cost == 6 * k * n * plan.params["n_params"]
        out = run_and_check(planner, device, plan.params, arrays)
        assert out[-1][1] == k * n
        assert not np.array_equal(out[0], arrays[0])  # the parameters after K steps


def test_async_grad_subtask(tmp_path: Path) -> None:
    planner, device, _ = train_job(tmp_path, sync="async")
    plans = planner.plan(providers(2), 0, 1.0)
    assert len(plans) == 2 and [p.params["round"] for p in plans] == [0, 0]
    for plan in plans:
        arrays = check_train_subtask(planner, plan.params, "async")
        assert arrays[1].size == 16  # a whole batch
        run_and_check(planner, device, plan.params, arrays)


@pytest.mark.parametrize("kind, arrays", [
    ("grad", [np.zeros(5, np.float32)]),
    ("grad", [np.zeros(5, np.float64), np.zeros(3)]),
    ("grad", [np.zeros(4, np.float32), np.zeros(3)]),
    ("grad", [np.zeros(5, np.float32), np.zeros(3, np.float32)]),
    ("local", [np.zeros(5, np.float32), np.zeros(4)]),
    ("eval", [np.zeros(5, np.float32), np.zeros(3)]),
    ("eval", [np.zeros(3, np.int64)]),
])
def test_train_results_other_than_documented_are_invalid(kind: str, arrays: list[np.ndarray]) -> None:
    with pytest.raises(ValidationError):
        TrainTask.check_result({"kind": kind, "n_params": 5}, arrays)


def test_predict_subtask(tmp_path: Path) -> None:
    task = PredictTask()
    model_params = {"model": "mlp", "model_args": {"hidden": [8]}, "input_shape": [6], "classes": 3}
    from common.tasks.train import models

    net = models.build_model("mlp", [6], 3, {"hidden": [8]}, seed=1)
    weights = models.flat_parameters(net).numpy()
    x = np.random.default_rng(1).standard_normal((11, 6))  # float64 is allowed
    inputs = {"x": ArrayMeta.of(x), "weights": ArrayMeta.of(weights)}
    outputs = task.validate(model_params, inputs)
    assert outputs == {"predictions": ArrayMeta("int64", (11,))}
    plans = task.split(model_params, inputs, providers(3))
    assert [p.params["row0"] for p in plans] == [0, 4, 8] and sum(p.params["rows"] for p in plans) == 11
    for plan in plans:
        assert set(plan.params) == {"row0", "rows", *model_params}
        assert plan.cost == 2 * plan.params["rows"] * weights.size
        arrays = task.subtask_inputs(plan.params, {"x": x, "weights": weights})
        assert arrays[0].dtype == np.float64 and arrays[0].shape == (plan.params["rows"], 6)
        assert arrays[1].dtype == np.float32 and arrays[1].shape == weights.shape
        params, wire_arrays = over_the_wire(plan.params, arrays)
        (pred,) = task.run(params, wire_arrays, FakeDevice({}))
        assert pred.dtype == np.int64 and pred.shape == (plan.params["rows"],)
        task.check_result(plan.params, outputs, [pred])
        expected = net(torch.from_numpy(arrays[0].astype(np.float32))).argmax(1).numpy()
        np.testing.assert_array_equal(pred, expected)
        with pytest.raises(ValidationError):
            task.check_result(plan.params, outputs, [pred.astype(np.int32)])


def test_predict_runs_in_blocks_of_rows_with_checkpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    from common.tasks import rows
    from common.tasks.train import models

    net = models.build_model("mlp", [6], 3, {"hidden": [8]}, seed=1)
    weights = models.flat_parameters(net).numpy()
    x = np.random.default_rng(2).standard_normal((50, 6)).astype(np.float32)
    monkeypatch.setattr(rows, "MIN_BLOCK_ROWS", 16)
    monkeypatch.setattr(rows, "BLOCK_FLOPS", 1.0)  # blocks of MIN_BLOCK_ROWS rows
    calls: list[tuple[int, int]] = []

    class Counting(FakeDevice):
        def checkpoint(self, done: int, total: int) -> None:
            calls.append((done, total))

    params = {"row0": 0, "rows": 50, "model": "mlp", "model_args": {"hidden": [8]}, "input_shape": [6],
              "classes": 3}
    (pred,) = PredictTask().run(params, [x, weights], Counting({}))
    np.testing.assert_array_equal(pred, net(torch.from_numpy(x)).argmax(1).numpy())
    assert calls == [(16, 50), (32, 50), (48, 50), (50, 50)]
    assert PredictTask().units(params) == 50 and PredictTask.progress_unit == "rows"


def test_malformed_subtask_params_are_refused_before_running() -> None:
    from common import tasks
    from common.errors import ProtocolError

    with pytest.raises(ProtocolError, match="row0"):
        tasks.get("matmul").check_params({"row0": "0", "rows": 4})
    with pytest.raises(ProtocolError, match="missing field 'rows'"):
        tasks.get("predict").check_params({"row0": 0, "model": "mlp", "model_args": {}, "input_shape": [4],
                                           "classes": 2})
    good = {"kind": "local", "job_id": hexid(), "round": 1, "shard": 0, "version": 0, "model": "mlp",
            "model_args": {}, "input_shape": [4], "classes": 2, "n_params": 10,
            "data": {"x": hexid(), "y": hexid(), "key": "k"}, "local_steps": 2, "lr": 0.1}
    TrainTask().check_params(good)
    for bad in ({"kind": "sideways"}, {"data": {"x": "../etc", "y": hexid(), "key": "k"}}, {"lr": "fast"}):
        with pytest.raises(ProtocolError):
            TrainTask().check_params({**good, **bad})
