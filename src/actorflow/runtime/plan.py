"""Placement and code generation: from a validated Graph to runnable segments.

A *segment* is the unit a host runs: one node, or a linear chain of stateless
thread nodes fused together (each feeding only the next, which reads only it),
so that an item crosses the chain without a hop between actors. Every node
stays a logical actor with its own name, counters and failure attribution.

For each segment two forms of the chain are compiled:

- the *fast loop*: generated Python that runs a whole batch of clean values
  (no skip or failure among them) through every node of the chain, item by
  item, in one tight loop, stopping at the first exception;
- the *careful step*: one node at a time for one item, aware of skip markers,
  failures and gathers, timing the call; it handles special values, the item
  that raised, and the latency samples.

Both build a node's arguments from the same binding template, so they agree.
"""

from __future__ import annotations

import keyword
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from actorflow._markers import SKIP
from actorflow.errors import GraphError
from actorflow.graph import (
    _POSITIONAL,
    INPUT,
    Gather,
    Graph,
    NodeSpec,
    Ref,
    _OutRef,
    _Validated,
)

__all__ = ["NodePlan", "Plan", "SegmentPlan", "compile_plan"]


@dataclass(slots=True)
class NodePlan:
    """Static, per-graph facts about one node (shared by every run of the graph)."""

    name: str
    spec: NodeSpec
    ports: tuple[str, ...]  # input node names (INPUT for the run's arguments)
    n_data: int  # how many leading ports carry data (the rest only order)
    expr: str  # call expression over `v` and `f` (the function or instance)
    consts: dict[str, Any]
    call: Callable[[Any, Any], Any]  # call(f, v): the careful-path call, clean inputs
    is_class: bool
    kind: str  # "task", "map" (af.map) or "exceptionally" (a failure handler)
    first_arg: Callable[[Any], Any] | None = None  # keyed tasks: what key= is applied to


@dataclass(slots=True)
class SegmentPlan:
    """A chain of nodes run by one logical actor (the head may join several inputs)."""

    index: int
    nodes: list[NodePlan]
    consumers: list[tuple[int, int]]  # (segment index, port) fed by the tail; -1: the sink
    fusable: bool = False  # plain function nodes only: a fast loop can be generated
    _fast: Callable[..., None] | None = None
    _remote: Callable[..., None] | None = None

    def fast(self) -> Callable[..., None] | None:
        """The generated loop ``fast(vals, out, skips, err)``, built on first need.

        None when the segment holds class or map nodes (careful path only).
        A run of single items never needs it, so graphs built for one run
        do not pay for code generation.
        """
        if self._fast is None and self.fusable:
            self._fast = _compile_fast(self)
        return self._fast

    def remote_loop(self) -> Callable[..., None] | None:
        """The generated loop run inside a worker process for a process chain.

        ``remote(vals, out, kept_at, err, tick, i, skips) -> int`` numbers the
        values from ``i`` and appends each kept result to ``out``, its number to
        ``kept_at`` (a ``SKIP`` ends an item's walk and appends nothing; from a
        node ``k`` before the last, it adds 1 to ``skips[k]``); when
        node ``k`` raises (any ``BaseException``: the worker must survive its
        tasks), ``(k, exception)`` is appended to ``err`` and the loop returns;
        it also returns after an item that ends with ``tick[0]`` set (the
        worker's ticker sets it periodically so that results flush on time).
        It returns the number of the next item. None for class
        or map nodes. Only clean values: the worker runs items whose binding
        was applied in the parent (``_ArgsCall``) through the per-node chain.
        """
        if self._remote is None and all(
            n.kind == "task" and not n.is_class and n.spec.task.executor == "process"
            for n in self.nodes
        ):
            self._remote = _compile_remote(self)
        return self._remote

    @property
    def head(self) -> NodePlan:
        return self.nodes[0]

    @property
    def tail(self) -> NodePlan:
        return self.nodes[-1]

    @property
    def workers(self) -> int:
        return self.head.spec.task.workers


@dataclass(slots=True)
class Plan:
    """Everything a run needs to know about a graph, compiled once per graph."""

    graph_name: str
    segments: list[SegmentPlan]
    roots: list[tuple[int, int]]  # (segment, port) that receive each item's input
    sink_ports: tuple[str, ...]  # node names the sink joins (outputs, then leaves)
    sink_feeds: dict[str, int]  # node name -> sink port
    output: Any  # output template (with _OutRef over sink port names)
    output_fn: Callable[[tuple[Any, ...]], Any]  # clean sink values -> the item's output
    validated: _Validated
    n_nodes: int


