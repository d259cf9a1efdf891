"""An allreduce train job that no ready provider can join is refused at submission (422, exit 2), naming the
providers and why: one without torch.distributed (a real provider process whose torch build says it has no
distributed package), one whose `--memory-limit` is below what the model needs. Once a provider that can
join is ready, the same submission is accepted and trains in a group of it alone (the others may score
the evaluation rounds, which need no group)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

from tests.conftest import run_cli  # noqa: E402
from user_client import Client  # noqa: E402
from user_client.local import LocalCluster  # noqa: E402

pytestmark = pytest.mark.integration

ALLREDUCE = ("--dataset", "digits", "--model", "logreg", "--epochs", "1", "--batch-size", "128", "--sync",
             "allreduce")
#: a provider process whose torch.distributed says it is unavailable (as in torch builds without it)
NO_DISTRIBUTED = ("import runpy, torch.distributed as d; d.is_available = lambda: False; "
                  "runpy.run_module('provider_node', run_name='__main__')")


@pytest.fixture()
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(0, heartbeat=0.5, threads=1) as cl:
        yield cl


def ids(cl: LocalCluster) -> dict[str, str]:
    with Client(cl.url) as c:
        return {n["name"]: n["provider_id"] for n in c.nodes()}


def test_a_job_no_ready_provider_can_join_is_refused_naming_them(cluster: LocalCluster, tmp_path: Path) -> None:
    cluster.add_provider("--memory-limit", "1kB")
    cluster.wait_ready(1)
    out = run_cli("submit", "train", *ALLREDUCE, "--no-wait", url=cluster.url)
    assert out.returncode == 2, out.stdout + out.stderr
    small = ids(cluster)["local-0"][:8]
    assert f"{small} offers 0.0 MB of memory and the model needs at least" in out.stderr

    args = ["-c", NO_DISTRIBUTED, "--head", "127.0.0.1", "--threads", "1", "--name", "local-1", *cluster.port_args()]
    cluster.providers.append(subprocess.Popen([sys.executable, *args], env=cluster.env))
    cluster.wait_ready(2)
    out = run_cli("submit", "train", *ALLREDUCE, "--no-wait", url=cluster.url)
    assert out.returncode == 2, out.stdout + out.stderr
    lacking = ids(cluster)["local-1"][:8]
    assert "1 provider that can join its torch.distributed group; 2 ready, 0 can" in out.stderr
    assert f"torch.distributed is unavailable on {lacking}" in out.stderr and small in out.stderr

    cluster.add_provider()
    cluster.wait_ready(3)
    out = run_cli("--json", "submit", "train", *ALLREDUCE, "-o", str(tmp_path / "m.pt"), url=cluster.url, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    with Client(cluster.url) as c:
        view = c.status(json.loads(out.stdout)["job_id"])
    assert view["state"] == "done"
    group = view["stats"]["training"]["group"]
    assert group["world"] == 1 and group["regroups"] == 0, group  # only the one that can join trained
