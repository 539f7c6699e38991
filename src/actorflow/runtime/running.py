"""A running graph: entry, sink, futures, ordered map, stream, metrics, shutdown.

``RunningFlow`` is what ``flow.start()`` returns and what ``flow.run()`` uses
for its single item. Items enter in column-wise batches of contiguous ids; the
sink joins the outputs of the graph, builds each item's output and hands
finished id blocks to their *owner*: a future (``submit``), an ordered map, or
a stream. The number of items in flight is bounded by ``max_in_flight``: a
producer blocks instead of growing memory, and ``map`` / ``stream`` never read
more than ``max_in_flight`` items ahead of what the caller has consumed.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import dataclasses
import gc
import itertools
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from actorflow._markers import SKIP
from actorflow.errors import ActorflowError, Failure, RunFailed
from actorflow.graph import EntrySpec
from actorflow.observe.log import EventLog, enabled
from actorflow.runtime.actors import Deadlines, HostPool
from actorflow.runtime.node import (
    Failed,
    Joiner,
    RunContext,
    Segment,
    indexed_refs,
    projection_error,
)
from actorflow.runtime.plan import Plan, compile_plan
from actorflow.supervision import Supervision

if TYPE_CHECKING:
    from actorflow.graph import Graph

__all__ = ["NodeMetrics", "RunningFlow", "run_once"]

_EMPTY: dict[str, Any] = {}
_MISSING = object()
_FIRST_CHUNK = 1  # read-ahead chunks start small (first output soon) and double
_MAX_CHUNK = 512
_CANCEL_GRACE_S = 1.0  # stop(): how long cancelled coroutines get to finish
_CAP_DIV = 2  # chunks of max_in_flight/2: fewer hand-offs (W1b: 0.51x -> 0.58x of the loop)
_CORES = os.cpu_count() or 1


@dataclass(frozen=True, slots=True)
class NodeMetrics:
    """Counters and latency of one node of a running graph (``running.metrics()``).

    ``done`` / ``failed`` / ``skipped`` count items; ``retried`` counts retries
    (always 0 until retries land); ``in_flight`` items being processed now;
    ``queued`` items waiting for this node (in its mailbox or join);
    ``p50_s`` / ``p99_s`` the task-call latency over recent calls (the first
    item of every batch is timed; ``None`` before any call). Beyond the
    contract: ``restarts`` (supervisor restarts of the node), ``state_lost``
    (keyed instances that lost their state with a dead worker) and, for
    process nodes, ``workers`` (per worker process: pid, alive, rss_mb,
    cpu_percent, tasks_done).

    Example::

        m = running.metrics()["parse"]
        print(m.done, m.failed, m.p50_s)
    """

    done: int
    failed: int
    retried: int
    skipped: int
    in_flight: int
    queued: int
    p50_s: float | None
    p99_s: float | None
    restarts: int = 0
    state_lost: int = 0
    workers: tuple[dict[str, Any], ...] = ()


class _Block:
    """A contiguous block of item ids entered together, and their results."""

    __slots__ = ("kept", "n", "owner", "received", "special", "start", "vals")

    def __init__(self, owner: Any, start: int, n: int) -> None:
        self.owner = owner
        self.start = start
        self.n = n
        self.vals: list[Any] | None = None
        self.received = 0
        self.special = False
        # a special block's outputs without skipped and failed items (what stream yields)
        self.kept: list[Any] | None = None


class _Resolving(threading.local):
    flow: Any = None  # the running flow whose future's done-callbacks this thread runs


_RESOLVING = _Resolving()  # (see _Future; a class default: no AttributeError per read)


class _Future(concurrent.futures.Future[Any]):
    """The future of a submitted item: ``result()`` without a timeout runs the
    item's first job itself if no host has taken it yet (see ``submit``).

    Only the jobs ``submit`` offered, each at most once: a waiting thread never
    picks up unrelated work, and a timeout is never overrun by a task.
    """

    _offers: list[Any] | None = None
    _pool: Any = None
    _flow: Any = None  # until it resolves: the running flow (see _wait_here)
    _has_callbacks = False

    def add_done_callback(self, fn: Callable[[concurrent.futures.Future[Any]], object]) -> None:
        self._has_callbacks = True
        super().add_done_callback(fn)

    def _wait_here(self, timeout: float | None) -> None:
        """Before waiting for a pending item: refuse a thread where the wait could
        never end (see ``_refuse_*``), then, without a timeout, run the item's
        offered jobs here unless hosts took them."""
        flow: Any = self._flow
        if flow is None or self.done():
            return
        if flow._loop_thread is not None:
            flow._refuse_loop_thread("wait for an item")
        in_callback = _RESOLVING.flow is flow
        if in_callback:
            flow._refuse_in_callback("wait for an item")
        offers = self._offers
        pool = self._pool
        if offers and pool is not None and timeout is None:
            self._offers = None
            for offer in offers:
                if self.done():
                    break
                pool.take_offer(offer)

    def result(self, timeout: float | None = None) -> Any:
        if self._flow is not None:
            self._wait_here(timeout)
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._flow is not None:
            self._wait_here(timeout)
        return super().exception(timeout)


class _FutureOwner:
    """Owner of a one-item block: resolves a concurrent.futures.Future."""

    __slots__ = ("future", "run_id")

    def __init__(self, run_id: str) -> None:
        self.future: _Future = _Future()
        self.run_id = run_id

    def block_done(self, block: _Block) -> None:
        assert block.vals is not None
        v = block.vals[0]
        fut = self.future
        flow = fut._flow
        fut._offers = fut._pool = fut._flow = None  # a kept future must not keep the run alive
        before = None
        marked = fut._has_callbacks  # (read once: a callback may be added meanwhile)
        if marked:
            # they run in this thread, which hands the node's outputs on: waiting
            # there for another item of the flow would wait for ever (refused)
            before = _RESOLVING.flow
            _RESOLVING.flow = flow
        try:
            if type(v) is Failed:
                fut.set_exception(RunFailed(list(v.failures), self.run_id))
            else:
                fut.set_result(v)
        except concurrent.futures.InvalidStateError:
            pass  # the caller cancelled the future: the result is discarded
        finally:
            if marked:
                _RESOLVING.flow = before

    def abort(self, exc: BaseException) -> None:
        fut = self.future
        fut._offers = fut._pool = fut._flow = None
        try:
            fut.set_exception(exc)
        except concurrent.futures.InvalidStateError:
            pass  # already cancelled or resolved

    def cancel(self) -> None:
        fut = self.future
        fut._offers = fut._pool = fut._flow = None
        fut.cancel()


class _ConsumerWake:
    """The wake descriptor of a consumer that pumps a process node while it waits
    (see ``Segment.pump``): its eventfd is made on first use, so a graph without
    process tasks never loads the process runtime. ``armed`` while the consumer
    blocks on it: only then do completions signal it."""

    __slots__ = ("armed", "fd")

    def __init__(self) -> None:
        self.armed = False
        self.fd: Any = None

    def fileno(self) -> int:
        if self.fd is None:
            from actorflow.runtime.processes import WakeFd

            self.fd = WakeFd()
        return int(self.fd.fileno())

    def signal(self) -> None:
        if self.fd is not None:
            self.fd.signal()

    def drain(self) -> None:
        if self.fd is not None:
            self.fd.drain()

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            fd.close()


class _QueueOwner:
    """Owner of the blocks of one ``map`` or ``stream`` call."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.done: dict[int, _Block] = {}
        self.order: deque[_Block] = deque()  # completion order (stream)
        self.error: BaseException | None = None
        self.wake = _ConsumerWake()

    def block_done(self, block: _Block) -> None:
        cond = self.cond
        with cond:
            self.done[block.start] = block
            self.order.append(block)
            # (the consumer often finishes its own blocks, running the pump: no waiter)
            if cond._waiters:  # type: ignore[attr-defined]
                cond.notify()
        if self.wake.armed:  # the consumer pumps a process node: wake it
            self.wake.signal()

    def abort(self, exc: BaseException) -> None:
        with self.cond:
            self.error = exc
            self.cond.notify_all()
        self.wake.signal()


