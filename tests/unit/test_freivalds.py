"""Freivalds' check of matmul results (common/tasks/verify.py, MatMulPlanner.check_result): a wrong
element is caught, a correct result never fails (float32 and float64, many shapes, magnitudes and seeds), a
block written in place is read from the job's output file (an all-zero block of a nonzero product fails)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from common import tasks
from common.errors import ValidationError
from common.tasks import ArrayMeta
from common.tasks.base import JobContext
from common.tasks.matmul import MatMulPlanner
from common.tasks.verify import EXACT_MAX_TERMS, Freivalds, exact_check

DTYPES = ("float64", "float32")


def planner(a: np.ndarray, b: np.ndarray) -> MatMulPlanner:
    """The planner of a job ``a @ b`` whose output array ``c`` is in memory (zeros, as the head creates it)."""
    task = tasks.get("matmul")
    inputs = {"a": ArrayMeta(a.dtype.name, a.shape), "b": ArrayMeta(b.dtype.name, b.shape)}
    outputs = task.validate({}, inputs)
    results = {"c": np.zeros(outputs["c"].shape, dtype=outputs["c"].dtype)}
    job = JobContext("job", {}, inputs, outputs, {"a": a, "b": b}, {"a": "blob-a", "b": "blob-b"}, results, Path("."))
    p = task.planner(job)
    assert isinstance(p, MatMulPlanner)
    return p


def block(r0: int, rows: int) -> dict[str, int]:
    return {"row0": r0, "rows": rows}


# ---- one wrong element of a 4096 x 4096 result ---------------------------------------------------------------
N = 4096
#: a wrong element is caught once it is off by more than about twice the row's tolerance (|r_j| >= 0.5); with
#: standard normal data at n = k = 4096 the tolerance is ~1.2e-5 in float64 (entries ~64) and ~36 in float32
OFF_BY = {"float64": 1e-4, "float32": 128.0}


@pytest.fixture(scope="module", params=DTYPES)
def big(request: pytest.FixtureRequest) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(4096)
    a = rng.standard_normal((N, N)).astype(request.param)
    b = rng.standard_normal((N, N)).astype(request.param)
    yield a, b, a @ b


def test_one_wrong_element_of_a_4096_result_is_caught(big: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    a, b, c = big
    p = planner(a, b)
    p.check_result(block(0, N), [c])  # the right result passes
    rng = np.random.default_rng(7)
    for i, j in zip(rng.integers(0, N, 6), rng.integers(0, N, 6), strict=True):
        wrong = c.copy()
        wrong[i, j] += OFF_BY[c.dtype.name]
        with pytest.raises(ValidationError, match=rf"rows 0\.\.4095 failed Freivalds' check: 1 of 4096 rows wrong: "
                                                  rf"row {i} off by"):
            p.check_result(block(0, N), [wrong])
    assert p.summary()["verify"]["blocks_rejected"] == 6


def test_only_the_block_holding_the_wrong_element_fails(big: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    a, b, c = big
    p = planner(a, b)
    wrong = c.copy()
    wrong[1500, 4000] -= OFF_BY[c.dtype.name]
    for r0 in range(0, N, 512):
        sub = block(r0, 512)
        if r0 == 1024:
            with pytest.raises(ValidationError, match=r"rows 1024\.\.1535 .* row 1500 off by"):
                p.check_result(sub, [wrong[r0:r0 + 512]])
        else:
            p.check_result(sub, [wrong[r0:r0 + 512]])


# ---- no false alarms --------------------------------------------------------------------------------------
SHAPES = [(1, 1, 1), (5, 3, 7), (300, 177, 95), (64, 4096, 64), (33, 20000, 5), (800, 8, 900)]


def _data(kind: str, dtype: str, m: int, k: int, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    big_scale = 1e100 if dtype == "float64" else 1e15
    small_scale = 1e-100 if dtype == "float64" else 1e-20  # float32: products in the subnormals
    makers: dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]] = {
        "normal": lambda: (rng.standard_normal((m, k)), rng.standard_normal((k, n))),
        "positive": lambda: (rng.random((m, k)), rng.random((k, n))),
        "large": lambda: (rng.standard_normal((m, k)) * big_scale, rng.standard_normal((k, n)) * big_scale),
        "tiny": lambda: (rng.standard_normal((m, k)) * small_scale, rng.standard_normal((k, n)) * small_scale),
        "scales": lambda: (rng.standard_normal((m, k)) * 10.0 ** rng.uniform(-6, 6, (m, 1)),
                           rng.standard_normal((k, n)) * 10.0 ** rng.uniform(-6, 6, (1, n))),
        "integers": lambda: (rng.integers(-1000, 1000, (m, k)).astype(float),
                             rng.integers(-1000, 1000, (k, n)).astype(float)),
        "cancelling": lambda: _cancelling(m, k, n, rng),
    }
    a, b = makers[kind]()
    return a.astype(dtype), b.astype(dtype)


def _cancelling(m: int, k: int, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A product that is exactly zero with large terms: only rounding is left in C."""
    half = max(1, k // 2)
    x, y = rng.standard_normal((m, half)) * 1e3, rng.standard_normal((half, n)) * 1e3
    return np.hstack([x, x]), np.vstack([y, -y])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["normal", "positive", "large", "tiny", "scales", "integers", "cancelling"])
