"""The Graph IR: nodes, edges, bindings, validation and topological order.

A :class:`Graph` is a description, separate from execution. Traced flows
(:func:`actorflow.flow`) compile to it; the explicit builder
(``Graph(name).add(...)``) writes it directly. It is validated once, when it is
first used (``.nodes`` of a flow, ``run``, ``start``, ``to_mermaid``), before
any actor starts, and the validated form is cached until the next ``add``.

How a node's call is built from its inputs is a *binding*: a template of the
call's positional and keyword arguments in which :class:`Ref` stands for the
value of one data dependency (optionally indexed by a path, for ``node[k]``)
and :class:`Gather` for a list / tuple / dict of such values. A gather omits
skipped elements; a direct reference to a skipped value skips the node.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from inspect import CO_VARARGS
from types import FunctionType, MethodType
from typing import TYPE_CHECKING, Any, Literal

from actorflow.errors import GraphError
from actorflow.task import Task, as_task

if TYPE_CHECKING:
    from actorflow.runtime.running import RunningFlow

__all__ = ["INPUT", "Binding", "Gather", "Graph", "NodeSpec", "Ref"]

INPUT = "<input>"
"""Name of the pseudo-node that carries an item's arguments into the graph."""

_RESERVED = ("store", "run_id", "processes", "max_in_flight", "backend")


@dataclass(frozen=True, slots=True)
class Ref:
    """The value of data dependency number ``dep`` of a node, indexed by ``path``."""

    dep: int
    path: tuple[Any, ...] = ()


@dataclass(frozen=True, slots=True)
class Gather:
    """A list, tuple or dict built from templates; skipped elements are omitted."""

    kind: Literal["list", "tuple", "dict"]
    items: tuple[Any, ...]  # templates; for dicts, (key, template) pairs


