"""``--verify-rate`` end to end: a real head (``--verify-rate 1``), two honest providers and one that lies about
gradients and predictions (``--plugins tests.plugins.grad_liar`` on it alone). The liar is outvoted by the two
honest providers and quarantined, its work is redone by them, and the job's result is the honest one: the trained
parameters match single-process PyTorch, the predictions match the model's."""

from __future__ import annotations

import json
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

from common.tasks.train import datasets, models  # noqa: E402
from tests.integration.test_training import PARAMS, max_diff, reference  # noqa: E402
from user_client import Client  # noqa: E402
from user_client.local import LocalCluster  # noqa: E402

pytestmark = pytest.mark.integration

DIGITS = datasets.digits(0)
LIAR = ["--plugins", "tests.plugins.grad_liar"]


def node(client: Client, name: str) -> dict[str, Any]:
    return next(n for n in client.nodes() if n["name"] == name)


def events(client: Client, job: str, kind: str) -> list[dict[str, Any]]:
    return [e for e in client._json_list("GET", f"/v1/jobs/{job}/events") if e["kind"] == kind]


def honest_predictions(model: Path, x: np.ndarray) -> np.ndarray:
    meta = json.loads(model.with_suffix(".json").read_text())
    net = models.build_model(meta["model"], meta["input_shape"], meta["classes"], meta["model_args"])
    net.load_state_dict(torch.load(model, weights_only=True))
    with torch.no_grad():
        return net(torch.from_numpy(x)).argmax(1).numpy()


@pytest.mark.parametrize("mode", ["perturb", "nan", "wrong"])
def test_a_lying_provider_is_outvoted_quarantined_and_the_results_are_the_honest_ones(tmp_path: Path,
                                                                                      mode: str) -> None:
    ref = reference(DIGITS, 1)
    with LocalCluster(2, heartbeat=0.5, threads=1, env={"DCF_TEST_GRAD_LIAR": mode},
                      head_args=["--verify-rate", "1"]) as cl, Client(cl.url) as c:
        cl.add_provider(*LIAR)  # local-2
        cl.wait_ready(3)
        liar = node(c, "local-2")["provider_id"]

        job = c.submit_train(DIGITS, epochs=1, sync="sync", min_providers=3, **PARAMS)
        view = c.wait(job, timeout=120)
        c.save_model(job, tmp_path / "model.pt")
        caught = node(c, "local-2")
        quarantined = events(c, job, "node.quarantined")
        assert view["state"] == "done", view
        assert max_diff(tmp_path / "model.pt", ref) < 1e-5  # every gradient merged was the honest one
        assert caught["state"] == "quarantined" and caught["quarantined"].startswith(f"outvoted for job {job[:8]}")
        assert [e["provider_id"] for e in quarantined] == [liar]
        assert events(c, job, "job.disagreement")
        verify = view["stats"]["verify"]
        assert verify["method"] == "replicas" and verify["disagreements"] >= 1
        assert verify["verified"] == verify["selected"] >= 22  # every gradient subtask of the 22 steps
        assert "local-2" not in view["shares"]  # none of its results was merged

        c.clear_quarantine(liar)  # trusted again: it lies about predictions now
        x = DIGITS.x_test
        predicted = c.wait(c.submit_predict(tmp_path / "model.pt", x), timeout=60)
        assert predicted["state"] == "done", predicted
        np.testing.assert_array_equal(c.result(predicted["job_id"]), honest_predictions(tmp_path / "model.pt", x))
        assert node(c, "local-2")["state"] == "quarantined"
        assert predicted["stats"]["verify"]["verified"] == predicted["stats"]["verify"]["selected"] == 3
        head_log = (cl.log_dir / "head.log").read_text()
    outvoted = [line for line in head_log.splitlines() if "provider quarantined" in line and "outvoted" in line]
    assert len(outvoted) == 2 and all(f"provider_id={liar}" in line for line in outvoted), head_log[-3000:]
    assert "results disagree (--verify-rate)" in head_log


def test_a_restarted_head_verifies_anew_and_training_stays_exact(tmp_path: Path) -> None:
    """The held results are memory only: after a head kill -9 the job resumes from its checkpoint and the subtasks
    planned again are selected and verified anew; the parameters still match single-process PyTorch."""
    ref = reference(DIGITS, 1)
    with LocalCluster(2, heartbeat=0.3, threads=1, provider_args=["--delay", "0.03"],
                      head_args=["--verify-rate", "1"]) as cl, Client(cl.url) as c:
        job = c.submit_train(DIGITS, epochs=1, checkpoint_every=4, **PARAMS)
        deadline = time.monotonic() + 60
        while c.status(job)["progress"]["done"] < 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        cl.kill_head()
        cl.start_head()
        cl.wait_ready(2)
        view = c.wait(job, timeout=120)
        meta = c.save_model(job, tmp_path / "model.pt")
    assert view["state"] == "done" and meta["steps"] == 22
    assert max_diff(tmp_path / "model.pt", ref) < 1e-5
    verify = view["stats"]["verify"]  # what the restarted head planned: every one verified, none disagreeing
    assert verify["verified"] == verify["selected"] > 0 and verify["disagreements"] == 0