def compile_plan(graph: Graph) -> Plan:
    """Validate ``graph`` and compile its placement and fast loops (cached on the graph).

    Example::

        plan = compile_plan(flow.graph)
        [s.nodes[0].name for s in plan.segments]
    """
    cached = getattr(graph, "_plan", None)
    validated = graph.validate()
    if cached is not None and cached.validated is validated:
        return cached  # type: ignore[no-any-return]
    specs = graph._specs
    sink_ports = tuple(dict.fromkeys([*validated.output_names, *validated.leaves]))
    sink_feeds = {name: i for i, name in enumerate(sink_ports)}
    consumers = validated.consumers

    # Fusion: B joins A's segment when A feeds only B, B reads only A, A is not an
    # output, and both are plain single-worker function tasks.
    def fusable(node: NodePlan) -> bool:
        t = node.spec.task
        return (
            t.executor == "thread"
            and t.workers == 1
            and not t.is_class
            and node.kind != "map"
            and t.timeout is None
        )

    def fusable_process(node: NodePlan) -> bool:
        # process function tasks fuse into one chain run inside the worker (items in,
        # only results out); a retry or timeout policy keeps a node on its own
        t = node.spec.task
        return (
            t.executor == "process"
            and not t.is_class
            and node.kind == "task"
            and t.retries == 0
            and t.timeout is None
        )

    def direct(node: NodePlan) -> bool:
        # fused code stops an item at its first skip: only right when the next node
        # uses its input directly (not only through after= or inside a gather)
        b = node.spec.binding
        if b.passthrough or (b.args and isinstance(b.args[0], Ref)):
            return True  # the usual shapes, decided without a scan
        return any(isinstance(t, Ref) for t in (*b.args, *(v for _, v in b.kwargs)))

    # nodes are compiled and placed in topological order: a node's inputs are placed
    # before it; nodes sharing a binding share their compiled call (see _node_plan)
    nodes: dict[str, NodePlan] = {}
    fits: dict[str, bool] = {}  # node name -> fusable(node)
    calls: dict[tuple[int, int, int], tuple[str, dict[str, Any], Any]] = {}
    seg_of: dict[str, int] = {}
    segments: list[SegmentPlan] = []
    for name in validated.order:
        node = nodes[name] = _node_plan(specs[name], calls)
        fit = fits[name] = fusable(node)
        ports = node.ports
        if len(ports) == 1 and ports[0] != INPUT:
            prev = ports[0]
            if consumers[prev] == (name,) and prev not in sink_feeds:
                prev_node = nodes[prev]
                seg = segments[seg_of[prev]]
                if (
                    seg.nodes[-1] is prev_node
                    and direct(node)
                    and (
                        (fit and fits[prev])
                        or (
                            fusable_process(prev_node)
                            and fusable_process(node)
                            and prev_node.spec.task.workers == node.spec.task.workers
                        )
                    )
                ):
                    seg.nodes.append(node)
                    seg_of[name] = seg.index
                    continue
        seg_of[name] = len(segments)
        segments.append(SegmentPlan(len(segments), [node], []))

    roots: list[tuple[int, int]] = []
    for seg in segments:
        index = seg.index
        chain = seg.nodes
        for port, src in enumerate(chain[0].ports):
            if src == INPUT:
                roots.append((index, port))
            else:
                segments[seg_of[src]].consumers.append((index, port))
        feed = sink_feeds.get(chain[-1].name)
        if feed is not None:
            seg.consumers.append((-1, feed))
        if len(chain) == 1:
            seg.fusable = fits[chain[0].name]
        else:
            seg.fusable = all(fits[n.name] for n in chain)
    sink_input_roots = [i for i, name in enumerate(sink_ports) if name == INPUT]
    if sink_input_roots:  # the flow returns one of its own parameters
        roots.extend((-1, port) for port in sink_input_roots)

    output = _rename_output(validated.output, sink_feeds)
    plan = Plan(
        graph_name=graph.name,
        segments=segments,
        roots=roots,
        sink_ports=sink_ports,
        sink_feeds=sink_feeds,
        output=output,
        output_fn=_compile_output(output, len(sink_ports)),
        validated=validated,
        n_nodes=len(nodes),
    )
    graph._plan = plan  # type: ignore[attr-defined]
    return plan


