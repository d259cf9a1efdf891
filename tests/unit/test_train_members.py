"""Who can join an allreduce group (common/tasks/train/members.py), the planner leaving out a provider its
model does not fit, and the refusal at submission of a job no ready provider can join
(``TrainTask.cannot_start``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.protocol import LocalData
from common.tasks import ArrayMeta, ProviderSpec, get
from common.tasks.train.members import joinable, member_bytes, refusal
from tests.unit.test_allreduce_planner import planner, rounds
from tests.unit.test_state import hexid

torch = pytest.importorskip("torch")

X = {"x": ArrayMeta("float32", (1000, 64)), "y": ArrayMeta("int64", (1000,)),
     "x_test": ArrayMeta("float32", (100, 64)), "y_test": ArrayMeta("int64", (100,))}
ALLREDUCE = {"model": "logreg", "sync": "allreduce", "batch_size": 32}
LOGREG_BYTES = member_bytes(64 * 2 + 2, "sgd", 0.0)  # 64 features, 2 classes at least, plain SGD


def spec(collectives: tuple[str, ...] = ("gloo",), memory: int = 1 << 30, kind: str = "cpu",
         datasets: tuple[LocalData, ...] = ()) -> ProviderSpec:
    return ProviderSpec(hexid(), 1.0, memory, kind, frozenset({"float32"}), datasets, frozenset(collectives))


def test_member_bytes_counts_the_model_sized_vectors_of_each_optimizer() -> None:
    assert member_bytes(1000, "sgd", 0.0) == 4 * 1000 * 3  # parameters, gradients, the state handed over
    assert member_bytes(1000, "sgd", 0.9) == 4 * 1000 * 4  # + the momentum buffer
    assert member_bytes(1000, "adam", 0.0) == 4 * 1000 * 5  # + two moments


def test_joinable_names_who_lacks_gloo_and_who_lacks_memory() -> None:
    able, lacking, small = spec(), spec(collectives=()), spec(memory=1000)
    members, why = joinable([able, lacking, small], 4000)
    assert members == [able]
    assert why[0] == f"torch.distributed is unavailable on {lacking.provider_id[:8]}"
    assert why[1].startswith(f"{small.provider_id[:8]} offers 0.0 MB of memory and the model needs at least "
                             "0.0 MB on each member")


def test_an_all_cuda_nccl_group_does_not_need_gloo() -> None:
    gpus = [spec(("nccl",), kind="cuda") for _ in range(2)]
    assert joinable(gpus, 0) == (gpus, [])
    cpu = spec()
    members, why = joinable([*gpus, cpu], 0)  # mixed devices meet on gloo, which these GPUs lack
    assert members == [cpu] and why == [f"torch.distributed is unavailable on {gpus[0].provider_id[:8]}, "
                                        f"{gpus[1].provider_id[:8]}"]


def test_refused_only_when_the_providers_there_are_the_cause() -> None:
    able, lacking = spec(), spec(collectives=())
    assert refusal([], 0, 1) is None  # nobody ready: the job waits
    assert refusal([able], 0, 3) is None  # too few: it waits for more
    assert refusal([able, lacking], 0, 1) is None  # one can: the other is left out
    why = refusal([lacking], 0, 1)
    assert why == ("an allreduce job needs 1 provider that can join its torch.distributed group; 1 ready, 0 can: "
                   f"torch.distributed is unavailable on {lacking.provider_id[:8]}")
    assert refusal([able, lacking], 0, 2) is not None  # two are there, only one can join
    assert refusal([able, lacking], 0, 3) is None  # three are needed: it waits for a third


def test_a_shard_held_only_by_providers_that_cannot_join_is_refused() -> None:
    from common.tasks.train.shards import Shards

    a = LocalData("d", "a" * 32, 50, 10, (4,), (0, 1))
    b = LocalData("d", "b" * 32, 50, 10, (4,), (0, 1))
    holder_a, holder_b = spec(datasets=(a,)), spec(collectives=(), datasets=(b,))
    shards = Shards.found("d", [holder_a, holder_b])
    assert shards is not None
    why = refusal([holder_a, holder_b], 0, 1, shards)
    assert why == (f"shard bbbbbbbb of dataset provider:d is held only by providers that cannot join an allreduce "
                   f"group: torch.distributed is unavailable on {holder_b.provider_id[:8]}")
    replica = spec(datasets=(b,))
    assert refusal([holder_a, holder_b, replica], 0, 1, shards) is None


def test_cannot_start_sizes_the_model_and_refuses_a_job_no_provider_can_hold() -> None:
    train = get("train")
    assert train.cannot_start(ALLREDUCE, X, [spec(memory=LOGREG_BYTES - 1)]) is not None
    assert train.cannot_start(ALLREDUCE, X, [spec(memory=LOGREG_BYTES)]) is None
    big = {**ALLREDUCE, "model": "mlp", "model_args": {"hidden": [4096]}, "optimizer": "adam"}
    need = member_bytes(64 * 4096 + 4096 + 4096 * 2 + 2, "adam", 0.0)
    why = train.cannot_start(big, X, [spec(memory=100_000_000), spec(memory=1_000_000)])
    assert why is None  # the first can hold it
    why = train.cannot_start(big, X, [spec(memory=1_000_000)])
    assert why is not None and f"needs at least {need / 1e6:,.1f} MB on each member" in why
    assert train.cannot_start({**ALLREDUCE, "sync": "sync"}, X, [spec(collectives=())]) is None  # no group


def test_cannot_start_on_provider_data_looks_only_at_its_holders() -> None:
    train = get("train")
    shard = LocalData("digits", "c" * 32, 700, 175, (64,), (0, 9))
    local = {**ALLREDUCE, "dataset": "provider:digits"}
    holder = spec(collectives=(), datasets=(shard,))
    assert train.cannot_start(local, {}, [spec()]) is None  # nobody holds it: the job waits for a holder
    why = train.cannot_start(local, {}, [spec(), holder])
    assert why is not None and f"torch.distributed is unavailable on {holder.provider_id[:8]}" in why


def test_the_planner_leaves_out_a_provider_the_model_does_not_fit(tmp_path: Path) -> None:
    p = planner(tmp_path)
    small, roomy = spec(memory=p.member_bytes - 1), spec()
    assert p.plan([small], 0, 0.0) == []
    assert f"{small.provider_id[:8]} offers" in (p.waiting() or "")
    first = rounds(p.plan([small, roomy], 0, 1.0))[0]
    assert [s.provider_id for s in first] == [roomy.provider_id] and p.waiting() is None
    assert np.isclose(p.member_bytes, 4 * p.n_params * 3)
