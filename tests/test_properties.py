"""Property tests: random graphs on the engine agree with a sequential reference.

Random DAGs of deterministic integer operations (add, multiply, sum, skip when
``value % k == 0``, raise ``ValueError`` when ``value % m == 0``) are built with
the public builder (``af.Graph.add``) or traced with ``@af.flow``, run on the
engine, and compared with ``tests/reference.py``, which evaluates the same graph
one node at a time: outputs, skips, failures (which tasks failed), and which
node functions were called how many times.
"""

from __future__ import annotations

import itertools
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import actorflow as af

try:  # tests/ is a package
    from tests import reference as ref
except ImportError:  # pragma: no cover - tests/ without __init__.py: it is on sys.path
    import reference as ref

RESULT_TIMEOUT = 60.0
MODULUS = 1_000_003

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
LONG_LIVED_SETTINGS = settings(SETTINGS, max_examples=25)


# --------------------------------------------------------------------------- ops


@dataclass(frozen=True)
class Op:
    """A deterministic pure operation on the node's inputs.

    The inputs are first combined into one value, position-sensitively (so that a
    wrong argument order shows): ``sum((i + 1) * x)``, except for ``sum`` which
    adds them plainly. Then ``add`` adds ``k``, ``mul`` multiplies by ``k``,
    ``skip`` returns the skip sentinel when the value is a multiple of ``k``, and
    ``raise`` raises ``ValueError`` when it is a multiple of ``k``.
    """

    kind: str
    k: int = 0

    def apply(self, xs: Sequence[int], skip: object) -> Any:
        if self.kind == "sum":
            value = sum(xs) % MODULUS
        else:
            value = sum((i + 1) * x for i, x in enumerate(xs)) % MODULUS
        if self.kind == "add":
            return (value + self.k) % MODULUS
        if self.kind == "mul":
            return (value * self.k) % MODULUS
        if self.kind == "skip":
            return skip if value % self.k == 0 else value
        if self.kind == "raise" and value % self.k == 0:
            raise ValueError(f"{value} is a multiple of {self.k}")
        return value

    def __repr__(self) -> str:
        return f"Op({self.kind!r}, {self.k})" if self.k else f"Op({self.kind!r})"


PURE_OPS = st.one_of(
    st.builds(Op, st.just("add"), st.integers(-7, 7)),
    st.builds(Op, st.just("mul"), st.integers(2, 5)),
    st.builds(Op, st.just("sum")),
)
SKIP_OPS = st.builds(Op, st.just("skip"), st.integers(2, 9))
RAISE_OPS = st.builds(Op, st.just("raise"), st.integers(2, 9))


def ops(*, skips: bool = True, faults: bool = True) -> st.SearchStrategy[Op]:
    choices = [PURE_OPS]
    if skips:
        choices.append(SKIP_OPS)
    if faults:
        choices.append(RAISE_OPS)
    return st.one_of(*choices)


# ------------------------------------------------------------------ call tracking


