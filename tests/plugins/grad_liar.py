"""A provider that lies about training gradients and predictions, for the tests of ``--verify-rate``
(tests/integration/test_verify_rate.py).

Loaded with ``--plugins tests.plugins.grad_liar`` on one provider only: its ``train`` subtasks that compute a
gradient or a local-SGD round return a vector of the right dtype and shape with wrong values (their
``[loss, samples, correct]`` stay right, and so do evaluation rounds), and its ``predict`` subtasks return wrong
classes. ``DCF_TEST_GRAD_LIAR`` says how:

* ``perturb`` (the default): one element is off (a gradient's value doubled, plus one; one prediction the next
  class);
* ``nan``: a few elements of the vector are NaN (predictions, integers: as ``wrong``);
* ``wrong``: every element is wrong (a random vector of the same magnitude; every prediction the next class).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from common import tasks
from common.tasks import Device
from common.tasks.predict import PredictTask
from common.tasks.train.task import TrainTask

MODES = ("perturb", "nan", "wrong")
#: the train subtasks whose vector is spoiled (those --verify-rate checks)
SPOILED_KINDS = ("grad", "local")


def _mode() -> str:
    mode = os.environ.get("DCF_TEST_GRAD_LIAR", "perturb")
    if mode not in MODES:
        raise ValueError(f"DCF_TEST_GRAD_LIAR={mode!r}: choose one of {MODES}")
    return mode


def spoil_vector(vector: np.ndarray) -> np.ndarray:
    """A float vector with the same dtype and shape, its values spoiled as the mode says."""
    out = np.array(vector, copy=True)
    mode = _mode()
    if mode == "perturb":
        i = out.size // 3
        out[i] = 2 * out[i] + 1
    elif mode == "nan":
        out[:: max(1, out.size // 3)] = np.nan
    else:
        scale = float(np.abs(out).max()) or 1.0
        out[...] = np.random.default_rng(0).standard_normal(out.shape) * scale
    return out


def spoil_classes(predictions: np.ndarray, classes: int) -> np.ndarray:
    """Predictions of the same dtype and shape: one (``perturb``) or every one the next class."""
    out = np.array(predictions, copy=True)
    if _mode() == "perturb":
        out[out.size // 2] = (out[out.size // 2] + 1) % classes
    else:
        out[...] = (out + 1) % classes
    return out


class LyingTrain(TrainTask):
    """train's provider side, with every gradient and local-SGD round spoiled before it is returned."""

    def run(self, sub_params: Mapping[str, Any], arrays: Sequence[np.ndarray], device: Device) -> list[np.ndarray]:
        out = super().run(sub_params, arrays, device)
        if sub_params["kind"] in SPOILED_KINDS:
            out[0] = spoil_vector(out[0])
        return out


class LyingPredict(PredictTask):
    """predict's provider side, with every block of predictions spoiled (``run_into`` calls it too)."""

    def run(self, sub_params: Mapping[str, Any], arrays: Sequence[np.ndarray], device: Device) -> list[np.ndarray]:
        out = super().run(sub_params, arrays, device)
        return [spoil_classes(out[0], int(sub_params["classes"]))]


_mode()  # a wrong mode stops the provider at start-up (plugin module cannot be imported)
# the registered instances become liars: this process's `tasks.get(...)` are the same objects
tasks.get("train").__class__ = LyingTrain
tasks.get("predict").__class__ = LyingPredict
