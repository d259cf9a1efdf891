"""The README's Python snippets, run as written against a real head: loading a trained ``model.pt``
in plain PyTorch, and following ``dcf.events`` with pika (RabbitMQ)."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest

if TYPE_CHECKING:
    import torch
else:
    torch = pytest.importorskip("torch")
pytest.importorskip("sklearn")
pytest.importorskip("pika")

from common.tasks.train import datasets  # noqa: E402
from tests.conftest import ROOT  # noqa: E402
from user_client import Client  # noqa: E402
from user_client.local import LocalCluster  # noqa: E402

pytestmark = pytest.mark.integration

README = (ROOT / "README.md").read_text()


def snippet(marker: str) -> str:
    """The README's one ```python block that contains ``marker``."""
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README, re.S) if marker in b]
    assert len(blocks) == 1, f"expected one README python block with {marker!r}, found {len(blocks)}"
    return blocks[0]


def test_loading_a_trained_model_in_plain_pytorch(tmp_path: Path) -> None:
    data = datasets.digits(0)
    with LocalCluster(2, heartbeat=0.5, threads=1) as cl, Client(cl.url) as c:
        meta = c.train(data, tmp_path / "model.pt", timeout=300, epochs=1, model="logreg", lr=0.1, seed=3)
        x = data.x_test[:50]
        served = np.asarray(c.predict(tmp_path / "model.pt", x))
    code = snippet("build_model")
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the snippet opens model.json and model.pt by their plain names
    try:
        scope: dict[str, object] = {}
        exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 (the README's own code)
    finally:
        os.chdir(cwd)
    net = scope["net"]
    assert isinstance(net, torch.nn.Module) and not net.training
    with torch.no_grad():
        mine = net(torch.from_numpy(x)).argmax(1).numpy()
    np.testing.assert_array_equal(mine, served)  # the same model the cluster predicts with
    assert meta["metrics"]["test_accuracy"] > 0.5


def _lines(proc: subprocess.Popen[str], out: queue.Queue[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        out.put(line)


def test_following_dcf_events_with_pika(amqp_url: str) -> None:
    code = snippet("dcf.events").replace("amqp://guest:guest@127.0.0.1:5672/", amqp_url)
    code = code.replace("inactivity_timeout=60", "inactivity_timeout=20")
    lines: queue.Queue[str] = queue.Queue()
    with LocalCluster(1, heartbeat=0.5, threads=1, amqp_url=amqp_url) as cl, Client(cl.url) as c:
        reader = subprocess.Popen([sys.executable, "-u", "-c", code], stdout=subprocess.PIPE, text=True)
        threading.Thread(target=_lines, args=(reader, lines), daemon=True).start()
        try:
            submitted: set[str] = set()
            seen: list[str] = []
            for _ in range(40):  # until the reader, once bound, prints one of our jobs' job.done
                job = c.submit_matmul(np.eye(3), np.ones((3, 3)))
                submitted.add(job)
                c.wait(job, timeout=60)
                try:
                    while True:
                        seen.append(lines.get(timeout=0.5))
                except queue.Empty:
                    pass
                if any(line.startswith("job.done") and any(j in line for j in submitted) for line in seen):
                    break
            assert any(line.startswith("job.done") and any(j in line for j in submitted) for line in seen), seen
        finally:
            reader.terminate()
            reader.wait(timeout=10)