@dataclass(frozen=True, slots=True)
class Binding:
    """How a node's call arguments are built from its dependency values.

    ``passthrough`` (builder roots): called with the run's own arguments.
    ``map_over`` (``af.map``): the node calls its task once per element of the
    single argument, up to ``max_parallelism`` at once.
    """

    args: tuple[Any, ...] = ()
    kwargs: tuple[tuple[str, Any], ...] = ()
    passthrough: bool = False
    map_over: bool = False
    max_parallelism: int = 1
    return_exceptions: bool = False


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """One node of a graph: a task, its data dependencies, ordering dependencies and binding.

    ``deps`` are the names of the nodes whose outputs feed the call (``INPUT``
    for the run's arguments), in the order :class:`Ref` indexes them;
    ``after`` are names this node only waits for.

    Example::

        spec = flow.graph.nodes[0]
        spec.name, spec.task, spec.deps, spec.after
    """

    name: str
    task: Task[Any, Any]
    deps: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    binding: Binding = field(default_factory=Binding)
    kind: str = "task"  # "task", or "exceptionally": a handler that turns a failure into a value
    inputs: tuple[str, ...] = field(init=False, repr=False, compare=False)
    """Every node this one waits for: data deps, then ``after`` deps not already there."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", _inputs(self.deps, self.after))


def _inputs(deps: tuple[str, ...], after: tuple[str, ...]) -> tuple[str, ...]:
    if not after:
        return deps
    return deps + tuple(a for a in after if a not in deps)


# The slot setters of NodeSpec's fields, in declaration order (a frozen dataclass
# sets each field through object.__setattr__, which costs twice as much).
_SET_NAME, _SET_TASK, _SET_DEPS, _SET_AFTER, _SET_BINDING, _SET_KIND, _SET_INPUTS = (
    getattr(NodeSpec, f.name).__set__ for f in fields(NodeSpec)
)


def _node_spec(
    name: str,
    task: Task[Any, Any],
    deps: tuple[str, ...],
    after: tuple[str, ...],
    binding: Binding,
    kind: str = "task",
) -> NodeSpec:
    """``NodeSpec(name, task, deps, after, binding, kind)`` at half the cost (hot paths).

    Graph building makes one spec per node (``Graph.add``, every task call a
    flow traces); the result is equal to the dataclass-built spec.
    """
    spec: NodeSpec = object.__new__(NodeSpec)
    _SET_NAME(spec, name)
    _SET_TASK(spec, task)
    _SET_DEPS(spec, deps)
    _SET_AFTER(spec, after)
    _SET_BINDING(spec, binding)
    _SET_KIND(spec, kind)
    _SET_INPUTS(spec, _inputs(deps, after) if after else deps)
    return spec


# Bindings are immutable: the common shapes are built once and shared by every
# node (and graph) that has them, so that 1,000 nodes of the same shape are
# checked and compiled once -- see ``_positional_binding``.
_PASSTHROUGH = Binding(passthrough=True)
_POSITIONAL: dict[int, Binding] = {}
"""n -> the shared positional binding of n arguments (see ``_positional_binding``)."""
_REFS: list[Ref] = []  # Ref(i) for every i below the widest binding built so far
_NARROW = 256  # shared for good up to this width; wider ones, only the latest few
_WIDE: list[int] = []  # widths above _NARROW in _POSITIONAL, oldest first
_POSITIONAL_LOCK = threading.Lock()


def _positional_binding(n: int) -> Binding:
    """``Binding(args=(Ref(0), ..., Ref(n - 1)))``: data deps passed positionally, in order.

    Shared: the same object for every node of that shape (a wide fan-in such as
    a 1,000-input sum is built once for all the graphs that have it, not per graph).
    """
    b = _POSITIONAL.get(n)
    if b is None:
        with _POSITIONAL_LOCK:  # graphs may be built in several threads at once
            b = _POSITIONAL.get(n)
            if b is None:
                if len(_REFS) < n:
                    _REFS.extend([Ref(i) for i in range(len(_REFS), n)])
                b = _POSITIONAL[n] = Binding(args=tuple(_REFS[:n]))
                if n > _NARROW:
                    _WIDE.append(n)
                    if len(_WIDE) > 8:
                        del _POSITIONAL[_WIDE.pop(0)]
    return b


class Graph:
    """A dataflow graph: the IR that traced flows compile to, and an explicit builder.

    ``add(name, fn, depends_on=[...], after=[...])`` adds a node. Outputs of
    ``depends_on`` are passed positionally in list order; ``after`` only
    orders. Root nodes receive the run's arguments if they take parameters,
    none otherwise. ``run()`` returns a dict of the outputs of the nodes nothing
    depends on (by data or by ``after``); a skipped output is ``af.SKIP``.
    Forward references are allowed: names are checked when the graph is first
    run, started or drawn.

    Example::

        g = af.Graph("etl")
        g.add("extract", extract)
        g.add("transform", transform, depends_on=["extract"])
        g.add("load", load, depends_on=["transform"])
        g.run()                 # -> {"load": ...}
        print(g.to_mermaid())
        with g.start() as running:
            running.submit().result()
    """

    def __init__(
        self,
        name: str = "graph",
        *,
        finally_do: Callable[..., Any] | None = None,
        supervision: Any = None,
    ) -> None:
        self.name = name
        self._on_failure: list[Callable[[Any], Any]] = []
        self._finally = finally_do
        self._supervision = supervision
        self._specs: dict[str, NodeSpec] = {}
        self._output: Any = None  # template over node names; None: dict of leaves
        self._entry: EntrySpec = EntrySpec.passthrough()
        self._validated: _Validated | None = None
        self._stream_shaped = False

    # -- building ------------------------------------------------------------
    def add(
        self,
        name: str,
        fn: Callable[..., Any],
        depends_on: Iterable[str] = (),
        after: Iterable[str] = (),
    ) -> Graph:
        """Add node ``name`` running ``fn`` (a task or any callable); returns the graph.

        Example::

            g.add("transform", transform, depends_on=["extract"], after=["audit"])
        """
        if not isinstance(name, str) or not name:
            raise GraphError(f"graph {self.name!r}: a node name must be a non-empty string")
        if name in self._specs:
            raise GraphError(
                f"graph {self.name!r} already has a node {name!r}; node names are unique "
                "per graph: pick another name"
            )
        if name == INPUT:
            raise GraphError(f"graph {self.name!r}: {INPUT!r} is reserved")
        if isinstance(depends_on, str) or isinstance(after, str):
            raise GraphError(
                f"task {name!r}: depends_on and after take a list of names, "
                f"e.g. depends_on=[{depends_on!r}]"
            )
        t = as_task(fn)
        deps = tuple(depends_on)
        if deps:
            if len(set(deps)) != len(deps):
                raise GraphError(f"task {name!r} lists a dependency twice in depends_on={deps!r}")
            binding = _positional_binding(len(deps))
        else:
            # a node without data dependencies receives the run's arguments,
            # whether or not it also waits (after=) for other nodes
            deps = (INPUT,)
            binding = _PASSTHROUGH
        self._specs[name] = _node_spec(name, t, deps, tuple(after), binding)
        self._validated = None
        return self

    def on_failure(self, handler: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """Register ``handler(af.Failure)`` for every failure whose retries ran out.

        Example::

            g.on_failure(lambda failure: alerts.append(failure.task))
        """
        if not callable(handler):
            raise TypeError(f"on_failure needs a callable, got {handler!r}")
        self._on_failure.append(handler)
        return handler

    # -- inspection ----------------------------------------------------------
    @property
    def graph(self) -> Graph:
        """This graph, validated: forward references, cycles and arity are checked
        here, as for a flow's ``.graph`` (``nodes`` and ``edges`` do not check).

        Example::

            g = af.Graph("etl").add("load", load, depends_on=["extract"])
            g.graph   # GraphError: task 'load' depends on 'extract', but graph 'etl' has no ...
        """
        self.validate()
        return self

    @property
    def nodes(self) -> tuple[NodeSpec, ...]:
        """The node specs (``.name``, ``.task``, ``.deps``, ``.after``), in insertion order."""
        return tuple(self._specs.values())

    @property
    def edges(self) -> tuple[tuple[str, str], ...]:
        """``(src_name, dst_name)`` for every data and ``after`` edge between nodes."""
        out: list[tuple[str, str]] = []
        for spec in self._specs.values():
            out.extend((src, spec.name) for src in spec.inputs if src != INPUT)
        return tuple(out)

    def to_mermaid(self) -> str:
        """The graph as a Mermaid flowchart (edges ``-->``; ordering-only edges labelled).

        Example::

            print(flow.graph.to_mermaid())
        """
        self.validate()
        ids = {name: f"n{i}" for i, name in enumerate(self._specs)}
        lines = ["flowchart TD"]
        lines.extend(f'    {ids[name]}["{_escape(name)}"]' for name in self._specs)
        for spec in self._specs.values():
            lines.extend(
                f"    {ids[src]} --> {ids[spec.name]}" for src in spec.deps if src != INPUT
            )
            lines.extend(
                f"    {ids[src]} -->|after| {ids[spec.name]}"
                for src in spec.after
                if src not in spec.deps
            )
        return "\n".join(lines)

    def to_dot(self) -> str:
        """The graph in Graphviz DOT (edges ``->``; ordering-only edges dashed).

        Example::

            Path("g.dot").write_text(flow.graph.to_dot())
        """
        self.validate()
        lines = [f"digraph {_dot_id(self.name)} {{", "    rankdir=TB;"]
        lines.extend(f"    {_dot_id(name)};" for name in self._specs)
        for spec in self._specs.values():
            lines.extend(
                f"    {_dot_id(src)} -> {_dot_id(spec.name)};" for src in spec.deps if src != INPUT
            )
            lines.extend(
                f"    {_dot_id(src)} -> {_dot_id(spec.name)} [style=dashed];"
                for src in spec.after
                if src not in spec.deps
            )
        lines.append("}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"<af.Graph {self.name!r}: {len(self._specs)} nodes>"

    # -- validation ----------------------------------------------------------
    def validate(self) -> _Validated:
        """Check the graph (names, cycles, arity) and return its validated form.

        Called by ``run``, ``start``, ``to_mermaid`` and ``to_dot``; raises
        :class:`~actorflow.GraphError` naming the culprit.
        """
        if self._validated is not None:
            return self._validated
        specs = self._specs
        if not specs:
            raise GraphError(f"graph {self.name!r} has no nodes; add at least one task")
        # one pass over every edge: consumers (children) and in-degrees
        consumers: dict[str, list[str]] = {name: [] for name in specs}
        indegree: dict[str, int] = {}
        try:
            for spec in specs.values():
                n = 0
                for src in spec.inputs:
                    if src != INPUT:
                        consumers[src].append(spec.name)
                        n += 1
                indegree[spec.name] = n
        except KeyError:
            _refuse_unknown_names(self.name, specs)
            raise  # not reached: some name is unknown
        order = _topological_order(self.name, specs, consumers, indegree)
        # a node with the task and binding of the node before it (a builder's
        # fan-out) is known to fit; a process task is shipped (pickled) once
        fits: tuple[Any, Any] = (None, None)
        shipped: set[int] = set()
        for spec in specs.values():
            t = spec.task
            if t is not fits[0] or spec.binding is not fits[1]:
                _check_arity(self.name, spec)
                fits = (t, spec.binding)
            if t.executor == "process" and id(t) not in shipped:
                _check_picklable(spec)
                shipped.add(id(t))
        leaves = tuple(name for name in order if not consumers[name])
        output = self._output
        if output is None:
            output = Gather("dict", tuple((name, _OutRef(name)) for name in leaves))
            output_names: tuple[str, ...] = leaves
        else:
            output_names = tuple(_template_names(output))
        self._validated = _Validated(
            tuple(order),
            {k: tuple(v) for k, v in consumers.items()},
            leaves,
            output,
            output_names,
            self._entry,
        )
        return self._validated

    # -- running -------------------------------------------------------------
    def run(
        self, *args: Any, run_id: str | None = None, processes: int | None = None, **kwargs: Any
    ) -> Any:
        """Run the graph once with these arguments and return its output.

        Raises :class:`~actorflow.RunFailed` when a task failed. Run options
        are keyword-only: ``run_id``; ``store``, ``processes`` and ``backend``
        are refused until their issues land.

        Example::

            g.run("input.csv")   # -> {"load": ...}
        """
        from actorflow.runtime.running import run_once

        opts, kwargs = _split_run_options(kwargs)
        return run_once(self, args, kwargs, run_id=run_id, processes=processes, **opts)

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
        """Start the graph as a long-lived running flow (a context manager).

        ``processes``: size of the run's worker-process pool (process tasks).
        ``max_tasks_per_worker`` / ``max_worker_rss_mb``: recycle a worker
        process (between batches) after that many items, or once its resident
        memory exceeds that many MB.

        Example::

            with g.start(max_in_flight=100) as running:
                fut = running.submit(x)
                for out in running.map(xs): ...
        """
        from actorflow.runtime.running import RunningFlow

        _refuse_later_options(opts)
        return RunningFlow(
            self,
            max_in_flight=max_in_flight,
            run_id=run_id,
            processes=processes,
            max_tasks_per_worker=max_tasks_per_worker,
            max_worker_rss_mb=max_worker_rss_mb,
        )


@dataclass(frozen=True, slots=True)
class EntrySpec:
    """How the arguments of ``submit`` / ``map`` / ``run`` become an item's input value.

    ``passthrough``: the value is ``(args, kwargs)`` (builder graphs).
    Otherwise the flow has ``params`` positional parameters; with one
    parameter the value is the argument itself, else a tuple of them.
    """

    mode: Literal["passthrough", "params"]
    _signature: inspect.Signature | None = None
    n_params: int = 0
    fn: Any = field(default=None, repr=False, compare=False)
    """The flow function, whose signature is read on first need when not given."""

    @classmethod
    def passthrough(cls) -> EntrySpec:
        return cls("passthrough")

    @property
    def signature(self) -> inspect.Signature | None:
        """The flow function's signature (binding keyword or missing arguments).

        Read lazily: a run called with exactly its positional parameters never
        needs it, and ``inspect.signature`` costs more than tracing a small flow.
        """
        sig = self._signature
        if sig is None and self.fn is not None:
            sig = inspect.signature(self.fn)
            object.__setattr__(self, "_signature", sig)
        return sig

    def __reduce__(self) -> tuple[Any, ...]:
        # pickled with its signature, as before it was lazy: never with the function
        return (EntrySpec, (self.mode, self.signature, self.n_params))


@dataclass(frozen=True, slots=True)
class _Validated:
    order: tuple[str, ...]
    consumers: Mapping[str, tuple[str, ...]]
    leaves: tuple[str, ...]
    output: Any
    output_names: tuple[str, ...]
    entry: EntrySpec


def _template_names(template: Any) -> Iterable[str]:
    """Names of the nodes an output template refers to."""
    if isinstance(template, Gather):
        for item in template.items:
            yield from _template_names(item[1] if template.kind == "dict" else item)
    elif isinstance(template, _OutRef):
        yield template.name


@dataclass(frozen=True, slots=True)
class _OutRef:
    """In a flow's output template: the value of node ``name`` indexed by ``path``."""

    name: str
    path: tuple[Any, ...] = ()


