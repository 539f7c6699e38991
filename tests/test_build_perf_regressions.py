"""Graph building shortcuts keep the behaviour of the plain code they replace.

Building, validating and planning share work between nodes of the same shape
(one binding object, one compiled call, one arity check), take fast paths for
the usual task call and flow signature, and build specs without the dataclass
``__init__``. These tests pin that the results are the ones the general code
gives, and that errors still name the first culprit.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import pickle
import re
from typing import Any

import cloudpickle
import pytest

import actorflow as af
from actorflow.graph import (
    INPUT,
    Binding,
    NodeSpec,
    Ref,
    _node_spec,
    _positional_binding,
)
from actorflow.runtime.plan import compile_plan


def _double(x: int) -> int:
    return 2 * x


def _total(*xs: int) -> int:
    return sum(xs)


def test_a_spec_built_by_the_fast_constructor_equals_the_dataclass_one() -> None:
    t = af.task(_double)
    b = Binding((Ref(0),))
    for after in [(), ("a",), ("x", "a", "x")]:
        fast = _node_spec("n", t, ("a",), after, b, "exceptionally")
        slow = NodeSpec("n", t, ("a",), after, b, kind="exceptionally")
        assert fast == slow
        assert fast.inputs == slow.inputs
        assert [getattr(fast, f.name) for f in dataclasses.fields(NodeSpec)] == [
            getattr(slow, f.name) for f in dataclasses.fields(NodeSpec)
        ]


@pytest.mark.parametrize("n", [0, 1, 3, 256, 257, 1000])
def test_positional_bindings_are_shared_and_reference_every_input_in_order(n: int) -> None:
    b = _positional_binding(n)
    assert b == Binding(args=tuple(Ref(i) for i in range(n)))
    assert _positional_binding(n) is b


def test_builder_nodes_of_one_shape_share_one_binding_and_one_compiled_call() -> None:
    g = af.Graph("fan")
    g.add("source", lambda: 3)
    names = [f"t{i}" for i in range(50)]
    for name in names:
        g.add(name, _double, depends_on=["source"])
    g.add("sum", _total, depends_on=names)
    specs = {s.name: s for s in g.nodes}
    assert len({id(specs[name].binding) for name in names}) == 1
    plan = compile_plan(g)
    calls = {id(n.call) for seg in plan.segments for n in seg.nodes if n.name in names}
    assert len(calls) == 1
    assert g.run() == {"sum": 50 * 6}


def test_a_wide_fan_in_runs_in_every_graph_that_has_it() -> None:
    for width in (300, 1000, 300):
        g = af.Graph("wide")
        g.add("source", lambda: 1)
        names = [f"t{i}" for i in range(width)]
        for i, name in enumerate(names):
            g.add(name, functools.partial(lambda i, x: i * x, i), depends_on=["source"])
        g.add("sum", _total, depends_on=names)
        assert g.run() == {"sum": width * (width - 1) // 2}


def test_the_topological_order_is_kahns_first_in_first_out() -> None:
    g = af.Graph("order")
    g.add("d", lambda a, c: 0, depends_on=["a", "c"])
    g.add("a", lambda: 0)
    g.add("b", lambda a: 0, depends_on=["a"])
    g.add("c", lambda a: 0, depends_on=["a"], after=["b"])
    g.add("e", lambda: 0)
    v = g.validate()
    assert v.order == ("a", "e", "b", "c", "d")
    assert dict(v.consumers) == {"d": (), "a": ("d", "b", "c"), "b": ("c",), "c": ("d",), "e": ()}
    assert v.leaves == ("e", "d")


def test_the_first_unknown_name_in_insertion_order_is_the_one_reported() -> None:
    g = af.Graph("etl")
    g.add("read", lambda: 1)
    g.add("late", lambda x: x, depends_on=["read"], after=["nowhere"])
    g.add("load", lambda x: x, depends_on=["raw"])
    with pytest.raises(af.GraphError) as info:
        g.validate()
    assert str(info.value) == (
        "task 'late' runs after 'nowhere', but graph 'etl' has no node 'nowhere'; "
        "known nodes: 'read', 'late', 'load'"
    )


def test_an_arity_error_names_the_first_node_even_when_many_share_the_shape() -> None:
    g = af.Graph("g")
    g.add("src", lambda: 1)
    g.add("ok", _double, depends_on=["src"])
    one = lambda: 0  # noqa: E731
    for i in range(3):
        g.add(f"bad{i}", one, depends_on=["src"])
    with pytest.raises(af.GraphError, match=r"^task 'bad0' in graph 'g' cannot be called"):
        g.validate()


def test_an_unpicklable_process_task_is_refused_once_naming_its_first_node() -> None:
    import threading

    lock = threading.Lock()

    @af.task(executor="process")
    def guarded(x: int) -> int:
        with lock:
            return x

    @af.flow
    def f(x: int) -> Any:
        return [guarded(x), guarded(x)]

    with pytest.raises(af.GraphError, match=r"^task 'guarded' cannot run in a worker process"):
        _ = f.graph


@af.task
def _pair(a: Any, b: Any = None) -> Any:
    return (a, b)


@af.task
def _inc(x: int) -> int:
    return x + 1


def test_traced_calls_get_the_bindings_the_general_templates_give() -> None:
    @af.flow
    def f(x: int) -> Any:
        a = _inc(x)
        b = _inc(a)
        return [_pair(a, b), _pair(a, a), _pair(a[0], b), _pair(a, b=b), _pair(a, 7)]

    specs = {s.name: s for s in f.graph.nodes}
    assert specs["_inc"].binding is _positional_binding(1)
    assert specs["_inc"].deps == (INPUT,)
    assert specs["_pair"].binding is _positional_binding(2)
    assert specs["_pair"].deps == ("_inc", "_inc_2")
    assert specs["_pair_2"].binding == Binding((Ref(0), Ref(0)))
    assert specs["_pair_2"].deps == ("_inc",)
    assert specs["_pair_3"].binding == Binding((Ref(0, (0,)), Ref(1)))
    assert specs["_pair_4"].binding == Binding((Ref(0),), (("b", Ref(1)),))
    assert specs["_pair_5"].binding == Binding((Ref(0), 7))


def test_after_on_the_usual_call_orders_without_data() -> None:
    @af.flow
    def f(x: int) -> Any:
        a = _inc(x)
        b = _inc(x)
        return _pair(a, b, after=[b, a])  # type: ignore[call-arg]

    spec = f.graph.nodes[-1]
    assert spec.after == ("_inc_2", "_inc")
    assert spec.inputs == ("_inc", "_inc_2")
    assert f.run(1) == (2, 2)


def test_a_node_of_another_flow_is_refused_on_the_usual_call_too() -> None:
    leaked: list[Any] = []

    @af.flow
    def g(x: int) -> Any:
        leaked.append(_inc(x))
        return leaked[0]

    _ = g.graph

    @af.flow
    def h(x: int) -> Any:
        return _inc(leaked[0])

    with pytest.raises(af.GraphError, match="a Node of another flow"):
        _ = h.graph


def test_a_flow_signature_is_read_lazily_and_binds_keywords_and_defaults() -> None:
    @af.flow
    def f(x: int, y: int = 10) -> Any:
        return _pair(_inc(x), y)

    assert f.run(1) == (2, 10)
    assert f.run(x=2, y=3) == (3, 3)
    entry = f.graph._entry
    assert entry.signature == inspect.signature(f.fn)
    clone = pickle.loads(cloudpickle.dumps(entry))
    assert clone.signature == entry.signature
    assert clone.fn is None
    with pytest.raises(TypeError, match=re.escape(f"flow 'f' takes {entry.signature}, called")):
        f.run(1, 2, 3)


def test_a_wrapped_flow_function_is_read_through_its_wrapper() -> None:
    def inner(x: int) -> Any:
        return _inc(x)

    @functools.wraps(inner)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return inner(*args, **kwargs)

    f = af.flow(wrapper)
    assert f.graph._entry.n_params == 1
    assert f.run(4) == 5


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("def f(x, *rest): return _inc(x)", r"flow 'f' takes \*rest: a flow's parameters"),
        ("def f(x, **opts): return _inc(x)", r"flow 'f' takes \*opts: a flow's parameters"),
        ("def f(x, run_id): return _inc(x)", "parameter named 'run_id', which is reserved"),
        ("def f(x, *, backend): return _inc(x)", "parameter named 'backend', which is reserved"),
    ],
)
def test_flow_parameters_are_refused_with_the_same_messages(source: str, message: str) -> None:
    ns: dict[str, Any] = {"_inc": _inc}
    exec(source, ns)
    with pytest.raises(af.GraphError, match=message):
        _ = af.flow(ns["f"]).graph
