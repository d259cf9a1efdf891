"""A lying matmul provider, for the tests of verified results (tests/integration/test_verified_results.py).

Loaded with ``--plugins tests.plugins.liar`` on one provider only: it turns that process's matmul into one
that returns blocks of the right dtype and shape with wrong values. ``DCF_TEST_LIAR`` says how:

* ``perturb`` (the default): one element of the block is off (its value doubled, plus one);
* ``nan``: a few elements are NaN;
* ``skip``: nothing is computed: over the network the block is zeros, in place the output file's rows are
  left as they are (zeros), with the ``in_place`` result the head expects.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from common import tasks
from common.tasks import Device
from common.tasks.matmul import MatMul

MODES = ("perturb", "nan", "skip")


def _mode() -> str:
    mode = os.environ.get("DCF_TEST_LIAR", "perturb")
    if mode not in MODES:
        raise ValueError(f"DCF_TEST_LIAR={mode!r}: choose one of {MODES}")
    return mode


def lie(block: np.ndarray) -> None:
    """Spoil ``block`` (rows x n) in place, as the mode says."""
    mode = _mode()
    if mode == "skip":
        block[...] = 0
    elif mode == "nan":
        block.flat[:: max(1, block.size // 3)] = np.nan
    else:
        i, j = block.shape[0] // 2, block.shape[1] // 3
        block[i, j] = 2 * block[i, j] + 1


class LyingMatMul(MatMul):
    """matmul's provider side, with every block spoiled before it is returned."""

    def run(self, sub_params: Mapping[str, Any], arrays: Sequence[np.ndarray], device: Device) -> list[np.ndarray]:
        if _mode() == "skip":
            return [np.zeros((arrays[0].shape[0], arrays[1].shape[1]), dtype=arrays[0].dtype)]
        out = super().run(sub_params, arrays, device)
        lie(out[0])
        return out

    def run_into(self, sub_params: Mapping[str, Any], arrays: Sequence[np.ndarray],
                 outputs: Mapping[str, np.ndarray], device: Device) -> list[np.ndarray]:
        if _mode() == "skip":
            return []  # the rows stay as the head created them: zeros
        out = super().run_into(sub_params, arrays, outputs, device)
        lie(out[0])  # the view of the shared output file: the lie lands in place
        return out


_mode()  # a wrong mode stops the provider at start-up (plugin module cannot be imported)
# the registered instance becomes a liar: this process's `tasks.get("matmul")` is the same object
tasks.get("matmul").__class__ = LyingMatMul
