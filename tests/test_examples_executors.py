"""The executor examples run as tests: io_vs_cpu (threads vs processes) and cpu_fanout.

Each example runs as a script with this interpreter (exit code, no traceback, key
lines, the example's own verdicts), and is imported as a module of its own so that
a test can run its flows on small inputs and compare them with plain sequential
calls of the same tasks (a task called outside a flow is a plain call). Timings
are printed by the examples, never asserted: the machine may be loaded.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
LOGHUB = ROOT / ".." / "shared" / "data" / "loghub"


def _import_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` as a fresh module (not registered in sys.modules)."""
    spec = importlib.util.spec_from_file_location(
        f"actorflow_example_{name}", EXAMPLES / f"{name}.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_script(name: str) -> str:
    """Run ``examples/<name>.py`` with this interpreter; assert it succeeds; return stdout."""
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"{name}.py exited with {proc.returncode}:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    assert "Traceback" not in proc.stdout
    return proc.stdout


def _number(pattern: str, text: str) -> float:
    """The number captured by ``pattern``'s first group in ``text``."""
    match = re.search(pattern, text)
    assert match is not None, f"no match for {pattern!r} in:\n{text}"
    return float(match.group(1))


# --- cpu_fanout ---------------------------------------------------------------------------


@pytest.fixture
def cpu_fanout() -> ModuleType:
    """The cpu_fanout example, imported afresh (tests shrink its chunks before tracing)."""
    return _import_example("cpu_fanout")


@pytest.mark.slow
def test_cpu_fanout_script_prints_both_times_the_speedup_and_identical_results() -> None:
    out = _run_script("cpu_fanout")
    assert "CPU-bound fan-out: 8 chunks of 30,000 Collatz sequences" in out
    sequential_s = _number(r"sequential \(plain calls, 1 process\): +([0-9.]+) s", out)
    parallel_s = _number(r"executor='process', processes=2: +([0-9.]+) s", out)
    speedup = _number(r"speedup: ([0-9.]+)x", out)
    assert sequential_s > 0
    assert parallel_s > 0
    assert speedup > 0  # printed, never asserted against a minimum: the machine may be busy
    assert "results identical: True" in out
    assert re.search(r"crunch ran in [12] worker process\(es\) .*: True", out)
    assert "total Collatz steps: " in out


def test_cpu_fanout_flow_on_processes_matches_sequential_calls(cpu_fanout: ModuleType) -> None:
    cpu_fanout.CHUNK_SIZE = 500  # read when the flow is first traced: a quick run
    expected = cpu_fanout.run_sequentially()
    result, pids = cpu_fanout.run_on_processes(2)
    assert result == expected
    assert [c["range"] for c in result["chunks"]] == cpu_fanout.split(8, 500)
    assert result["total_steps"] == sum(c["total_steps"] for c in expected["chunks"])
    assert 1 <= len(pids) <= 2  # the run's pool: processes=2
    assert os.getpid() not in pids


def test_cpu_fanout_flow_is_a_static_fan_out_of_process_nodes(cpu_fanout: ModuleType) -> None:
    graph = cpu_fanout.fanout.graph
    crunches = [n for n in graph.nodes if n.task is cpu_fanout.crunch]
    assert [n.name for n in crunches] == ["crunch"] + [f"crunch_{i}" for i in range(2, 9)]
    assert all(n.task.executor == "process" for n in crunches)
    assert {(n.name, "combine") for n in crunches} <= set(graph.edges)


def test_crunch_counts_collatz_steps() -> None:
    mod = _import_example("cpu_fanout")
    # 1 -> 0 steps, 2 -> 1, 3 -> 7 (3 10 5 16 8 4 2 1), 4 -> 2, 5 -> 5, 6 -> 8
    assert mod.crunch(1, 7) == {"range": (1, 7), "total_steps": 23, "longest": (6, 8)}


# --- io_vs_cpu ----------------------------------------------------------------------------


@pytest.fixture
def io_vs_cpu() -> ModuleType:
    """The io_vs_cpu example, imported afresh."""
    return _import_example("io_vs_cpu")


def test_io_vs_cpu_script_compares_executors_and_prints_the_monitor_summary() -> None:
    out = _run_script("io_vs_cpu")
    if (LOGHUB / "Apache_2k.log").exists():
        assert "IO vs CPU over 8 loghub logs" in out
        assert "16 steps over 8 logs, 16,000 lines" in out
    else:
        assert "IO vs CPU over 4 generated logs" in out
        assert "8 steps over 4 logs, 8,000 lines" in out
    steps = re.findall(
        r"^(fetch_log|score_log) +(thread|process) +\S+ +(parent|worker \d+) ", out, re.M
    )
    assert steps
    assert {(name, executor) for name, executor, _ in steps} == {
        ("fetch_log", "thread"),
        ("score_log", "process"),
    }
    assert all(where == "parent" for name, _, where in steps if name == "fetch_log")
    assert all(where.startswith("worker ") for name, _, where in steps if name == "score_log")
    assert "IO steps in the parent: True; CPU steps outside the parent: True" in out
    step_sum = _number(r"sum of the step times: +([0-9.]+) s", out)
    elapsed = _number(r"elapsed: +([0-9.]+) s", out)
    assert step_sum > 0
    assert elapsed > 0
    assert "ResourceMonitor summary:" in out
    assert _number(r"peak RSS ([0-9.]+) MB", out) > 0
    assert _number(r"CPU ([0-9.]+)% average", out) >= 0
    assert _number(r"max child processes (\d+)", out) >= 1  # the worker processes, at least


def _without_steps(score: dict[str, Any]) -> dict[str, Any]:
    """A score without its timing records (where and how long: they differ run to run)."""
    return {k: v for k, v in score.items() if k not in ("step", "fetch_step")}


def test_io_vs_cpu_flow_matches_plain_calls_on_generated_logs(
    io_vs_cpu: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    m = io_vs_cpu
    paths = m.generate_logs(tmp_path, services=3, lines=300)
    result = m.run(paths, latency_s=0.05, rounds=1, processes=2)
    expected = [_without_steps(m.score_log(m.fetch_log(str(p), 0.0), 1)) for p in paths]
    report = result["report"]
    assert [_without_steps(s) for s in report["scores"]] == expected
    assert report["sources"] == [p.name for p in paths]
    assert report["lines"] == 900
    assert report["error_lines"] == sum(s["error_lines"] for s in expected) > 0
    # the IO steps ran on threads of this process, the CPU steps in worker processes
    assert result["io_pids"] == {os.getpid()}
    assert os.getpid() not in result["cpu_pids"]
    assert 1 <= len(result["cpu_pids"]) <= 2
    assert 1 <= result["cpu_overlap"] <= 2  # never more scores at once than processes
    assert result["io_overlap"] >= 2  # blocking fetches wait at the same time
    usage = result["usage"]
    assert usage["samples"] >= 1
    assert usage["peak_rss_mb"] > 0
    # the sampler thread and this one at least; child processes are not asserted: the
    # CPU phase (workers alive) is shorter than a sampling interval here, so whether a
    # sample sees them is timing (tests/test_monitor.py counts children deterministically)
    assert usage["max_threads"] >= 2
    out = capsys.readouterr().out
    assert "ResourceMonitor summary:" in out


def test_io_vs_cpu_falls_back_to_generated_logs(
    io_vs_cpu: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert io_vs_cpu.loghub_logs(tmp_path / "missing") == []
    calls: list[list[Path]] = []
    real_run = io_vs_cpu.run

    def recording_run(paths: list[Path]) -> dict[str, Any]:
        calls.append([Path(p) for p in paths])
        assert all(p.exists() for p in paths)  # the generated logs exist during the run
        return real_run(paths, latency_s=0.0, rounds=1)  # quick: no latency, one round

    monkeypatch.setattr(io_vs_cpu, "run", recording_run)
    result = io_vs_cpu.main(log_dir=tmp_path / "missing")
    assert [p.name for p in calls[0]] == [f"service_{i}.log" for i in range(1, 5)]
    assert result["report"]["lines"] == 8000
    assert not any(p.exists() for p in calls[0])  # the temporary directory is gone


def test_io_vs_cpu_template_and_overlap_helpers(io_vs_cpu: ModuleType) -> None:
    m = io_vs_cpu
    assert m.template_of("user 42 logged in from 10.0.1.2") == "user <*> logged in from <*>"
    assert m.fingerprint("abc", 2) == m.fingerprint("abc", 2) != m.fingerprint("abc", 1)
    assert m.max_overlap([(0.0, 1.0), (0.5, 1.5), (1.0, 2.0)]) == 2
    assert m.max_overlap([(0.0, 1.0), (1.0, 2.0)]) == 1
    assert m.max_overlap([]) == 0


@pytest.mark.skipif(
    not (LOGHUB / "Apache_2k.log").exists(), reason="../shared/data/loghub is not at hand"
)
def test_io_vs_cpu_reads_the_loghub_samples(io_vs_cpu: ModuleType) -> None:
    paths = io_vs_cpu.loghub_logs()
    assert [p.name for p in paths][:2] == ["Apache_2k.log", "BGL_2k.log"]
    assert all(p.resolve().parent == LOGHUB.resolve() for p in paths)
    scored = io_vs_cpu.score_log(io_vs_cpu.fetch_log(str(paths[0]), 0.0), 1)
    assert scored["lines"] == 2000
    assert scored["error_lines"] == 595  # the [error] lines of the Apache sample
    assert scored["top_count"] == 442
    assert scored["top_template"].endswith("[notice] <*> Found child <*> in scoreboard slot <*>")
