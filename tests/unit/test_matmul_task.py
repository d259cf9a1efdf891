"""Unit tests of common/matmul.py: the matmul task type (validate, split, run, merge)."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from common import tasks
from common.errors import NotFound, ValidationError
from common.tasks import ArrayMeta, ProviderSpec, rows
from common.tasks.matmul import MEMORY_FRACTION, MatMul, proportional_rows


@pytest.fixture(autouse=True)
def _split_small_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests split small matrices to check the mechanics; the least-share rule
    (rows.MIN_SHARE_SECONDS) has tests of its own in test_matmul_task.py."""
    monkeypatch.setattr(rows, "MIN_SHARE_SECONDS", 0.0)

GiB = 1024**3


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


def metas(m: int, k: int, n: int, dtype: str = "float64") -> dict[str, ArrayMeta]:
    return {"a": ArrayMeta(dtype, (m, k)), "b": ArrayMeta(dtype, (k, n))}


@pytest.fixture
def mm() -> MatMul:
    return MatMul()


# ---- proportional_rows ----------------------------------------------------------------------------
@pytest.mark.parametrize(("total", "weights"), [
    (300, [20.0, 10.0]), (1001, [30, 20, 7]), (7, [1, 1, 1]), (1, [5, 3]), (0, [1, 2]),
    (10, [1.0]), (1000, [0.1, 0.2, 0.3, 0.4]), (5, [1, 1, 1, 1, 1, 1, 1]), (12345, [1e-3, 1e3]),
])
def test_proportional_rows_sums_to_total(total, weights):
    rows = proportional_rows(total, weights)
    assert len(rows) == len(weights)
    assert sum(rows) == total
    assert all(r >= 0 for r in rows)
    wsum = sum(weights)
    for r, w in zip(rows, weights, strict=True):
        assert abs(r - total * w / wsum) < 1.0


def test_proportional_rows_exact_ratio():
    assert proportional_rows(300, [20.0, 10.0]) == [200, 100]
    assert proportional_rows(100, [1, 1, 2]) == [25, 25, 50]


def test_proportional_rows_largest_remainder():
    # exact shares 3.33.., 3.33.., 3.33.. -> one extra row, to the first of the tied ones
    assert sorted(proportional_rows(10, [1, 1, 1])) == [3, 3, 4]
    # exact shares 0.6 and 0.4 -> the larger remainder wins
    assert proportional_rows(1, [3, 2]) == [1, 0]


def test_proportional_rows_randomized():
    rng = np.random.default_rng(1234)
    for _ in range(200):
        n = int(rng.integers(1, 9))
        weights = list(rng.uniform(0.01, 100.0, size=n))
        total = int(rng.integers(0, 100_000))
        rows = proportional_rows(total, weights)
        assert sum(rows) == total
        exact = [total * w / sum(weights) for w in weights]
        assert all(abs(r - e) < 1.0 for r, e in zip(rows, exact, strict=True))


# ---- registry ------------------------------------------------------------------------------------
def test_matmul_is_registered():
    assert isinstance(tasks.get("matmul"), MatMul)
    assert "matmul" in tasks.names()
    with pytest.raises(NotFound):
        tasks.get("no-such-task")


# ---- validate ------------------------------------------------------------------------------------
def test_validate_returns_output_meta(mm):
    assert mm.validate({}, metas(4, 3, 2)) == {"c": ArrayMeta("float64", (4, 2))}
    assert mm.validate({}, metas(1, 1, 1, "float32")) == {"c": ArrayMeta("float32", (1, 1))}