class _Sink:
    """Joins the graph's outputs by item id and hands finished items to the flow."""

    def __init__(self, flow: RunningFlow, plan: Plan) -> None:
        self.flow = flow
        n = len(plan.sink_ports)
        self.joiner = Joiner(n) if n > 1 else None
        self.lock = threading.Lock()
        self.output_fn = plan.output_fn
        tmpl = self.template = plan.output
        self.sink_names = plan.sink_ports
        # the common case: the output is exactly the value of the single sink port
        self.identity = n == 1 and getattr(tmpl, "name", None) == "0" and not tmpl.path
        # batches of one port may arrive in any order (Segment.connect); a join of
        # several ports works best aligned, so those keep their ticket order
        self.any_order = self.joiner is None
        self.name = "<sink>"
        # what a node feeding it alone may call instead of deliver(): the flow's
        # completion itself, when the output is that node's value as is
        self.direct: Callable[[Any, list[Any], bool, list[Any] | None], None] | None = (
            flow._complete if self.identity and self.joiner is None else None
        )

    def deliver(self, port: int, ids: Any, vals: list[Any], special: bool, sender: Any) -> bool:
        if self.joiner is None:
            ready = [(ids, vals, special)]
        else:
            with self.lock:
                ready = self.joiner.add(port, ids, vals, special)
        for r_ids, r_vals, r_special in ready:
            out, out_special = self._outputs(r_ids, r_vals, r_special)
            self.flow._complete(r_ids, out, out_special)
        return False

    def _outputs(self, ids: Any, vals: list[Any], special: bool) -> tuple[list[Any], bool]:
        if self.identity:
            return vals, special
        fn = self.output_fn
        single = self.joiner is None
        if not special:
            try:
                return ([fn((v,)) for v in vals] if single else [fn(t) for t in vals]), False
            except Exception:
                pass  # an output path failed for some item: build them one by one
        out = []
        for item, v in zip(ids, vals, strict=True):
            parts = (v,) if single else v
            failed = [x for x in parts if type(x) is Failed]
            if failed:
                out.append(Failed.merge(failed))
                continue
            try:
                out.append(fn(parts))
            except Exception as exc:  # e.g. the flow returns node["key"] and the key is missing
                failure = Failure.capture(
                    exc, task=self.flow.name, item_id=item, run_id=self.flow.run_id
                )
                why = self._projection_error(parts)
                if why is not None:
                    failure = dataclasses.replace(
                        failure, message=f"the flow's output could not be built: {why}"
                    )
                self.flow.on_task_failed(failure)
                out.append(Failed((failure,)))
        return out, True

    def _projection_error(self, parts: Any) -> str | None:
        names = self.sink_names
        try:
            refs = [
                (names[int(r.name)], parts[int(r.name)], r.path)
                for r in indexed_refs(self.template)
            ]
            return projection_error(refs)
        except Exception:  # describing must never fail the failure
            return None


