"""Flows: a graph traced from a plain Python function.

Inside a flow being traced, a task call does not run the task: it adds a node
to the graph and returns a :class:`Node`, a placeholder for the value computed
at run time. The flow is traced once, lazily, on first use (``.graph``,
``run``, ``start``), and the result is cached.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from collections.abc import Callable, Iterable, Mapping, Sequence, Set
from inspect import CO_VARARGS, CO_VARKEYWORDS
from types import FunctionType
from typing import TYPE_CHECKING, Any, Generic, NoReturn, ParamSpec, TypeVar, overload

from actorflow import _trace
from actorflow.errors import Failure, GraphError
from actorflow.graph import (
    _RESERVED,
    INPUT,
    Binding,
    EntrySpec,
    Gather,
    Graph,
    NodeSpec,
    Ref,
    _node_spec,
    _OutRef,
    _positional_binding,
    _refuse_later_options,
)
from actorflow.supervision import Supervision
from actorflow.task import Task, as_task

if TYPE_CHECKING:
    from actorflow.runtime.running import RunningFlow

__all__ = ["Flow", "Node", "flow", "map"]

P = ParamSpec("P")
R = TypeVar("R")

_DEFAULT_MAP_PARALLELISM = min(32, (os.cpu_count() or 1) + 4)


class Node:
    """A placeholder, inside a flow, for a value computed at run time.

    A Node can be passed to other tasks (alone, or inside a list / tuple /
    dict, which gathers the values), indexed (``node[k]`` is a Node of that
    element) and returned from the flow. It has no truth value, operators or
    iteration: branch inside a task instead.

    Example::

        @af.flow
        def f(x):
            pair = split(x)          # a Node
            return join(pair[0], pair[1])
    """

    __slots__ = ("_name", "_path", "_tracer")

    def __init__(self, tracer: _Tracer, name: str, path: tuple[Any, ...] = ()) -> None:
        self._tracer = tracer
        self._name = name
        self._path = path

    def __getitem__(self, key: Any) -> Node:
        if isinstance(key, Node):
            _misuse(self, "as an index", "index inside a task instead")
        return Node(self._tracer, self._name, (*self._path, key))

    def __repr__(self) -> str:
        shown = "".join(f"[{k!r}]" for k in self._path)
        return f"<af.Node {self._name}{shown}>"

    def __bool__(self) -> bool:  # noqa: PLE0304 - always raises
        _misuse(self, "as a truth value (if / while / and / or / not)", _BRANCH)

    def __iter__(self) -> NoReturn:
        _misuse(
            self,
            "as an iterable (for / unpacking / list())",
            "index it (node[0]) or fan out with af.map(task, node)",
        )

    def __len__(self) -> int:  # noqa: PLE0303 - always raises
        _misuse(self, "with len()", "compute the length inside a task")

    def __contains__(self, item: Any) -> bool:
        _misuse(self, "with 'in'", _BRANCH)

    def __eq__(self, other: object) -> bool:
        _misuse(self, "in a comparison (==)", _BRANCH)

    def __ne__(self, other: object) -> bool:
        _misuse(self, "in a comparison (!=)", _BRANCH)

    __hash__ = object.__hash__

    def __index__(self) -> int:  # noqa: PLE0305 - always raises
        _misuse(self, "as an integer", "convert it inside a task")

    def __float__(self) -> float:
        _misuse(self, "as a float", "convert it inside a task")

    def __int__(self) -> int:
        _misuse(self, "as an int", "convert it inside a task")

    def __str__(self) -> str:  # noqa: PLE0307 - always raises
        _misuse(self, "as a string (str() / f-string)", "format it inside a task")

    def __format__(self, spec: str) -> str:
        _misuse(self, "in a format string", "format it inside a task")

    def __call__(self, *args: Any, **kwargs: Any) -> NoReturn:
        _misuse(self, "as a function", "call tasks, not Nodes")

    def exceptionally(self, handler: Callable[[Any], Any]) -> Node:
        """A Node that turns this node's failure back into a value.

        ``handler(failure: af.Failure) -> value`` runs only when the item
        failed upstream (after retries ran out); without an error it is
        skipped and the value passes through unchanged. A handler that raises
        fails the item with its own failure. Handlers may be tasks or plain
        callables. With several failures joined upstream, the handler gets
        the first.

        Example::

            @af.flow
            def f(url):
                page = fetch(url).exceptionally(lambda failure: "<cached page>")
                return parse(page)
        """
        return self._tracer.exceptionally(self, handler)


_BRANCH = "branch inside a task, or return a pipeline from a task"


def _refusing(how: str, fix: str) -> Callable[..., NoReturn]:
    """A Node dunder method that raises GraphError: the Node was used ``how``."""

    def refuse(self: Node, *other: Any) -> NoReturn:
        _misuse(self, how, fix)

    return refuse


for _name, _symbol in {
    "add": "+",
    "sub": "-",
    "mul": "*",
    "truediv": "/",
    "floordiv": "//",
    "mod": "%",
    "pow": "**",
    "matmul": "@",
    "and": "&",
    "or": "|",
    "xor": "^",
    "lshift": "<<",
    "rshift": ">>",
}.items():
    for _dunder in (f"__{_name}__", f"__r{_name}__"):
        setattr(
            Node, _dunder, _refusing(f"with the operator {_symbol}", "compute it inside a task")
        )
for _name, _symbol in {
    "lt": "<",
    "le": "<=",
    "gt": ">",
    "ge": ">=",
    "neg": "unary -",
    "pos": "unary +",
    "invert": "~",
    "abs": "abs()",
}.items():
    setattr(
        Node, f"__{_name}__", _refusing(f"with the operator {_symbol}", "compute it inside a task")
    )
for _name, _how in {
    "round": "with round()",
    "trunc": "with math.trunc()",
    "floor": "with math.floor()",
    "ceil": "with math.ceil()",
    "complex": "as a complex number",
}.items():
    setattr(Node, f"__{_name}__", _refusing(_how, "convert it inside a task"))


def _misuse(node: Node, how: str, fix: str) -> NoReturn:
    what = "the flow's input" if node._name == INPUT else f"the output of {node._name!r}"
    raise GraphError(
        f"a Node ({what}) was used {how}; a Node is a placeholder for a "
        f"value computed at run time, not the value itself: {fix}"
    )


class _Tracer:
    """Records task calls made while a flow function runs, as node specs."""

    def __init__(self, flow_name: str) -> None:
        self.flow_name = flow_name
        self.specs: dict[str, NodeSpec] = {}
        self.counts: dict[str, int] = {}

    def call(self, t: Task[Any, Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Node:
        after_arg = kwargs.pop("after", None) if kwargs else None
        name = self._name_for(t.name)
        deps: list[str] = []
        if not kwargs:
            # the usual call, f(a, b, ...) of distinct unindexed Nodes of this flow:
            # its binding is the shared positional one, nothing to template
            for a in args:
                if type(a) is not Node or a._tracer is not self or a._path or a._name in deps:
                    deps.clear()
                    break
                deps.append(a._name)
            else:
                binding = _positional_binding(len(deps))
                after = self._after(after_arg, name) if after_arg is not None else ()
                self.specs[name] = _node_spec(name, t, tuple(deps), after, binding)
                return Node(self, name)
        arg_t = tuple(self._template(a, deps, name, direct=True) for a in args)
        kw_t = tuple((k, self._template(v, deps, name, direct=True)) for k, v in kwargs.items())
        after = self._after(after_arg, name)
        self.specs[name] = _node_spec(name, t, tuple(deps), after, Binding(arg_t, kw_t))
        return Node(self, name)

    def exceptionally(self, node: Node, handler: Any) -> Node:
        t = as_task(handler)
        self._own(node, t.name)
        name = self._name_for(t.name)
        binding = Binding((Ref(0, node._path),))
        self.specs[name] = _node_spec(name, t, (node._name,), (), binding, "exceptionally")
        return Node(self, name)

    def map_call(
        self,
        t: Task[Any, Any],
        items: Any,
        max_parallelism: int,
        return_exceptions: bool,
        after_arg: Any,
    ) -> Node:
        name = self._name_for(t.name)
        deps: list[str] = []
        template = self._template(items, deps, name, direct=True)
        after = self._after(after_arg, name)
        binding = Binding(
            (template,),
            map_over=True,
            max_parallelism=max_parallelism,
            return_exceptions=return_exceptions,
        )
        self.specs[name] = _node_spec(name, t, tuple(deps), after, binding)
        return Node(self, name)

    def _name_for(self, base: str) -> str:
        n = self.counts.get(base, 0) + 1
        self.counts[base] = n
        name = base if n == 1 else f"{base}_{n}"
        while name in self.specs:  # a task literally named "x_2" next to "x" used twice
            n += 1
            self.counts[base] = n
            name = f"{base}_{n}"
        return name

    def _after(self, after_arg: Any, name: str) -> tuple[str, ...]:
        if after_arg is None:
            return ()
        items = [after_arg] if isinstance(after_arg, Node) else list(after_arg)
        out: list[str] = []
        for item in items:
            if not isinstance(item, Node):
                raise GraphError(
                    f"task {name!r}: after= takes Nodes (outputs of tasks in this flow), "
                    f"got {item!r}"
                )
            self._own(item, name)
            if item._name not in out:
                out.append(item._name)
        return tuple(out)

    def _own(self, node: Node, name: str) -> None:
        if node._tracer is not self:
            raise GraphError(
                f"task {name!r} in flow {self.flow_name!r} received {node!r}, a Node of "
                "another flow; pass values between flows as arguments"
            )

    def _template(self, value: Any, deps: list[str], name: str, *, direct: bool) -> Any:
        if isinstance(value, Node):
            self._own(value, name)
            if value._name not in deps:
                deps.append(value._name)
            return Ref(deps.index(value._name), value._path)
        if isinstance(value, list | tuple) and type(value) in (list, tuple):
            items = tuple(self._template(v, deps, name, direct=False) for v in value)
            if any(_has_ref(i) for i in items):
                return Gather("list" if isinstance(value, list) else "tuple", items)
            return value
        if type(value) is dict:
            pairs = []
            for k, v in value.items():
                if isinstance(k, Node):
                    raise GraphError(
                        f"task {name!r}: a Node cannot be a dict key; use it as a value"
                    )
                pairs.append((k, self._template(v, deps, name, direct=False)))
            if any(_has_ref(v) for _, v in pairs):
                return Gather("dict", tuple(pairs))
            return value
        if isinstance(value, Flow):
            raise GraphError(
                f"task {name!r} received the flow {value.name!r} itself; call it or pass a value"
            )
        _refuse_hidden_nodes(value, f"task {name!r}")
        return value


def _refuse_hidden_nodes(value: Any, who: str, depth: int = 0) -> None:
    """A Node inside a container that is not gathered (a set, OrderedDict, namedtuple...)."""
    if depth > 3 or isinstance(value, str | bytes | bytearray | range):
        return
    if isinstance(value, Mapping):
        items: Iterable[Any] = [*value.keys(), *value.values()]
    elif isinstance(value, Set | Sequence):
        items = value
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        items = [getattr(value, f.name, None) for f in dataclasses.fields(value)]
    else:
        return
    for item in items:
        if isinstance(item, Node):
            raise GraphError(
                f"{who} received a Node inside a {type(value).__name__}: only plain lists, "
                "tuples and dicts of Nodes are gathered; pass a list / tuple / dict, or build "
                f"the {type(value).__name__} inside a task"
            )
        _refuse_hidden_nodes(item, who, depth + 1)


def _has_ref(template: Any) -> bool:
    if isinstance(template, Ref):
        return True
    if isinstance(template, Gather):
        if template.kind == "dict":
            return any(_has_ref(v) for _, v in template.items)
        return any(_has_ref(v) for v in template.items)
    return False


def _output_template(value: Any, tracer: _Tracer, flow_name: str) -> Any:
    if isinstance(value, Node):
        tracer._own(value, flow_name)
        return _OutRef(value._name, value._path)
    if type(value) in (list, tuple):
        items = tuple(_output_template(v, tracer, flow_name) for v in value)
        if any(_has_out(i) for i in items):
            return Gather("list" if isinstance(value, list) else "tuple", items)
        return value
    if type(value) is dict:
        if any(isinstance(k, Node) for k in value):
            raise GraphError(
                f"flow {flow_name!r}'s output: a Node cannot be a dict key; use it as a value"
            )
        pairs = tuple((k, _output_template(v, tracer, flow_name)) for k, v in value.items())
        if any(_has_out(v) for _, v in pairs):
            return Gather("dict", pairs)
        return value
    _refuse_hidden_nodes(value, f"flow {flow_name!r}'s output")
    return value


def _has_out(template: Any) -> bool:
    if isinstance(template, _OutRef):
        return True
    if isinstance(template, Gather):
        if template.kind == "dict":
            return any(_has_out(v) for _, v in template.items)
        return any(_has_out(v) for v in template.items)
    return False


def _plain_parameters(fn: Any) -> tuple[str, ...] | None:
    """The parameter names of a plain function without ``*args`` / ``**kwargs``, from its code.

    None when ``inspect.signature`` must decide: not a plain function, a
    wrapper (``__wrapped__``), an explicit ``__signature__``, or a star parameter.
    """
    if type(fn) is not FunctionType:
        return None
    own = fn.__dict__
    if "__wrapped__" in own or "__signature__" in own:
        return None
    code = fn.__code__
    if code.co_flags & (CO_VARARGS | CO_VARKEYWORDS):
        return None
    return code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]


class Flow(Generic[P, R]):
    """A graph traced from a function by :func:`flow`.

    Example::

        @af.flow
        def analysis(url):
            raw = fetch(url)
            return build_report(premium(raw), standard(raw))

        analysis.run("http://x")
        analysis.graph.to_mermaid()
        with analysis.start() as running:
            running.submit("http://y").result()
    """

    def __init__(
        self,
        fn: Callable[P, R],
        *,
        name: str | None = None,
        finally_do: Callable[..., Any] | None = None,
        supervision: Supervision | None = None,
    ) -> None:
        self.fn = fn
        self._graph: Graph | None = None
        self._finally = finally_do
        self._supervision = supervision
        self._on_failure: list[Callable[[Failure], Any]] = []
        functools.update_wrapper(self, fn)
        self.name: str = name or getattr(fn, "__name__", None) or "flow"

    @property
    def graph(self) -> Graph:
        """The traced, validated :class:`Graph` (traced on first use, then cached)."""
        if self._graph is None:
            graph = self._trace()
            graph._on_failure = self._on_failure  # shared: handlers added later apply too
            graph._finally = self._finally
            graph._supervision = self._supervision
            graph.validate()
            self._graph = graph
        return self._graph

    def _trace(self) -> Graph:
        names = _plain_parameters(self.fn)
        if names is None:
            sig = inspect.signature(self.fn)
            parameters = list(sig.parameters.values())
            for p in parameters:
                self._refuse_parameter(p.name, p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
            entry = EntrySpec("params", sig, len(parameters))
        else:  # a plain function: its code object says it all (the signature is lazy)
            for name in names:
                self._refuse_parameter(name, False)
            entry = EntrySpec("params", None, len(names), self.fn)
        n_params = entry.n_params
        tracer = _Tracer(self.name)
        if n_params == 1:
            placeholders = [Node(tracer, INPUT)]
        else:
            placeholders = [Node(tracer, INPUT, (i,)) for i in range(n_params)]
        previous = _trace.push(tracer)
        try:
            result = self.fn(*placeholders)  # type: ignore[call-arg, arg-type]
        finally:
            _trace.pop(previous)
        graph = Graph(self.name)
        graph._specs = tracer.specs
        graph._output = _output_template(result, tracer, self.name)
        graph._entry = entry
        if not tracer.specs:
            raise GraphError(
                f"flow {self.name!r} calls no task; decorate the functions it calls with @af.task"
            )
        return graph

    def _refuse_parameter(self, name: str, star: bool) -> None:
        if name in _RESERVED:
            raise GraphError(
                f"flow {self.name!r} has a parameter named {name!r}, which is reserved "
                f"for run options ({', '.join(_RESERVED)}); rename the parameter"
            )
        if star:
            raise GraphError(
                f"flow {self.name!r} takes *{name}: a flow's parameters must be named; "
                "pass a list as one parameter instead"
            )

    def run(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the flow once on these arguments; return its output or raise ``af.RunFailed``.

        Run options are keyword-only: ``run_id`` (others are refused until
        their issue lands).

        Example::

            analysis.run("http://x", run_id="nightly-1")
        """
        from actorflow.runtime.running import run_once

        run_id: Any = kwargs.pop("run_id", None)
        processes: Any = kwargs.pop("processes", None)
        opts = {k: kwargs.pop(k) for k in list(kwargs) if k in _RESERVED}
        opts.pop("max_in_flight", None)
        _refuse_later_options(opts)
        return run_once(  # type: ignore[no-any-return]
            self.graph, args, kwargs, run_id=run_id, processes=processes
        )

    def start(
        self,
        *,
        max_in_flight: int = 1024,
        run_id: str | None = None,
        processes: int | None = None,
        max_tasks_per_worker: int | None = None,
        max_worker_rss_mb: float | None = None,
        **opts: Any,
    ) -> RunningFlow:
        """Start the flow as a long-lived graph; use it as a context manager.

        Example::

            with analysis.start(max_in_flight=1_000) as running:
                fut = running.submit("http://a")
                for out in running.map(urls): ...
        """
        return self.graph.start(
            max_in_flight=max_in_flight,
            run_id=run_id,
            processes=processes,
            max_tasks_per_worker=max_tasks_per_worker,
            max_worker_rss_mb=max_worker_rss_mb,
            **opts,
        )

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Call the flow as a plain function (outside a flow: tasks run directly).

        Inside another flow, nested sub-flows are not implemented yet and are refused.
        """
        if _trace.depth and _trace.current() is not None:
            raise GraphError(
                f"flow {self.name!r} was called inside another flow: nested sub-flows are "
                "not implemented yet; call its tasks directly in the outer flow for now"
            )
        return self.fn(*args, **kwargs)

    def on_failure(self, handler: Callable[[Failure], Any]) -> Callable[[Failure], Any]:
        """Register ``handler(af.Failure)``, called once for every failure whose retries ran out.

        Also for failures later recovered by ``exceptionally``. It runs before
        ``run()`` returns or the item's future resolves; a handler that raises
        is logged (``on_failure_handler_failed``) and never changes the
        result. Returns the handler, so it can be used as a decorator.

        Example::

            @analysis.on_failure
            def alert(failure):
                pager.send(f"{failure.task} failed: {failure.message}")
        """
        if not callable(handler):
            raise TypeError(f"on_failure needs a callable, got {handler!r}")
        self._on_failure.append(handler)
        return handler

    def __repr__(self) -> str:
        return f"<af.flow {self.name!r}>"


@overload
def flow(fn: Callable[P, R], /) -> Flow[P, R]: ...


@overload
def flow(
    fn: None = None,
    /,
    *,
    name: str | None = None,
    finally_do: Callable[..., Any] | None = None,
    supervision: Supervision | None = None,
) -> Callable[[Callable[P, R]], Flow[P, R]]: ...


def flow(
    fn: Callable[P, R] | None = None,
    /,
    *,
    name: str | None = None,
    finally_do: Callable[..., Any] | None = None,
    supervision: Supervision | None = None,
) -> Flow[P, R] | Callable[[Callable[P, R]], Flow[P, R]]:
    """Turn a function that calls tasks into a dataflow graph.

    Independent calls become parallel nodes; a node fires once all its inputs
    have arrived. A list / tuple / dict of Nodes passed as an argument is
    gathered (fan-in). ``after=[node, ...]`` on a task call orders without
    passing data. Return any nesting of Nodes and constants.

    Example::

        @af.flow
        def analysis(url):
            raw = fetch(url)
            a, b = premium(raw), standard(raw)     # run in parallel
            report = build_report(a, b)            # fires when both arrived
            audit(raw, after=[report])             # ordering without data
            return {"report": report}

        analysis.run("http://x")                   # -> {"report": ...}

    ``finally_do=cleanup`` calls ``cleanup(outcome)`` once per run / item,
    after success, failure (``outcome`` is the ``af.Failure``) or cancellation;
    it does not change the result, but if it raises, its failure replaces the
    result (never swallowed). A cleanup taking no parameter is called with
    none. ``supervision=af.Supervision(...)`` sets the restart policy of the
    run's supervisor (see :class:`~actorflow.Supervision`).

    Example::

        @af.flow(finally_do=release_lock)
        def job(x): ...
    """
    if finally_do is not None and not callable(finally_do):
        raise GraphError(
            f"finally_do must be a callable (a task or a function), got {finally_do!r}"
        )
    if supervision is not None and not isinstance(supervision, Supervision):
        raise GraphError(f"supervision must be an af.Supervision(...), got {supervision!r}")

    def wrap(f: Callable[P, R]) -> Flow[P, R]:
        return Flow(f, name=name, finally_do=finally_do, supervision=supervision)

    if fn is not None:
        return wrap(fn)
    return wrap


def map(
    fn: Callable[..., R],
    items: Iterable[Any],
    *,
    max_parallelism: int | None = None,
    return_exceptions: bool = False,
    after: Any = None,
) -> list[R]:
    """Dynamic fan-out: call ``fn`` on every element of ``items``; returns the list.

    Inside a flow, ``items`` is usually a Node whose value is a list known only
    at run time; the result is a Node of the list of results, in order. Up to
    ``max_parallelism`` calls run at once (default ``min(32, cores + 4)``). A
    failing element fails the node with every element failure, unless
    ``return_exceptions=True``, which puts each exception in its place.
    Outside a flow it is a plain sequential map.

    Example::

        @af.flow
        def totals(path):
            parts = af.map(process, split(path), max_parallelism=4)
            return aggregate(parts)
    """
    t = as_task(fn)
    parallelism = _DEFAULT_MAP_PARALLELISM if max_parallelism is None else max_parallelism
    if not isinstance(parallelism, int) or parallelism < 1:
        raise GraphError(
            f"af.map({t.name}): max_parallelism must be an int >= 1, got {max_parallelism!r}"
        )
    if _trace.depth:
        tracer = _trace.current()
        if tracer is not None:
            return tracer.map_call(  # type: ignore[no-any-return]
                t, items, parallelism, return_exceptions, after
            )
    if isinstance(items, Node):
        raise GraphError("af.map received a Node outside the flow that traced it")
    out: list[Any] = []
    for item in items:
        try:
            out.append(t(item))
        except Exception as exc:
            if not return_exceptions:
                raise
            out.append(exc)
    return out
