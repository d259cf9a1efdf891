"""``--sync allreduce`` end to end: the providers train as one torch.distributed (gloo) process group.

Exactness against single-process PyTorch (1, 2 and 3 providers of different speeds; adam with a cosine
schedule, whose state and learning rates cross rounds), a provider killed mid-epoch, the head killed and
resumed from its checkpoint, and bad parameters."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import torch
else:
    torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from common.errors import ValidationError  # noqa: E402
from common.tasks.train import datasets, models  # noqa: E402
from common.tasks.train.planner import epoch_order  # noqa: E402
from tests.integration.test_training import max_diff, reference  # noqa: E402
from user_client import Client  # noqa: E402
from user_client.local import LocalCluster  # noqa: E402

pytestmark = pytest.mark.integration

DIGITS = datasets.digits(0)
PARAMS: dict[str, Any] = {"model": "cnn", "batch_size": 64, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "seed": 11,
                          "sync": "allreduce", "round_steps": 5}


@pytest.fixture(scope="module")
def ref_one_epoch() -> dict[str, torch.Tensor]:
    return reference(DIGITS, 1)


def progress(c: Client, job: str) -> int:
    return int(c.status(job)["progress"]["done"])


def wait_steps(c: Client, job: str, steps: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while progress(c, job) < steps:
        assert time.monotonic() < deadline, f"job {job} did not reach step {steps}"
        time.sleep(0.05)


@pytest.mark.parametrize("providers", [1, 2, 3])
def test_allreduce_matches_single_process(tmp_path, ref_one_epoch, providers: int) -> None:
    with LocalCluster(0, heartbeat=0.5, threads=1) as cl, Client(cl.url) as c:
        for i in range(providers):
            cl.add_provider(*(["--delay", "0.02"] if i == 1 else []))  # one slower member
        cl.wait_ready(providers)
        job = c.submit_train(DIGITS, epochs=1, min_providers=providers, **PARAMS)
        view = c.wait(job, timeout=300)
        meta = c.save_model(job, tmp_path / "model.pt")
    assert max_diff(tmp_path / "model.pt", ref_one_epoch) < 1e-5
    group = view["stats"]["training"]["group"]
    assert meta["steps"] == 22 and group["world"] >= 1
    assert 0 <= meta["metrics"]["test_accuracy"] <= 1


def reference_adam_cosine(ds: datasets.Dataset, epochs: int, lr: float, seed: int, batch: int) -> dict:
    torch.set_num_threads(1)
    net = models.build_model("mlp", ds.input_shape, ds.n_classes, {"hidden": [32]}, seed=seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    steps = epochs * (len(ds.x_train) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    x, y = torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train)
    for epoch in range(epochs):
        order = torch.from_numpy(epoch_order(seed, epoch, len(x)).copy())
        for s in range(len(x) // batch):
            idx = order[s * batch:(s + 1) * batch]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
    return net.state_dict()


def test_allreduce_carries_adam_state_and_a_cosine_schedule_across_rounds(tmp_path) -> None:
    ref = reference_adam_cosine(DIGITS, 2, 0.01, 5, 100)
    with LocalCluster(2, heartbeat=0.5, threads=1) as cl, Client(cl.url) as c:
        meta = c.train(DIGITS, tmp_path / "m.pt", timeout=300, epochs=2, model="mlp", model_args={"hidden": [32]},
                       optimizer="adam", lr=0.01, schedule="cosine", seed=5, batch_size=100, sync="allreduce",
                       round_steps=3, min_providers=2)
    assert meta["steps"] == 28
    assert max_diff(tmp_path / "m.pt", ref) < 1e-5


def test_allreduce_exact_when_a_provider_is_killed_mid_epoch(tmp_path, ref_one_epoch) -> None:
    with LocalCluster(3, heartbeat=0.3, threads=1, provider_args=["--delay", "0.05"]) as cl, Client(cl.url) as c:
        job = c.submit_train(DIGITS, epochs=1, min_providers=3, **{**PARAMS, "round_steps": 2})
        wait_steps(c, job, 6)
        cl.providers[1].kill()  # kill -9 while the group runs a round
        view = c.wait(job, timeout=300)
        c.save_model(job, tmp_path / "model.pt")
    assert view["state"] == "done"
    assert max_diff(tmp_path / "model.pt", ref_one_epoch) < 1e-5
    group = view["stats"]["training"]["group"]
    assert group["world"] == 2 and group["generation"] >= 2, group


def test_allreduce_resumes_after_a_head_kill(tmp_path) -> None:
    ref = reference(DIGITS, 2)
    with LocalCluster(2, heartbeat=0.3, threads=1, provider_args=["--delay", "0.03"]) as cl, Client(cl.url) as c:
        job = c.submit_train(DIGITS, epochs=2, checkpoint_every=5, **{**PARAMS, "round_steps": 5})
        wait_steps(c, job, 12)
        cl.kill_head()
        assert (cl.state_dir / "jobs" / job / "checkpoint.pt").exists()
        cl.start_head()
        cl.wait_ready(2)
        view = c.wait(job, timeout=300)
        meta = c.save_model(job, tmp_path / "model.pt")
    assert view["state"] == "done" and meta["steps"] == 44
    assert max_diff(tmp_path / "model.pt", ref) < 1e-5


@pytest.mark.parametrize("params,match", [
    ({"round_steps": 0}, "round_steps"),
    ({"collective_timeout": 0}, "collective_timeout"),
    ({"collective_timeout": "soon"}, "collective_timeout"),
])
def test_bad_allreduce_parameters_are_refused(params, match) -> None:
    with LocalCluster(0) as cl, Client(cl.url) as c, pytest.raises(ValidationError, match=match):
        c.submit_train(DIGITS, epochs=1, **{**PARAMS, **params})
