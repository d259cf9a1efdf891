"""The allreduce planner's choices (common/tasks/train/planner.py): who can join a group, which backend, ranks
kept across rounds, a new generation after an abandoned round, the round planned ahead of the one in flight."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common.errors import TaskError
from common.tasks import ProviderSpec
from tests.unit.test_state import hexid
from tests.unit.test_train_barrier import data

torch = pytest.importorskip("torch")


def planner(tmp_path: Path, rows: int = 64, **params: Any) -> Any:
    from common.tasks import JobContext
    from common.tasks.train.planner import TrainPlanner

    arrays = data()
    arrays["x"], arrays["y"] = np.resize(arrays["x"], (rows, 4)), np.resize(arrays["y"], rows)
    ctx = JobContext(job_id=hexid(), params={"model": "logreg", "batch_size": 32, "sync": "allreduce", "round_steps": 1,
                                             "epochs": 3, **params}, inputs={}, outputs={}, operands=arrays,
                     blob_ids={k: hexid() for k in arrays}, results={}, job_dir=tmp_path,
                     options={"rendezvous": {"port": 5558, "secret": "s" * 32}})
    return TrainPlanner(ctx)


def rounds(plans: list[Any]) -> list[list[Any]]:
    """Plans grouped by round, in planning order (the round in flight, then the one planned ahead)."""
    out: dict[str, list[Any]] = {}
    for plan in plans:
        out.setdefault(plan.group, []).append(plan)
    return list(out.values())


def report(p: Any, plans: list[Any], now: float) -> None:
    """Every member of a round reports: rank 0 the parameters and momentum-free SGD's (no) state."""
    for s in plans:
        arrays = [np.zeros(p.n_params, np.float32), np.array([1.0, 16, 8, 0.01])] if s.params["rank"] == 0 else \
            [np.array([1.0, 16, 8, 0.01])]
        p.check_result(s.params, arrays)
        p.merge(s.params, arrays, now)


def spec(kind: str = "cpu", collectives: tuple[str, ...] = ("gloo",), pid: str | None = None) -> ProviderSpec:
    return ProviderSpec(pid or hexid(), 1.0, 1 << 30, kind, frozenset({"float32"}), (), frozenset(collectives))


def test_a_provider_without_torch_distributed_is_left_out_and_named(tmp_path: Path) -> None:
    p = planner(tmp_path)
    lacking = spec(collectives=())
    assert p.plan([lacking], 0, 0.0) == []
    assert "torch.distributed is unavailable on " + lacking.provider_id[:8] in (p.waiting() or "")
    able = spec()
    plans = rounds(p.plan([lacking, able], 0, 1.0))[0]
    assert [s.provider_id for s in plans] == [able.provider_id] and p.waiting() is None
    assert plans[0].params["group"]["backend"] == "gloo" and plans[0].group


def test_nccl_only_when_every_member_is_cuda_with_nccl(tmp_path: Path) -> None:
    gpus = [spec("cuda", ("gloo", "nccl")) for _ in range(2)]
    assert {s.params["group"]["backend"] for s in planner(tmp_path).plan(gpus, 0, 0.0)} == {"nccl"}
    mixed = [spec("cuda", ("gloo", "nccl")), spec("cpu")]
    assert {s.params["group"]["backend"] for s in planner(tmp_path / "m").plan(mixed, 0, 0.0)} == {"gloo"}


def test_ranks_keep_while_the_group_does_and_an_abandon_forms_a_new_one(tmp_path: Path) -> None:
    p = planner(tmp_path)
    a, b = spec(pid="a" * 32), spec(pid="b" * 32)
    first, ahead = rounds(p.plan([a, b], 0, 0.0))  # an epoch of 2 steps: both rounds of it go out at once
    prefix = first[0].params["group"]["prefix"]
    assert [s.params["rank"] for s in first] == [0, 1] and {s.params["state"] for s in first} == {"sent"}
    report(p, first, 1.0)
    report(p, ahead, 1.5)
    (evals,) = rounds(p.plan([a, b], 0, 1.5))  # the epoch's end: its eval round
    assert {s.params["kind"] for s in evals} == {"eval"}
    for s in evals:
        p.merge(s.params, [np.array([1.0, 4, 2])], 1.6)
    second = rounds(p.plan([b, a], 0, 2.0))[0]  # another order: the same ranks, the same group, state kept
    assert [(s.provider_id, s.params["rank"]) for s in second] == [("a" * 32, 0), ("b" * 32, 1)]
    assert second[0].params["group"]["prefix"] == prefix and {s.params["state"] for s in second} == {"kept"}
    p.abandoned(second[0].group or "", "provider lost", 2.0)
    assert p.plan([a, b], 0, 2.5) == [] and "re-forming" in (p.waiting() or "")  # the settle time
    third = rounds(p.plan([a, b], 0, 3.5))[0]
    assert third[0].params["group"]["prefix"] != prefix and {s.params["state"] for s in third} == {"sent"}