def _refuse_unknown_names(graph: str, specs: Mapping[str, NodeSpec]) -> None:
    """Raise GraphError for the first dependency (in insertion order) naming no node."""
    known = ", ".join(repr(n) for n in list(specs)[:20])
    for spec in specs.values():
        for kind, names in (("depends on", spec.deps), ("runs after", spec.after)):
            for dep in names:
                if dep != INPUT and dep not in specs:
                    raise GraphError(
                        f"task {spec.name!r} {kind} {dep!r}, but graph {graph!r} "
                        f"has no node {dep!r}; known nodes: {known}"
                    )


def _topological_order(
    graph: str,
    specs: Mapping[str, NodeSpec],
    children: Mapping[str, list[str]],
    indegree: dict[str, int],
) -> list[str]:
    """Kahn's algorithm (FIFO); on a cycle, raise GraphError printing the cycle path.

    ``indegree`` is consumed. The order is the order in which nodes become
    ready, roots first in insertion order.
    """
    order = [name for name, d in indegree.items() if d == 0]
    i = 0
    while i < len(order):
        for child in children[order[i]]:
            d = indegree[child] - 1
            indegree[child] = d
            if d == 0:
                order.append(child)
        i += 1
    if len(order) != len(specs):
        cycle = _find_cycle(specs, {n for n, d in indegree.items() if d > 0})
        path = " -> ".join(repr(n) for n in cycle)
        raise GraphError(
            f"graph {graph!r} has a cycle: {path}; a dataflow graph must be acyclic: "
            "remove one of these dependencies"
        )
    return order