class CallLog:
    """Thread-safe record of every call of every node function."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seq = itertools.count()
        self.counts: Counter[str] = Counter()
        self.starts: dict[str, list[int]] = defaultdict(list)
        self.ends: dict[str, list[int]] = defaultdict(list)

    def record(self, name: str, op: Op, xs: Sequence[int]) -> Any:
        with self._lock:
            self.counts[name] += 1
            self.starts[name].append(next(self._seq))
        try:
            return op.apply(xs, af.SKIP)
        finally:
            with self._lock:
                self.ends[name].append(next(self._seq))


def positional_fn(name: str, op: Op, arity: int, log: CallLog) -> Callable[..., Any]:
    """A plain function of exactly ``arity`` parameters (arity checks must accept it)."""

    def call(*xs: int) -> Any:
        return log.record(name, op, xs)

    fn: Callable[..., Any]
    if arity == 0:

        def fn() -> Any:
            return call()

    elif arity == 1:

        def fn(a: int) -> Any:
            return call(a)

    elif arity == 2:

        def fn(a: int, b: int) -> Any:
            return call(a, b)

    elif arity == 3:

        def fn(a: int, b: int, c: int) -> Any:
            return call(a, b, c)

    elif arity == 4:

        def fn(a: int, b: int, c: int, d: int) -> Any:
            return call(a, b, c, d)

    else:  # pragma: no cover - the strategies never draw more
        raise AssertionError(arity)
    fn.__name__ = fn.__qualname__ = name
    return fn


def gather_fn(name: str, op: Op, container: str, log: CallLog) -> Callable[..., Any]:
    """A function taking one gathered container (``list``, ``tuple`` or ``dict``)."""

    expected_type = {"list": list, "tuple": tuple, "dict": dict}[container]

    def fn(values: Any) -> Any:
        if type(values) is not expected_type:
            raise TypeError(f"a gathered {container} arrived as {type(values).__name__}")
        if isinstance(values, dict):
            values = values.values()
        return log.record(name, op, list(values))

    fn.__name__ = fn.__qualname__ = name
    return fn


def reference_fn(op: Op, *, gather: bool = False) -> Callable[..., Any]:
    if gather:
        return lambda values: op.apply(values, ref.SKIP)
    return lambda *xs: op.apply(xs, ref.SKIP)


def to_engine(value: Any) -> Any:
    """Translate the reference's skip sentinel in an expected result to ``af.SKIP``."""
    if value is ref.SKIP:
        return af.SKIP
    if isinstance(value, dict):
        return {k: to_engine(v) for k, v in value.items()}
    return value


# ------------------------------------------------------------- builder graphs


@dataclass(frozen=True)
class NodeSpec:
    name: str
    op: Op
    deps: tuple[str, ...]
    after: tuple[str, ...]
    takes_input: bool = True  # for a root: whether its function takes parameters


@dataclass(frozen=True)
class DagSpec:
    """A random DAG: edges only go from lower to higher index (acyclic).

    A run passes ``n_args`` arguments; a root's function takes them all, or none.
    """

    nodes: tuple[NodeSpec, ...]
    add_order: tuple[int, ...]  # the order of the ``add`` calls (forward references)
    n_args: int = 1

    def reference(self) -> list[ref.Node]:
        return [
            ref.Node(n.name, reference_fn(n.op), n.deps, n.after, root_args=n.takes_input)
            for n in self.nodes
        ]

    def arity(self, node: NodeSpec) -> int:
        if node.deps:
            return len(node.deps)
        return self.n_args if node.takes_input else 0

    def args(self, values: Sequence[int]) -> tuple[int, ...]:
        """The run's arguments, taken from an item's values."""
        return tuple(values[: self.n_args])

    def build(self, log: CallLog) -> af.Graph:
        graph = af.Graph("random_dag")
        for index in self.add_order:
            node = self.nodes[index]
            fn = positional_fn(node.name, node.op, self.arity(node), log)
            options: dict[str, list[str]] = {}
            if node.deps:
                options["depends_on"] = list(node.deps)
            if node.after:
                options["after"] = list(node.after)
            graph.add(node.name, fn, **options)
        return graph

    def expect(self, *args: Any) -> ref.Outcome:
        return ref.interpret(self.reference(), args)

    def builder_code(self) -> str:
        """The builder calls, for a readable reproduction in failure reports."""
        lines = ['g = af.Graph("random_dag")']
        for index in self.add_order:
            node = self.nodes[index]
            extra = ""
            if node.deps:
                extra += f", depends_on={list(node.deps)!r}"
            if node.after:
                extra += f", after={list(node.after)!r}"
            fn = f"{node.op!r}/{self.arity(node)}"  # the op, and how many parameters
            lines.append(f"g.add({node.name!r}, {fn}{extra})")
        return "\n".join(lines)