class _ReadAhead:
    """Read-ahead state of one ``map`` / ``stream`` iteration."""

    __slots__ = ("cap", "chunk", "exhausted", "limit", "outstanding")

    def __init__(self, limit: int, div: int = _CAP_DIV) -> None:
        self.limit = limit
        self.cap = max(1, min(_MAX_CHUNK, limit // div or 1))
        self.chunk = _FIRST_CHUNK  # read-ahead chunks start small (first output soon)
        self.outstanding = 0  # items entered and not yet consumed
        self.exhausted = False


class RunningFlow(RunContext):
    """A started graph: submit items, map or stream iterables, read metrics, stop.

    Use it as a context manager: leaving the block drains in-flight items,
    then stops every actor and thread of the graph (``stop(drain=False)``
    cancels instead). Failed items resolve their future with
    :class:`~actorflow.RunFailed` and are kept in ``dead_letters()``; the
    graph keeps serving later items.

    Example::

        with analysis.start(max_in_flight=1_000) as running:
            fut = running.submit("http://a")          # concurrent.futures.Future
            for out in running.map(urls): ...         # ordered, backpressured
            for out in running.stream(source): ...    # as produced
            running.metrics()["fetch"].p50_s
        running.metrics()                             # still readable afterwards
    """

    def __init__(
        self,
        graph: Graph,
        *,
        max_in_flight: int = 1024,
        run_id: str | None = None,
        batch: bool = False,
        edge_capacity: int | None = None,
        processes: int | None = None,
        max_tasks_per_worker: int | None = None,
        max_worker_rss_mb: float | None = None,
    ) -> None:
        if not isinstance(max_in_flight, int) or max_in_flight < 1:
            raise ValueError(f"max_in_flight must be an int >= 1, got {max_in_flight!r}")
        if processes is not None and (not isinstance(processes, int) or processes < 1):
            raise ValueError(f"processes must be an int >= 1, got {processes!r}")
        # checked here, not when the pool starts on the first process item (that
        # error would surface as an internal error of the run)
        if max_tasks_per_worker is not None and (
            isinstance(max_tasks_per_worker, bool)
            or not isinstance(max_tasks_per_worker, int)
            or max_tasks_per_worker < 1
        ):
            raise ValueError(
                f"max_tasks_per_worker must be an int >= 1 or None, got {max_tasks_per_worker!r}"
            )
        if max_worker_rss_mb is not None and (
            isinstance(max_worker_rss_mb, bool)
            or not isinstance(max_worker_rss_mb, (int, float))
            or not max_worker_rss_mb > 0
        ):
            raise ValueError(
                f"max_worker_rss_mb must be a number > 0 or None, got {max_worker_rss_mb!r}"
            )
        # thousands of small objects that all live as long as the run (a plan, its
        # segments): the cyclic GC would traverse them again and again while they
        # are made (W3a: ~4 us per node); it is paused until the segments exist
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            self._build(graph, max_in_flight, run_id, batch, edge_capacity, processes)
        finally:
            if gc_was_enabled:
                gc.enable()
        self._max_tasks_per_worker = max_tasks_per_worker
        self._max_worker_rss_mb = max_worker_rss_mb
        if not batch:
            self._log.info("run_started", nodes=self.plan.n_nodes, segments=len(self._segments))
        if enabled(logging.DEBUG):
            for seg in self._segments:
                for node in seg.nodes:
                    self._log.debug(
                        "node_started",
                        task=node.name,
                        segment=seg.plan.index,
                        fused_with=[n.name for n in seg.nodes if n is not node],
                        workers=seg.workers,
                    )

    def _build(
        self,
        graph: Graph,
        max_in_flight: int,
        run_id: str | None,
        batch: bool,
        edge_capacity: int | None,
        processes: int | None,
    ) -> None:
        self._worker_stats: list[dict[str, Any]] = []
        self.graph = graph
        self.plan = plan = compile_plan(graph)
        self.name = graph.name
        self.run_id = run_id or f"{graph.name}-{os.urandom(6).hex()}"
        self.max_in_flight = max_in_flight
        self._batch = batch
        self._log = self.log = EventLog(run_id=self.run_id, flow=self.name)
        self._t0 = time.perf_counter()
        self._lock = threading.Lock()
        self._space = threading.Condition(self._lock)
        self._in_flight = 0
        self._next_id = 0
        self._blocks: dict[int, _Block] = {}
        self._starts: list[int] = []
        self._dead: list[Failure] = []
        self._fatal: BaseException | None = None
        self._stopped = False
        self._items = 0
        self._failed_items = 0
        self._pool = HostPool(
            self.run_id, self._on_fatal, watcher_thread=not batch, caller_runs=batch
        )
        self._deadlines: Deadlines | None = None
        self._loop: Any = None  # the run's asyncio loop (async tasks), started on first use
        self._processes: Any = None  # the run's ProcessPool (process tasks), on first use
        self._n_processes = processes
        self._loop_thread: threading.Thread | None = None
        self._supervision: Supervision = getattr(graph, "_supervision", None) or Supervision()
        self._restart_times: dict[int, deque[float]] = {}
        self._on_failure: list[Callable[[Failure], Any]] = getattr(graph, "_on_failure", [])
        self._finally: Callable[..., Any] | None = getattr(graph, "_finally", None)
        self._finalized: set[int] = set()  # items whose finally_do ran (or is running)
        self._finally_takes_outcome = _takes_parameters(self._finally)
        capacity = edge_capacity if edge_capacity is not None else max(max_in_flight, 1)
        schedule = self._pool.schedule
        self._segments = [Segment(sp, self, schedule, capacity) for sp in plan.segments]
        self._sink = _Sink(self, plan)
        # read-ahead chunks (blocks) small enough that every worker a process node's
        # pump keeps busy holds two of them: a pump sends a block of quick items
        # whole, to one worker, so no block waits for the slower of two workers.
        # Only the workers the pool can run at once count: workers=8 on processes=2
        # keeps 2 busy, and 16 blocks of 64 items would cost ~5x the parent's work
        # per item. (One block fewer when the workers filled the cores was faster
        # while the parent's work per block was larger: W2 on 2 cores now takes
        # 25 ms less with four blocks of 256 than with three of 341.)
        pumped = min(sum(seg.workers for seg in self._segments if seg.pumped), processes or _CORES)
        self._chunk_div = max(_CAP_DIV, 2 * pumped)
        segments, sink = self._segments, self._sink
        for seg, sp in zip(segments, plan.segments, strict=True):
            seg.open()
            seg.connect([(sink if i == -1 else segments[i], port) for i, port in sp.consumers])
        self._roots = [(self._target(i), port) for i, port in plan.roots]
        self._entry = graph.validate().entry

    def _target(self, index: int) -> Any:
        return self._sink if index == -1 else self._segments[index]

    # -- context manager -----------------------------------------------------
    def __enter__(self) -> RunningFlow:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        interrupted = exc is not None and not isinstance(exc, Exception)
        self.stop(drain=not interrupted)

    # -- entry -----------------------------------------------------------------
    def _value_of(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        entry: EntrySpec = self._entry
        if entry.mode == "passthrough":
            return (args, kwargs or _EMPTY)
        n = entry.n_params
        if not kwargs and len(args) == n:
            return args[0] if n == 1 else args
        assert entry.signature is not None
        try:
            bound = entry.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(
                f"flow {self.name!r} takes {entry.signature}, called with "
                f"{len(args)} positional and {sorted(kwargs)} keyword arguments: {exc}"
            ) from None
        bound.apply_defaults()
        values = tuple(bound.arguments.values())
        if n == 0:
            return None
        return values[0] if n == 1 else values

    def _check_open(self) -> None:
        if self._stopped:
            raise ActorflowError(
                f"running flow {self.name!r} (run {self.run_id!r}) is stopped; "
                "start it again to submit more items"
            )
        if self._fatal is not None:
            if not isinstance(self._fatal, Exception):
                raise self._fatal  # KeyboardInterrupt / SystemExit raised by a task
            raise ActorflowError(f"running flow {self.name!r} failed: {self._fatal!r}")

    def _enter(self, values: list[Any], owner: Any) -> _Block:
        """Allocate ids for ``values``, wait for room, register the block, send it in."""
        n = len(values)
        limit = self.max_in_flight
        with self._space:
            if self._in_flight + n > limit and self._in_flight > 0:
                # the items in flight may be waiting for this very thread (a consumer
                # of map/stream queued them): it runs them rather than sleep
                self._wait_helping(
                    self._space,
                    lambda: self._in_flight + n <= limit or self._in_flight == 0,
                    timeout=None if self._batch else 0.5,
                    check=self._check_open,
                )
            self._check_open()
            start = self._next_id
            self._next_id = start + n
            self._in_flight += n
            self._items += n
            block = _Block(owner, start, n)
            self._blocks[start] = block
            self._starts.append(start)
        ids = range(start, start + n)
        for target, port in self._roots:
            target.deliver(port, ids, values, False, None)
        return block

    def submit(self, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        """Send one item in; return a future of its output.

        The future resolves to the output, to ``af.SKIP`` for a skipped item,
        or raises :class:`~actorflow.RunFailed` holding the item's failures.
        Blocks while ``max_in_flight`` items are already in flight.

        The item's first job goes to a host at once; ``result()`` without a
        timeout, called before that host took it, runs it in the waiting
        thread instead (no hand-off there and back: a 10-stage chain answers
        in about a third of the time). That is one batch of the item's first
        node (or fused chain), when that node has one worker and no key; the
        batch is the item's own or one it waits behind. Your task may then run
        in the thread that waits, and Ctrl-C there stops the graph, as in a
        consumer of ``map``. ``result(timeout=...)`` never runs work in the
        calling thread, so its timeout holds.

        Example::

            fut = running.submit("http://a")
            fut.result(timeout=10)
        """
        self._check_open()
        owner = _FutureOwner(self.run_id)
        value = self._value_of(args, kwargs)
        pool = self._pool
        offers: list[Any] | None = []
        aio = sys.modules.get("asyncio")
        if aio is not None and aio._get_running_loop() is not None:
            # an event loop runs in this thread: a task run here (by result()) could
            # not use asyncio.run() and the like, so it runs on a host, as before
            offers = None
        before = pool.offering(offers)
        try:
            self._enter([value], owner)
        finally:
            pool.offering(before)
        fut = owner.future
        if not fut.done():
            fut._flow = self
            if offers:
                fut._offers = offers
                fut._pool = pool
        return fut

    def _values(self, iterables: tuple[Iterable[Any], ...]) -> Iterator[Any]:
        if not iterables:
            raise TypeError("map() needs at least one iterable")
        entry = self._entry
        if len(iterables) == 1:
            it = iter(iterables[0])
            if entry.mode == "passthrough":
                return (((x,), _EMPTY) for x in it)
            if entry.n_params == 1:
                return it
            return (self._value_of((x,), {}) for x in it)
        zipped = zip(*iterables)  # noqa: B905 - zips like the builtin map
        if entry.mode == "passthrough":
            return ((args, _EMPTY) for args in zipped)
        if entry.n_params == len(iterables):
            return zipped
        return (self._value_of(args, {}) for args in zipped)

    def map(self, *iterables: Iterable[Any]) -> Iterator[Any]:
        """Outputs for the zipped iterables, in input order (like the builtin ``map``).

        Lazy and backpressured: at most ``max_in_flight`` items are read ahead
        of what the caller has consumed. A skipped item yields ``af.SKIP`` in
        its place; a failed item raises :class:`~actorflow.RunFailed` when its
        turn comes (the rest already in flight finish and are discarded).

        Example::

            for report in running.map(urls):
                print(report)
        """
        self._check_open()
        return self._iterate(self._values(iterables), ordered=True)

    def stream(self, source: Iterable[Any]) -> Iterator[Any]:
        """Every real output, in completion order, as produced.

        The output node hands each batch on as soon as it is done: with
        ``workers=N``, process or async tasks there, a slow item does not hold
        back later ones, so the order may differ from the entry order (use
        ``map`` for input order).

        Skipped items are not yielded; failed items are kept in
        ``dead_letters()`` and the stream goes on. Reads at most
        ``max_in_flight`` items ahead of what the caller has consumed, in the
        caller's thread, in chunks that start at one item and double: a
        source whose ``next()`` blocks (a followed file) holds back the items
        of its current chunk until it yields again.

        Example::

            for ev in running.stream(open("app.log")):
                print(ev)
        """
        self._check_open()
        return self._iterate(self._values((source,)), ordered=False)

    def _refuse_loop_thread(self, what: str) -> None:
        """Raise if the calling thread is this run's event loop thread: whatever waits
        there for items blocks the loop those items need (a deadlock)."""
        if threading.current_thread() is self._loop_thread:
            raise ActorflowError(
                f"cannot {what} of running flow {self.name!r} in the thread of its event loop "
                "(a done-callback of a future that an async node resolved, or an async "
                "task): the item needs that loop, so this would wait for ever. Wait in "
                "another thread, e.g. hand the work to a concurrent.futures executor"
            )

    def _refuse_in_callback(self, what: str) -> None:
        raise ActorflowError(
            f"cannot {what} of running flow {self.name!r} in a done-callback of one of "
            "its futures: callbacks run in the thread that hands the flow's outputs on, "
            "which that item needs too, so this would wait for ever. Wait in another "
            "thread, e.g. hand the work to a concurrent.futures executor"
        )

    def _iterate(self, values: Iterator[Any], *, ordered: bool) -> Iterator[Any]:
        if self._loop_thread is not None:
            self._refuse_loop_thread("read map / stream results")
        if _RESOLVING.flow is self:
            self._refuse_in_callback("read map / stream results")
        owner = _QueueOwner()
        pending: deque[_Block] = deque()
        read_ahead = _ReadAhead(self.max_in_flight, self._chunk_div)
        cond = owner.cond
        pool = self._pool
        try:
            while True:
                # While it enters items and waits for results this thread helps: the
                # jobs it queues wait for it, and it runs them instead of sleeping (no
                # hand-off to a host thread: on 2 cores that costs more than the work)
                pool.helping(True)
                try:
                    block = self._next_block(values, owner, pending, ordered, read_ahead)
                finally:
                    pool.helping(False)
                if block is None:
                    return
                read_ahead.outstanding -= block.n
                vals = block.vals
                assert vals is not None
                if not block.special:
                    yield from vals
                    continue
                if not ordered:  # skipped and failed items are not yielded (dead_letters())
                    kept = block.kept
                    if kept is None:  # pragma: no cover - every special block has them
                        kept = [v for v in vals if v is not SKIP and type(v) is not Failed]
                    yield from kept
                    continue
                for v in vals:  # map: a skipped item yields SKIP in its place
                    if type(v) is Failed:
                        raise RunFailed(list(v.failures), self.run_id)
                    yield v
        finally:
            owner.wake.close()
            if pending and not self._stopped:
                # abandoned: in-flight items finish and are discarded
                with cond:
                    owner.done.clear()
                    owner.order.clear()

    def _next_block(
        self,
        values: Iterator[Any],
        owner: _QueueOwner,
        pending: deque[_Block],
        ordered: bool,
        ra: _ReadAhead,
    ) -> _Block | None:
        """Read ahead, then wait (helping the pool) for the next finished block."""
        limit = ra.limit
        # read ahead, up to max_in_flight items beyond what was consumed
        while not ra.exhausted and ra.outstanding < limit:
            # read whole chunks only: refilling just what was consumed would keep
            # the first small chunks' sizes for ever
            chunk = ra.chunk
            if ra.outstanding and ra.outstanding + chunk > limit:
                break
            take = min(chunk, limit - ra.outstanding)
            batch = list(itertools.islice(values, take))
            if len(batch) < take:
                ra.exhausted = True
            if not batch:
                break
            pending.append(self._enter(batch, owner))
            ra.outstanding += len(batch)
            ra.chunk = min(ra.cap, chunk * 2)
            if not ordered and owner.order:
                break  # results are waiting: yield them first
        if not pending:
            return None
        cond = owner.cond
        with cond:
            if ordered:
                head = pending[0]
                self._wait_helping(
                    cond,
                    lambda: head.start in owner.done or owner.error is not None,
                    wake=owner.wake,
                )
                if owner.error is not None:
                    raise owner.error
                block = owner.done.pop(head.start)
                pending.popleft()
            else:
                self._wait_helping(
                    cond, lambda: bool(owner.order) or owner.error is not None, wake=owner.wake
                )
                if owner.error is not None:
                    raise owner.error
                block = owner.order.popleft()
                owner.done.pop(block.start, None)
                pending.remove(block)
        return block

    def _wait_helping(
        self,
        cond: threading.Condition,
        done: Callable[[], bool],
        *,
        timeout: float | None = None,
        check: Callable[[], None] | None = None,
        wake: _ConsumerWake | None = None,
    ) -> None:
        """Under ``cond``: wait until ``done()``; a helping thread runs queued work
        meanwhile instead of sleeping (see ``HostPool.help_one``). With ``wake``
        (signalled when ``done()`` may have become true) it also pumps process
        nodes in rounds (see ``Segment.pump``)."""
        pool = self._pool
        pump = None if wake is None else (done, wake)
        while not done():
            if check is not None:
                check()
            if pool.ready and pool.is_helping():
                cond.release()
                try:
                    helped = pool.help_one(pump)
                finally:
                    cond.acquire()
                # re-check before sleeping: the condition may have changed meanwhile
                if helped or done():
                    continue
            cond.wait(timeout)

    # -- completion (called from host threads) ---------------------------------
    def _complete(
        self, ids: Any, vals: list[Any], special: bool, kept: list[Any] | None = None
    ) -> None:
        """Items ``ids`` are done with outputs ``vals`` (``special``: some may be
        skipped or failed). ``kept``, if given, is ``vals`` without the skipped
        (and none failed): a stream yields it without a pass over ``vals``."""
        if self._finally is not None:
            ids, vals = self._finalize(ids, vals)
            if not vals:
                return
            special = True
            kept = None
        finished: list[_Block] = []
        with self._lock:
            blocks = self._blocks
            if type(ids) is range and ids.start in blocks and blocks[ids.start].n == len(ids):
                block = blocks.pop(ids.start)
                block.vals = vals
                block.special = special
                block.kept = kept
                block.received = block.n
                finished.append(block)
            elif type(ids) is range and self._fill_part(ids, vals, special, finished):
                pass  # a slice of one block (a node with workers=N splits batches)
            else:
                for i, v in zip(ids, vals, strict=True):
                    found = self._block_of(i)
                    if found is None:
                        continue  # its block was cancelled (stop(drain=False)): discard
                    block = found
                    if block.vals is None:
                        block.vals = [_MISSING] * block.n
                    block.vals[i - block.start] = v
                    block.received += 1
                    if special and (v is SKIP or type(v) is Failed):
                        block.special = True
                    if block.received == block.n:
                        del blocks[block.start]
                        finished.append(block)
            n_done = sum(b.n for b in finished)
            self._in_flight -= n_done
            if self._finally is not None:
                for b in finished:
                    self._finalized.difference_update(range(b.start, b.start + b.n))
            for b in finished:
                # the block's flag, not this call's: a block finished by a clean part
                # may hold failures its earlier parts brought
                if b.special and b.kept is None:
                    assert b.vals is not None
                    kept = [v for v in b.vals if v is not SKIP]
                    failed = [v for v in kept if type(v) is Failed]
                    if failed:
                        self._failed_items += len(failed)
                        for v in failed:
                            self._dead.extend(v.failures)
                        kept = [v for v in kept if type(v) is not Failed]
                    b.kept = kept
            if len(self._starts) > 2 * len(blocks) + 256:
                self._starts = sorted(blocks)
            if self._space._waiters:  # type: ignore[attr-defined]  # (~1 us when none)
                self._space.notify_all()
        for b in finished:
            b.owner.block_done(b)
        if self._batch:
            self._pool.notify()

    def _finalize(self, ids: Any, vals: list[Any]) -> tuple[list[Any], list[Any]]:
        """Run ``finally_do`` exactly once per item: claim items under the lock first.

        An item cancelled by ``stop(drain=False)`` while its last call was
        running is claimed by whichever comes first, the cancellation or the
        completion; the other leaves it alone.
        """
        with self._lock:
            claimed = self._finalized
            keep = [(i, v) for i, v in zip(ids, vals, strict=True) if i not in claimed]
            claimed.update(i for i, _ in keep)
        return [i for i, _ in keep], [self._run_finally(i, v) for i, v in keep]

    def _run_finally(self, item: Any, value: Any) -> Any:
        """Call the flow's ``finally_do`` for one finished item; its failure replaces the value."""
        fn = self._finally
        assert fn is not None
        outcome = value.failures[0] if type(value) is Failed else value
        try:
            if self._finally_takes_outcome:
                fn(outcome)
            else:
                fn()
        except Exception as exc:
            name = str(getattr(fn, "name", None) or getattr(fn, "__name__", "finally_do"))
            failure = Failure.capture(exc, task=name, item_id=item, run_id=self.run_id)
            self.on_task_failed(failure)
            previous = value.failures if type(value) is Failed else ()
            return Failed((*previous, failure))
        return value

    def _fill_part(
        self, ids: range, vals: list[Any], special: bool, finished: list[_Block]
    ) -> bool:
        """Under the lock: store a contiguous run of results that lies in one block.

        Returns False (nothing done) if ``ids`` is not such a run.
        """
        n = len(ids)
        if not n or ids.step != 1:
            return False
        block = self._block_of(ids.start)
        if block is None or ids.stop > block.start + block.n:
            return False
        if block.vals is None:
            block.vals = [_MISSING] * block.n
        offset = ids.start - block.start
        block.vals[offset : offset + n] = vals
        block.received += n
        if special:
            block.special = True
        if block.received == block.n:
            del self._blocks[block.start]
            finished.append(block)
        return True

    def _block_of(self, item: int) -> _Block | None:
        starts = self._starts
        if not starts:
            return None  # every block finished or was cancelled
        start = starts[bisect.bisect_right(starts, item) - 1]
        block = self._blocks.get(start)
        if block is None or not block.start <= item < block.start + block.n:
            return None
        return block

    # -- RunContext ----------------------------------------------------------------
    def on_task_failed(self, failure: Failure) -> None:
        """A call failed for good: log it once, then run the ``on_failure`` handlers.

        Handlers run in the host thread, before the item completes (so before
        ``run()`` returns or the future resolves); a handler that raises is
        logged and never changes the result.
        """
        self._log.error(
            "task_failed",
            task=failure.task,
            item_id=failure.item_id,
            attempt=failure.attempt,
            error_type=failure.error_type,
            error_message=failure.message,
        )
        for handler in self._on_failure:
            try:
                handler(failure)
            except Exception as exc:
                self._log.error(
                    "on_failure_handler_failed",
                    task=failure.task,
                    item_id=failure.item_id,
                    handler=getattr(handler, "__name__", repr(handler)),
                    error_type=type(exc).__name__,
                    error_message=str(exc),
                )

    def call_later(self, delay: float, fn: Callable[..., None], *args: Any) -> None:
        self._pool.call_later(delay, fn, *args)

    def call_with_timeout(
        self, thunk: Callable[[], Any], timeout: float, task: str, item: Any, attempt: int
    ) -> Any:
        deadlines = self._deadlines
        if deadlines is None:
            with self._lock:
                if self._deadlines is None:
                    self._deadlines = Deadlines(self.run_id)
                deadlines = self._deadlines
        return deadlines.call(thunk, timeout, task, item, attempt)

    def run_coroutine(self, coro: Any) -> Any:
        """Schedule ``coro`` on the run's event loop (started on first use)."""
        import asyncio

        loop = self._loop
        if loop is None:
            with self._lock:
                if self._loop is None:
                    from actorflow.runtime.loopwatch import LoopWatch

                    new_loop = asyncio.new_event_loop()
                    thread = threading.Thread(
                        target=new_loop.run_forever,
                        name=f"actorflow-loop-{self.run_id}",
                        # joined at stop; a daemon only so that a coroutine stuck in
                        # one C call past every interruption cannot block exit
                        daemon=True,
                    )
                    self.loop_watch = LoopWatch(new_loop, thread, self.call_later, self._log)
                    thread.start()
                    self.loop_watch.start()
                    self._loop, self._loop_thread = new_loop, thread
                loop = self._loop
        return asyncio.run_coroutine_threadsafe(coro, loop)

    def on_internal_error(self, exc: BaseException) -> None:
        self._on_fatal(exc)

    def schedule_on_host(self, segment: Segment) -> None:
        self._pool.schedule(segment, to_host=True)

    def process_pool(self) -> Any:
        """The run's pool of worker processes, shared by all its process tasks."""
        pool = self._processes
        if pool is None:
            from actorflow.runtime.processes import ProcessPool

            with self._lock:
                if self._processes is None:
                    self._processes = ProcessPool(
                        self._n_processes or os.cpu_count() or 1,
                        name=self.run_id,
                        on_event=self._on_pool_event,
                        max_tasks_per_worker=self._max_tasks_per_worker,
                        max_worker_rss_mb=self._max_worker_rss_mb,
                    )
                    launch = True
                else:
                    launch = False
                pool = self._processes
            if launch:  # every worker starts now, in parallel, not on its first batch
                pool.launch()
        return pool

    def _on_pool_event(self, event: str, data: dict[str, Any]) -> None:
        if event == "instance_state_lost":
            key = str(data.get("key", ""))
            for seg in self._segments:
                if seg.pool_key == key:
                    seg.stats[0].state_lost += len(data.get("indices", ())) or 1
        fields = {k: v for k, v in data.items() if k != "event"}
        if event == "worker_started":
            self._log.debug(event, **fields)
        elif event == "worker_recycled":
            self._log.info(event, **fields)
        else:  # worker_died, worker_timed_out, instance_state_lost
            self._log.warning(event, **fields)

    def _stop_loop(self) -> None:
        loop, thread = self._loop, self._loop_thread
        if loop is None or thread is None:
            return  # no async task ran: asyncio was never imported (~30 ms of a cold run)
        import asyncio

        def cancel_all() -> None:
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.call_soon(loop.stop)

        loop.call_soon_threadsafe(cancel_all)
        watch = self.loop_watch
        if watch is not None and not watch.stop(thread.join):
            return  # a coroutine holds the loop and ignores cancellation (logged)
        thread.join()
        # let the cancelled batches finish here, so their callbacks settle the node's
        # counters (in_flight); bounded: a coroutine may swallow its cancellation
        pending = asyncio.all_tasks(loop)
        if pending:
            loop.run_until_complete(asyncio.wait(pending, timeout=_CANCEL_GRACE_S))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

    def on_segment_crash(self, segment: Segment, exc: Exception) -> None:
        """Supervisor: restart the node (and, by strategy, its downstream) or escalate."""
        if segment.cancelled:
            # the run is being cancelled: a cancelled node is not restarted (its
            # error is most likely the cancellation's: PoolClosed from stop())
            return
        sup = self._supervision
        now = time.monotonic()
        with self._lock:
            times = self._restart_times.setdefault(segment.plan.index, deque())
            while times and now - times[0] > sup.within_s:
                times.popleft()
            times.append(now)
            count = len(times)
        if count > sup.max_restarts:
            self._log.error(
                "node_escalated",
                task=segment.label,
                restarts=count - 1,
                error_type=type(exc).__name__,
                error_message=str(exc),
            )
            error = ActorflowError(
                f"node {segment.label} failed internally {count} times within "
                f"{sup.within_s:g} s, over its restart limit ({sup.max_restarts}); the run "
                f"was stopped. Last error: {type(exc).__name__}: {exc}"
            )
            error.__cause__ = exc
            self._on_fatal(error, internal=False)
            return
        targets = [segment]
        if sup.strategy == "with_downstream":
            targets.extend(self._downstream(segment))
        for seg in targets:
            seg.restart()
        self._log.warning(
            "node_restarted",
            task=segment.name,
            restarts=segment.restarts,
            strategy=sup.strategy,
            restarted=[seg.name for seg in targets],
            error_type=type(exc).__name__,
            error_message=str(exc),
        )
        for seg in targets:
            seg.resume()

    def _downstream(self, segment: Segment) -> list[Segment]:
        seen: dict[int, Segment] = {}
        stack = [segment]
        while stack:
            for target, _, _ in stack.pop().consumers:
                if isinstance(target, Segment) and target.plan.index not in seen:
                    seen[target.plan.index] = target
                    stack.append(target)
        return list(seen.values())

    def map_parallel(
        self, fn: Callable[[Any], Any], items: list[Any], parallelism: int, policy: Any = None
    ) -> list[tuple[bool, Any, int]]:
        return self._pool.map_parallel(fn, items, parallelism, policy)

    def quantum(self) -> int:
        # a consumer of map/stream running a segment must get back to its results soon
        return self._pool.quantum(RunContext.quantum(self))

    def _on_fatal(self, exc: BaseException, *, internal: bool = True) -> None:
        with self._lock:
            if self._fatal is None:
                self._fatal = exc
            blocks = list(self._blocks.values())
            self._blocks.clear()
            self._in_flight = 0
            self._space.notify_all()
        self._pool.notify()  # run() waits in the pool: it re-checks for a fatal error
        if not isinstance(exc, Exception) or not internal:
            error: BaseException = exc
        else:
            error = ActorflowError(
                f"running flow {self.name!r} hit an internal error: {exc!r}; this is a bug "
                "in actorflow, please report it with the traceback"
            )
            error.__cause__ = exc
        for b in blocks:
            if self._finally is not None:
                self._finally_cancelled(b, error)
            b.owner.abort(error)

    # -- inspection --------------------------------------------------------------------
    def metrics(self) -> dict[str, NodeMetrics]:
        """Per-node :class:`NodeMetrics`, by node name; still readable after stop.

        Example::

            for name, m in running.metrics().items():
                print(f"{name}: {m.done} done, p99 {m.p99_s}")
        """
        out: dict[str, NodeMetrics] = {}
        workers: tuple[dict[str, Any], ...] = ()
        if any(seg.is_process for seg in self._segments):
            if self._processes is not None and not self._stopped:
                workers = tuple(self._processes.stats())
            else:
                workers = tuple(self._worker_stats)
        for seg in self._segments:
            queued = seg.pending_items()
            for k, (node, stats) in enumerate(zip(seg.nodes, seg.stats, strict=True)):
                lat = sorted(stats.recent())
                p50 = lat[len(lat) // 2] if lat else None
                p99 = lat[min(len(lat) - 1, (len(lat) * 99) // 100)] if lat else None
                out[node.name] = NodeMetrics(
                    done=stats.done,
                    failed=stats.failed,
                    retried=stats.retried,
                    skipped=stats.skipped,
                    in_flight=max(0, seg.stats[0].in_flight) if k == 0 else 0,
                    queued=queued if k == 0 else 0,
                    p50_s=p50,
                    p99_s=p99,
                    restarts=seg.restarts if k == 0 else 0,
                    state_lost=stats.state_lost,
                    workers=workers if seg.is_process else (),
                )
        return out

    def dead_letters(self) -> list[Failure]:
        """The :class:`~actorflow.Failure` of every failed item so far.

        Example::

            for f in running.dead_letters():
                print(f.task, f.item_id, f.message)
        """
        with self._lock:
            return list(self._dead)

    @property
    def in_flight(self) -> int:
        """Items entered and not yet finished."""
        return self._in_flight

    # -- shutdown ----------------------------------------------------------------------
    def drain(self) -> None:
        """Block until every item in flight has finished.

        Example::

            running.drain()
        """
        if self._batch:
            self._pool.wait(lambda: self._in_flight == 0 or self._fatal is not None)
            return
        with self._space:
            while self._in_flight > 0 and self._fatal is None:
                self._space.wait()

    def stop(self, *, drain: bool = True) -> None:
        """Stop the graph: drain in-flight items first (default) or cancel them.

        After it returns no host thread or worker process of this graph remains.
        ``drain=False`` cancels the items' futures, kills the worker processes
        at once (process tasks mid-call included) and cancels async tasks; a
        thread task in the middle of a call is waited for (threads cannot be
        interrupted).

        Example::

            running.stop(drain=False)   # cancel what is in flight
        """
        if self._stopped:
            return
        drained = False
        try:
            if drain:
                self.drain()
                drained = True
        finally:
            self._stopped = True
            cancelled = ActorflowError(
                f"running flow {self.name!r} was stopped before this item finished"
            )
            # a drain interrupted (Ctrl-C) cancels too: hosts are joined below, and one
            # waiting for a worker that a dropped pump holds would wait for ever
            if not drained or self._fatal is not None:
                for seg in self._segments:
                    seg.cancel()
                self._pool.cancel_queued()
                if self._processes is not None:
                    # cancel what runs in workers: a host waiting for a worker's batch
                    # (or for a worker that a dropped pump holds) gets PoolClosed now,
                    # ignored as its node is cancelled; before, stop(drain=False)
                    # waited for the batches in the workers' pipes (2 x 5 s: 9.5 s)
                    self._processes.cancel()
            with self._lock:
                blocks = list(self._blocks.values())
                self._blocks.clear()
                self._space.notify_all()
            for b in blocks:
                if self._finally is not None:
                    self._finally_cancelled(b)
                if isinstance(b.owner, _FutureOwner):
                    b.owner.cancel()
                else:
                    b.owner.abort(cancelled)
            self._pool.shutdown()  # counters are final from here on: metrics() reads them
            for seg in self._segments:
                if seg.pumped:
                    seg.release_leases()  # workers a pump held (cancelled or failed run)
            self._stop_loop()
            if self._processes is not None:
                self._worker_stats = self._processes.stats()
                self._processes.shutdown(kill=not drain)
            if self._deadlines is not None:
                still_running = self._deadlines.shutdown()
                if still_running:
                    self._log.warning(
                        "timed_out_threads_abandoned",
                        threads=still_running,
                        late_results=self._deadlines.late,
                    )
            if enabled(logging.DEBUG):
                for name, m in self.metrics().items():
                    self._log.debug(
                        "node_finished", task=name, done=m.done, failed=m.failed, skipped=m.skipped
                    )
            if not self._batch:
                self._log.info(
                    "run_finished",
                    elapsed_s=round(time.perf_counter() - self._t0, 6),
                    items=self._items,
                    failed_items=self._failed_items,
                    hosts=self._pool.started_hosts,
                )

    def _finally_cancelled(self, block: _Block, error: BaseException | None = None) -> None:
        # finally_do runs once per item on cancellation too, with a Cancelled failure
        # (or the failure that stopped the run)
        with self._lock:
            todo = [
                i for i in range(block.start, block.start + block.n) if i not in self._finalized
            ]
            self._finalized.update(todo)
        for i in todo:
            if error is not None:
                failure = Failure.capture(error, task=self.name, item_id=i, run_id=self.run_id)
            else:
                try:
                    raise concurrent.futures.CancelledError(
                        f"run {self.run_id!r} was stopped before item {i} finished"
                    )
                except concurrent.futures.CancelledError as exc:
                    failure = Failure.capture(exc, task=self.name, item_id=i, run_id=self.run_id)
            self._run_finally(i, Failed((failure,)))

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else "running"
        return f"<af.RunningFlow {self.name!r} run={self.run_id!r} {state}>"


def _takes_parameters(fn: Any) -> bool:
    if fn is None:
        return False
    import inspect

    target = getattr(fn, "fn", fn)  # a Task: look at the wrapped function
    try:
        return bool(inspect.signature(target).parameters)
    except (TypeError, ValueError):
        return True


def run_once(
    graph: Graph,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    run_id: str | None,
    processes: int | None = None,
) -> Any:
    """Run ``graph`` for one item in the caller's thread; return its output.

    The caller's thread watches the host pool while it waits; a
    ``BaseException`` (Ctrl-C) cancels the run and is re-raised.
    """
    running = RunningFlow(graph, max_in_flight=1, run_id=run_id, batch=True, processes=processes)
    log = running._log
    t0 = time.perf_counter()
    log.info("run_started", nodes=running.plan.n_nodes)
    try:
        fut = running.submit(*args, **kwargs)
        running._pool.wait(lambda: fut.done() or running._fatal is not None)
    except BaseException:
        running.stop(drain=False)
        log.info("run_cancelled", elapsed_s=round(time.perf_counter() - t0, 6))
        raise
    running.stop(drain=running._fatal is None)
    fatal = running._fatal
    if fatal is not None and not isinstance(fatal, Exception):
        raise fatal
    try:
        result = fut.result()
    except RunFailed as exc:
        log.info("run_finished", elapsed_s=round(time.perf_counter() - t0, 6), failed=True)
        raise exc.with_traceback(None) from None
    log.info("run_finished", elapsed_s=round(time.perf_counter() - t0, 6), failed=False)
    return result