@pytest.mark.parametrize(("inputs", "match"), [
    ({"a": ArrayMeta("float64", (2, 3, 4)), "b": ArrayMeta("float64", (4, 2))}, "a must be 2-D"),
    ({"a": ArrayMeta("float64", (2, 3)), "b": ArrayMeta("float64", (3,))}, "b must be 2-D"),
    ({"a": ArrayMeta("float64", ()), "b": ArrayMeta("float64", (3, 2))}, "a must be 2-D"),
    ({"a": ArrayMeta("float64", (0, 3)), "b": ArrayMeta("float64", (3, 2))}, "a is empty"),
    ({"a": ArrayMeta("float64", (2, 3)), "b": ArrayMeta("float64", (3, 0))}, "b is empty"),
    ({"a": ArrayMeta("float64", (2, 0)), "b": ArrayMeta("float64", (0, 2))}, "a is empty"),
    ({"a": ArrayMeta("int64", (2, 3)), "b": ArrayMeta("int64", (3, 2))}, "a has dtype int64"),
    ({"a": ArrayMeta("float64", (2, 3)), "b": ArrayMeta("float16", (3, 2))}, "b has dtype float16"),
    ({"a": ArrayMeta("float32", (2, 3)), "b": ArrayMeta("float64", (3, 2))},
     "a is float32 but b is float64"),
    ({"a": ArrayMeta("float64", (2, 3)), "b": ArrayMeta("float64", (4, 2))}, r"do not align \(3 != 4\)"),
    ({"a": ArrayMeta("float64", (2, 3))}, "exactly two inputs"),
    ({"a": ArrayMeta("float64", (2, 3)), "b": ArrayMeta("float64", (3, 2)),
      "c": ArrayMeta("float64", (2, 2))}, "exactly two inputs"),
    ({"x": ArrayMeta("float64", (2, 3)), "b": ArrayMeta("float64", (3, 2))}, "exactly two inputs"),
])
def test_validate_errors(mm, inputs, match):
    with pytest.raises(ValidationError, match=match):
        mm.validate({}, inputs)


# ---- eligible ------------------------------------------------------------------------------------
def test_eligible_by_dtype(mm):
    mps = provider(dtypes=("float32",), kind="mps")
    assert mm.eligible(mps, {}, metas(2, 2, 2, "float32")) is None
    assert mm.eligible(mps, {}, metas(2, 2, 2, "float64")) == "mps provider does not support float64"
    assert mm.eligible(provider(), {}, metas(2, 2, 2, "float64")) is None


# ---- split ---------------------------------------------------------------------------------------
def _check_cover(plans, m):
    pos = 0
    for plan in plans:
        assert plan.params["row0"] == pos
        assert plan.params["rows"] >= 1
        pos += plan.params["rows"]
    assert pos == m


def test_split_single_worker(mm):
    w = provider()
    plans = mm.split({}, metas(100, 8, 6), [w])
    assert len(plans) == 1
    assert plans[0].provider_id == w.provider_id
    assert plans[0].params == {"row0": 0, "rows": 100}
    assert plans[0].cost == 2.0 * 100 * 8 * 6


def test_split_proportional(mm):
    fast, slow = provider(20.0), provider(10.0)
    plans = mm.split({}, metas(300, 8, 6), [fast, slow])
    _check_cover(plans, 300)
    rows = {p.provider_id: p.params["rows"] for p in plans}
    assert rows == {fast.provider_id: 200, slow.provider_id: 100}
    assert sum(p.cost for p in plans) == 2.0 * 300 * 8 * 6


def test_split_more_workers_than_rows(mm):
    ws = [provider(g) for g in (40.0, 30.0, 20.0, 10.0)]
    plans = mm.split({}, metas(2, 4, 4), ws)
    _check_cover(plans, 2)
    assert {p.provider_id for p in plans} <= {ws[0].provider_id, ws[1].provider_id}


def test_split_skips_workers_with_no_rows(mm):
    big, tiny = provider(1000.0), provider(1.0)
    plans = mm.split({}, metas(10, 4, 4), [big, tiny])
    assert [p.provider_id for p in plans] == [big.provider_id]