def _find_cycle(specs: Mapping[str, NodeSpec], candidates: set[str]) -> list[str]:
    # Walk backwards along inputs inside the unresolved set until a node repeats.
    start = sorted(candidates)[0]
    seen: dict[str, int] = {}
    path: list[str] = []
    node = start
    while node not in seen:
        seen[node] = len(path)
        path.append(node)
        node = next(src for src in specs[node].inputs if src in candidates)
    cycle = path[seen[node] :]
    cycle.reverse()  # follow edge direction: src -> dst
    order = {name: i for i, name in enumerate(specs)}
    first = min(range(len(cycle)), key=lambda i: order[cycle[i]])
    cycle = cycle[first:] + cycle[:first]  # start at the node added first
    return [*cycle, cycle[0]]


def _fits_positionally(fn: Any, n: int) -> bool:
    """Fast check, from the code object, that a plain function accepts ``n`` positional args."""
    # (a function's own attributes live in its __dict__: no hasattr, which raises inside)
    if type(fn) is not FunctionType or "__wrapped__" in fn.__dict__:
        return False  # not a plain function, or a wrapper: let inspect read the signature
    code = fn.__code__
    if code.co_kwonlyargcount and len(fn.__kwdefaults__ or ()) < code.co_kwonlyargcount:
        return False  # a required keyword-only parameter: let inspect explain
    required = code.co_argcount - len(fn.__defaults__ or ())
    if n < required:
        return False
    return n <= code.co_argcount or bool(code.co_flags & CO_VARARGS)


