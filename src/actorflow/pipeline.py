"""Fluent pipelines: send, continue_with, in_parallel, exceptionally, finally_do.

A pipeline is a description, like a flow, and compiles to the same
:class:`~actorflow.Graph` IR: each ``send`` / ``continue_with`` step is a node
(the previous result is passed as the first argument), ``exceptionally`` is
a failure-handler node, ``finally_do`` the graph's cleanup, and
``in_parallel`` one fan-out node that runs each branch pipeline as its own
sub-run, at most ``max_parallelism`` at once. Pipelines run, raise
(:class:`~actorflow.RunFailed`) and call ``finally_do`` exactly like flows.

A step's task may return a pipeline instead of a value: the returned
pipeline is its *continuation*, run in its place, and its result (or its
failures, as the inner tasks' own records) becomes the step's result. This
gives orchestrator tasks: composition, conditionals and recursion.

Example::

    p = multiply.send(3, 2).continue_with(divide, 2)        # divide(multiply(3, 2), 2)
    p.run()                                                 # -> 3.0

    p = af.in_parallel([multiply.send(3, 2), multiply.send(4, 5)],
                       max_parallelism=10).continue_with(average)
    p.run()                                                 # -> 13.0

    @af.task
    def make_positive(x):
        return x if x > 0 else multiply.send(x, -1)         # a continuation
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from actorflow.errors import GraphError, RunFailed, _InnerFailures
from actorflow.graph import Binding, EntrySpec, Graph, NodeSpec, Ref, _OutRef
from actorflow.task import Task, as_task

__all__ = ["Pipeline", "in_parallel"]


@dataclass(frozen=True, slots=True)
class _Call:
    task: Task[Any, Any]
    args: tuple[Any, ...]
    kwargs: tuple[tuple[str, Any], ...]


@dataclass(frozen=True, slots=True)
class _Group:
    branches: tuple[Pipeline, ...]
    max_parallelism: int
    return_exceptions: bool


@dataclass(frozen=True, slots=True)
class _Handler:
    kind: str  # "exceptionally" | "finally_do"
    fn: Callable[..., Any]


class Pipeline:
    """An immutable chain of steps; every method returns a new pipeline.

    Example::

        p = a.send(1).exceptionally(recover).continue_with(c).finally_do(cleanup)
        p.run()
        print(p.graph.to_mermaid())
    """

    __slots__ = ("_graph", "steps")

    def __init__(self, steps: tuple[Any, ...]) -> None:
        self.steps = steps
        self._graph: Graph | None = None

    def _then(self, step: Any) -> Pipeline:
        if (
            self.steps
            and isinstance(self.steps[-1], _Handler)
            and self.steps[-1].kind == "finally_do"
        ):
            raise GraphError(
                "finally_do must come last in a pipeline: it runs once after everything "
                "else; add steps before it"
            )
        return Pipeline((*self.steps, step))

    def continue_with(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Pipeline:
        """Call ``fn(previous_result, *args, **kwargs)`` next.

        Example::

            multiply.send(3, 2).continue_with(divide, 2)
        """
        return self._then(_Call(as_task(fn), args, tuple(kwargs.items())))

    def exceptionally(self, handler: Callable[[Any], Any]) -> Pipeline:
        """Turn a failure so far into a value: ``handler(af.Failure) -> value``.

        Skipped when there is no error; steps after a failure are skipped
        until a handler like this one turns it back into a value.

        Example::

            risky.send(x).exceptionally(lambda failure: 0).continue_with(report)
        """
        return self._then(_Handler("exceptionally", handler))

    def finally_do(self, handler: Callable[..., Any]) -> Pipeline:
        """Call ``handler(outcome)`` once, last, on success, failure or cancellation.

        It does not change the result; if it raises, its failure replaces the
        result. A handler taking no parameter is called with none.

        Example::

            job.send(x).finally_do(release_lock)
        """
        return self._then(_Handler("finally_do", handler))

    @property
    def graph(self) -> Graph:
        """The pipeline compiled to a validated :class:`~actorflow.Graph` (cached)."""
        if self._graph is None:
            graph = _compile(self)
            graph.validate()
            self._graph = graph
        return self._graph

    def run(self, *, run_id: str | None = None) -> Any:
        """Run the pipeline once; return its result or raise :class:`~actorflow.RunFailed`.

        Example::

            multiply.send(3, 2).run()   # -> 6
        """
        from actorflow.runtime.running import run_once

        return run_once(self.graph, (), {}, run_id=run_id)

    def __repr__(self) -> str:
        return f"<af.Pipeline {' -> '.join(_describe(s) for s in self.steps)}>"


def _describe(step: Any) -> str:
    if isinstance(step, _Call):
        return step.task.name
    if isinstance(step, _Group):
        return f"in_parallel[{len(step.branches)}]"
    return f"{step.kind}({getattr(step.fn, '__name__', 'handler')})"


def send(t: Task[Any, Any], *args: Any, **kwargs: Any) -> Pipeline:
    """Start a pipeline with the call ``t(*args, **kwargs)`` (``task.send``).

    Example::

        multiply.send(3, 2).run()   # -> 6
    """
    return Pipeline((_Call(t, args, tuple(kwargs.items())),))


def in_parallel(
    pipelines: Sequence[Pipeline],
    *,
    max_parallelism: int | None = None,
    return_exceptions: bool = False,
) -> Pipeline:
    """Run pipelines in parallel; the result is the list of their results, in order.

    The group waits for every branch. Failed branches are aggregated into one
    failure of the group (each branch's own failure records), or, with
    ``return_exceptions=True``, their ``af.RunFailed`` stands in place in the
    result list. At most ``max_parallelism`` branches run at once (default:
    all of them).

    Example::

        af.in_parallel([multiply.send(3, 2), multiply.send(4, 5)]).continue_with(average)
    """
    branches = tuple(pipelines)
    for b in branches:
        if not isinstance(b, Pipeline):
            raise GraphError(
                f"af.in_parallel takes pipelines (task.send(...)...), got {b!r}; "
                "wrap a call as task.send(args)"
            )
    if not branches:
        raise GraphError("af.in_parallel needs at least one pipeline")
    limit = len(branches) if max_parallelism is None else max_parallelism
    if not isinstance(limit, int) or limit < 1:
        raise GraphError(f"af.in_parallel: max_parallelism must be an int >= 1, got {limit!r}")
    return Pipeline((_Group(branches, limit, return_exceptions),))


def run_continuation(result: Any) -> Any:
    """Run pipelines returned by a step (continuations) until a plain value results.

    Raises ``_InnerFailures`` carrying the inner failures.
    """
    while isinstance(result, Pipeline):
        try:
            result = result.run()
        except RunFailed as exc:
            raise _InnerFailures(exc.failures, exc.run_id) from None
    return result


def _run_branch(branch: Pipeline) -> Any:
    try:
        return branch.run()
    except RunFailed as exc:
        raise _InnerFailures(exc.failures, exc.run_id) from None


def _compile(pipeline: Pipeline) -> Graph:
    """Translate the steps to nodes of a Graph: one node per call, handler or group."""
    if not pipeline.steps:
        raise GraphError("an empty pipeline has nothing to run; start it with task.send(...)")
    first = pipeline.steps[0]
    if isinstance(first, _Handler):
        raise GraphError(f"a pipeline cannot start with {first.kind}; start with task.send(...)")
    graph = Graph(f"pipeline:{_describe(first)}")
    counts: dict[str, int] = {}

    def unique(base: str) -> str:
        counts[base] = counts.get(base, 0) + 1
        return base if counts[base] == 1 else f"{base}_{counts[base]}"

    prev: str | None = None
    specs: dict[str, NodeSpec] = {}
    for step in pipeline.steps:
        if isinstance(step, _Call):
            name = unique(step.task.name)
            t = _expanding(step.task)
            if prev is None:
                spec = NodeSpec(name, t, (), (), Binding(step.args, step.kwargs), kind="step")
            else:
                binding = Binding((Ref(0), *step.args), step.kwargs)
                spec = NodeSpec(name, t, (prev,), (), binding, kind="step")
        elif isinstance(step, _Group):
            if prev is not None:
                raise GraphError(
                    "af.in_parallel starts a pipeline; to run a group after a step, return "
                    "the group from that step's task (a continuation)"
                )
            name = unique("in_parallel")
            group_task: Task[Any, Any] = Task(_run_branch, name=name)
            binding = Binding(
                (list(step.branches),),
                map_over=True,
                max_parallelism=step.max_parallelism,
                return_exceptions=step.return_exceptions,
            )
            spec = NodeSpec(name, group_task, (), (), binding)
        elif step.kind == "exceptionally":
            assert prev is not None
            t = as_task(step.fn)
            name = unique(t.name)
            spec = NodeSpec(name, t, (prev,), (), Binding((Ref(0),)), kind="exceptionally")
        else:  # finally_do: the graph's cleanup, called once per run
            graph._finally = step.fn
            continue
        specs[name] = spec
        prev = name
    assert prev is not None
    graph._specs = specs
    graph._output = _OutRef(prev)
    graph._entry = EntrySpec("params", inspect.Signature(), 0)
    return graph


def _expanding(t: Task[Any, Any]) -> Task[Any, Any]:
    """The step's task, with any pipeline it returns run as its continuation."""
    fn = t.fn
    if t.is_class:
        return t  # class tasks return values; continuations come from function tasks

    def step(*args: Any, **kwargs: Any) -> Any:
        return run_continuation(fn(*args, **kwargs))

    step.__name__ = getattr(fn, "__name__", t.name)
    step.__qualname__ = getattr(fn, "__qualname__", t.name)
    step.__wrapped__ = fn  # type: ignore[attr-defined]
    options = t._options()
    return Task(step, **options)
