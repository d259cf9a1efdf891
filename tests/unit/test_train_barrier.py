"""The start barrier of a train job (``min_providers``, ``start_timeout``): its planner, and the pure state
machine driving it (the job's ``waiting``, a Tick that fails it on time)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common.errors import ValidationError, WaitTimeout
from common.tasks import JobContext, ProviderSpec
from common.tasks.train.defaults import MAX_MIN_PROVIDERS, START_TIMEOUT_S, TRAIN_DEFAULTS
from common.tasks.train.params import train_params
from head_node import stimuli
from head_node.state import ClusterState, Job, JobFailed, JobState
from tests.unit.test_state import connect, dispatches, hexid, make_info

torch = pytest.importorskip("torch")


def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x": rng.standard_normal((64, 4)).astype(np.float32), "y": rng.integers(0, 2, 64),
            "x_test": rng.standard_normal((8, 4)).astype(np.float32), "y_test": rng.integers(0, 2, 8)}


def planner(tmp_path: Path, **params: Any):
    from common.tasks.train.planner import TrainPlanner

    arrays = data()
    ctx = JobContext(job_id=hexid(), params={"model": "logreg", "batch_size": 32, **params}, inputs={}, outputs={},
                     operands=arrays, blob_ids={k: hexid() for k in arrays}, results={}, job_dir=tmp_path)
    return TrainPlanner(ctx)


def spec() -> ProviderSpec:
    return ProviderSpec(hexid(), 1.0, 1 << 30, "cpu", frozenset({"float32"}))


def test_defaults_are_todays_behaviour_and_torchruns_timeout() -> None:
    assert TRAIN_DEFAULTS["min_providers"] == 1 and TRAIN_DEFAULTS["start_timeout"] == START_TIMEOUT_S == 900


@pytest.mark.parametrize("bad", [0, -1, MAX_MIN_PROVIDERS + 1, 2.5, True, "3"])
def test_min_providers_out_of_range_is_refused(bad: object) -> None:
    with pytest.raises(ValidationError, match="min_providers"):
        train_params({"min_providers": bad})


@pytest.mark.parametrize("bad", [-1, float("inf"), float("nan"), "30", 2e9])
def test_start_timeout_out_of_range_is_refused(bad: object) -> None:
    with pytest.raises(ValidationError, match="start_timeout"):
        train_params({"start_timeout": bad})


@pytest.mark.parametrize("sync", ["sync", "async", "local-sgd"])
def test_barrier_holds_with_one_of_two_and_starts_at_two(tmp_path: Path, sync: str) -> None:
    p = planner(tmp_path, min_providers=2, start_timeout=30, sync=sync)
    a, b = spec(), spec()
    assert p.plan([a], 0, 100.0) == []
    assert p.waiting() == "waiting for 2 providers, 1 ready"
    assert p.plan([a], 0, 129.0) == []  # 29 s: not yet timed out
    plans = p.plan([a, b], 0, 129.5)
    assert plans and {x.provider_id for x in plans} == {a.provider_id, b.provider_id}
    assert p.waiting() is None
    assert p.plan([a], len(plans), 1000.0) == []  # once met it stays met: a lost provider does not time it out


def test_barrier_times_out_with_a_clear_error(tmp_path: Path) -> None:
    p = planner(tmp_path, min_providers=3, start_timeout=30)
    a, b = spec(), spec()
    assert p.plan([a], 0, 10.0) == []
    assert p.plan([a, b], 0, 20.0) == []
    assert p.waiting() == "waiting for 3 providers, 2 ready"
    with pytest.raises(WaitTimeout, match=r"^start barrier: needed 3 providers within 30 s, 2 were ready$"):
        p.plan([a, b], 0, 40.0)


def test_zero_timeout_waits_forever(tmp_path: Path) -> None:
    p = planner(tmp_path, min_providers=2, start_timeout=0)
    a = spec()
    assert p.plan([a], 0, 0.0) == [] and p.plan([a], 0, 1e8) == []
    assert p.waiting() == "waiting for 2 providers, 1 ready"


def test_default_starts_with_one_provider(tmp_path: Path) -> None:
    p = planner(tmp_path)
    assert len(p.plan([spec()], 0, 0.0)) == 1 and p.waiting() is None


def train_job(tmp_path: Path, **params: Any) -> Job:
    p = planner(tmp_path, **params)
    return Job(p.job_id, "train", dict(p.p), {}, {}, None, created_at=0.0, planner=p)


def test_state_shows_the_barrier_and_starts_when_the_second_provider_comes(tmp_path: Path) -> None:
    cs = ClusterState(hexid())
    connect(cs, make_info(task_types=("train",)), 0.0)
    job = train_job(tmp_path, min_providers=2, start_timeout=60)
    actions = cs.handle(stimuli.JobAdded(job), 1.0)
    assert not dispatches(actions) and job.state is JobState.RUNNING
    assert job.waiting == "waiting for 2 providers, 1 ready"
    assert not dispatches(cs.handle(stimuli.Tick(), 2.0)) and job.waiting == "waiting for 2 providers, 1 ready"
    actions = connect(cs, make_info(task_types=("train",)), 3.0)
    assert len({d.provider_id for d in dispatches(actions)}) == 2
    assert job.waiting is None


def test_a_tick_alone_fails_the_job_at_its_start_timeout(tmp_path: Path) -> None:
    cs = ClusterState(hexid())
    info = make_info(task_types=("train",))
    connect(cs, info, 0.0)
    job = train_job(tmp_path, min_providers=2, start_timeout=30)
    cs.handle(stimuli.JobAdded(job), 1.0)
    for t in range(2, 31, 2):  # the provider stays alive; nothing else happens but ticks
        cs.handle(stimuli.HeartbeatReceived(info.provider_id), float(t))
        assert not any(isinstance(a, JobFailed) for a in cs.handle(stimuli.Tick(), t + 0.5))
    assert job.waiting == "waiting for 2 providers, 1 ready"
    actions = cs.handle(stimuli.Tick(), 31.0)
    failed = [a for a in actions if isinstance(a, JobFailed)]
    assert failed and failed[0].error == "start barrier: needed 2 providers within 30 s, 1 was ready"
    assert job.state is JobState.FAILED and job.error == failed[0].error


def test_the_timeout_fires_when_every_provider_is_gone_too(tmp_path: Path) -> None:
    cs = ClusterState(hexid())
    connect(cs, make_info(task_types=("train",)), 0.0)  # never heard from again: lost after 15 s
    job = train_job(tmp_path, min_providers=2, start_timeout=30)
    cs.handle(stimuli.JobAdded(job), 1.0)
    cs.handle(stimuli.Tick(), 20.0)
    assert job.state is JobState.RUNNING and job.waiting == "waiting for providers: none is connected"
    cs.handle(stimuli.Tick(), 31.0)
    assert job.state is JobState.FAILED
    assert job.error == "start barrier: needed 2 providers within 30 s, 0 were ready"


def test_the_client_refuses_a_barrier_above_nodes_before_it_uploads() -> None:
    from user_client import Client

    class Nothing:  # not even a dataset: the check comes first, and no request is made (no head there)
        pass

    with Client("http://127.0.0.1:9") as c, pytest.raises(ValidationError, match="min_providers 3 is more than nodes"):
        c.submit_train(Nothing(), nodes=2, min_providers=3)
