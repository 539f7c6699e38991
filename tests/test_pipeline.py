"""Fluent pipelines: send / continue_with / in_parallel / exceptionally / finally_do."""

from __future__ import annotations

import threading
from typing import Any

import pytest

import actorflow as af


@af.task
def multiply(a: float, b: float) -> float:
    return a * b


@af.task
def divide(a: float, b: float) -> float:
    return a / b


@af.task
def average(xs: list[float]) -> float:
    return sum(xs) / len(xs)


@af.task
def boom(x: Any) -> Any:
    raise ValueError(f"boom {x}")


def test_continue_with_passes_the_result_as_first_argument() -> None:
    assert multiply.send(3, 2).continue_with(divide, 2).run() == 3.0


def test_in_parallel_gathers_results_in_order_then_continues() -> None:
    p = af.in_parallel([multiply.send(3, 2), multiply.send(4, 5)], max_parallelism=10)
    assert p.continue_with(average).run() == 13.0


def test_in_parallel_runs_at_most_max_parallelism_branches_at_once() -> None:
    active = 0
    peak = 0
    lock = threading.Lock()
    barrier = threading.Barrier(2, timeout=10)

    @af.task
    def hold(i: int) -> int:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        if i < 2:
            barrier.wait()  # the first two meet: two run at once
        with lock:
            active -= 1
        return i

    p = af.in_parallel([hold.send(i) for i in range(6)], max_parallelism=2)
    assert p.run() == list(range(6))
    assert peak == 2


def test_a_task_returning_a_pipeline_continues_with_it() -> None:
    @af.task
    def make_positive(x: float) -> Any:
        return x if x > 0 else multiply.send(x, -1)

    assert make_positive.send(-5).run() == 5
    assert make_positive.send(7).run() == 7


def test_recursive_orchestration_terminates() -> None:
    @af.task
    def countdown(n: int) -> Any:
        return n if n == 0 else countdown.send(n - 1)

    assert countdown.send(4).run() == 0


def test_a_failure_skips_later_steps_until_exceptionally_recovers_it() -> None:
    calls: list[str] = []

    @af.task
    def never(x: Any) -> Any:
        calls.append("never")
        return x

    def recover(failure: af.Failure) -> str:
        calls.append(f"recover {failure.task} {failure.error_type}")
        return "recovered"

    p = boom.send(1).continue_with(never).exceptionally(recover).continue_with(str.upper)
    assert p.run() == "RECOVERED"
    assert calls == ["recover boom ValueError"]


def test_exceptionally_is_skipped_when_there_is_no_error() -> None:
    called = []
    p = multiply.send(2, 3).exceptionally(lambda f: called.append(f) or 0)
    assert p.run() == 6
    assert called == []


def test_finally_do_runs_last_once_on_success_and_failure_without_changing_the_result() -> None:
    seen: list[Any] = []
    assert multiply.send(2, 3).finally_do(seen.append).run() == 6
    with pytest.raises(af.RunFailed):
        boom.send(1).finally_do(seen.append).run()
    assert seen[0] == 6
    assert isinstance(seen[1], af.Failure)
    assert seen[1].task == "boom"


def test_a_failing_finally_do_replaces_the_result() -> None:
    def cleanup() -> None:
        raise RuntimeError("cleanup broke")

    with pytest.raises(af.RunFailed) as info:
        multiply.send(2, 3).finally_do(cleanup).run()
    assert [f.message for f in info.value.failures] == ["cleanup broke"]


def test_steps_after_finally_do_are_refused() -> None:
    with pytest.raises(af.GraphError, match="finally_do must come last"):
        multiply.send(1, 2).finally_do(print).continue_with(divide, 2)


def test_a_group_aggregates_branch_failures_as_their_own_records() -> None:
    with pytest.raises(af.RunFailed) as info:
        af.in_parallel([boom.send(1), multiply.send(2, 2), boom.send(2)]).run()
    assert sorted(f.message for f in info.value.failures) == ["boom 1", "boom 2"]
    assert {f.task for f in info.value.failures} == {"boom"}


def test_a_group_with_return_exceptions_keeps_failures_in_place() -> None:
    out = af.in_parallel([boom.send(1), multiply.send(2, 2)], return_exceptions=True).run()
    assert isinstance(out[0], af.RunFailed)
    assert type(out[0]) is af.RunFailed
    assert out[0].failures[0].message == "boom 1"
    assert out[1] == 4


def test_a_failed_continuation_reports_the_inner_task_failure() -> None:
    @af.task
    def orchestrate(x: int) -> Any:
        return boom.send(x)

    with pytest.raises(af.RunFailed) as info:
        orchestrate.send(3).run()
    assert [(f.task, f.message) for f in info.value.failures] == [("boom", "boom 3")]


def test_a_step_with_the_wrong_arity_is_refused_when_built() -> None:
    with pytest.raises(af.GraphError, match="cannot be called"):
        _ = multiply.send(1, 2).continue_with(multiply).graph


def test_a_pipeline_compiles_to_a_graph_with_one_node_per_step() -> None:
    p = multiply.send(3, 2).continue_with(divide, 2).continue_with(divide, 3)
    assert [n.name for n in p.graph.nodes] == ["multiply", "divide", "divide_2"]
    assert p.graph.edges == (("multiply", "divide"), ("divide", "divide_2"))
    assert "-->" in p.graph.to_mermaid()
