"""Training on data that stays on the providers (``dcf-provider --data NAME=PATH.npz``, ``--dataset
provider:NAME``): exact against one process on the concatenation of the shards, no sample bytes at the head,
a shard's provider lost (the job waits for it, says so, and goes on when it is back), bad input."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

if TYPE_CHECKING:
    import torch
else:
    torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")

from common.errors import DcfError  # noqa: E402
from common.tasks.train import datasets, models  # noqa: E402
from tests.integration.test_training import max_diff, reference  # noqa: E402
from user_client import Client  # noqa: E402
from user_client.local import LocalCluster  # noqa: E402

pytestmark = pytest.mark.integration

DIGITS = datasets.digits(0)
PARAMS: dict[str, Any] = {"model": "cnn", "batch_size": 64, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "seed": 11}


def shard_files(tmp: Path, cuts: tuple[int, ...] = (700,)) -> list[Path]:
    """The digits training set cut into shards (each with a share of the test split), one .npz each."""
    bounds = [0, *cuts, len(DIGITS.x_train)]
    tbounds = [b * len(DIGITS.x_test) // len(DIGITS.x_train) for b in bounds]
    paths = []
    for i in range(len(bounds) - 1):
        path = tmp / f"shard{i}.npz"
        np.savez(path, X=DIGITS.x_train[bounds[i]:bounds[i + 1]], y=DIGITS.y_train[bounds[i]:bounds[i + 1]],
                 X_test=DIGITS.x_test[tbounds[i]:tbounds[i + 1]], y_test=DIGITS.y_test[tbounds[i]:tbounds[i + 1]])
        paths.append(path)
    return paths


def concatenation(paths: list[Path]) -> datasets.Dataset:
    """What the job trains on: the shards in content-key order, concatenated."""
    shards = sorted((datasets.from_npz(p.read_bytes(), str(p)) for p in paths), key=lambda d: d.content_hash())
    return datasets.Dataset("concat", np.concatenate([d.x_train for d in shards]),
                            np.concatenate([d.y_train for d in shards]), np.concatenate([d.x_test for d in shards]),
                            np.concatenate([d.y_test for d in shards]), 10)


def test_trains_where_the_data_lives_exactly_and_no_sample_reaches_the_head(tmp_path) -> None:
    paths = shard_files(tmp_path)
    ref = reference(concatenation(paths), 1)
    with LocalCluster(0, heartbeat=0.5, threads=1) as cl, Client(cl.url) as c:
        for p in paths:
            cl.add_provider("--data", f"digits={p}")
        cl.add_provider()  # holds no shard: it gets no work of this job
        cl.wait_ready(3)
        job = c.submit_train("provider:digits", epochs=1, min_providers=2, **PARAMS)
        view = c.wait(job, timeout=300)
        meta = c.save_model(job, tmp_path / "model.pt")
        blobs = [f for f in (cl.state_dir / "blobs").rglob("*") if f.is_file()] \
            if (cl.state_dir / "blobs").exists() else []
    assert max_diff(tmp_path / "model.pt", ref) < 1e-5
    assert meta["steps"] == 22 and 0 <= meta["metrics"]["test_accuracy"] <= 1
    # no sample crossed to the head: nothing was uploaded, and what came back is gradients and metrics only
    assert blobs == []
    n_params = meta["parameters"]
    per_grad, per_eval = 4 * n_params + 24, 24
    stats = view["stats"]
    assert stats["bytes_in"] <= 22 * 2 * per_grad + 2 * per_eval, stats
    assert stats["bytes_in"] % 8 == 0 and stats["bytes_in"] >= 22 * per_grad


def test_allreduce_trains_where_the_data_lives_exactly(tmp_path) -> None:
    """``--sync allreduce`` on provider data: one group member per shard, each computing the part of every
    global batch its shard holds (uneven, step by step); the same parameters as one process on the
    concatenation, and still no sample at the head."""
    paths = shard_files(tmp_path, cuts=(500, 1100))  # 3 shards of unequal size
    ref = reference(concatenation(paths), 1)
    with LocalCluster(0, heartbeat=0.5, threads=1) as cl, Client(cl.url) as c:
        for p in paths:
            cl.add_provider("--data", f"digits={p}")
        cl.wait_ready(3)
        job = c.submit_train("provider:digits", epochs=1, sync="allreduce", min_providers=3, **PARAMS)
        view = c.wait(job, timeout=300)
        c.save_model(job, tmp_path / "model.pt")
        blobs = [f for f in (cl.state_dir / "blobs").rglob("*") if f.is_file()] \
            if (cl.state_dir / "blobs").exists() else []
    assert view["state"] == "done", view
    diff = max_diff(tmp_path / "model.pt", ref)
    print(f"allreduce on 3 provider shards (500, 600, {len(DIGITS.x_train) - 1100} samples): max diff {diff:.2e}")
    assert diff < 1e-5
    assert blobs == []
    assert set(view["shares"]) == {"local-0", "local-1", "local-2"}


def test_a_lost_shard_is_waited_for_and_the_job_goes_on_when_it_is_back(tmp_path) -> None:
    paths = shard_files(tmp_path)
    ref = reference(concatenation(paths), 1)
    with LocalCluster(0, heartbeat=0.3, threads=1) as cl, Client(cl.url) as c:
        cl.add_provider("--data", f"digits={paths[0]}", "--delay", "0.05")
        cl.add_provider("--data", f"digits={paths[1]}", "--delay", "0.05")
        cl.wait_ready(2)
        job = c.submit_train("provider:digits", epochs=1, min_providers=2, **PARAMS)
        deadline = time.monotonic() + 120
        while c.status(job)["progress"]["done"] < 5:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        cl.providers[1].kill()
        waiting = ""
        deadline = time.monotonic() + 60
        while "shard" not in waiting:
            assert time.monotonic() < deadline, f"the job never said it waits for the shard: {c.status(job)}"
            waiting = c.status(job).get("waiting") or ""
            time.sleep(0.1)
        assert "exists nowhere else" in waiting or "memory" not in waiting, waiting
        cl.add_provider("--data", f"digits={paths[1]}")  # the same data is back, on a new provider
        view = c.wait(job, timeout=300)
        c.save_model(job, tmp_path / "model.pt")
    assert view["state"] == "done"
    assert max_diff(tmp_path / "model.pt", ref) < 1e-5


def test_a_dataset_nobody_holds_waits_then_fails_on_time(tmp_path) -> None:
    with LocalCluster(0, heartbeat=0.5, threads=1) as cl, Client(cl.url) as c:
        cl.add_provider("--data", f"digits={shard_files(tmp_path)[0]}")
        cl.wait_ready(1)
        job = c.submit_train("provider:nothing", epochs=1, start_timeout=3, **PARAMS)
        time.sleep(1.0)
        assert "nothing" in (c.status(job).get("waiting") or "")
        with pytest.raises(DcfError, match="nothing"):
            c.wait(job, timeout=60)


def test_shards_that_do_not_fit_together_fail_before_any_step(tmp_path) -> None:
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    np.savez(a, X=np.ones((100, 8), np.float32), y=np.zeros(100, np.int64))
    np.savez(b, X=np.ones((100, 6), np.float32), y=np.zeros(100, np.int64))
    with LocalCluster(0, heartbeat=0.5, threads=1) as cl, Client(cl.url) as c:
        cl.add_provider("--data", f"odd={a}")
        cl.add_provider("--data", f"odd={b}")
        cl.wait_ready(2)
        job = c.submit_train("provider:odd", epochs=1, min_providers=2, **{**PARAMS, "model": "logreg",
                                                                           "batch_size": 10})
        with pytest.raises(DcfError, match="different feature shapes"):
            c.wait(job, timeout=60)
        assert c.status(job)["progress"]["done"] == 0


def test_a_provider_with_a_bad_data_file_stops_with_one_line(tmp_path) -> None:
    import subprocess
    import sys

    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    out = subprocess.run([sys.executable, "-m", "provider_node", "--data", f"x={bad}", "--head", "127.0.0.1",
                          "--registration-port", "9"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "--data x" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_model_file_of_provider_data_loads_in_plain_torch(tmp_path) -> None:
    """(shape and class count come from the shards' metadata, not from samples)"""
    paths = shard_files(tmp_path)
    with LocalCluster(0, heartbeat=0.5, threads=1) as cl, Client(cl.url) as c:
        cl.add_provider("--data", f"digits={paths[0]},other={paths[1]}")
        cl.wait_ready(1)
        meta = c.train("provider:digits", tmp_path / "m.pt", timeout=300, epochs=1, **PARAMS)
    net = models.build_model("cnn", meta["input_shape"], meta["classes"], meta["model_args"])
    net.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    assert meta["input_shape"] == [1, 8, 8] and meta["classes"] == 10
