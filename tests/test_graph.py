"""Graph building, tracing, validation and drawing; no graph here is run."""

from __future__ import annotations

import dataclasses
import math
import pickle
import threading
from typing import Any

import cloudpickle
import pytest

import actorflow as af


@af.task
def fetch(url: str) -> str:
    return f"<{url}>"


@af.task
def premium(raw: str) -> str:
    return raw + "p"


@af.task
def standard(raw: str) -> str:
    return raw + "s"


@af.task
def build_report(a: str, b: str) -> str:
    return a + b


@af.task
def audit(raw: str) -> None:
    return None


@af.task
def split(raw: str) -> list[str]:
    return list(raw)


@af.task
def aggregate(parts: list[str]) -> int:
    return len(parts)


@af.flow
def analysis(url: str) -> Any:
    raw = fetch(url)
    a, b = premium(raw), standard(raw)
    report = build_report(a, b)
    parts = af.map(premium, split(raw), max_parallelism=4)
    total = aggregate(parts)
    audit(raw, after=[report])
    return {"report": report, "total": total}


def test_a_traced_flow_has_one_node_per_task_call_named_in_trace_order() -> None:
    names = [n.name for n in analysis.graph.nodes]
    assert names == [
        "fetch",
        "premium",
        "standard",
        "build_report",
        "split",
        "premium_2",
        "aggregate",
        "audit",
    ]
    assert all(isinstance(n.task, af.Task) for n in analysis.graph.nodes)


def test_edges_include_data_and_after_dependencies() -> None:
    edges = set(analysis.graph.edges)
    assert ("fetch", "premium") in edges
    assert ("premium", "build_report") in edges
    assert ("standard", "build_report") in edges
    assert ("build_report", "audit") in edges  # after=
    assert ("fetch", "audit") in edges
    assert ("split", "premium_2") in edges


def test_mermaid_and_dot_draw_every_edge() -> None:
    mermaid = analysis.graph.to_mermaid()
    dot = analysis.graph.to_dot()
    n_edges = len(analysis.graph.edges)
    assert mermaid.startswith("flowchart")
    assert mermaid.count("-->") == n_edges
    assert dot.count("->") == n_edges
    assert '"build_report" -> "audit" [style=dashed];' in dot


def test_a_flow_is_traced_once_and_cached() -> None:
    calls = []

    @af.flow
    def f(x: int) -> Any:
        calls.append(x)
        return fetch(x)  # type: ignore[arg-type]

    assert calls == []  # not at decoration time
    g1 = f.graph
    g2 = f.graph
    assert g1 is g2
    assert len(calls) == 1


def test_the_builder_passes_dependency_outputs_positionally_in_order() -> None:
    g = af.Graph("etl")
    g.add("load", lambda t, e: (t, e), depends_on=["transform", "extract"])  # forward refs
    g.add("extract", lambda: "E")
    g.add("transform", lambda e: e + "T", depends_on=["extract"])
    assert g.run() == {"load": ("ET", "E")}


def test_a_duplicate_name_is_refused_at_add() -> None:
    g = af.Graph("etl")
    g.add("extract", lambda: 1)
    with pytest.raises(af.GraphError, match="graph 'etl' already has a node 'extract'"):
        g.add("extract", lambda: 2)


def test_an_unknown_dependency_is_refused_naming_the_task_and_known_nodes() -> None:
    g = af.Graph("etl")
    g.add("read", lambda: 1)
    g.add("load", lambda x: x, depends_on=["raw"])
    with pytest.raises(af.GraphError) as info:
        g.run()
    assert str(info.value) == (
        "task 'load' depends on 'raw', but graph 'etl' has no node 'raw'; "
        "known nodes: 'read', 'load'"
    )


def test_a_cycle_is_refused_printing_the_cycle_path() -> None:
    g = af.Graph("etl")
    g.add("a", lambda x: x, depends_on=["c"])
    g.add("b", lambda x: x, depends_on=["a"])
    g.add("c", lambda x: x, depends_on=["b"])
    g.add("d", lambda: 1)
    with pytest.raises(af.GraphError, match=r"graph 'etl' has a cycle: 'a' -> 'b' -> 'c' -> 'a'"):
        g.to_mermaid()