def _check_arity(graph: str, spec: NodeSpec) -> None:
    t = spec.task
    b = spec.binding
    if b.passthrough:
        return  # root of a builder graph: bound against the run's arguments at run time
    args: tuple[Any, ...] = b.args
    kwargs = dict(b.kwargs) if b.kwargs else {}
    if b.map_over:
        args, kwargs = (None,), {}
    if not kwargs and not t.is_class and _fits_positionally(t.fn, len(args)):
        return
    sig = t.signature()
    try:
        sig.bind(*args, **kwargs)
    except TypeError as exc:
        shown = ", ".join(
            [*("<input>" for _ in args), *(f"{k}=<input>" for k in kwargs)],
        )
        raise GraphError(
            f"task {spec.name!r} in graph {graph!r} cannot be called as "
            f"{t.name}({shown}): {exc}; its signature is {t.name}{sig}"
        ) from None


def _parts_of(value: Any) -> list[tuple[str, Any]]:
    """The named pieces cloudpickle ships with ``value`` (for naming a culprit)."""
    if isinstance(value, MethodType):
        return [("self", value.__self__), ("function", value.__func__)]
    if isinstance(value, FunctionType):
        code = value.__code__
        parts: list[tuple[str, Any]] = []
        for cell_name, cell in zip(code.co_freevars, value.__closure__ or (), strict=False):
            try:
                parts.append((cell_name, cell.cell_contents))
            except ValueError:  # an empty cell
                pass
        fn_globals = value.__globals__
        parts.extend((name, fn_globals[name]) for name in code.co_names if name in fn_globals)
        defaults = value.__defaults__ or ()
        names = code.co_varnames[: code.co_argcount][-len(defaults) :] if defaults else ()
        parts.extend((f"default of {n}", d) for n, d in zip(names, defaults, strict=False))
        parts.extend((f"default of {n}", d) for n, d in (value.__kwdefaults__ or {}).items())
        return parts
    if isinstance(value, dict):
        return [(f"[{k!r}]", v) for k, v in list(value.items())[:50]]
    if isinstance(value, list | tuple):
        return [(f"[{i}]", v) for i, v in enumerate(value[:50])]
    attrs = getattr(value, "__dict__", None)
    if isinstance(attrs, dict) and not isinstance(value, type):
        return [(f".{k}", v) for k, v in list(attrs.items())[:50]]
    return []


