"""The planner interface through the pure state machine: a multi-round planner is driven round by
round, what it asks to be written comes out as actions, and no path reads a clock or opens a file."""

from __future__ import annotations

import builtins
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common.tasks import Effect, JobContext, Metrics, Planner, ProviderSpec, SaveFile, SubtaskPlan
from head_node import stimuli
from head_node.state import ClusterState, Job, JobState
from tests.unit.test_state import connect, dispatches, hexid, make_info, result


class Rounds(Planner):
    """Three rounds of one subtask per worker; a checkpoint and a metrics record after each."""

    def __init__(self, rounds: int = 3) -> None:
        self.rounds, self.done_rounds, self.expect, self.merged = rounds, 0, 0, 0
        self.pending: list[Effect] = []
        self.seen_now: list[float] = []

    def plan(self, providers: Sequence[ProviderSpec], outstanding: int, now: float) -> list[SubtaskPlan]:
        self.seen_now.append(now)
        if outstanding:
            return []
        if self.expect:
            self.done_rounds += 1
            self.pending += [SaveFile("state.bin", bytes([self.done_rounds])),
                             Metrics("round", {"n": self.done_rounds})]
            if self.done_rounds == self.rounds:
                self.finished = True
                return []
        self.expect = len(providers)
        return [SubtaskPlan(w.provider_id, {"round": self.done_rounds}, 1.0) for w in providers]

    def subtask_inputs(self, sub_params: Mapping[str, Any]) -> list[np.ndarray]:
        return []

    def check_result(self, sub_params: Mapping[str, Any], arrays: Sequence[np.ndarray]) -> None:
        pass

    def merge(self, sub_params: Mapping[str, Any], arrays: Sequence[np.ndarray], now: float) -> None:
        self.merged += 1

    def progress(self) -> tuple[int, int]:
        return self.done_rounds, self.rounds

    def effects(self) -> list[Effect]:
        out, self.pending = self.pending, []
        return out


@pytest.fixture
def no_clock_no_files(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("the state machine read a clock or opened a file")

    for name in ("time", "monotonic", "perf_counter", "time_ns", "monotonic_ns"):
        monkeypatch.setattr(time, name, forbidden)
    monkeypatch.setattr(builtins, "open", forbidden)
    monkeypatch.setattr(Path, "open", forbidden)


def test_a_multi_round_planner_runs_to_the_end_with_effects_as_actions(no_clock_no_files: None) -> None:
    cs = ClusterState(hexid())
    a, b = make_info(), make_info()
    connect(cs, a)
    connect(cs, b)
    planner = Rounds()
    job = Job(hexid(), "matmul", {}, {}, {}, None, created_at=0.0, planner=planner)
    actions = cs.handle(stimuli.JobAdded(job), 1.0)
    effects: list[Any] = []
    now = 1.0
    for _ in range(3):
        sent = dispatches(actions)
        assert len(sent) == 2
        actions = []
        for d in sent:
            now += 1.0
            assert result(cs, d.provider_id, d.job_id, d.subtask, d.attempt, cs.incarnation, now)
            planner.merge({}, [], now)
            actions = cs.handle(stimuli.ResultMerged(job.job_id), now)
        effects += [e for act in actions if isinstance(act, stimuli.PlannerEffects) for e in act.effects]
    assert job.state is JobState.DONE and stimuli.JobFinished(job.job_id) in actions
    assert planner.merged == 6 and len(job.subtasks) == 6
    assert [e.data for e in effects if isinstance(e, SaveFile)] == [b"\x01", b"\x02", b"\x03"]
    assert [e.values["n"] for e in effects if isinstance(e, Metrics)] == [1, 2, 3]
    assert planner.seen_now[-1] == now  # the clock it sees is the one the I/O layer passed in


def test_a_planner_that_raises_fails_its_job_not_the_scheduler() -> None:
    class Broken(Rounds):
        def plan(self, providers: Sequence[ProviderSpec], outstanding: int, now: float) -> list[SubtaskPlan]:
            raise KeyError("bug")

    cs = ClusterState(hexid())
    connect(cs, make_info())
    bad = Job(hexid(), "matmul", {}, {}, {}, None, created_at=0.0, planner=Broken())
    good = Job(hexid(), "matmul", {}, {}, {}, None, created_at=1.0, planner=Rounds(1))
    cs.handle(stimuli.JobAdded(bad), 1.0)
    actions = cs.handle(stimuli.JobAdded(good), 1.0)
    assert bad.state is JobState.FAILED and "KeyError" in (bad.error or "")
    assert good.state is JobState.RUNNING and dispatches(actions)


def test_train_planner_is_pure_after_it_is_built(tmp_path: Path) -> None:
    """The training planner asks for its checkpoints (SaveFile) instead of writing them."""
    pytest.importorskip("torch")
    from common.tasks.train.planner import TrainPlanner

    rng = np.random.default_rng(0)
    data: dict[str, np.ndarray] = {"x": rng.standard_normal((64, 4)).astype(np.float32), "y": rng.integers(0, 2, 64),
            "x_test": rng.standard_normal((8, 4)).astype(np.float32), "y_test": rng.integers(0, 2, 8)}
    ctx = JobContext(job_id=hexid(), params={"model": "logreg", "batch_size": 32, "checkpoint_every": 1},
                     inputs={}, outputs={}, operands=data, blob_ids={k: hexid() for k in data}, results={},
                     job_dir=tmp_path)
    planner = TrainPlanner(ctx)
    w = ProviderSpec(hexid(), 1.0, 1 << 30, "cpu", frozenset({"float32"}))
    (plan,) = planner.plan([w], 0, 10.0)
    grad = np.zeros(plan.params["n_params"], dtype=np.float32)
    planner.merge(plan.params, [grad, np.array([1.0, 32, 16])], 11.0)
    planner.plan([w], 0, 12.0)  # closes the step: a checkpoint is due
    saved = [e for e in planner.effects() if isinstance(e, SaveFile)]
    assert [e.name for e in saved] == ["checkpoint.pt"] and saved[0].data
    assert list(tmp_path.iterdir()) == []  # nothing written by the planner itself
    assert planner.progress() == (1, 2)