def test_arguments_that_do_not_bind_are_refused_with_the_signature() -> None:
    @af.task
    def two(a: int, b: int) -> int:
        return a + b

    @af.flow
    def f(x: int) -> Any:
        return two(x)

    with pytest.raises(af.GraphError, match=r"task 'two' .* cannot be called as two\(<input>\)"):
        _ = f.graph
    g = af.Graph("g")
    g.add("src", lambda: 1)
    g.add("two", two, depends_on=["src", "src2"])
    g.add("src2", lambda: 2)
    g.add("three", lambda a: a, depends_on=["src", "src2"])
    with pytest.raises(af.GraphError, match=r"task 'three' in graph 'g' cannot be called"):
        g.run()


@pytest.mark.parametrize(
    ("use", "fragment"),
    [
        (lambda n: bool(n), "as a truth value"),
        (lambda n: n + 1, "with the operator +"),
        (lambda n: 1 - n, "with the operator -"),
        (lambda n: n < 3, "with the operator <"),
        (lambda n: list(n), "as an iterable"),
        (lambda n: len(n), "with len()"),
        (lambda n: n == 1, "in a comparison (==)"),
        (lambda n: f"{n}", "in a format string"),
        (lambda n: 3 in n, "with 'in'"),
        (lambda n: n(), "as a function"),
        (lambda n: round(n), "with round()"),
        (lambda n: math.floor(n), "with math.floor()"),
    ],
)
def test_a_node_used_as_a_value_names_the_task_and_the_fix(use: Any, fragment: str) -> None:
    @af.flow
    def f(url: str) -> Any:
        raw = fetch(url)
        use(raw)
        return raw

    with pytest.raises(af.GraphError) as info:
        _ = f.graph
    message = str(info.value)
    assert "the output of 'fetch'" in message
    assert fragment in message
    assert "placeholder for a value computed at run time" in message


def test_a_node_hidden_in_a_dataclass_or_used_as_an_output_key_is_refused() -> None:
    # both used to reach run time as the placeholder itself (acceptance test)
    @dataclasses.dataclass
    class Box:
        v: Any

    @af.task
    def show(b: Any) -> str:
        return repr(b)

    @af.flow
    def boxed(url: str) -> Any:
        return show(Box(fetch(url)))

    @af.flow
    def keyed(url: str) -> Any:
        return {fetch(url): 1}

    with pytest.raises(af.GraphError, match=r"inside a Box.*build the Box inside a task"):
        _ = boxed.graph
    with pytest.raises(af.GraphError, match="cannot be a dict key"):
        _ = keyed.graph


def test_a_builders_graph_attribute_checks_forward_references() -> None:
    g = af.Graph("etl").add("load", fetch, depends_on=["extract"])
    assert [n.name for n in g.nodes] == ["load"]  # inspection does not check
    with pytest.raises(af.GraphError, match="graph 'etl' has no node 'extract'"):
        _ = g.graph
    g.add("extract", fetch)
    assert g.graph is g


def test_if_on_a_node_suggests_branching_inside_a_task() -> None:
    @af.flow
    def f(url: str) -> Any:
        raw = fetch(url)
        if raw:
            return premium(raw)
        return standard(raw)

    with pytest.raises(af.GraphError, match="branch inside a task"):
        _ = f.graph


def test_indexing_a_node_gives_a_node_of_the_element() -> None:
    @af.task
    def pair(x: int) -> tuple[int, int]:
        return x, x + 1

    @af.task
    def add(a: int, b: int) -> int:
        return a + b

    @af.flow
    def f(x: int) -> Any:
        p = pair(x)
        return add(p[0], p[1])

    assert [n.name for n in f.graph.nodes] == ["pair", "add"]
    assert f.run(3) == 7


def test_a_reserved_run_option_cannot_be_a_flow_parameter() -> None:
    @af.flow
    def f(store: str) -> Any:
        return fetch(store)

    with pytest.raises(af.GraphError, match="parameter named 'store', which is reserved"):
        _ = f.graph


def test_an_unknown_executor_is_refused_with_the_choices() -> None:
    with pytest.raises(af.GraphError, match=r"unknown executor='gpu'.*'thread'.*'process'"):
        af.task(executor="gpu")(lambda x: x)


