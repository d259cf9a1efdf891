"""The allreduce planner's choices (common/tasks/train/planner.py): who can join a group, which backend, ranks
kept across rounds, a new generation after an abandoned round."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from common.errors import TaskError
from common.tasks import ProviderSpec
from tests.unit.test_state import hexid
from tests.unit.test_train_barrier import data

torch = pytest.importorskip("torch")


def planner(tmp_path: Path) -> Any:
    from common.tasks import JobContext
    from common.tasks.train.planner import TrainPlanner

    arrays = data()
    ctx = JobContext(job_id=hexid(), params={"model": "logreg", "batch_size": 32, "sync": "allreduce", "round_steps": 1,
                                             "epochs": 3}, inputs={}, outputs={}, operands=arrays,
                     blob_ids={k: hexid() for k in arrays}, results={}, job_dir=tmp_path,
                     options={"rendezvous": {"port": 5558, "secret": "s" * 32}})
    return TrainPlanner(ctx)


def spec(kind: str = "cpu", collectives: tuple[str, ...] = ("gloo",), pid: str | None = None) -> ProviderSpec:
    return ProviderSpec(pid or hexid(), 1.0, 1 << 30, kind, frozenset({"float32"}), (), frozenset(collectives))


def test_a_provider_without_torch_distributed_is_left_out_and_named(tmp_path: Path) -> None:
    p = planner(tmp_path)
    lacking = spec(collectives=())
    assert p.plan([lacking], 0, 0.0) == []
    assert "torch.distributed is unavailable on " + lacking.provider_id[:8] in (p.waiting() or "")
    able = spec()
    plans = p.plan([lacking, able], 0, 1.0)
    assert [s.provider_id for s in plans] == [able.provider_id] and p.waiting() is None
    assert plans[0].params["group"]["backend"] == "gloo" and plans[0].group


def test_nccl_only_when_every_member_is_cuda_with_nccl(tmp_path: Path) -> None:
    gpus = [spec("cuda", ("gloo", "nccl")) for _ in range(2)]
    assert {s.params["group"]["backend"] for s in planner(tmp_path).plan(gpus, 0, 0.0)} == {"nccl"}
    mixed = [spec("cuda", ("gloo", "nccl")), spec("cpu")]
    assert {s.params["group"]["backend"] for s in planner(tmp_path / "m").plan(mixed, 0, 0.0)} == {"gloo"}


def test_ranks_keep_while_the_group_does_and_an_abandon_forms_a_new_one(tmp_path: Path) -> None:
    import numpy as np

    p = planner(tmp_path)
    a, b = spec(pid="a" * 32), spec(pid="b" * 32)
    first = p.plan([a, b], 0, 0.0)
    prefix = first[0].params["group"]["prefix"]
    assert [s.params["rank"] for s in first] == [0, 1] and {s.params["state"] for s in first} == {"sent"}
    n = p.n_params
    for s in first:  # both members report: rank 0 sends the parameters and momentum-free SGD's (no) state
        arrays = [np.zeros(n, np.float32), np.array([1.0, 16, 8, 0.01])] if s.params["rank"] == 0 else \
            [np.array([1.0, 16, 8, 0.01])]
        p.check_result(s.params, arrays)
        p.merge(s.params, arrays, 1.0)
    second = p.plan([b, a], 0, 1.0)  # another order: the same ranks, the same group, state kept
    assert [(s.provider_id, s.params["rank"]) for s in second] == [("a" * 32, 0), ("b" * 32, 1)]
    assert second[0].params["group"]["prefix"] == prefix and {s.params["state"] for s in second} == {"kept"}
    p.abandoned(second[0].group or "", "provider lost", 2.0)
    assert p.plan([a, b], 0, 2.5) == [] and "re-forming" in (p.waiting() or "")  # the settle time
    third = p.plan([a, b], 0, 3.5)
    assert third[0].params["group"]["prefix"] != prefix and {s.params["state"] for s in third} == {"sent"}


def test_too_many_abandoned_rounds_fail_the_job(tmp_path: Path) -> None:
    from common.tasks.train.planner import MAX_ABANDONED_ROUNDS

    p = planner(tmp_path)
    now = 0.0
    with pytest.raises(TaskError, match="rounds in a row"):
        for _ in range(MAX_ABANDONED_ROUNDS + 1):
            now += 10
            plans = p.plan([spec()], 0, now)
            p.abandoned(plans[0].group or "", "boom", now)