@st.composite
def dags(
    draw: st.DrawFn,
    *,
    min_nodes: int = 2,
    max_nodes: int = 25,
    skips: bool = True,
    faults: bool = True,
) -> DagSpec:
    n = draw(st.integers(min_nodes, max_nodes))
    op_strategy = ops(skips=skips, faults=faults)
    nodes: list[NodeSpec] = []
    for i in range(n):
        deps: list[int] = []
        after: list[int] = []
        if i > 0:
            # one node in five is another root (no data dependencies)
            if draw(st.integers(0, 4)) > 0:
                deps = draw(
                    st.lists(st.integers(0, i - 1), min_size=1, max_size=min(3, i), unique=True)
                )
            drawn = draw(st.lists(st.integers(0, i - 1), max_size=min(2, i), unique=True))
            after = [a for a in drawn if a not in deps]
        nodes.append(
            NodeSpec(
                f"n{i}",
                draw(op_strategy),
                tuple(f"n{d}" for d in deps),
                tuple(f"n{a}" for a in after),
                takes_input=bool(deps) or draw(st.integers(0, 3)) > 0,
            )
        )
    order = draw(st.permutations(range(n)))
    return DagSpec(tuple(nodes), tuple(order), n_args=draw(st.integers(1, 2)))


INPUTS = st.integers(-1000, 1000)
ITEMS = st.tuples(INPUTS, INPUTS)  # a DAG's run takes the first ``n_args`` of these


def columns(dag: DagSpec, items: Sequence[tuple[int, int]]) -> list[list[int]]:
    """One iterable per run argument, for ``map(*iterables)`` (which zips them)."""
    return [[item[i] for item in items] for i in range(dag.n_args)]


def failed_tasks(error: af.RunFailed) -> Counter[str]:
    return Counter(f.task for f in error.failures)


def check_failure(error: af.RunFailed, expected: ref.Outcome) -> None:
    """One ``af.Failure`` per failed task, each a ``ValueError`` of our ops."""
    assert failed_tasks(error) == Counter(expected.failed)
    assert all(f.error_type == "ValueError" for f in error.failures), [
        (f.task, f.error_type, f.message) for f in error.failures
    ]


def check_order(spec: DagSpec, log: CallLog) -> None:
    """Every data and ``after`` dependency that ran finished before its dependent started."""
    for node in spec.nodes:
        for dep in (*node.deps, *node.after):
            if log.starts[node.name] and log.ends[dep]:
                assert log.ends[dep][0] < log.starts[node.name][0], (
                    f"{node.name} started before its dependency {dep} finished"
                )


# ------------------------------------------------------------------ traced flows


@dataclass(frozen=True)
class Step:
    """One node of a traced flow: ``key`` locates it in the spec, ``name`` is its node name."""

    key: str
    name: str
    op: Op
    deps: tuple[str, ...]  # node names
    gather: bool
    task: str  # the task's name (shared by the nodes of a task used several times)