def _unpicklable_part(value: Any, dumps: Callable[[Any], bytes], depth: int = 0) -> str | None:
    """The path to the innermost piece of ``value`` that does not pickle, e.g.
    ``'helper' -> 'LOCK' (_thread.lock)``; None when no single piece is to blame."""
    for name, part in _parts_of(value):
        try:
            dumps(part)
            continue
        except Exception:
            pass
        inner = _unpicklable_part(part, dumps, depth + 1) if depth < 3 else None
        here = f"{name!r}" if not name.startswith((".", "[")) else name
        if inner is not None:
            sep = "" if inner.startswith((".", "[")) else " -> "
            return f"{here}{sep}{inner}"
        return f"{here} ({type(part).__module__}.{type(part).__qualname__})"
    return None


def _check_picklable(spec: NodeSpec) -> None:
    """Refuse a process task that cannot be shipped to a worker, naming the culprit."""
    import cloudpickle

    fn = spec.task.fn
    try:
        cloudpickle.dumps(fn)
        if spec.task.key is not None:
            cloudpickle.dumps(spec.task.key)
        return
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
    culprit = _unpicklable_part(fn, cloudpickle.dumps)
    what = culprit or f"it ({reason})"
    raise GraphError(
        f"task {spec.name!r} cannot run in a worker process: {what} is not picklable; "
        "create that object inside the task (e.g. open the connection there), "
        "or use executor='thread'"
    )


def _escape(name: str) -> str:
    return name.replace('"', "#quot;")


def _dot_id(name: str) -> str:
    escaped = name.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def _refuse_later_options(opts: Mapping[str, Any]) -> None:
    later = {
        "store": "the durable store",
        "backend": "other backends (Ray)",
    }
    for key in opts:
        if key in later:
            raise GraphError(
                f"run option {key}= is not implemented yet ({later[key]}); remove it for now"
            )
        raise TypeError(f"unknown run option {key!r}")


def _split_run_options(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    opts = {k: kwargs.pop(k) for k in list(kwargs) if k in _RESERVED}
    if "max_in_flight" in opts:
        opts.pop("max_in_flight")  # meaningless for one item; accepted for symmetry
    _refuse_later_options({k: v for k, v in opts.items() if k != "run_id"})
    opts.pop("run_id", None)
    return opts, kwargs