def test_correct_results_never_fail(dtype: str, kind: str) -> None:
    rng = np.random.default_rng(abs(hash((dtype, kind))) % 2**32)
    for m, k, n in SHAPES:
        a, b = _data(kind, dtype, m, k, n, rng)
        c = a @ b
        for seed in range(40):
            found = Freivalds.of(b, np.random.default_rng(seed)).check(a, c)
            assert found.ok, (m, k, n, seed, found.describe(0))
            assert found.unverified == 0
        planner(a, b).check_result(block(0, m), [c])


def _sequential(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """C summed term after term in the dtype: the least accurate order a provider may reasonably use."""
    c = np.zeros((a.shape[0], b.shape[1]), dtype=a.dtype)
    for t in range(a.shape[1]):
        c += np.outer(a[:, t], b[t])
    return c


@pytest.mark.parametrize("kind", ["normal", "positive", "large"])
def test_other_summation_orders_pass(kind: str) -> None:
    """float32 sequential sums (rounding errors ~10x BLAS's) and torch's kernels are right results too."""
    rng = np.random.default_rng(11)
    a, b = _data(kind, "float32", 64, 4096, 64, rng)
    results = [_sequential(a, b), (a[:, ::-1] @ b[::-1]).astype("float32")]
    torch = pytest.importorskip("torch")
    results.append(torch.matmul(torch.from_numpy(a), torch.from_numpy(b)).numpy())
    for c in results:
        for seed in range(100):
            found = Freivalds.of(b, np.random.default_rng(seed)).check(a, c)
            assert found.ok, (seed, found.describe(0))


def test_a_changed_value_is_caught_in_every_kind_of_data() -> None:
    rng = np.random.default_rng(3)
    for dtype in DTYPES:
        for kind in ("normal", "positive", "large", "scales", "integers"):
            a, b = _data(kind, dtype, 300, 177, 95, rng)
            c = a @ b
            wrong = c.copy()
            wrong[17, 40] += np.abs(c[17]).max()  # off by the row's largest entry
            for seed in range(20):
                found = Freivalds.of(b, np.random.default_rng(seed)).check(a, wrong)
                assert found.bad.tolist() == [17], (dtype, kind, seed)


# ---- NaN, Inf, overflow ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_where_the_inputs_are_finite_is_caught(dtype: str) -> None:
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((50, 40)).astype(dtype), rng.standard_normal((40, 30)).astype(dtype)
    for value in (np.nan, np.inf, -np.inf):
        c = a @ b
        c[9, 3] = value
        with pytest.raises(ValidationError, match=r"rows 0\.\.49 .*1 of 50 rows wrong: row 9 off by"):
            planner(a, b).check_result(block(0, 50), [c])


def test_nan_and_inf_inputs_give_unverified_rows_not_failures() -> None:
    rng = np.random.default_rng(6)
    a, b = rng.standard_normal((20, 10)), rng.standard_normal((10, 8))
    a[2, 1], a[5, 0], b[3, 6] = np.nan, np.inf, np.nan  # rows 2 and 5 of C and its column 6: non-finite
    c = a @ b
    found = Freivalds.of(b, np.random.default_rng(0)).check(a, c)
    assert found.ok and found.unverified == 2
    wrong = c.copy()
    wrong[7, 1] += 1.0  # outside the non-finite row and column: still caught
    assert Freivalds.of(b, np.random.default_rng(0)).check(a, wrong).bad.tolist() == [7]


def test_a_float32_product_that_overflows_is_not_a_failure() -> None:
    rng = np.random.default_rng(8)
    a, b = rng.standard_normal((10, 64)).astype("float32"), rng.standard_normal((64, 6)).astype("float32")
    a[:4] *= 1e36  # rows 0-3 of C overflow float32 (legitimately inf); the others are verified
    b *= 1e3
    with np.errstate(all="ignore"):
        c = a @ b
    assert not np.isfinite(c[:4]).all()
    found = Freivalds.of(b, np.random.default_rng(1)).check(a, c)
    assert found.ok and found.unverified == 4
    c[6, 2] = np.inf
    assert Freivalds.of(b, np.random.default_rng(1)).check(a, c).bad.tolist() == [6]


# ---- blocks written in place ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_an_all_zero_block_in_place_is_caught(dtype: str) -> None:
    rng = np.random.default_rng(9)
    a, b = rng.standard_normal((120, 70)).astype(dtype), rng.standard_normal((70, 50)).astype(dtype)
    p = planner(a, b)
    out = p.job.results["c"]  # zeros: a provider that sent `in_place` without computing anything
    with pytest.raises(ValidationError, match=r"rows 40\.\.79 \(written in place\) failed Freivalds' check: "
                                              r"40 of 40 rows wrong"):
        p.check_result(block(40, 40), [])
    out[40:80] = a[40:80] @ b  # computed in place: passes
    p.check_result(block(40, 40), [])
    out[55, 7] = 2 * out[55, 7] + 1
    with pytest.raises(ValidationError, match=r"row 55 off by"):
        p.check_result(block(40, 40), [])
    assert p.summary()["verify"] == {"method": "freivalds", "blocks_rejected": 2, "rows_unverified": 0}


def test_zeros_are_right_for_a_zero_product() -> None:
    a, b = np.zeros((30, 20)), np.random.default_rng(1).standard_normal((20, 10))
    planner(a, b).check_result(block(0, 30), [])


def test_the_shape_and_dtype_are_still_checked_first() -> None:
    a, b = np.ones((4, 3)), np.ones((3, 2))
    with pytest.raises(ValidationError, match=r"result is float64\[4, 3\], expected float64\[4, 2\]"):
        planner(a, b).check_result(block(0, 4), [np.ones((4, 3))])
    with pytest.raises(ValidationError, match="result is float32"):
        planner(a, b).check_result(block(0, 4), [np.full((4, 2), 3.0, dtype="float32")])


def test_every_job_draws_its_own_vector() -> None:
    a, b = np.ones((4, 300)), np.random.default_rng(2).standard_normal((300, 50))  # past EXACT_MAX_TERMS
    vectors = []
    for _ in range(3):
        p = planner(a, b)
        p.check_result(block(0, 4), [a @ b])
        assert p._freivalds is not None
        vectors.append(p._freivalds.r)
    assert not np.array_equal(vectors[0], vectors[1]) and not np.array_equal(vectors[1], vectors[2])
    assert all(0.5 <= abs(x) <= 1.0 for v in vectors for x in v)


# ---- small blocks: the exact check ---------------------------------------------------------------------------
SMALL = [(1, 1, 1), (4, 4, 4), (3, 17, 5), (16, 64, 32), (2, 4096, 4)]  # at most EXACT_MAX_TERMS terms


def test_small_blocks_take_the_exact_check() -> None:
    assert all(m * k * n <= EXACT_MAX_TERMS for m, k, n in SMALL)
    a, b = np.ones((4, 4)), np.ones((4, 4))
    p = planner(a, b)
    p.check_result(block(0, 4), [a @ b])
    assert p._freivalds is None  # no vectors drawn for it
    with pytest.raises(ValidationError, match=r"rows 0\.\.3 failed the exact check: 1 of 4 rows wrong: row 2 off by 1"):
        wrong = a @ b
        wrong[2, 3] += 1.0
        p.check_result(block(0, 4), [wrong])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["normal", "positive", "large", "tiny", "scales", "integers", "cancelling"])
