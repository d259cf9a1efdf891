"""Smoke test of bench/scale.py: a real head and 5 simulated providers speaking the wire protocol,
for a few seconds. It checks that the bench runs to the end and reports every figure; it asserts
no timing (the figures depend on the machine)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
RESULT_KEYS = {"n", "procs", "registration_s", "idle_cpu_pct", "head_cpu_pct", "heartbeats", "heartbeats_per_s",
               "us_per_heartbeat", "t1_s", "tn_s", "head_t1_s", "head_tn_s", "overhead_ms_per_subtask",
               "providers_used", "head_cpu_split_pct", "errors"}


def test_scale_bench_quick_run_reports_every_figure() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "scale.py"), "--quick", "--sizes", "5"],
                          capture_output=True, text=True, timeout=150, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, proc.stdout
    report = json.loads(lines[-1])
    assert report["bench"] == "scale" and report["sizes"] == [5]
    assert set(report) >= {"heartbeat_s", "duration_s", "repeats", "results", "growth", "targets"}
    assert set(report["targets"]) == {"cpu_500_at_1s_le_10pct", "overhead_100_le_1ms_per_subtask"}
    (row,) = report["results"]
    assert set(row) >= RESULT_KEYS
    assert row["n"] == 5
    # every provider registered, heartbeated and computed a share of the job over 5 providers
    assert row["registration_s"] is not None and row["heartbeats"] > 0
    assert row["t1_s"] is not None and row["tn_s"] is not None and row["providers_used"] == 5
    assert "head CPU %" in proc.stdout  # the table's header
