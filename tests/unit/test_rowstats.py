"""Unit tests of examples/rowstats.py, the worked-example plugin task type: no sockets, no processes."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from common import tasks
from common.errors import ValidationError
from common.tasks import ArrayMeta, ProviderSpec, TaskType
from common.tasks.rows import MEMORY_FRACTION
from examples.rowstats import STATS, TASK, RowStats, row_stats

GiB = 1024**3
ALL = list(STATS)


class CpuDevice:
    kind = "cpu"
    head_host = "127.0.0.1"

    def local(self, key: str) -> dict:
        raise KeyError(key)  # holds no dataset of its own

    def torch_device(self):  # pragma: no cover - never called on cpu
        raise AssertionError("the cpu path must not use torch")


def provider(gflops: float = 10.0, memory_bytes: int = 16 * GiB, dtypes=("float32", "float64"),
           kind: str = "cpu") -> ProviderSpec:
    return ProviderSpec(uuid.uuid4().hex, gflops, memory_bytes, kind, frozenset(dtypes))


def meta(m: int, n: int, dtype: str = "float64") -> dict[str, ArrayMeta]:
    return {"x": ArrayMeta(dtype, (m, n))}


def reference(x: np.ndarray, stats: list[str]) -> np.ndarray:
    x = x.astype(np.float64)
    funcs = {"mean": lambda: x.mean(axis=1), "std": lambda: x.std(axis=1), "min": lambda: x.min(axis=1),
             "max": lambda: x.max(axis=1), "norm": lambda: np.sqrt((x * x).sum(axis=1))}
    return np.stack([funcs[s]() for s in stats], axis=1)


@pytest.fixture
def rs() -> RowStats:
    return RowStats()


def _check_cover(plans, m):
    pos = 0
    for plan in plans:
        assert plan.params["row0"] == pos
        assert plan.params["rows"] >= 1
        pos += plan.params["rows"]
    assert pos == m


# ---- registry ------------------------------------------------------------------------------------
def test_registered_at_import_and_exposed_as_task():
    assert isinstance(TASK, RowStats) and isinstance(TASK, TaskType)
    assert tasks.get("rowstats") is TASK
    assert "rowstats" in tasks.names() and "matmul" in tasks.names()


def test_load_plugins_imports_the_module():
    assert "examples.rowstats" in tasks.load_plugins("examples.rowstats")
    assert isinstance(tasks.get("rowstats"), RowStats)


# ---- validate ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_validate_returns_output_meta(rs, dtype):
    assert rs.validate({"stats": ALL}, meta(7, 3, dtype)) == {"stats": ArrayMeta("float64", (7, 5))}
    assert rs.validate({"stats": ["max"]}, meta(1, 1, dtype)) == {"stats": ArrayMeta("float64", (1, 1))}
    assert rs.validate({"stats": ("norm", "mean")}, meta(2, 2, dtype)) == {"stats": ArrayMeta("float64", (2, 2))}


@pytest.mark.parametrize(("params", "match"), [
    ({}, "non-empty list"),
    ({"stats": []}, "non-empty list"),
    ({"stats": "mean"}, "non-empty list"),
    ({"stats": None}, "non-empty list"),
    ({"stats": {"mean": 1}}, "non-empty list"),
    ({"stats": ["mean", "median"]}, r"unknown statistics \['median'\]"),
    ({"stats": ["MEAN"]}, "unknown statistics"),
    ({"stats": [1, "mean"]}, r"unknown statistics \[1\]"),
    ({"stats": [["mean"]]}, "unknown statistics"),
    ({"stats": ["mean", "std", "mean"]}, r"\['mean'\] are listed more than once"),
    ({"stats": ["mean"], "ddof": 1}, r"unknown params \['ddof'\]"),
])
def test_validate_param_errors(rs, params, match):
    with pytest.raises(ValidationError, match=match):
        rs.validate(params, meta(4, 3))


@pytest.mark.parametrize(("inputs", "match"), [
    ({"x": ArrayMeta("float64", (4,))}, "must be 2-D"),
    ({"x": ArrayMeta("float64", (2, 3, 4))}, "must be 2-D"),
    ({"x": ArrayMeta("float64", ())}, "must be 2-D"),
    ({"x": ArrayMeta("float64", (0, 3))}, "is empty"),
    ({"x": ArrayMeta("float64", (3, 0))}, "is empty"),
    ({"x": ArrayMeta("int64", (3, 3))}, "dtype int64"),
    ({"x": ArrayMeta("float16", (3, 3))}, "dtype float16"),
    ({}, "exactly one input"),
    ({"a": ArrayMeta("float64", (3, 3))}, "exactly one input"),
    ({"x": ArrayMeta("float64", (3, 3)), "y": ArrayMeta("float64", (3, 3))}, "exactly one input"),
])
def test_validate_input_errors(rs, inputs, match):
    with pytest.raises(ValidationError, match=match):
        rs.validate({"stats": ["mean"]}, inputs)


def test_eligible_by_dtype(rs):
    mps = provider(dtypes=("float32",), kind="mps")
    assert rs.eligible(mps, {"stats": ALL}, meta(2, 2, "float32")) is None
    assert rs.eligible(mps, {"stats": ALL}, meta(2, 2)) == "mps provider does not support float64"


# ---- split ---------------------------------------------------------------------------------------
def test_split_single_worker(rs):
    w = provider()
    plans = rs.split({"stats": ["mean", "norm"]}, meta(100, 8), [w])
    assert len(plans) == 1
    assert plans[0].provider_id == w.provider_id
    assert plans[0].params == {"row0": 0, "rows": 100, "stats": ["mean", "norm"]}
    assert plans[0].cost > 0


def test_split_proportional_to_gflops(rs):
    fast, slow = provider(30.0), provider(10.0)
    plans = rs.split({"stats": ALL}, meta(500, 40), [fast, slow])
    _check_cover(plans, 500)
    rows = {p.provider_id: p.params["rows"] for p in plans}
    assert rows == {fast.provider_id: 375, slow.provider_id: 125}
    assert all(p.params["stats"] == ALL for p in plans)
    assert plans[0].cost == pytest.approx(3 * plans[1].cost)


def test_split_params_are_plain_lists(rs):
    plans = rs.split({"stats": ("min", "max")}, meta(10, 2), [provider()])
    assert plans[0].params["stats"] == ["min", "max"]  # msgpack/JSON friendly


def test_split_more_workers_than_rows(rs):
    ws = [provider(g) for g in (40.0, 30.0, 20.0, 10.0)]
    plans = rs.split({"stats": ["mean"]}, meta(2, 4), ws)
    _check_cover(plans, 2)
    assert {p.provider_id for p in plans} <= {ws[0].provider_id, ws[1].provider_id}


def test_split_skips_workers_with_no_rows(rs):
    big, tiny = provider(1000.0), provider(1.0)
    plans = rs.split({"stats": ["mean"]}, meta(10, 4), [big, tiny])
    assert [p.provider_id for p in plans] == [big.provider_id]


def test_split_respects_memory(rs):
    m, n, k = 1000, 100, 3
    per_row = n * 8 + k * 8
    small = provider(10.0, memory_bytes=int(64 * per_row / MEMORY_FRACTION))
    plans = rs.split({"stats": ["mean", "std", "max"]}, meta(m, n), [small])
    _check_cover(plans, m)
    assert len(plans) == -(-m // 64)
    assert all(p.params["rows"] <= 64 for p in plans)
    assert all(rs.fits(small, p.params, meta(m, n)) for p in plans)
    assert not rs.fits(small, {"row0": 0, "rows": 65, "stats": ["mean", "std", "max"]}, meta(m, n))


def test_split_row_too_big_for_memory(rs):
    with pytest.raises(ValidationError, match="does not fit"):
        rs.split({"stats": ["mean"]}, meta(10, 1000), [provider(memory_bytes=1000)])


# ---- subtask_inputs / check_result / merge ---------------------------------------------------------
def test_subtask_inputs_are_views(rs):
    x = np.arange(60.0).reshape(20, 3)
    (part,) = rs.subtask_inputs({"row0": 5, "rows": 4, "stats": ["mean"]}, {"x": x})
    np.testing.assert_array_equal(part, x[5:9])
    assert np.shares_memory(part, x)


def test_check_result(rs):
    outputs = {"stats": ArrayMeta("float64", (10, 2))}
    sub = {"row0": 3, "rows": 4, "stats": ["mean", "max"]}
    rs.check_result(sub, outputs, [np.zeros((4, 2))])
    with pytest.raises(ValidationError, match="one array"):
        rs.check_result(sub, outputs, [])
    with pytest.raises(ValidationError, match="one array"):
        rs.check_result(sub, outputs, [np.zeros((4, 2)), np.zeros((4, 2))])
    with pytest.raises(ValidationError, match=r"float32\[4, 2\], expected float64\[4, 2\]"):
        rs.check_result(sub, outputs, [np.zeros((4, 2), np.float32)])
    with pytest.raises(ValidationError, match=r"expected float64\[4, 2\]"):
        rs.check_result(sub, outputs, [np.zeros((5, 2))])
    with pytest.raises(ValidationError, match=r"expected float64\[4, 2\]"):
        rs.check_result(sub, outputs, [np.zeros(8)])


def test_merge_places_rows_by_offset(rs):
    out = {"stats": np.full((10, 2), -1.0)}
    rs.merge({"row0": 6, "rows": 4, "stats": ["mean", "max"]}, [np.ones((4, 2))], out)
    rs.merge({"row0": 0, "rows": 6, "stats": ["mean", "max"]}, [np.zeros((6, 2))], out)
    np.testing.assert_array_equal(out["stats"], np.r_[np.zeros((6, 2)), np.ones((4, 2))])


# ---- run ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_run_matches_numpy(rs, dtype):
    x = np.random.default_rng(3).standard_normal((37, 11)).astype(dtype)
    (got,) = rs.run({"row0": 0, "rows": 37, "stats": ALL}, [x], CpuDevice())
    assert got.dtype == np.float64 and got.shape == (37, 5)
    np.testing.assert_allclose(got, reference(x, ALL), rtol=1e-12, atol=1e-12)


def test_run_keeps_the_requested_order(rs):
    x = np.array([[1.0, -2.0, 3.0], [4.0, 0.0, 0.0]])
    (got,) = rs.run({"row0": 0, "rows": 2, "stats": ["max", "min", "norm", "mean"]}, [x], CpuDevice())
    np.testing.assert_allclose(got, [[3.0, -2.0, np.sqrt(14.0), 2.0 / 3.0], [4.0, 0.0, 4.0, 4.0 / 3.0]])


def test_run_on_read_only_input(rs):
    x = np.random.default_rng(4).standard_normal((5, 6))
    x.flags.writeable = False  # results arrive as read-only frames, inputs as read-only maps
    (got,) = rs.run({"row0": 0, "rows": 5, "stats": ["std"]}, [x], CpuDevice())
    np.testing.assert_allclose(got[:, 0], x.std(axis=1))


def test_run_propagates_nan(rs):
    x = np.ones((3, 4))
    x[1, 2] = np.nan
    (got,) = rs.run({"row0": 0, "rows": 3, "stats": ALL}, [x], CpuDevice())
    assert np.isnan(got[1]).all() and np.isfinite(np.delete(got, 1, axis=0)).all()


def test_row_stats_rejects_unknown_stat():
    with pytest.raises(ValidationError, match="unknown statistic"):
        row_stats(np.ones((2, 2)), ["median"])


def test_whole_job_without_sockets(rs):
    """validate -> split -> subtask_inputs -> run -> check_result -> merge, as head and providers do."""
    x = np.random.default_rng(9).standard_normal((500, 40))
    params = {"stats": ALL}
    outputs = rs.validate(params, {"x": ArrayMeta.of(x)})
    result = {"stats": np.full(outputs["stats"].shape, np.nan)}
    small = int(50 * (40 * 8 + 5 * 8) / MEMORY_FRACTION)
    providers = [provider(20.0), provider(10.0), provider(5.0, memory_bytes=small)]
    plans = rs.split(params, {"x": ArrayMeta.of(x)}, providers)
    _check_cover(plans, 500)
    for plan in reversed(plans):  # results arrive in any order
        arrays = rs.run(plan.params, rs.subtask_inputs(plan.params, {"x": x}), CpuDevice())
        rs.check_result(plan.params, outputs, arrays)
        rs.merge(plan.params, arrays, result)
    np.testing.assert_allclose(result["stats"], reference(x, ALL), rtol=1e-12, atol=1e-12)


def test_default_run_into_writes_the_shared_output(rs):
    x = np.random.default_rng(2).standard_normal((8, 5))
    out = {"stats": np.zeros((8, 2))}
    sub = {"row0": 2, "rows": 3, "stats": ["min", "max"]}
    (wrote,) = rs.run_into(sub, rs.subtask_inputs(sub, {"x": x}), out, CpuDevice())
    np.testing.assert_array_equal(out["stats"][2:5], wrote)
    np.testing.assert_array_equal(out["stats"][:2], 0.0)
    np.testing.assert_allclose(wrote, reference(x[2:5], ["min", "max"]))


class TorchCpuDevice:
    """Takes the GPU code path (kind != "cpu") on torch's CPU device, so it runs without a GPU."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def torch_device(self):
        import torch

        return torch.device("cpu")


@pytest.mark.parametrize("kind", ["cuda", "mps"])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_run_torch_path_matches_numpy(rs, kind, dtype):
    pytest.importorskip("torch")
    x = np.random.default_rng(5).standard_normal((29, 13)).astype(dtype)
    x.flags.writeable = False
    (got,) = rs.run({"row0": 0, "rows": 29, "stats": ALL}, [x], TorchCpuDevice(kind))
    assert got.dtype == np.float64 and got.shape == (29, 5)
    exact = kind == "cuda" or dtype == "float64"  # "cuda" computes in float64; MPS stays in the input dtype
    tol = 1e-12 if exact else 1e-5
    np.testing.assert_allclose(got, reference(x, ALL), rtol=tol, atol=tol)