@dataclass(frozen=True)
class FlowSpec:
    """A traced flow: a chain, or a diamond (head, branches, a join, a tail).

    The join is a gather (``total([a, b, c])``: skipped elements omitted) or a
    positional join (``total(a, b, c)``: skipped when any input is skipped). With
    ``shared``, single-input steps doing the same op use one task object, so the
    traced nodes are named ``name``, ``name_2``, ... in trace order.
    """

    head: tuple[Op, ...]
    branches: tuple[tuple[Op, ...], ...] = ()
    join: Op | None = None
    container: str = "list"  # "list" | "tuple" | "dict" (gather) or "positional"
    tail: tuple[Op, ...] = ()
    shared: bool = False

    def steps(self) -> list[Step]:
        """Every node, in trace order."""
        steps: list[Step] = []
        uses: Counter[str] = Counter()

        def add(key: str, op: Op, deps: tuple[str, ...], gather: bool = False) -> tuple[str]:
            task = key
            if self.shared and key != "join":
                task = f"{op.kind}_{op.k}".replace("-", "m")
            uses[task] += 1
            name = task if uses[task] == 1 else f"{task}_{uses[task]}"
            steps.append(Step(key, name, op, deps, gather, task))
            return (name,)

        previous: tuple[str, ...] = ()
        for i, op in enumerate(self.head):
            previous = add(f"head{i}", op, previous)
        if self.join is None:
            return steps
        ends: list[str] = []
        for b, branch in enumerate(self.branches):
            upstream = previous
            for i, op in enumerate(branch):
                upstream = add(f"branch{b}_{i}", op, upstream)
            ends.append(upstream[0])
        previous = add("join", self.join, tuple(ends), self.container != "positional")
        for i, op in enumerate(self.tail):
            previous = add(f"tail{i}", op, previous)
        return steps

    def reference(self) -> list[ref.Node]:
        return [
            ref.Node(s.name, reference_fn(s.op, gather=s.gather), s.deps, gather=s.gather)
            for s in self.steps()
        ]

    def expect(self, x: int) -> ref.Outcome:
        return ref.interpret(self.reference(), (x,))

    def expected_value(self, outcome: ref.Outcome) -> Any:
        (sink,) = outcome.sinks
        return to_engine(outcome.outputs[sink])

    def expected_calls(self, outcomes: Sequence[ref.Outcome]) -> Counter[str]:
        """Calls per task function (a shared task counts the calls of all its nodes)."""
        task_of = {s.name: s.task for s in self.steps()}
        return Counter(task_of[name] for outcome in outcomes for name in outcome.ran)

    def build(self, log: CallLog) -> af.Flow:
        by_task: dict[str, Any] = {}
        tasks: dict[str, Any] = {}
        for step in self.steps():
            if step.task not in by_task:
                if step.gather:
                    fn = gather_fn(step.task, step.op, self.container, log)
                else:
                    fn = positional_fn(step.task, step.op, max(1, len(step.deps)), log)
                by_task[step.task] = af.task(name=step.task)(fn)
            tasks[step.key] = by_task[step.task]
        spec = self

        def traced(x: Any) -> Any:
            value = x
            for i in range(len(spec.head)):
                value = tasks[f"head{i}"](value)
            if spec.join is None:
                return value
            ends = []
            for b, branch in enumerate(spec.branches):
                end = value
                for i in range(len(branch)):
                    end = tasks[f"branch{b}_{i}"](end)
                ends.append(end)
            if spec.container == "positional":
                value = tasks["join"](*ends)
            elif spec.container == "tuple":
                value = tasks["join"](tuple(ends))
            elif spec.container == "dict":
                value = tasks["join"]({f"b{b}": end for b, end in enumerate(ends)})
            else:
                value = tasks["join"](ends)
            for i in range(len(spec.tail)):
                value = tasks[f"tail{i}"](value)
            return value

        return af.flow(traced)


@st.composite
def chains(draw: st.DrawFn, *, skips: bool = True, faults: bool = True) -> FlowSpec:
    return FlowSpec(
        tuple(draw(st.lists(ops(skips=skips, faults=faults), min_size=1, max_size=8))),
        shared=draw(st.booleans()),
    )


@st.composite
def diamonds(draw: st.DrawFn, *, skips: bool = True, faults: bool = True) -> FlowSpec:
    op_strategy = ops(skips=skips, faults=faults)
    return FlowSpec(
        head=tuple(draw(st.lists(op_strategy, min_size=1, max_size=3))),
        branches=tuple(
            tuple(branch)
            for branch in draw(
                st.lists(st.lists(op_strategy, min_size=1, max_size=3), min_size=2, max_size=4)
            )
        ),
        join=draw(op_strategy),
        container=draw(st.sampled_from(["list", "positional", "tuple", "dict"])),
        tail=tuple(draw(st.lists(op_strategy, max_size=3))),
        shared=draw(st.booleans()),
    )


