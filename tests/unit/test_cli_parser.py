"""The ``dcf`` parser and its text output, in process (issue 11: options anywhere, units, training)."""

from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path

import pytest

from common import config
from common.errors import ConfigError
from user_client import cli
from user_client.paths import check_output


def parse(*argv: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(argv)


@pytest.mark.parametrize("argv", [
    ("--json", "--head", "h:1", "status", "J"), ("status", "J", "--json", "--head", "h:1"),
    ("--json", "status", "--head", "h:1", "J"), ("--head", "h:1", "status", "J", "--json"),
])
def test_shared_options_before_or_after_the_command(argv: tuple[str, ...]) -> None:
    args = parse(*argv)
    assert args.json is True and args.head_url == "h:1" and args.job_id == "J"
    assert config.ClientSettings.from_namespace(args, env={}).head_url == "http://h:1"


def test_a_shared_option_before_the_command_is_not_reset_by_the_command() -> None:
    args = parse("--queue-wait", "5", "--token", "t", "submit", "matmul", "--size", "2")
    assert args.queue_wait == "5" and args.api_token == "t" and args.json is False
    args = parse("submit", "--json", "matmul", "--size", "2", "--reconnect-wait", "0")
    assert args.json is True and args.reconnect_wait == "0"
    settings = config.ClientSettings.from_namespace(args, env={})
    assert settings.reconnect_wait == 0.0 and settings.queue_wait == 60.0


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 0
    assert "usage: dcf" in capsys.readouterr().out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"dcf {cli.version()}"


def view(**over: object) -> dict[str, object]:
    base: dict[str, object] = {"job_id": "j1", "type": "matmul", "state": "running",
                               "progress": {"done": 3, "total": 8}, "shares": {}}
    return {**base, **over}


def test_status_text_names_the_unit_of_progress() -> None:
    assert "3/8 subtasks" in cli.status_text(view())
    assert "3/8 rows" in cli.status_text(view(progress={"done": 3, "total": 8, "unit": "rows"}))


def test_status_text_of_a_training_job() -> None:
    training = {"epoch": 1, "step": 30, "total_steps": 75,
                "last": {"epoch": 2, "step": 30, "loss": 0.25, "accuracy": 0.9, "samples_per_s": 1000.0}}
    v = view(type="train", params={"epochs": 3}, started_at=100.0, finished_at=None,
             stats={"training": training})
    line = cli.training_line(v, now=104.5)
    assert line == "training: epoch 2/3, step 30/75, loss 0.2500, accuracy 0.900, 1000 samples/s, 4.5 s elapsed"
    assert line in cli.status_text(v, now=104.5)
    assert cli.training_line(view(), now=0) == ""  # no metrics yet, or not a training job


def test_byte_bars_show_the_average_rate_and_none_for_a_single_piece(monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    bars = cli.Bars(enabled=True)
    bars.bytes("upload")(10, 100)
    bars.bytes("download")(100, 100)  # all at once: a rate would be bytes over no time
    assert bars.bars["upload"].smoothing == 0
    assert bars.bars["download"].bar_format == cli.NO_RATE
    assert bars.bars["upload"].bar_format is None
    bars.close()
    shown = [part for line in err.getvalue().splitlines() for part in line.split("\r") if "download" in part]
    assert shown and not any("/s" in part for part in shown), shown


def test_check_output(tmp_path: Path) -> None:
    assert check_output(tmp_path / "C.txt") == tmp_path / "C.txt"
    assert not (tmp_path / "C.txt").exists()  # the check leaves nothing behind
    (tmp_path / "kept.npy").write_bytes(b"x")
    check_output(tmp_path / "kept.npy")
    assert (tmp_path / "kept.npy").read_bytes() == b"x"  # an existing file is not truncated
    with pytest.raises(ConfigError, match="no such directory"):
        check_output(tmp_path / "missing" / "C.npy")
    with pytest.raises(ConfigError, match="is a directory"):
        check_output(tmp_path)
    with pytest.raises(ConfigError, match="cannot write"):
        check_output("/proc/dcf-C.npy")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ConfigError, match="cannot write"):
            check_output(locked / "C.npy")