def test_the_exact_check_never_fails_a_correct_result(dtype: str, kind: str) -> None:
    rng = np.random.default_rng(abs(hash(("exact", dtype, kind))) % 2**32)
    for m, k, n in SMALL:
        a, b = _data(kind, dtype, m, k, n, rng)
        results = [a @ b, _sequential(a, b), (a[:, ::-1] @ b[::-1]).astype(dtype)]
        for c in results:
            found = exact_check(a, b, c)
            assert found.ok and found.unverified == 0, (kind, m, k, n, found.describe(0))


def test_the_exact_check_catches_a_change_of_one_unit_of_rounding_past_its_bound() -> None:
    rng = np.random.default_rng(4)
    for dtype in DTYPES:
        a, b = _data("normal", dtype, 16, 64, 32, rng)
        c = a @ b
        wrong = c.copy()
        wrong[5, 7] += 1e-3 * np.abs(c[5]).max()  # far below Freivalds' noise floor for big blocks: still caught
        found = exact_check(a, b, wrong)
        assert found.bad.tolist() == [5] and found.error[0] > found.tolerance[0]


def test_the_exact_check_with_nan_inf_and_overflow() -> None:
    rng = np.random.default_rng(6)
    a, b = rng.standard_normal((20, 10)), rng.standard_normal((10, 8))
    a[2, 1], b[3, 6] = np.nan, np.nan  # row 2 of C and its column 6: not verified
    c = a @ b
    found = exact_check(a, b, c)
    assert found.ok and found.unverified == 20  # every row has its column-6 entry unverified
    wrong = c.copy()
    wrong[7, 1] = np.nan  # where the product is finite: caught
    found = exact_check(a, b, wrong)
    assert found.bad.tolist() == [7] and np.isnan(found.error[0])
    big_a = rng.standard_normal((4, 8)).astype("float32")
    big_a[:2] *= 1e36
    big_b = rng.standard_normal((8, 3)).astype("float32") * 1e3
    with np.errstate(all="ignore"):
        over = big_a @ big_b
    found = exact_check(big_a, big_b, over)
    assert found.ok and found.unverified == 2