def flows(*, skips: bool = True, faults: bool = True) -> st.SearchStrategy[FlowSpec]:
    return st.one_of(chains(skips=skips, faults=faults), diamonds(skips=skips, faults=faults))


# ------------------------------------------------------- corner cases, always run


def dag_spec(*nodes: tuple[str, Op, tuple[str, ...], tuple[str, ...]]) -> DagSpec:
    return DagSpec(tuple(NodeSpec(*node) for node in nodes), tuple(range(len(nodes))))


# with x = 4: "skip" skips n1, "raise" fails n2 (4 % 2 == 0)
SKIP_AND_FAILURE_DAG = dag_spec(
    ("n0", Op("add"), (), ()),
    ("n1", Op("skip", 2), ("n0",), ()),
    ("n2", Op("raise", 2), ("n0",), ()),
    ("n3", Op("add", 1), ("n0",), ("n1",)),  # a skipped `after` does not skip: runs
    ("n4", Op("sum"), ("n1", "n2"), ()),  # skipped and failed inputs: failed
    ("n5", Op("add", 1), ("n0",), ("n4",)),  # failed `after` (propagated): not run
    ("n6", Op("mul", 3), ("n0",), ("n2",)),  # failed `after`: not run
    ("n7", Op("add", 2), (), ()),  # another root, not downstream of the failure: runs
)
# with x = 4: n1 skips; n4 is a positional join with a skipped input: skipped
SKIP_DAG = dag_spec(
    ("n0", Op("add"), (), ()),
    ("n1", Op("skip", 2), ("n0",), ()),
    ("n2", Op("add", 3), ("n0",), ()),
    ("n3", Op("add", 1), ("n0",), ("n1",)),
    ("n4", Op("sum"), ("n2", "n1"), ()),
    ("n5", Op("mul", 2), ("n2",), ("n4",)),
    ("n6", Op("add", 1), ("n4",), ()),
)
# with x = 4: branch 0 skips (4 % 2), branch 2 does not (4 % 3): the gather gets [5, 4]
GATHER_SOME_SKIPPED = FlowSpec(
    head=(Op("add"),),
    branches=((Op("skip", 2),), (Op("add", 1),), (Op("skip", 3),)),
    join=Op("add", 10),
    container="list",
)
# with x = 6: every branch skips, the gather gets []
GATHER_ALL_SKIPPED = FlowSpec(
    head=(Op("add"),),
    branches=((Op("skip", 2),), (Op("skip", 3),)),
    join=Op("add", 10),
    container="dict",
)
# a task used three times: nodes add_1, add_1_2, add_1_3; the third one fails (x = 1)
SHARED_CHAIN = FlowSpec(
    head=(Op("add", 1), Op("add", 1), Op("raise", 3), Op("add", 1), Op("add", 1)), shared=True
)


# ==================================================== the reference, on its own


def _const(value: Any) -> Callable[..., Any]:
    return lambda *_: value


def _boom(*_: Any) -> Any:
    raise ValueError("boom")


def test_the_reference_skips_a_positional_join_with_a_skipped_input() -> None:
    nodes = [
        ref.Node("a", _const(1)),
        ref.Node("b", _const(ref.SKIP)),
        ref.Node("join", lambda a, b: a + b, deps=("a", "b")),
        ref.Node("after_join", lambda j: j, deps=("join",)),
    ]
    outcome = ref.interpret(nodes)
    assert outcome.outputs == {"after_join": ref.SKIP}
    assert outcome.ran == {"a", "b"}
    assert outcome.states["join"] is ref.NodeState.SKIP_PROPAGATED


def test_the_reference_gather_omits_skipped_elements() -> None:
    nodes = [
        ref.Node("a", _const(1)),
        ref.Node("b", _const(ref.SKIP)),
        ref.Node("c", _const(3)),
        ref.Node("total", list, deps=("a", "b", "c"), gather=True),
        ref.Node("none", list, deps=("b",), gather=True),
    ]
    assert ref.interpret(nodes).outputs == {"total": [1, 3], "none": []}