# -- per-node compilation ------------------------------------------------------


def _node_plan(
    spec: NodeSpec, calls: dict[tuple[int, int, int], tuple[str, dict[str, Any], Any]]
) -> NodePlan:
    """Compile one node; ``calls`` shares the call of nodes with the same binding object.

    A binding (and, for a passthrough root, the task) fully determines the call
    expression, its constants and the compiled call, so the many nodes of a
    builder graph that share one binding (see ``graph._positional_binding``)
    are compiled once.
    """
    ports = spec.inputs
    n_data = len(spec.deps)
    if not ports:
        ports = (INPUT,)  # a node of constants only fires once per item
    b = spec.binding
    t = spec.task
    n_ports = len(ports)
    if b.passthrough:
        memo, key = calls, (id(b), n_ports, id(t))  # the call depends on the task's signature
    elif _POSITIONAL.get(len(b.args)) is b:
        memo, key = _POSITIONAL_CALLS, (len(b.args), n_ports, -1)  # shared for good
    else:
        memo, key = calls, (id(b), n_ports, 0)
    known = memo.get(key)
    if known is None:
        consts: dict[str, Any] = {}
        expr = _call_expr(spec, n_ports, consts)
        call = _SHARED_CALLS.get(expr)
        if call is None and not consts and n_ports > 1 and expr == _positional_join(n_ports):
            call = _star_call  # f(v[0], ..., v[n-1]): the usual join of n inputs
        if call is None or consts:
            ns = {**consts, "SKIP": SKIP}
            call = eval(_compiled(f"lambda f, v: {expr}", "eval"), ns)
        if memo is _POSITIONAL_CALLS and len(memo) >= 1024:
            memo.clear()  # bounded: widths come and go (see graph._positional_binding)
        known = memo[key] = (expr, consts, call)
    expr, consts, call = known
    return NodePlan(  # positional: a quarter of the cost of keywords, per node
        spec.name,
        spec,
        ports,
        n_data,
        expr,
        consts,
        call,
        t.is_class,
        "map" if b.map_over else spec.kind,
        _first_arg(spec, len(ports)) if t.key is not None else None,
    )


def _call_expr(spec: NodeSpec, n_ports: int, consts: dict[str, Any]) -> str:
    b = spec.binding
    base = "v" if n_ports == 1 else None

    def ref_base(dep: int) -> str:
        return base if base is not None else f"v[{dep}]"

    def const(value: Any) -> str:
        # only None / bools / ints are inlined: generated code holds no string literal,
        # so identifiers can be renamed safely and code is cached by its shape
        if value is None or value is True or value is False or type(value) is int:
            return repr(value)
        name = f"c{len(consts)}"
        consts[name] = value
        return name

    def tmpl(t: Any) -> str:
        if isinstance(t, Ref):
            out = ref_base(t.dep)
            for key in t.path:
                out += f"[{const(key)}]"
            return out
        if isinstance(t, Gather):
            if t.kind == "dict":
                body = ", ".join(f"{const(k)}: {tmpl(v)}" for k, v in t.items)
                return "{" + body + "}"
            body = ", ".join(tmpl(v) for v in t.items)
            return f"[{body}]" if t.kind == "list" else f"({body},)"
        return const(t)

    if b.passthrough:
        if _takes_parameters(spec):
            return f"f(*{ref_base(0)}[0], **{ref_base(0)}[1])"
        return "f()"
    if b.map_over:
        return tmpl(b.args[0])  # the list to map over; the call happens in the host
    parts = [tmpl(a) for a in b.args]
    kw_plain = [(k, v) for k, v in b.kwargs if k.isidentifier() and not keyword.iskeyword(k)]
    kw_odd = [(k, v) for k, v in b.kwargs if (k, v) not in kw_plain]
    parts.extend(f"{k}={tmpl(v)}" for k, v in kw_plain)
    if kw_odd:
        parts.append("**{" + ", ".join(f"{const(k)}: {tmpl(v)}" for k, v in kw_odd) + "}")
    return f"f({', '.join(parts)})"


_CODE_CACHE: dict[tuple[str, str], Any] = {}
# (n args, n ports, -1) -> (expr, consts, call) of graph._positional_binding(n args): those
# bindings are shared by every graph, so their calls are compiled once per process
_POSITIONAL_CALLS: dict[tuple[int, int, int], tuple[str, dict[str, Any], Any]] = {}
_SHARED_CALLS: dict[str, Callable[[Any, Any], Any]] = {
    "f(v)": lambda f, v: f(v),
    "f()": lambda f, v: f(),
    "f(*v[0], **v[1])": lambda f, v: f(*v[0], **v[1]),
}


