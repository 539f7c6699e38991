"""The examples run as tests: as scripts (exit code, key lines) and as modules (values).

Each example is imported from ``examples/`` as a module of its own, so a test can
call its functions, compare the engine's results with plain sequential calls of the
same tasks (a task called outside a flow is a plain call), and patch its globals.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
APACHE_LOG = ROOT / ".." / "shared" / "data" / "loghub" / "Apache_2k.log"


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
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"{name}.py exited with {proc.returncode}:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    return proc.stdout


# --- customer_analysis ------------------------------------------------------------------

DIAGRAM_EDGES = {
    ("prepare_dataset", "analyze_premium_customers"),
    ("prepare_dataset", "analyze_standard_customers"),
    ("prepare_dataset", "distribute_workload"),
    ("analyze_premium_customers", "generate_customer_report"),
    ("analyze_standard_customers", "generate_customer_report"),
    *{("distribute_workload", f"process_batch_{i}") for i in range(1, 5)},
    *{(f"process_batch_{i}", "aggregate_batch_results") for i in range(1, 5)},
    ("aggregate_batch_results", "level_1_basic_analysis"),
    ("level_1_basic_analysis", "level_2_segment_analysis"),
    ("level_2_segment_analysis", "level_3_advanced_metrics"),
    ("level_3_advanced_metrics", "level_4_predictive_insights"),
    ("level_4_predictive_insights", "final_comprehensive_report"),
}
TUTORIAL_TASKS = {name for edge in DIAGRAM_EDGES for name in edge}


@pytest.fixture(scope="module")
def customer_analysis() -> ModuleType:
    """The customer_analysis example, imported once for this module."""
    return _import_example("customer_analysis")


def _customer_analysis_sequentially(mod: ModuleType, n: int, seed: int) -> dict[str, Any]:
    """The same workflow as plain function calls, in one topological order, no engine."""
    dataset = mod.prepare_dataset(n, seed)
    premium = mod.analyze_premium_customers(dataset)
    standard = mod.analyze_standard_customers(dataset)
    customer_report = mod.generate_customer_report(dataset, premium, standard)
    batches = mod.distribute_workload(dataset)
    results = [task(batches[i], i + 1) for i, task in enumerate(mod.PROCESS_BATCH)]
    aggregated = mod.aggregate_batch_results(results)
    level_1 = mod.level_1_basic_analysis(aggregated)
    level_2 = mod.level_2_segment_analysis(aggregated, level_1)
    level_3 = mod.level_3_advanced_metrics(aggregated, level_1, level_2)
    level_4 = mod.level_4_predictive_insights(level_1, level_2, level_3)
    return mod.final_comprehensive_report(
        {
            "customer_report": customer_report,
            "aggregated": aggregated,
            "level_1": level_1,
            "level_2": level_2,
            "level_3": level_3,
            "level_4": level_4,
        }
    )


def test_customer_analysis_script_prints_the_report_and_the_mermaid_graph() -> None:
    out = _run_script("customer_analysis")
    assert "=== Comprehensive Customer Analysis Report ===" in out
    assert "Customers analyzed:     100" in out
    for section in ("Diamond", "Fan-out / fan-in", "Multi-level chain", "Recommendations"):
        assert f"--- {section}" in out
    mermaid = out.split("--- Graph (Mermaid) ---", 1)[1]
    assert "-->" in mermaid
    for name in TUTORIAL_TASKS:
        assert name in mermaid


def test_customer_analysis_graph_has_the_15_tasks_and_every_edge_of_the_diagram(
    customer_analysis: ModuleType,
) -> None:
    graph = customer_analysis.complex_customer_analysis.graph
    assert {node.name for node in graph.nodes} == TUTORIAL_TASKS
    assert len(graph.nodes) == 15
    assert DIAGRAM_EDGES - set(graph.edges) == set()  # no edge of the diagram is missing
    # the reads the shared context hid are edges of their own
    assert ("generate_customer_report", "final_comprehensive_report") in set(graph.edges)
    assert ("aggregate_batch_results", "level_2_segment_analysis") in set(graph.edges)


def test_customer_analysis_flow_gives_the_same_report_as_sequential_calls(
    customer_analysis: ModuleType,
) -> None:
    flow = customer_analysis.complex_customer_analysis
    assert flow.run(100, 2024) == _customer_analysis_sequentially(customer_analysis, 100, 2024)
    assert flow.run(37, 5) == _customer_analysis_sequentially(customer_analysis, 37, 5)


def test_customer_analysis_report_accounts_for_every_customer(
    customer_analysis: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    report = customer_analysis.main(n_customers=100, seed=2024)
    summary = report["executive_summary"]
    fanout = report["detailed_analysis"]["fanout_processing_results"]
    levels = report["detailed_analysis"]["sequential_analysis"]
    assert summary["total_customers_analyzed"] == 100
    assert [b["batch_id"] for b in fanout["batch_statistics"]] == [1, 2, 3, 4]
    assert sum(b["count"] for b in fanout["batch_statistics"]) == 100
    assert [c["id"] for c in fanout["processed_customers"]] == list(range(1, 101))
    segments = levels["level_2_segments"]["segments"]
    assert sum(s["count"] for s in segments.values()) == 100
    assert sum(s["total_value"] for s in segments.values()) == summary["total_customer_value"]
    assert summary["recommendations_count"] == len(report["actionable_recommendations"]) >= 2
    out = capsys.readouterr().out
    assert f"Total customer value:   ${summary['total_customer_value']:,}" in out


def test_customer_analysis_is_deterministic_for_a_seed(customer_analysis: ModuleType) -> None:
    flow = customer_analysis.complex_customer_analysis
    first = flow.run(60, 11)
    assert flow.run(60, 11) == first
    assert flow.run(60, 12) != first


# --- etl_manager --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def etl_manager() -> ModuleType:
    """The etl_manager example, imported once for this module."""
    return _import_example("etl_manager")


def _assert_topological(order: list[str]) -> None:
    """extract, transform, then load and quality_check in either order, then report."""
    assert order[:2] == ["extract", "transform"]
    assert set(order[2:4]) == {"load", "quality_check"}
    assert order[4:] == ["report"]


def test_etl_script_runs_and_shows_the_refused_graphs() -> None:
    out = _run_script("etl_manager")
    assert "Execution order: extract -> transform -> " in out
    assert "Most frequent error messages:" in out
    assert "cycle: GraphError: " in out
    assert "missing dependency: GraphError: " in out
    assert out.count("[tasks run before the refusal: 0]") == 2


def test_etl_graph_is_wired_as_declared(etl_manager: ModuleType, tmp_path: Path) -> None:
    graph = etl_manager.build_etl_graph(str(tmp_path / "etl.db"))
    assert set(graph.edges) == {
        ("extract", "transform"),
        ("transform", "load"),
        ("transform", "quality_check"),
        ("load", "report"),
        ("quality_check", "report"),
    }


def test_etl_over_a_generated_log_loads_every_parsable_line(
    etl_manager: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = etl_manager.generate_apache_log(tmp_path / "apache.log", lines=120, seed=9)
    result = etl_manager.main(log_path=log)
    report = result["report"]
    assert report["quality"]["lines"] == 121
    assert report["quality"]["rejected"] == 1
    assert report["rows"] == 120
    assert sum(report["levels"].values()) == 120
    assert set(report["levels"]) == {"notice", "error"}
    _assert_topological(result["order"])
    out = capsys.readouterr().out
    assert "ETL over a generated Apache log" not in out  # the given path wins
    assert "loaded 120 rows" in out


def test_etl_refuses_a_cycle_and_a_missing_dependency_before_running_anything(
    etl_manager: ModuleType, tmp_path: Path
) -> None:
    log = etl_manager.generate_apache_log(tmp_path / "apache.log", lines=10)
    refusals = etl_manager.main(log_path=log)["refusals"]
    cycle, missing = refusals["cycle"], refusals["missing dependency"]
    assert "cycle" in cycle
    assert "'transform'" in cycle
    assert "'load'" in cycle
    assert "'extrakt'" in missing
    assert "tasks run before the refusal: 0" in cycle
    assert "tasks run before the refusal: 0" in missing


@pytest.mark.skipif(not APACHE_LOG.exists(), reason="../shared/data/loghub is not at hand")
def test_etl_over_the_loghub_apache_log(etl_manager: ModuleType) -> None:
    result = etl_manager.main()
    report = result["report"]
    assert Path(result["source"]).resolve() == APACHE_LOG.resolve()
    assert report["rows"] == 2000
    assert report["quality"]["rejected"] == 0
    assert report["levels"] == {"notice": 1405, "error": 595}
    assert report["top_errors"][0] == ("mod_jk child workerEnv in error state <*>", 539)
    _assert_topological(result["order"])


# --- dag_scheduling ---------------------------------------------------------------------------


@pytest.fixture
def dag_scheduling() -> ModuleType:
    """The dag_scheduling example, imported afresh (tests patch its globals)."""
    return _import_example("dag_scheduling")


class _RendezvousMeter:
    """Stands in for the example's meter: the first ``parties`` blocking calls must meet.

    If the engine ran those steps one after another, the first would wait alone and
    the barrier would break after ``timeout`` seconds, failing the run. Later calls
    return at once.
    """

    def __init__(self, parties: int, timeout: float = 10.0) -> None:
        """Make the first ``parties`` calls wait for each other, for at most ``timeout``."""
        self._barrier = threading.Barrier(parties, timeout=timeout)
        self._lock = threading.Lock()
        self._left = parties

    def block(self, seconds: float) -> None:
        """Wait for the other parties if this is one of the first calls; ignore ``seconds``."""
        with self._lock:
            meet = self._left > 0
            self._left -= 1
        if meet:
            self._barrier.wait()


def test_dag_scheduling_script_prints_timings_and_the_graph() -> None:
    out = _run_script("dag_scheduling")
    assert "1. af.Graph with depends_on" in out
    assert "2. @af.flow with a nested worker per region" in out
    assert "graph.run(): " in out
    assert "master.run(): " in out
    assert out.count("blocked at once") == 2
    assert "Graph of part 1 (Mermaid):" in out


def test_dag_scheduling_overlaps_independent_blocking_steps(
    dag_scheduling: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    result = dag_scheduling.main()
    graph_part, flow_part = result["graph"], result["flow"]
    assert graph_part["calls"] == 5
    assert flow_part["calls"] == 4
    for part in (graph_part, flow_part):
        assert part["peak"] >= 2
        assert part["elapsed_s"] < part["sleep_total_s"]
    assert "blocked at once" in capsys.readouterr().out


def test_dag_scheduling_graph_gives_the_same_report_as_sequential_calls(
    dag_scheduling: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dag_scheduling, "STEP_S", 0.0)
    m = dag_scheduling
    expected = m.generate_report(
        m.analyze(m.clean(m.fetch_users()), m.clean(m.fetch_orders()), m.fetch_prices())
    )
    assert expected  # some countries have orders
    assert m.build_graph().run() == {"report": expected}


def test_dag_scheduling_flow_returns_the_nested_structure(
    dag_scheduling: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dag_scheduling, "STEP_S", 0.0)
    m = dag_scheduling
    regions = {r: m.transform(m.validate(m.fetch_raw(r))) for r in m.REGIONS}
    out = m.master.run()
    assert out == {"regions": regions, "saved": m.save_final(regions)}
    assert out["saved"]["regions_saved"] == sorted(m.REGIONS)


def test_dag_scheduling_independent_fetches_run_at_the_same_time(
    dag_scheduling: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the three root fetches are the first three blocking calls of each run
    monkeypatch.setattr(dag_scheduling, "meter", _RendezvousMeter(parties=3))
    assert "report" in dag_scheduling.build_graph().run()
    monkeypatch.setattr(dag_scheduling, "meter", _RendezvousMeter(parties=3))
    assert set(dag_scheduling.master.run()["regions"]) == set(dag_scheduling.REGIONS)