def test_the_reference_ignores_a_skipped_after_dependency_but_not_a_failed_one() -> None:
    nodes = [
        ref.Node("src", lambda x: x),
        ref.Node("skipper", _const(ref.SKIP), deps=("src",)),
        ref.Node("failer", _boom, deps=("src",)),
        ref.Node("ordered", lambda x: x + 1, deps=("src",), after=("skipper",)),
        ref.Node("blocked", lambda x: x + 2, deps=("src",), after=("failer",)),
    ]
    outcome = ref.interpret(nodes, (10,))
    assert outcome.states["ordered"] is ref.NodeState.VALUE
    assert outcome.values["ordered"] == 11
    assert outcome.states["blocked"] is ref.NodeState.FAIL_PROPAGATED
    assert outcome.failed == {"failer"}
    assert outcome.ran == {"src", "skipper", "failer", "ordered"}
    with pytest.raises(ValueError, match="failed"):
        _ = outcome.outputs


def test_the_reference_runs_everything_not_downstream_of_a_failure() -> None:
    nodes = [
        ref.Node("src", lambda x: x),
        ref.Node("bad", _boom, deps=("src",)),
        ref.Node("down", lambda x: x, deps=("bad",)),
        ref.Node("side", lambda x: x * 2, deps=("src",)),
        ref.Node("root2", lambda x: x * 3),
        ref.Node("bad2", _boom, deps=("root2",)),
    ]
    outcome = ref.interpret(nodes, (5,))
    assert outcome.failed == {"bad", "bad2"}
    assert outcome.ran == {"src", "bad", "side", "root2", "bad2"}
    assert outcome.values["side"] == 10


def test_the_reference_lets_a_failure_dominate_a_skip() -> None:
    nodes = [
        ref.Node("src", lambda x: x),
        ref.Node("skipper", _const(ref.SKIP), deps=("src",)),
        ref.Node("bad", _boom, deps=("src",)),
        ref.Node("both", lambda a, b: a, deps=("skipper", "bad")),
        ref.Node("later", lambda x: x, deps=("src",), after=("both",)),
    ]
    outcome = ref.interpret(nodes, (1,))
    assert outcome.states["both"] is ref.NodeState.FAIL_PROPAGATED
    assert outcome.states["later"] is ref.NodeState.FAIL_PROPAGATED
    assert outcome.ran == {"src", "skipper", "bad"}


def test_the_reference_gives_roots_the_run_arguments_and_sinks_include_after_only_nodes() -> None:
    nodes = [
        ref.Node("r1", lambda x, y: x - y),
        ref.Node("r2", lambda x, y: x * y, after=("r1",)),
    ]
    outcome = ref.interpret(nodes, (7, 2))
    assert outcome.outputs == {"r2": 14}
    assert outcome.sinks == ("r2",)


def test_the_reference_agrees_with_the_corner_cases_as_documented() -> None:
    outcome = SKIP_AND_FAILURE_DAG.expect(4)
    assert outcome.failed == {"n2"}
    assert outcome.ran == {"n0", "n1", "n2", "n3", "n7"}
    outcome = SKIP_DAG.expect(4)
    assert outcome.outputs == {"n3": 5, "n5": 14, "n6": ref.SKIP}
    assert outcome.ran == {"n0", "n1", "n2", "n3", "n5"}
    assert GATHER_SOME_SKIPPED.expect(4).outputs == {"join": (1 * 5 + 2 * 4 + 10)}
    assert GATHER_ALL_SKIPPED.expect(6).outputs == {"join": 10}
    assert GATHER_ALL_SKIPPED.expect(5).outputs == {"join": 1 * 5 + 2 * 5 + 10}
    assert [s.name for s in SHARED_CHAIN.steps()] == [
        "add_1",
        "add_1_2",
        "raise_3",
        "add_1_3",
        "add_1_4",
    ]
    assert SHARED_CHAIN.expect(1).failed == {"raise_3"}
    assert SHARED_CHAIN.expect(2).outputs == {"add_1_4": 6}


