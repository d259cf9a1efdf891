"""``Planner.compare`` (``--verify-rate``): two providers' results of one subtask agree up to rounding, and a lie
(right shape, wrong values; one element off; NaN where the other has a number) is told apart. The default
(``common.tasks.base.compare_arrays``) and the train planner's (gradients, local-SGD parameters, their metrics)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from common.tasks import Planner
from common.tasks.base import FLOAT_TOLERANCES, compare_arrays, tolerance
from common.tasks.train.planner import TrainPlanner


def differs(why: str | None) -> str:
    """What ``compare`` said differs (it must have said something)."""
    assert why is not None
    return why


def gradient(n: int = 4096, dtype: Any = np.float32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n).astype(dtype) * np.float32(0.01)


def rounded(x: np.ndarray, relative: float) -> np.ndarray:
    """What another device's rounding might make of ``x``: every element moved by up to ``relative`` of the
    largest one."""
    noise = np.random.default_rng(1).uniform(-1, 1, x.shape) * relative * float(np.abs(x).max())
    return (x.astype(np.float64) + noise).astype(x.dtype)


def test_the_same_results_agree() -> None:
    g = gradient()
    assert compare_arrays([g, np.arange(3.0)], [g.copy(), np.arange(3.0)]) is None
    assert compare_arrays([], []) is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rounding_noise_is_accepted(dtype: Any) -> None:
    g = gradient(dtype=dtype)
    rtol, _ = tolerance(np.dtype(dtype))
    assert compare_arrays([g], [rounded(g, rtol / 4)]) is None
    assert compare_arrays([g], [rounded(g, rtol * 4)]) is not None


def test_one_perturbed_element_is_caught_and_located() -> None:
    g = gradient()
    lie = g.copy()
    lie[1234] = 2 * lie[1234] + 1
    why = compare_arrays([g], [lie])
    assert why is not None and why.startswith("1 of 4096 elements differ, the first at 1234, by up to")
    small = g.copy()
    small[7] += 0.01 * float(np.abs(g).max())  # 1% of the largest gradient: 100 times the tolerance
    assert compare_arrays([g], [small]) is not None
    assert differs(compare_arrays([g, np.ones(2)], [g, np.array([1.0, 1.5])])).startswith("array 1: 1 of 2 elements")


def test_nan_where_the_other_has_a_number_is_caught_but_the_same_nans_agree() -> None:
    g = gradient()
    lie = g.copy()
    lie[::1000] = np.nan
    why = compare_arrays([g], [lie])
    assert why is not None and why.startswith("NaN where the other has a number: 5 of 4096 elements differ")
    assert compare_arrays([lie], [lie.copy()]) is None  # both providers' NaNs, in the same places


def test_inf_must_match_in_place_and_sign() -> None:
    x = np.array([1.0, np.inf, -np.inf, 3.0])
    assert compare_arrays([x], [x.copy()]) is None
    assert "Inf" in (compare_arrays([x], [np.array([1.0, -np.inf, -np.inf, 3.0])]) or "")
    assert "Inf" in (compare_arrays([x], [np.array([1.0, 1e308, -np.inf, 3.0])]) or "")


def test_all_wrong_values_of_the_right_shape_are_caught() -> None:
    g = gradient()
    assert compare_arrays([g], [-g]) is not None
    assert compare_arrays([g], [np.zeros_like(g)]) is not None
    assert compare_arrays([np.zeros(4, np.float32)], [np.zeros(4, np.float32)]) is None


def test_count_dtype_and_shape_must_match_and_integers_exactly() -> None:
    p = np.arange(10, dtype=np.int64)
    assert compare_arrays([p], [p, p]) == "1 arrays against 2"
    assert compare_arrays([p], [p.astype(np.int32)]) == "dtype int64 against int32"
    assert compare_arrays([p], [p.reshape(2, 5)]) == "shape [10] against [2, 5]"
    other = p.copy()
    other[3] = 4
    assert compare_arrays([p], [other]) == "1 of 10 elements differ, the first at 3"
    assert tolerance(np.dtype(np.int64)) == (0.0, 0.0) and set(FLOAT_TOLERANCES) >= {"float32", "float64"}


def test_the_default_planner_compare_is_compare_arrays() -> None:
    assert Planner.compare.__doc__ and "compare_arrays" in Planner.compare.__doc__
    assert not Planner.checks_values


# ---- the train planner's compare -------------------------------------------------------------------
def train_compare(kind: str, a: list[np.ndarray], b: list[np.ndarray]) -> str | None:
    planner = object.__new__(TrainPlanner)  # compare uses nothing the planner was built with
    return planner.compare({"kind": kind}, a, b)


def metrics(loss: float, n: int, correct: int) -> np.ndarray:
    return np.array([loss, n, correct], dtype=np.float64)


def test_train_results_agree_up_to_float32_rounding() -> None:
    g = gradient(2000)
    honest = [g, metrics(73.1234567, 64, 40)]
    other = [rounded(g, 1e-6), metrics(73.1234567 * (1 + 3e-7), 64, 40)]  # a float32 loss sum, rounded otherwise
    assert train_compare("grad", honest, other) is None
    assert train_compare("grad", honest, [g, metrics(73.1234567, 64, 39)]) is None  # a near tie went the other way


def test_train_lies_are_caught() -> None:
    g = gradient(2000)
    honest = [g, metrics(73.25, 64, 40)]
    lie = g.copy()
    lie[10] = 2 * lie[10] + 1
    assert differs(train_compare("grad", honest, [lie, honest[1]])).startswith("the gradient vectors differ: 1 of 2000")
    nan = g.copy()
    nan[::500] = np.nan
    assert differs(train_compare("local", honest, [nan, honest[1]])).startswith("the parameter vectors differ: NaN")
    assert differs(train_compare("grad", honest, [g, metrics(70.0, 64, 40)])).startswith("loss sum")
    assert train_compare("grad", honest, [g, metrics(73.25, 63, 40)]) == "64 samples against 63"
    assert train_compare("grad", honest, [g, metrics(73.25, 64, 60)]) == "40 of 64 samples right against 60"
    assert differs(train_compare("grad", honest, [g, metrics(float("nan"), 64, 40)])).startswith("loss sum")


def test_the_train_planner_verifies_gradients_and_local_rounds_on_uploaded_data_only() -> None:
    planner = object.__new__(TrainPlanner)
    blobs = {"x": "b1", "y": "b2", "key": "k-train"}
    assert planner.verifiable({"kind": "grad", "data": blobs})
    assert planner.verifiable({"kind": "local", "data": blobs})
    assert not planner.verifiable({"kind": "eval", "data": blobs})  # only scores the model
    assert not planner.verifiable({"kind": "grad", "data": {"local": "abc", "split": "train"}})  # one holder
    assert not TrainPlanner.checks_values