def test_an_unpicklable_process_task_is_refused_when_built_naming_the_object() -> None:
    import threading

    lock = threading.Lock()

    @af.task(executor="process")
    def guarded(x: int) -> int:
        with lock:
            return x

    @af.flow
    def f(x: int) -> Any:
        return guarded(x)

    with pytest.raises(af.GraphError) as info:
        _ = f.graph
    message = str(info.value)
    assert "task 'guarded' cannot run in a worker process" in message
    assert "'lock'" in message
    assert "executor='thread'" in message


def _one_param(body: Any) -> Any:
    def run(x: int) -> Any:
        return body(x)

    return run


def test_an_unpicklable_object_behind_a_helper_or_a_default_is_named() -> None:
    # the refusal named only 'helper' (a function), or nothing ("it (TypeError...)")
    lock = threading.Lock()

    def helper(x: int) -> int:
        with lock:
            return x

    def via_helper(x: int) -> int:
        return helper(x)

    def with_default(x: int, _lock: Any = lock) -> int:
        return x

    for fn, culprit in (
        (via_helper, "'helper' -> 'lock' (_thread.lock)"),
        (with_default, "'default of _lock' (_thread.lock)"),
    ):
        t = af.task(executor="process")(fn)

        def body(x: int, t: Any = t) -> Any:
            return t(x)

        flow = af.flow(_one_param(body))
        with pytest.raises(af.GraphError) as info:
            _ = flow.graph
        assert culprit in str(info.value)


def test_key_on_a_function_task_is_refused_with_the_fix() -> None:
    with pytest.raises(af.GraphError, match="make the task a class"):
        af.task(key=lambda e: e, workers=2)(lambda x: x)


def test_generator_tasks_are_refused_until_streaming_lands() -> None:
    def lines(path: str) -> Any:
        yield path

    async def alines(path: str) -> Any:
        yield path

    with pytest.raises(af.GraphError, match="generator function"):
        af.task(lines)
    with pytest.raises(af.GraphError, match="async generator"):
        af.task(alines)


def test_run_options_of_later_milestones_are_refused() -> None:
    with pytest.raises(af.GraphError, match="store= is not implemented yet"):
        analysis.run("x", store="runs.db")
    with pytest.raises(af.GraphError, match="backend= is not implemented yet"):
        analysis.start(backend="ray")


def test_a_task_outside_a_flow_is_a_plain_call() -> None:
    assert fetch("x") == "<x>"

    @af.task
    class Counter:
        def __init__(self) -> None:
            self.n = 0

        def __call__(self, x: int) -> int:
            self.n += x
            return self.n

    assert Counter(5) == 5
    assert Counter(5) == 5  # a fresh instance per plain call


def test_task_name_defaults_to_the_function_or_class_name() -> None:
    assert fetch.name == "fetch"
    assert af.task(name="get")(lambda u: u).name == "get"
    assert fetch.__name__ == "fetch"
    assert fetch.__wrapped__ is fetch.fn


def test_a_nested_flow_is_refused_until_sub_flows_land() -> None:
    @af.flow
    def inner(x: str) -> Any:
        return fetch(x)

    @af.flow
    def outer(x: str) -> Any:
        return inner(x)

    with pytest.raises(af.GraphError, match="nested sub-flows are not implemented yet"):
        _ = outer.graph


def test_a_graph_and_its_tasks_are_picklable() -> None:
    g = analysis.graph
    clone = cloudpickle.loads(cloudpickle.dumps(g))
    assert [n.name for n in clone.nodes] == [n.name for n in g.nodes]
    assert pickle.loads(pickle.dumps(fetch)).name == "fetch"


def test_a_flow_calling_no_task_is_refused() -> None:
    @af.flow
    def empty(x: int) -> int:
        return x

    with pytest.raises(af.GraphError, match="calls no task"):
        _ = empty.graph


def test_depends_on_given_as_a_string_is_refused_with_the_fix() -> None:
    g = af.Graph("g")
    with pytest.raises(af.GraphError, match=r"depends_on=\['a'\]"):
        g.add("b", lambda x: x, depends_on="a")