def test_the_reference_refuses_bad_graphs() -> None:
    with pytest.raises(ValueError, match="cycle"):
        ref.interpret([ref.Node("a", _const(1), deps=("b",)), ref.Node("b", _const(1), ("a",))])
    with pytest.raises(ValueError, match="unknown"):
        ref.interpret([ref.Node("a", _const(1), after=("zzz",))])
    with pytest.raises(ValueError, match="duplicate"):
        ref.interpret([ref.Node("a", _const(1)), ref.Node("a", _const(2))])


@SETTINGS
@given(dag=dags(), item=ITEMS, data=st.data())
def test_the_reference_does_not_depend_on_the_order_nodes_are_described_in(
    dag: DagSpec, item: tuple[int, int], data: st.DataObject
) -> None:
    nodes = dag.reference()
    shuffled = data.draw(st.permutations(nodes))
    a, b = ref.interpret(nodes, dag.args(item)), ref.interpret(shuffled, dag.args(item))
    assert a.states == b.states
    assert a.values == b.values
    assert a.failed == b.failed
    assert set(a.sinks) == set(b.sinks)
    assert sorted(a.calls) == sorted(b.calls)


# ======================================================= the engine vs the reference


@SETTINGS
@given(dag=dags(), item=ITEMS)
@example(dag=SKIP_AND_FAILURE_DAG, item=(4, 0))
@example(dag=SKIP_DAG, item=(4, 0))
def test_random_dags_match_the_reference_interpreter(dag: DagSpec, item: tuple[int, int]) -> None:
    log = CallLog()
    graph = dag.build(log)
    args = dag.args(item)
    expected = dag.expect(*args)
    assert {node.name for node in graph.nodes} == {n.name for n in dag.nodes}
    data_edges = {(dep, n.name) for n in dag.nodes for dep in n.deps}
    after_edges = {(dep, n.name) for n in dag.nodes for dep in n.after}
    assert data_edges <= set(graph.edges) <= data_edges | after_edges
    if expected.ok:
        assert graph.run(*args) == to_engine(expected.outputs)
    else:
        with pytest.raises(af.RunFailed) as caught:
            graph.run(*args)
        check_failure(caught.value, expected)
    # exactly the nodes the reference ran were called, each once; the rest never
    assert log.counts == Counter(expected.ran)
    check_order(dag, log)


@SETTINGS
@given(dag=dags(skips=False, faults=False), items=st.lists(ITEMS, min_size=1, max_size=5))
def test_every_node_runs_exactly_once_per_item_without_faults(
    dag: DagSpec, items: list[tuple[int, int]]
) -> None:
    log = CallLog()
    graph = dag.build(log)
    every_node_once_per_item = Counter({n.name: len(items) for n in dag.nodes})
    for item in items:
        graph.run(*dag.args(item))
    assert log.counts == every_node_once_per_item
    log.counts.clear()
    with graph.start() as running:
        outputs = list(running.map(*columns(dag, items)))
    assert outputs == [to_engine(dag.expect(*dag.args(item)).outputs) for item in items]
    assert log.counts == every_node_once_per_item


def start_options(max_in_flight: int | None) -> dict[str, int]:
    return {} if max_in_flight is None else {"max_in_flight": max_in_flight}


MAX_IN_FLIGHT = st.sampled_from([None, 1, 2, 3, 8])


