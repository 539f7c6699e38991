"""A sequential reference interpreter for actorflow graph semantics.

It is written independently of the engine (it never imports ``actorflow``) and
evaluates ONE item through a DAG, one node at a time, in topological order. The
property tests run the same graph on the engine and compare.

The graph is a plain description: a sequence of :class:`Node` with

- ``fn``: the node's function;
- ``deps``: data dependencies; their outputs are passed positionally in list
  order (or, for a *gather* node, as one list that omits skipped elements);
- ``after``: ordering-only dependencies;

Nodes without data dependencies are roots: they receive the run's arguments
(none when ``root_args`` is false: a function that takes no parameters). A node
with only ``after`` dependencies is a root too.

Semantics modelled (DESIGN.md sections 2-3):

- A node fires once all of its inputs (data and ``after``) have arrived.
- A function returning the skip sentinel skips the item at that node. A
  positional join with a skipped input is skipped: the node does not run and its
  output is the skip sentinel. A gather omits skipped elements (it runs with the
  remaining values, possibly an empty list).
- A skipped ``after`` dependency does NOT skip the node (ordering only).
- A function that raises (an ``Exception``) fails the item at that node: every
  node downstream of it, by data or by ``after``, transitively, does not run for
  that item. Failure dominates skip: a node with a failed input and a skipped
  input is failed (so nothing downstream of it runs either). Nodes not
  downstream of a failure still run.
- The outputs are those of the sink nodes (nothing depends on them by data or by
  ``after``); the run fails (``Outcome.failed`` non-empty) when any node raised,
  with exactly one failure per raising node.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

__all__ = [
    "SKIP",
    "Node",
    "NodeState",
    "Outcome",
    "interpret",
    "sinks",
    "topological_order",
]


class _Skip:
    """The reference's own skip sentinel (a singleton)."""

    _instance: _Skip | None = None

    def __new__(cls) -> _Skip:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "ref.SKIP"

    def __reduce__(self) -> str:
        return "SKIP"


SKIP = _Skip()


class NodeState(Enum):
    """What happened at one node for one item."""

    VALUE = "value"  # the function ran and returned a value
    SKIPPED = "skipped"  # the function ran and returned SKIP
    SKIP_PROPAGATED = "skip-propagated"  # not run: a positional input was skipped
    FAILED = "failed"  # the function ran and raised
    FAIL_PROPAGATED = "fail-propagated"  # not run: something upstream failed

    @property
    def is_skip(self) -> bool:
        return self in (NodeState.SKIPPED, NodeState.SKIP_PROPAGATED)

    @property
    def is_failure(self) -> bool:
        return self in (NodeState.FAILED, NodeState.FAIL_PROPAGATED)


@dataclass(frozen=True)
class Node:
    """One node of a reference graph."""

    name: str
    fn: Callable[..., Any]
    deps: tuple[str, ...] = ()
    after: tuple[str, ...] = ()
    gather: bool = False
    root_args: bool = True  # a root taking parameters gets the run's arguments, else none

    def __post_init__(self) -> None:
        object.__setattr__(self, "deps", tuple(self.deps))
        object.__setattr__(self, "after", tuple(self.after))
        if self.gather and not self.deps:
            raise ValueError(f"gather node {self.name!r} needs data dependencies")


@dataclass(frozen=True)
class Failure:
    """One failed node: its name and the exception's class name."""

    task: str
    error_type: str
    message: str


@dataclass
class Outcome:
    """The result of interpreting one item."""

    states: dict[str, NodeState]
    values: dict[str, Any]  # node -> output value (or SKIP) for nodes that have one
    failures: list[Failure]
    sinks: tuple[str, ...]
    calls: list[str] = field(default_factory=list)  # node names, in call order

    @property
    def failed(self) -> frozenset[str]:
        """Names of the nodes whose function raised."""
        return frozenset(f.task for f in self.failures)

    @property
    def ran(self) -> frozenset[str]:
        """Names of the nodes whose function was called."""
        return frozenset(self.calls)

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def outputs(self) -> dict[str, Any]:
        """``{sink: value or SKIP}``; only meaningful when :attr:`ok`."""
        if not self.ok:
            raise ValueError(f"the item failed at {sorted(self.failed)}")
        return {name: self.values[name] for name in self.sinks}


def _index(nodes: Sequence[Node]) -> dict[str, Node]:
    by_name: dict[str, Node] = {}
    for node in nodes:
        if node.name in by_name:
            raise ValueError(f"duplicate node name {node.name!r}")
        by_name[node.name] = node
    for node in nodes:
        for dep in (*node.deps, *node.after):
            if dep not in by_name:
                raise ValueError(f"node {node.name!r} depends on unknown node {dep!r}")
    return by_name


def topological_order(nodes: Sequence[Node]) -> list[str]:
    """Kahn's algorithm; ties broken by the order of ``nodes``. Raises on a cycle."""
    by_name = _index(nodes)
    upstream = {n.name: set(n.deps) | set(n.after) for n in nodes}
    order: list[str] = []
    done: set[str] = set()
    while len(order) < len(by_name):
        ready = [n.name for n in nodes if n.name not in done and upstream[n.name] <= done]
        if not ready:
            raise ValueError(f"cycle among {sorted(set(by_name) - done)}")
        order.append(ready[0])
        done.add(ready[0])
    return order


def sinks(nodes: Sequence[Node]) -> tuple[str, ...]:
    """Nodes nothing depends on (by data or by ``after``), in description order."""
    used = {dep for n in nodes for dep in (*n.deps, *n.after)}
    return tuple(n.name for n in nodes if n.name not in used)


def interpret(
    nodes: Sequence[Node],
    args: Iterable[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    skip: object = SKIP,
) -> Outcome:
    """Run one item through the graph, sequentially.

    ``skip`` is the sentinel the functions return to skip an item (compared by
    identity); skipped outputs are reported as :data:`SKIP`.
    """
    by_name = _index(nodes)
    args = tuple(args)
    kwargs = dict(kwargs or {})
    states: dict[str, NodeState] = {}
    values: dict[str, Any] = {}
    failures: list[Failure] = []
    calls: list[str] = []
    for name in topological_order(nodes):
        node = by_name[name]
        upstream = (*node.deps, *node.after)
        if any(states[dep].is_failure for dep in upstream):
            states[name] = NodeState.FAIL_PROPAGATED
            continue
        if node.gather:
            call_args: tuple[Any, ...] = (
                [values[dep] for dep in node.deps if not states[dep].is_skip],
            )
            call_kwargs: dict[str, Any] = {}
        elif any(states[dep].is_skip for dep in node.deps):
            states[name] = NodeState.SKIP_PROPAGATED
            values[name] = SKIP
            continue
        elif node.deps:
            call_args = tuple(values[dep] for dep in node.deps)
            call_kwargs = {}
        elif node.root_args:
            call_args, call_kwargs = args, kwargs
        else:
            call_args, call_kwargs = (), {}
        calls.append(name)
        try:
            result = node.fn(*call_args, **call_kwargs)
        except Exception as exc:
            states[name] = NodeState.FAILED
            failures.append(Failure(name, type(exc).__name__, str(exc)))
            continue
        if result is skip or result is SKIP:
            states[name] = NodeState.SKIPPED
            values[name] = SKIP
        else:
            states[name] = NodeState.VALUE
            values[name] = result
    return Outcome(states, values, failures, sinks(nodes), calls)