def _compiled(source: str, mode: str) -> Any:
    """Compile generated source once per shape (constants travel by name, not in the text)."""
    key = (source, mode)
    code = _CODE_CACHE.get(key)
    if code is None:
        code = _CODE_CACHE[key] = compile(source, "<actorflow generated>", mode)
    return code


def _first_arg(spec: NodeSpec, n_ports: int) -> Callable[[Any], Any]:
    """For a keyed task: a function from the node's input to its first argument."""
    b = spec.binding
    if b.passthrough:
        return _run_first_arg
    if n_ports == 1 and b.args and isinstance(b.args[0], Ref) and not b.kwargs:
        path = b.args[0].path
        if not path:
            return _identity
        return lambda v: _walk(v, path)
    raise GraphError(
        f"task {spec.name!r} has key=, so it must be called with one input, the item to "
        "route (e.g. counter(event)); join several inputs in a task before it"
    )


def _identity(v: Any) -> Any:
    return v


def _run_first_arg(v: Any) -> Any:
    args, kwargs = v
    if args:
        return args[0]
    return next(iter(kwargs.values()))


def _walk(v: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        v = v[key]
    return v


def _positional_join(n: int) -> str:
    return "f(" + ", ".join(f"v[{i}]" for i in range(n)) + ")"


def _star_call(f: Any, v: Any) -> Any:
    return f(*v)


def _takes_parameters(spec: NodeSpec) -> bool:
    try:
        return bool(spec.task.signature().parameters)
    except (TypeError, ValueError):
        return True


def _compile_fast(seg: SegmentPlan) -> Callable[..., Any]:
    """Generate the tight per-batch loop for a segment of plain function nodes.

    ``fast(vals, out, skips, err)`` appends one output per input value to
    ``out``; a node returning SKIP ends that item's walk (``skips[k] += 1``, the
    caller learns from ``skips`` that the batch now holds skip markers);
    when node ``k`` raises on item ``len(out)``, ``(k, input, exception)`` is
    appended to ``err`` and the loop returns (the item is not re-run).
    """
    ns: dict[str, Any] = {"SKIP": SKIP}
    last = len(seg.nodes) - 1
    # functions and SKIP become locals (LOAD_FAST), bound once per call of fast()
    names = ", ".join(f"f{k}" for k in range(last + 1))
    lines = [
        "def fast(vals, out, skips, err):",
        "    append = out.append",
        "    _skip = SKIP",
        f"    {names}, = FNS",
        "    for v in vals:",
    ]
    for k, node in enumerate(seg.nodes):
        if node.kind == "exceptionally":
            continue  # no error on this path: the handler is skipped, the value passes
        expr = node.expr
        for cname, cvalue in node.consts.items():
            new = f"k{k}_{cname}"
            ns[new] = cvalue
            expr = _rename_token(expr, cname, new)
        expr = _rename_token(expr, "f", f"f{k}")
        # try/except costs nothing in 3.11 until it fires; it tells which stage raised
        lines.append("        try:")
        lines.append(f"            v = {expr}")
        lines.append("        except Exception as e:")
        lines.append(f"            err.append(({k}, v, e))")
        lines.append("            return")
        lines.append("        if v is _skip:")
        lines.append(f"            skips[{k}] += 1")
        lines.append("            append(v)")
        lines.append("            continue")
    lines.append("        append(v)")
    ns["FNS"] = tuple(node.spec.task.fn for node in seg.nodes)
    source = "\n".join(lines)
    exec(_compiled(source, "exec"), ns)
    fast: Callable[..., Any] = ns["fast"]
    return fast


def _compile_remote(seg: SegmentPlan) -> Callable[..., Any]:
    """Generate ``remote(vals, out, kept_at, err, tick, i, skips)`` for a process chain
    (see ``remote_loop``).

    ``vals`` is an iterator the caller shares across calls, its items numbered
    from ``i``: each kept result goes to ``out``, its number to ``kept_at`` (a
    skipped item leaves no trace: the parent never touches it, beyond counting
    it in ``skips[k]`` when node ``k`` before the last skipped it). The loop returns
    the next item's number at the end of ``vals``, after an item that raised, or
    after the first item that ends with ``tick[0]`` true, so the worker can flush
    results. A flag, not a clock: reading ``time.monotonic()`` after each item cost
    ~3% of W2's quick items.
    """
    ns: dict[str, Any] = {"SKIP": SKIP}
    last = len(seg.nodes) - 1
    names = ", ".join(f"f{k}" for k in range(last + 1))
    lines = [
        "def remote(vals, out, kept_at, err, tick, i, skips):",
        "    append = out.append",
        "    mark = kept_at.append",
        "    _skip = SKIP",
        f"    {names}, = FNS",
        "    i -= 1",
        "    for v in vals:",
        "        i += 1",  # this item's number
    ]
    # flat, not nested: a skip leaves the item's walk with `continue` (nested ifs
    # hit Python's limit of 100 blocks in a ~99-node chain)
    for k, node in enumerate(seg.nodes):
        expr = node.expr
        for cname, cvalue in node.consts.items():
            new = f"k{k}_{cname}"
            ns[new] = cvalue
            expr = _rename_token(expr, cname, new)
        expr = _rename_token(expr, "f", f"f{k}")
        lines.append("        try:")
        lines.append(f"            v = {expr}")
        lines.append("        except BaseException as e:")
        lines.append(f"            err.append(({k}, e))")
        lines.append("            return i + 1")
        lines.append("        if v is _skip:")
        if k < last:  # the parent counts it skipped from node k on
            lines.append(f"            skips[{k}] += 1")
        lines.append("            if tick[0]:")
        lines.append("                return i + 1")
        lines.append("            continue")
    lines.append("        append(v)")
    lines.append("        mark(i)")
    lines.append("        if tick[0]:")
    lines.append("            return i + 1")
    lines.append("    return i + 1")
    ns["FNS"] = tuple(node.spec.task.fn for node in seg.nodes)
    exec(_compiled("\n".join(lines), "exec"), ns)
    remote: Callable[..., Any] = ns["remote"]
    return remote


def _rename_token(expr: str, old: str, new: str) -> str:
    """Rename identifier ``old`` in a generated expression (which holds no string literal)."""
    return re.sub(rf"(?<![\w.]){re.escape(old)}(?!\w)", new, expr)


# -- outputs -------------------------------------------------------------------


def _rename_output(template: Any, feeds: dict[str, int]) -> Any:
    if isinstance(template, _OutRef):
        return _OutRef(str(feeds[template.name]), template.path)
    if isinstance(template, Gather):
        if template.kind == "dict":
            return Gather("dict", tuple((k, _rename_output(v, feeds)) for k, v in template.items))
        return Gather(template.kind, tuple(_rename_output(v, feeds) for v in template.items))
    return template


def _compile_output(template: Any, n_ports: int) -> Callable[[tuple[Any, ...]], Any]:
    """Build ``fn(sink_values) -> output``; skipped values stay in place as af.SKIP."""
    consts: dict[str, Any] = {}

    def const(value: Any) -> str:
        name = f"c{len(consts)}"
        consts[name] = value
        return name

    def expr(t: Any) -> str:
        if isinstance(t, _OutRef):
            out = f"s[{t.name}]"
            for key in t.path:
                out = f"_index({out}, {const(key)})"
            return out
        if isinstance(t, Gather):
            if t.kind == "dict":
                return "{" + ", ".join(f"{const(k)}: {expr(v)}" for k, v in t.items) + "}"
            body = ", ".join(expr(v) for v in t.items)
            return f"[{body}]" if t.kind == "list" else f"({body},)"
        return const(t)

    body = expr(template)
    if body == "s[0]":
        return _first
    ns = {**consts, "_index": _index}
    fn: Callable[[tuple[Any, ...]], Any] = eval(_compiled(f"lambda s: {body}", "eval"), ns)
    return fn


def _first(s: tuple[Any, ...]) -> Any:
    return s[0]


def _index(value: Any, key: Any) -> Any:
    if value is SKIP:
        return SKIP
    return value[key]


def describe(plan: Plan) -> str:
    """A one-line-per-segment description of the placement (for logs and debugging).

    Example::

        print(describe(compile_plan(flow.graph)))
    """
    lines = []
    for seg in plan.segments:
        chain = " -> ".join(n.name for n in seg.nodes)
        fused = " (fused)" if len(seg.nodes) > 1 else ""
        lines.append(f"segment {seg.index}: {chain}{fused}, workers={seg.workers}")
    return "\n".join(lines)
