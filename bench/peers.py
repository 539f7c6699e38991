"""Peers: the plain-loop limit, raw pykka actors wired with ``tell``, dask, asyncio, bytewax.

These implementations call the same raw functions (``bench.workloads``, ``bench.w4``)
as the actorflow runs. dask and bytewax are optional: :func:`dask_get` returns
``None`` and :func:`bytewax_available` ``False`` when they are not importable, and
callers print "n/a". ``concurrent.futures.ProcessPoolExecutor`` is used directly in
``bench.w4``.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import pykka

from bench.workloads import w3a_names

# ------------------------------------------------------------------ plain loops


def plain_chain10(f: Callable[[Any], Any], x: Any) -> Any:
    """One item through the 10-stage chain of ``f``: the calls written out, no stage loop."""
    return f(f(f(f(f(f(f(f(f(f(x))))))))))


def plain_chain10_many(f: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
    """Many items through the 10-stage chain, one after the other."""
    return [f(f(f(f(f(f(f(f(f(f(x)))))))))) for x in items]


def plain_w3a(
    source: Callable[[], Any], work: Callable[[Any], Any], total: Callable[..., Any], n: int
) -> Any:
    """W3a as a plain loop."""
    s = source()
    return total(*[work(s) for _ in range(n)])


# ----------------------------------------------------------------- pykka chain


class _Stage(pykka.ThreadingActor):
    """A chain stage: applies ``fn`` and tells the next stage (or calls ``sink``)."""

    use_daemon_thread = True

    def __init__(
        self,
        fn: Callable[[Any], Any],
        nxt: pykka.ActorRef[Any] | None,
        sink: Callable[[Any], None] | None,
    ) -> None:
        super().__init__()
        self.fn = fn
        self.nxt = nxt
        self.sink = sink

    def on_receive(self, message: Any) -> None:
        value = self.fn(message)
        if self.nxt is not None:
            self.nxt.tell(value)
        else:
            assert self.sink is not None
            self.sink(value)


class PykkaChain:
    """``len(stages)`` ThreadingActors, each telling the next; the last calls a sink.

    Used as a context manager: actors start on enter and stop on exit.
    """

    def __init__(self, stages: Sequence[Callable[[Any], Any]]) -> None:
        self.stages = list(stages)
        self.refs: list[pykka.ActorRef[Any]] = []
        self._event = threading.Event()
        self._value: Any = None
        self._count = 0
        self._expect = 0
        self._results: list[Any] = []

    def _sink(self, value: Any) -> None:
        # runs on the last actor's thread
        if self._expect:
            self._results.append(value)
            self._count += 1
            if self._count == self._expect:
                self._event.set()
        else:
            self._value = value
            self._event.set()

    def __enter__(self) -> PykkaChain:
        nxt: pykka.ActorRef[Any] | None = None
        for i, fn in enumerate(reversed(self.stages)):
            nxt = _Stage.start(fn, nxt, self._sink if i == 0 else None)
            self.refs.append(nxt)
        self.refs.reverse()
        return self

    def __exit__(self, *exc: object) -> None:
        stop_all(self.refs)

    def call(self, x: Any, timeout: float = 60.0) -> Any:
        """One item in, wait until it comes out of the last stage."""
        self._expect = 0
        self._event.clear()
        self.refs[0].tell(x)
        if not self._event.wait(timeout):
            raise TimeoutError("pykka chain: no result")
        return self._value

    def run_many(self, items: Sequence[Any], timeout: float = 600.0) -> list[Any]:
        """Tell every item to the first stage, wait until the last one came out."""
        self._results = []
        self._count = 0
        self._expect = len(items)
        self._event.clear()
        first = self.refs[0]
        for x in items:
            first.tell(x)
        if not self._event.wait(timeout):
            raise TimeoutError("pykka chain: items missing")
        self._expect = 0
        return self._results


def stop_all(refs: Iterable[pykka.ActorRef[Any]]) -> None:
    """Stop the given actors (not the whole registry) and wait until they stopped."""
    futures = [ref.stop(block=False) for ref in refs]
    for fut in futures:
        fut.get(timeout=60)


# ------------------------------------------------------------------- pykka DAG


class _DagNode(pykka.ThreadingActor):
    """A DAG node: fires once every input port got a value, tells its downstream ports."""

    use_daemon_thread = True

    def __init__(
        self,
        fn: Callable[..., Any],
        n_inputs: int,
        downstream: list[tuple[pykka.ActorRef[Any], int]],
        sink: Callable[[Any], None] | None,
    ) -> None:
        super().__init__()
        self.fn = fn
        self.n_inputs = n_inputs
        self.inputs: list[Any] = [None] * n_inputs
        self.arrived = 0
        self.downstream = downstream
        self.sink = sink

    def on_receive(self, message: Any) -> None:
        port, value = message
        if self.n_inputs == 0:
            args = value  # a root: the run's arguments
        else:
            self.inputs[port] = value
            self.arrived += 1
            if self.arrived < self.n_inputs:
                return
            args = self.inputs
        out = self.fn(*args)
        for ref, p in self.downstream:
            ref.tell((p, out))
        if self.sink is not None:
            self.sink(out)


def pykka_start_dag(
    spec: dict[str, tuple[Callable[..., Any], list[str]]],
    make_sink: Callable[[str], Callable[[Any], None]] | None = None,
) -> dict[str, pykka.ActorRef[Any]]:
    """Start one ThreadingActor per node of ``spec``, wired with ``tell``; nothing sent yet.

    ``spec`` is ``{name: (fn, depends_on)}`` in topological order; the nodes nothing
    depends on call ``make_sink(name)(value)``. Stop them with :func:`stop_all`.
    """
    downstream: dict[str, list[tuple[str, int]]] = {name: [] for name in spec}
    for name, (_fn, deps) in spec.items():
        for port, dep in enumerate(deps):
            downstream[dep].append((name, port))
    refs: dict[str, pykka.ActorRef[Any]] = {}
    for name in reversed(spec):  # downstream first, so refs exist when wiring
        fn, deps = spec[name]
        ds = [(refs[d], port) for d, port in downstream[name]]
        sink = make_sink(name) if make_sink is not None and not ds else None
        refs[name] = _DagNode.start(fn, len(deps), ds, sink)
    return refs


def pykka_run_dag(
    spec: dict[str, tuple[Callable[..., Any], list[str]]],
    args: tuple[Any, ...] = (),
    timeout: float = 600.0,
) -> dict[str, Any]:
    """Run a DAG once with one ThreadingActor per node: start, run, stop.

    ``spec`` is ``{name: (fn, depends_on)}`` in topological order. Roots get
    ``args``; returns the outputs of the nodes nothing depends on.
    """
    depended = {dep for _fn, deps in spec.values() for dep in deps}
    outputs = [name for name in spec if name not in depended]
    results: dict[str, Any] = {}
    lock = threading.Lock()
    done = threading.Event()

    def make_sink(name: str) -> Callable[[Any], None]:
        def sink(value: Any) -> None:
            with lock:
                results[name] = value
                if len(results) == len(outputs):
                    done.set()

        return sink

    refs = pykka_start_dag(spec, make_sink)
    try:
        for name, (_fn, deps) in spec.items():
            if not deps:
                refs[name].tell((None, args))
        if not done.wait(timeout):
            raise TimeoutError("pykka DAG: outputs missing")
    finally:
        stop_all(refs.values())
    return results


# ---------------------------------------------------------------------- asyncio


def asyncio_gather_limited(
    fn: Callable[[Any], Awaitable[Any]], items: Sequence[Any], limit: int
) -> list[Any]:
    """Plain asyncio: ``fn`` over every item, at most ``limit`` awaits in flight."""
    import asyncio

    async def main() -> list[Any]:
        sem = asyncio.Semaphore(limit)

        async def one(x: Any) -> Any:
            async with sem:
                return await fn(x)

        return await asyncio.gather(*(one(x) for x in items))

    return asyncio.run(main())


# ---------------------------------------------------------------------- bytewax


def bytewax_available() -> bool:
    try:
        import bytewax.operators  # noqa: F401
    except ImportError:
        return False
    return True


def bytewax_map_filter(
    lines: Sequence[Any], parse: Callable[[Any], Any], keep: Callable[[Any], Any]
) -> list[Any]:
    """bytewax (one worker, ``run_main``): input -> map(parse) -> filter_map(keep) -> list.

    ``keep`` returns ``None`` for a dropped record (bytewax's ``filter_map``).
    """
    import bytewax.operators as op
    from bytewax.dataflow import Dataflow
    from bytewax.testing import TestingSink, TestingSource, run_main

    out: list[Any] = []
    flow = Dataflow("w2")
    stream = op.input("lines", flow, TestingSource(lines))
    parsed = op.map("parse", stream, parse)
    kept = op.filter_map("keep", parsed, keep)
    op.output("out", kept, TestingSink(out))
    run_main(flow)
    return out


# ------------------------------------------------------------------------ dask


def dask_get() -> Callable[..., Any] | None:
    """dask's threaded scheduler ``get``, or ``None`` when dask is not installed."""
    try:
        from dask.threaded import get
    except ImportError:
        return None
    return get  # type: ignore[no-any-return]


def dask_graph(
    spec: dict[str, tuple[Callable[..., Any], list[str]]], args: tuple[Any, ...] = ()
) -> dict[str, tuple[Any, ...]]:
    """The spec as a dask dict graph (legacy tuple tasks); roots get ``args``."""
    return {name: (fn, *(deps if deps else args)) for name, (fn, deps) in spec.items()}


def dask_w3a_graph(
    source: Callable[[], Any], work: Callable[[Any], Any], total: Callable[..., Any], n: int
) -> dict[str, tuple[Any, ...]]:
    """W3a as a dask dict graph."""
    names = w3a_names(n)
    dsk: dict[str, tuple[Any, ...]] = {"source": (source,)}
    for name in names:
        dsk[name] = (work, "source")
    dsk["sum"] = (total, *names)
    return dsk