def test_split_respects_memory(mm):
    m, k, n, item = 1000, 100, 50, 8
    per_row = (k + n) * item
    b_bytes = k * n * item
    rows_fit = 64
    memory = int((b_bytes + rows_fit * per_row) / MEMORY_FRACTION)
    small = provider(10.0, memory_bytes=memory)
    plans = mm.split({}, metas(m, k, n), [small])
    _check_cover(plans, m)
    assert len(plans) == -(-m // rows_fit)  # ceil
    assert all(p.provider_id == small.provider_id for p in plans)
    for plan in plans:
        assert plan.params["rows"] <= rows_fit
        used = b_bytes + plan.params["rows"] * per_row
        assert used <= memory * MEMORY_FRACTION
    assert sum(p.cost for p in plans) == pytest.approx(2.0 * m * k * n)


def test_split_memory_only_limits_the_small_worker(mm):
    m, k, n = 400, 64, 64
    small = provider(10.0, memory_bytes=int(2 * (k * n * 8 + 20 * (k + n) * 8)))  # 20 rows per chunk
    big = provider(10.0)
    plans = mm.split({}, metas(m, k, n), [big, small])
    _check_cover(plans, m)
    by: dict[str, list[int]] = {}
    for p in plans:
        by.setdefault(p.provider_id, []).append(p.params["rows"])
    assert by[big.provider_id] == [200]
    assert by[small.provider_id] == [20] * 10


def test_split_float32_uses_smaller_items(mm):
    m, k, n = 100, 10, 10
    memory = int(2 * (k * n * 4 + 10 * (k + n) * 4))
    plans32 = mm.split({}, metas(m, k, n, "float32"), [provider(memory_bytes=memory)])
    assert max(p.params["rows"] for p in plans32) == 10
    with pytest.raises(ValidationError, match="does not fit"):  # same memory, float64: b alone is too big
        mm.split({}, metas(m, k, n), [provider(memory_bytes=int(2 * k * n * 4))])


def test_split_b_does_not_fit(mm):
    w = provider(memory_bytes=1024)
    with pytest.raises(ValidationError, match="does not fit the memory of any provider") as info:
        mm.split({}, metas(10, 100, 100), [w])
    assert "the largest reports 1024 bytes" in info.value.message


def test_split_skips_a_provider_too_small_for_a_row(mm):
    """One provider reporting memory_bytes=1 (or an honest small one) gets no share; it does not fail the job."""
    tiny, big = provider(memory_bytes=1), provider(memory_bytes=16 * 2**30)
    plans = mm.split({}, metas(100, 100, 100), [tiny, big])
    assert {p.provider_id for p in plans} == {big.provider_id}
    assert sum(p.params["rows"] for p in plans) == 100


def test_split_b_fits_but_not_one_row(mm):
    k, n = 10, 10
    memory = int(2 * (k * n * 8 + (k + n) * 8 - 1))
    with pytest.raises(ValidationError, match="does not fit"):
        mm.split({}, metas(5, k, n), [provider(memory_bytes=memory)])
    memory = int(2 * (k * n * 8 + (k + n) * 8))
    plans = mm.split({}, metas(5, k, n), [provider(memory_bytes=memory)])
    assert [p.params["rows"] for p in plans] == [1] * 5


# ---- subtask_inputs / run / merge / check_result ------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_end_to_end_on_cpu(mm, dtype):
    rng = np.random.default_rng(7)
    m, k, n = 37, 11, 5
    a = rng.standard_normal((m, k)).astype(dtype)
    b = rng.standard_normal((k, n)).astype(dtype)
    inputs = {"a": ArrayMeta.of(a), "b": ArrayMeta.of(b)}
    outputs_meta = mm.validate({}, inputs)
    item = np.dtype(dtype).itemsize
    small = provider(5.0, memory_bytes=int(2 * (k * n * item + 4 * (k + n) * item)))  # 4 rows a chunk
    plans = mm.split({}, inputs, [provider(20.0), small])
    assert len(plans) > 2
    c = np.full(outputs_meta["c"].shape, np.nan, dtype=dtype)
    for plan in plans:
        sub_arrays = mm.subtask_inputs(plan.params, {"a": a, "b": b})
        assert len(sub_arrays) == 2
        assert np.shares_memory(sub_arrays[0], a)  # a view, not a copy
        assert sub_arrays[1] is b
        result = mm.run(plan.params, sub_arrays, CpuDevice())
        mm.check_result(plan.params, outputs_meta, result)
        mm.merge(plan.params, result, {"c": c})
    tol = 1e-5 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(c, a @ b, rtol=tol, atol=tol)
    assert c.dtype == np.dtype(dtype)


def test_run_on_cpu_exact(mm):
    a = np.arange(12, dtype=np.float32).reshape(4, 3)
    b = np.arange(6, dtype=np.float32).reshape(3, 2)
    out = mm.run({"row0": 2, "rows": 2}, mm.subtask_inputs({"row0": 2, "rows": 2}, {"a": a, "b": b}),
                 CpuDevice())
    assert len(out) == 1
    np.testing.assert_array_equal(out[0], [[46, 67], [64, 94]])  # docs/PROTOCOL.md §10


def test_run_on_read_only_inputs(mm):
    a = np.arange(6, dtype=np.float64).reshape(2, 3)
    b = np.ones((3, 2))
    a.flags.writeable = False
    b.flags.writeable = False
    np.testing.assert_array_equal(mm.run({}, [a, b], CpuDevice())[0], a @ b)


@pytest.mark.parametrize("bad", [
    [np.zeros((3, 2))],  # wrong rows
    [np.zeros((2, 3))],  # wrong cols
    [np.zeros((2, 2), dtype=np.float32)],  # wrong dtype
    [np.zeros((2, 2), dtype=np.int64)],
    [np.zeros(4)],  # wrong ndim
    [],
    [np.zeros((2, 2)), np.zeros((2, 2))],
])
def test_check_result_rejects(mm, bad):
    outputs = {"c": ArrayMeta("float64", (10, 2))}
    with pytest.raises(ValidationError):
        mm.check_result({"row0": 4, "rows": 2}, outputs, bad)


def test_check_result_accepts(mm):
    outputs = {"c": ArrayMeta("float64", (10, 2))}
    mm.check_result({"row0": 4, "rows": 2}, outputs, [np.zeros((2, 2))])


def test_merge_writes_only_its_rows(mm):
    c = np.zeros((6, 2))
    mm.merge({"row0": 2, "rows": 3}, [np.ones((3, 2))], {"c": c})
    np.testing.assert_array_equal(c[:2], 0)
    np.testing.assert_array_equal(c[2:5], 1)
    np.testing.assert_array_equal(c[5:], 0)


def test_a_tiny_job_goes_to_the_fastest_provider_alone(mm, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rows, "MIN_SHARE_SECONDS", 0.002)
    fast, slow = provider(20.0), provider(10.0)
    plans = mm.split({}, metas(4, 4, 4), [fast, slow])
    assert [(p.provider_id, p.params) for p in plans] == [(fast.provider_id, {"row0": 0, "rows": 4})]


def test_a_job_is_spread_as_far_as_each_share_is_worth_it(mm, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rows, "MIN_SHARE_SECONDS", 0.002)
    ws = [provider(10.0) for _ in range(4)]
    # 2*m*k*n flops: 2*1000*100*500 = 1e8 = 10 ms on one 10 GFLOP/s provider, so 2 ms shares for 4 providers
    # would be 2.5 ms: all 4; a fifth of that work (2 ms alone) stays on one
    assert {p.provider_id for p in mm.split({}, metas(1000, 100, 500), ws)} == {w.provider_id for w in ws}
    assert len({p.provider_id for p in mm.split({}, metas(200, 100, 500), ws)}) == 1
    assert len({p.provider_id for p in mm.split({}, metas(500, 100, 500), ws)}) == 2


# ---- blocks of rows: progress and cancel between them ----------------------------------------------
class CheckpointDevice(CpuDevice):
    """Records every checkpoint; raises SubtaskCancelled at the ``stop_at``-th one."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.calls: list[tuple[int, int]] = []
        self.stop_at = stop_at

    def checkpoint(self, done: int, total: int) -> None:
        self.calls.append((done, total))
        if self.stop_at is not None and len(self.calls) >= self.stop_at:
            raise tasks.SubtaskCancelled("stop")


def test_a_long_subtask_runs_in_blocks_of_rows_with_a_checkpoint_after_each(mm, monkeypatch) -> None:
    monkeypatch.setattr(rows, "BLOCK_FLOPS", 10 * 2.0 * 40 * 30)  # 10 rows of a (25 x 40) @ (40 x 30) a block
    monkeypatch.setattr(rows, "MIN_BLOCK_ROWS", 8)
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((25, 40)), rng.standard_normal((40, 30))
    dev = CheckpointDevice()
    (c,) = mm.run({"row0": 0, "rows": 25}, [a, b], dev)
    np.testing.assert_allclose(c, a @ b)
    assert dev.calls == [(10, 25), (20, 25), (25, 25)]
    out = {"c": np.zeros((25, 30))}
    mm.run_into({"row0": 0, "rows": 25}, [a, b], out, CheckpointDevice())
    np.testing.assert_allclose(out["c"], a @ b)
    stopped = CheckpointDevice(stop_at=1)
    with pytest.raises(tasks.SubtaskCancelled):
        mm.run({"row0": 0, "rows": 25}, [a, b], stopped)
    assert stopped.calls == [(10, 25)]  # stopped after the first block, not at the end


def test_row_chunks() -> None:
    assert rows.row_chunks(0, 1.0) == [(0, 0)]
    assert rows.row_chunks(100, 1.0) == [(0, 100)]  # a small subtask: one block
    per = int(rows.BLOCK_FLOPS // 1e7)
    chunks = rows.row_chunks(1000, 1e7)
    assert chunks[0] == (0, max(rows.MIN_BLOCK_ROWS, per)) and chunks[-1][1] == 1000
    assert all(b0 == a1 for (_, a1), (b0, _) in zip(chunks, chunks[1:], strict=False))


def test_matmul_progress_counts_rows(mm) -> None:
    assert mm.progress_unit == "rows" and mm.units({"row0": 5, "rows": 7}) == 7