def test_the_next_round_goes_out_while_one_runs(tmp_path: Path) -> None:
    """Pipelined rounds: the round after the one in flight is planned with it, from the state the members will
    hold (``kept``, the next version, the next steps), and the one after that when the first ends; never past
    the epoch's end. Results of the round ahead may come first."""
    p = planner(tmp_path, round_steps=1, epochs=1, rows=128)
    a, b = spec(pid="a" * 32), spec(pid="b" * 32)
    now_, ahead = rounds(p.plan([a, b], 0, 0.0))
    assert [s.params["step"] for s in now_ + ahead] == [0, 0, 1, 1]
    assert [s.params["version"] for s in now_ + ahead] == [0, 0, 1, 1]
    assert {s.params["state"] for s in ahead} == {"kept"} and now_[0].group != ahead[0].group
    assert ahead[0].params["group"]["prefix"] == now_[0].params["group"]["prefix"]  # one process group
    assert p.plan([a, b], 0, 0.1) == []  # two rounds out: nothing more
    report(p, ahead, 0.5)  # the later round's results first: held for it
    assert p.plan([a, b], 0, 0.5) == []
    report(p, now_, 1.0)
    third = p.plan([a, b], 0, 1.0)  # both rounds done: the third goes out as the fourth is planned ahead
    assert p.global_step == 2 and [s.params["step"] for s in third] == [2, 2, 3, 3]
    assert [s.params["version"] for s in third] == [2, 2, 3, 3]
    last, _ = rounds(third)
    report(p, last, 1.5)
    assert p.plan([a, b], 0, 1.5) == []  # step 3 is the epoch's last: nothing ahead of it


def test_abandoning_either_round_drops_both(tmp_path: Path) -> None:
    p = planner(tmp_path, round_steps=1, epochs=1, rows=128)
    a, b = spec(pid="a" * 32), spec(pid="b" * 32)
    now_, ahead = rounds(p.plan([a, b], 0, 0.0))
    # the head abandons the group it dropped with it, without asking again; asked anyway, nothing more happens
    assert p.abandoned(ahead[0].group or "", "member failed", 1.0) == [now_[0].group]
    assert p.abandoned(now_[0].group or "", "member failed", 1.0) == ()
    assert p.regroups == 1 and p.round is None and p.ahead is None
    again = rounds(p.plan([a, b], 0, 5.0))
    assert [s.params["step"] for s in again[0]] == [0, 0] and {s.params["state"] for s in again[0]} == {"sent"}
    old_ids = {s.params["round"] for s in now_ + ahead}
    assert not old_ids & {s.params["round"] for r in again for s in r}  # round ids are never given twice
    report(p, now_, 5.2)  # a late result of a dropped round fills no slot of the new ones
    assert p.round is not None and not p.round["parts"] and not (p.ahead or {"parts": {}})["parts"]


def test_no_round_is_planned_ahead_when_the_group_would_change(tmp_path: Path) -> None:
    """A provider ready to join (or a member gone) forms a new group at the next round: none goes out ahead."""
    p = planner(tmp_path, round_steps=1, epochs=1, rows=128)
    a, b, c = spec(pid="a" * 32), spec(pid="b" * 32), spec(pid="c" * 32)
    now_, ahead = rounds(p.plan([a, b], 0, 0.0))
    report(p, now_, 0.5)
    assert p.plan([a, b, c], 0, 0.5) == []  # c is ready: nothing ahead of the round in flight
    report(p, ahead, 1.0)
    joined = rounds(p.plan([a, b, c], 0, 1.0))[0]  # the next round forms the group of three
    assert {s.provider_id for s in joined} == {a.provider_id, b.provider_id, c.provider_id}
    assert {s.params["state"] for s in joined} == {"sent"}


def test_too_many_abandoned_rounds_fail_the_job(tmp_path: Path) -> None:
    from common.tasks.train.planner import MAX_ABANDONED_ROUNDS

    p = planner(tmp_path)
    now = 0.0
    with pytest.raises(TaskError, match="rounds in a row"):
        for _ in range(MAX_ABANDONED_ROUNDS + 1):
            now += 10
            plans = p.plan([spec()], 0, now)
            p.abandoned(plans[-1].group or "", "boom", now)