@LONG_LIVED_SETTINGS
@given(
    dag=dags(max_nodes=15),
    items=st.lists(ITEMS, min_size=20, max_size=50),
    max_in_flight=MAX_IN_FLIGHT,
)
def test_long_lived_graphs_match_the_reference_item_by_item(
    dag: DagSpec, items: list[tuple[int, int]], max_in_flight: int | None
) -> None:
    expected = [dag.expect(*dag.args(item)) for item in items]
    log = CallLog()
    graph = dag.build(log)
    options = start_options(max_in_flight)

    # submit: one future per item, a failed item's future raises RunFailed
    with graph.start(**options) as running:
        futures = [running.submit(*dag.args(item)) for item in items]
        for item, future, outcome in zip(items, futures, expected, strict=True):
            if outcome.ok:
                assert future.result(timeout=RESULT_TIMEOUT) == to_engine(outcome.outputs), item
            else:
                with pytest.raises(af.RunFailed) as caught:
                    future.result(timeout=RESULT_TIMEOUT)
                check_failure(caught.value, outcome)
    # after the block drained, exactly the reference's calls happened, per item
    assert log.counts == sum((Counter(o.ran) for o in expected), Counter())

    # map: zips its iterables, ordered, skipped outputs in place; raises RunFailed at a
    # failed item's position
    with graph.start(**options) as running:
        results = iter(running.map(*columns(dag, items)))
        for item, outcome in zip(items, expected, strict=True):
            if outcome.ok:
                assert next(results) == to_engine(outcome.outputs), item
            else:
                with pytest.raises(af.RunFailed) as caught:
                    next(results)
                check_failure(caught.value, outcome)
                break
        else:
            assert next(results, "exhausted") == "exhausted"


@SETTINGS
@given(spec=flows(), xs=st.lists(INPUTS, min_size=1, max_size=10), max_in_flight=MAX_IN_FLIGHT)
@example(spec=GATHER_SOME_SKIPPED, xs=[4, 5, 6, 12], max_in_flight=None)
@example(spec=GATHER_ALL_SKIPPED, xs=[6, 5, 6], max_in_flight=1)
@example(spec=SHARED_CHAIN, xs=[1, 2, 4], max_in_flight=None)
def test_traced_chains_and_diamonds_match_the_reference_interpreter(
    spec: FlowSpec, xs: list[int], max_in_flight: int | None
) -> None:
    log = CallLog()
    flow = spec.build(log)
    expected = [spec.expect(x) for x in xs]
    # tracing names the nodes of a task used n times name, name_2, ... in trace order
    assert {node.name for node in flow.graph.nodes} == {s.name for s in spec.steps()}
    assert set(flow.graph.edges) == {(dep, s.name) for s in spec.steps() for dep in s.deps}

    outcome = expected[0]
    if outcome.ok:
        assert flow.run(xs[0]) == spec.expected_value(outcome)
    else:
        with pytest.raises(af.RunFailed) as caught:
            flow.run(xs[0])
        check_failure(caught.value, outcome)
    assert log.counts == spec.expected_calls([outcome])
    log.counts.clear()

    with flow.start(**start_options(max_in_flight)) as running:
        futures = [running.submit(x) for x in xs]
        for x, future, outcome in zip(xs, futures, expected, strict=True):
            if outcome.ok:
                assert future.result(timeout=RESULT_TIMEOUT) == spec.expected_value(outcome), x
            else:
                with pytest.raises(af.RunFailed) as caught:
                    future.result(timeout=RESULT_TIMEOUT)
                check_failure(caught.value, outcome)
    assert log.counts == spec.expected_calls(expected)


@SETTINGS
@given(spec=flows(skips=False, faults=False), xs=st.lists(INPUTS, min_size=1, max_size=10))
def test_traced_flows_without_faults_run_every_task_once_per_item(
    spec: FlowSpec, xs: list[int]
) -> None:
    log = CallLog()
    flow = spec.build(log)
    with flow.start() as running:
        assert list(running.map(xs)) == [spec.expected_value(spec.expect(x)) for x in xs]
    assert log.counts == spec.expected_calls([spec.expect(x) for x in xs])
    assert sum(log.counts.values()) == len(spec.steps()) * len(xs)
