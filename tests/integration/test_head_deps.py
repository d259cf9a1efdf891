"""A head without an optional dependency says so in one line (issue 11 item 12): a train job sent to a
head that cannot import torch is refused at once with "the train task needs torch on the head: pip install
'dcf[torch]'", and the head logs one line, no traceback. torch is blocked in the head's process only, by a
meta path finder installed from a sitecustomize on its PYTHONPATH (nothing is uninstalled)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("sklearn")

from common.errors import ValidationError  # noqa: E402
from common.tasks.train import datasets  # noqa: E402
from tests.conftest import run_cli  # noqa: E402
from user_client import Client  # noqa: E402
from user_client.local import LocalCluster  # noqa: E402

pytestmark = pytest.mark.integration

BLOCKER = '''
import sys


class NoTorch:
    """Any import of torch fails, as on a machine where it is not installed."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NoTorch())
'''


def test_a_train_job_on_a_head_without_torch_is_one_clear_error(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join([str(site), root, os.environ.get("PYTHONPATH", "")])
    with LocalCluster(0, env={"PYTHONPATH": path}) as cl, Client(cl.url) as c:
        with pytest.raises(ValidationError) as err:
            c.submit_train(datasets.digits(0), epochs=1, model="mlp", batch_size=32)
        assert err.value.message == "the train task needs torch on the head: pip install 'dcf[torch]'"
        assert c.jobs() == []  # refused, not accepted and failed later
        cli = run_cli("submit", "train", "--dataset", "digits", "--epochs", "1", "-o", str(tmp_path / "m.pt"),
                      url=cl.url)
        assert cli.returncode == 2, cli.stderr  # the CLI: the same one line, exit 2
        assert cli.stderr.strip() == "dcf: error: the train task needs torch on the head: pip install 'dcf[torch]'"
        log = (cl.log_dir / "head.log").read_text(errors="replace")
    warned = [line for line in log.splitlines() if "needs torch" in line and "WARNING" in line]
    assert len(warned) == 2 and "pip install 'dcf[torch]'" in warned[0]  # the operator hears of it once
    assert "Traceback" not in log


def test_needs_on_head_names_the_module_and_the_extra() -> None:
    from common import tasks
    from head_node.lifecycle import needs_on_head

    train = tasks.get("train")
    assert needs_on_head(train, "torch", "ModuleNotFoundError: No module named 'torch'") == (
        "the train task needs torch on the head: pip install 'dcf[torch]'")
    broken = needs_on_head(train, "torch", "OSError: libtorch.so: cannot open shared object file")
    assert broken.startswith("the train task needs torch on the head, and importing it failed: OSError")
