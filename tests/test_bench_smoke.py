"""Smoke test of the benchmark suite: ``python -m bench --quick`` runs and reports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKLOADS = ("W1a", "W1b", "W3a", "W3b", "W4", "W2", "W5", "async")


@pytest.mark.slow
@pytest.mark.timeout(110)
def test_bench_quick_runs_and_reports_every_workload() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    out = proc.stdout
    rows = [line for line in out.splitlines() if line.startswith(WORKLOADS)]
    for workload in WORKLOADS:
        assert any(row.startswith(f"{workload} ") for row in rows), f"no {workload} row:\n{out}"
    header = next(line for line in out.splitlines() if line.startswith("workload"))
    for column in ("actorflow", "plain loop", "raw pykka", "dask", "target", "result"):
        assert column in header
    assert not [row for row in rows if "ERROR" in row], out
