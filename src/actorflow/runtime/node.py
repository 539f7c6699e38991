"""The node state machine: joining, firing, forwarding, skips, failures, credits.

No actor library here: a :class:`Segment` (one node, or a fused chain of
nodes) takes batches, returns nothing, and hands its outputs to the
``deliver`` of its consumers; whether a runner thread is needed is decided by
:meth:`Segment.deliver`, which calls the ``schedule`` callback it was given.
This is what the pykka hosts (and, later, Ray actors) run, and what the unit
tests drive directly, without threads.

Messages are column-wise batches ``(ids, vals, special)``: ``ids`` is a
``range`` (contiguous item ids, the usual case) or a list, ``vals`` the values
in the same order, ``special`` whether any value is a skip marker or a
failure. Item ids are ints allocated at the entry, one per item.

Semantics (DESIGN.md sections 2-3):

- a node fires for an item once every input port has that item;
- a failure on any input (data or ``after``) is forwarded, merged, without
  running the task; a skip on a data input used directly skips the node, a skip
  inside a gather is omitted, a skip on an ``after`` input only orders;
- outputs leave in arrival order (a node with ``workers > 1`` runs batches
  concurrently and re-orders them before emitting), except from a node whose
  only consumer is the flow's output: it emits each batch once done;
- every batch on an edge carries the edge's next sequence number.

Credits: a segment accepts every batch delivered to it (so no sender ever
blocks a host thread), but once its queue holds more than ``capacity`` items
it answers "throttle": the sender finishes the batch at hand and takes no new
work until the receiver has drained below half its capacity and wakes it.
Memory per edge is therefore bounded by ``capacity`` plus one batch per sender.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import math
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from itertools import islice, repeat
from operator import is_
from typing import Any

from actorflow._markers import SKIP
from actorflow.errors import Failure, RunFailed, TaskTimeout, _InnerFailures
from actorflow.graph import INPUT, Gather, Ref, _OutRef
from actorflow.runtime.plan import NodePlan, SegmentPlan
from actorflow.task import stable_hash

__all__ = ["Failed", "NodeStats", "Segment"]

_log = logging.getLogger("actorflow")
_LATENCY_SAMPLES = 512
_QUANTUM = 16  # batches a segment processes before yielding its host
_PIECE_S = 0.01  # a pumped node splits batches of slow items into pieces of about this
_SMALL_BATCH = 8  # ... and batches of up to this many items into single items
_SAMPLE_SINGLES = 8  # single items through a chain: one in 8 is timed (careful path)
# a pump sends a batch ahead into a busy worker's pipe only behind one that is
# estimated to take, and has so far taken, less than this: the batch waits there
# whatever happens, while another worker may come free (a slow or hung item must
# not hold back a batch that another worker could run). Quick batches gain the
# round trip between batches (W2: workers idled 20-30% without send-ahead)
_AHEAD_S = 0.005


class Failed:
    """A failure flowing downstream in place of a value (one or more Failure records)."""

    __slots__ = ("failures",)

    def __init__(self, failures: tuple[Failure, ...]) -> None:
        self.failures = failures

    def __repr__(self) -> str:
        return f"<failed: {', '.join(f.task for f in self.failures)}>"

    @staticmethod
    def merge(values: list[Any]) -> Failed:
        seen: dict[int, Failure] = {}
        for v in values:
            if type(v) is Failed:
                for f in v.failures:
                    seen.setdefault(id(f), f)
        return Failed(tuple(seen.values()))


class NodeStats:
    """Mutable per-node counters, written by the node's runner, read by ``metrics()``."""

    __slots__ = ("done", "failed", "in_flight", "latencies", "retried", "skipped", "state_lost")

    def __init__(self) -> None:
        self.done = 0
        self.failed = 0
        self.skipped = 0
        self.retried = 0
        self.in_flight = 0
        self.state_lost = 0
        self.latencies: list[float] = []  # recent samples; see sample()

    def sample(self, seconds: float) -> None:
        """Record one task-call latency, keeping about the last ``_LATENCY_SAMPLES``."""
        lat = self.latencies
        lat.append(seconds)
        if len(lat) >= 2 * _LATENCY_SAMPLES:
            del lat[:_LATENCY_SAMPLES]

    def recent(self) -> list[float]:
        """The most recent samples, oldest first."""
        return self.latencies[-_LATENCY_SAMPLES:]


class Joiner:
    """Joins batches from several ports by item id.

    Fast mode: batches stay aligned (the same id ranges reach every port, as
    they leave the entry), so the heads of the port queues are zipped whole.
    When heads disagree, every queued batch spills into a per-item table,
    which empties itself as items complete; then fast mode resumes.
    """

    __slots__ = ("filled", "n", "queues", "table")

    def __init__(self, n_ports: int) -> None:
        self.n = n_ports
        self.queues: list[deque[tuple[Any, list[Any], bool]]] = [deque() for _ in range(n_ports)]
        self.filled = 0  # how many port queues are non-empty (O(1) "all arrived?")
        self.table: dict[int, list[Any]] = {}

    def add(
        self, port: int, ids: Any, vals: list[Any], special: bool
    ) -> list[tuple[Any, list[Any], bool]]:
        if self.table:
            return self._spill(port, ids, vals)
        queues = self.queues
        q = queues[port]
        if not q:
            self.filled += 1
        q.append((ids, vals, special))
        out: list[tuple[Any, list[Any], bool]] = []
        n = self.n
        while self.filled == n:
            heads = [q[0] for q in queues]
            first = heads[0][0]
            if all(h[0] == first for h in heads):
                for q in queues:
                    q.popleft()
                    if not q:
                        self.filled -= 1
                cols = [h[1] for h in heads]
                out.append((first, list(zip(*cols, strict=True)), any(h[2] for h in heads)))
                continue
            # misaligned: spill everything queued into the per-item table
            for p, q in enumerate(queues):
                while q:
                    q_ids, q_vals, _ = q.popleft()
                    out.extend(self._spill(p, q_ids, q_vals))
            self.filled = 0
            break
        return out

    def _spill(self, port: int, ids: Any, vals: list[Any]) -> list[tuple[Any, list[Any], bool]]:
        table = self.table
        n = self.n  # slot layout: [value of port 0, ..., value of port n-1, count]
        done_ids: list[int] = []
        done_vals: list[Any] = []
        for i, v in zip(ids, vals, strict=True):
            slot = table.get(i)
            if slot is None:
                slot = table[i] = [_MISSING] * n + [0]
            slot[port] = v
            count: int = slot[n] + 1
            slot[n] = count
            if count == n:  # every port has arrived
                del table[i]
                done_ids.append(i)
                done_vals.append(tuple(slot[:n]))
        if not done_ids:
            return []
        special = any(_is_special(x) for t in done_vals for x in t)
        return [(done_ids, done_vals, special)]

    def pending(self) -> int:
        return len(self.table) + sum(len(b[1]) for q in self.queues for b in q)


_MISSING: Any = object()


class _Marker:
    """A named sentinel of the state machine."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


_PENDING: Any = _Marker("<pending retry>")  # the item waits on a timer for its next attempt
_NOT_RUN: Any = _Marker("<not run: skipped input>")


class _Resume:
    """A retried item re-entering its segment: start at node ``k``, attempt ``attempt``."""

    __slots__ = ("attempt", "k", "pin", "v")

    def __init__(self, k: int, v: Any, attempt: int, pin: int) -> None:
        self.k = k
        self.v = v
        self.attempt = attempt
        self.pin = pin


class _ArgsCall:
    """Arguments built in the parent (a gather with skipped elements), for a remote call."""

    __slots__ = ("args", "kwargs")

    def __init__(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.args = args
        self.kwargs = kwargs

    def __reduce__(self) -> tuple[Any, ...]:
        return (_ArgsCall, (self.args, self.kwargs))


def projection_error(refs: Any) -> str | None:
    """Describe the first ``(source name, value, path)`` whose path does not index its
    value (the flow wrote ``node["key"]`` and the key is missing), or None.

    Called on the error path only: indexing happens inside generated code, where a
    failure would otherwise name no source and no location.
    """
    for src, value, path in refs:
        v = value
        for i, key in enumerate(path):
            try:
                v = v[key]
            except Exception as exc:
                shown = "".join(f"[{k!r}]" for k in path[: i + 1])
                who = "the flow's input" if src == INPUT else f"the output of {src!r}"
                return (
                    f"taking {shown} from {who} failed: {type(exc).__name__}: {exc} (the flow "
                    f"indexes it, node{shown}; check the key, or index inside a task)"
                )
    return None


def indexed_refs(template: Any) -> Iterator[Any]:
    """The :class:`Ref` / ``_OutRef`` leaves of a binding or output ``template`` that
    index their value (``node["key"]``), depth first."""
    if isinstance(template, Ref | _OutRef):
        if template.path:
            yield template
    elif isinstance(template, Gather):
        for item in template.items:
            yield from indexed_refs(item[1] if template.kind == "dict" else item)


def _binding_refs(spec: Any, v_in: Any, n_ports: int) -> list[tuple[str, Any, Any]]:
    """``(source, value, path)`` of every indexed input of ``spec``'s call."""
    b = spec.binding
    templates = Gather("tuple", (*b.args, *(a for _, a in b.kwargs)))
    return [
        (spec.deps[r.dep], v_in if n_ports == 1 else v_in[r.dep], r.path)
        for r in indexed_refs(templates)
        if r.dep < len(spec.deps)
    ]


def _remote_stage0(fn: Any, call: Any, v: Any) -> Any:
    """First function of a remote chain: the node's binding applied in the worker."""
    if type(v) is _ArgsCall:
        return fn(*v.args, **v.kwargs)
    return call(fn, v)


def _remote_stage(fn: Any, call: Any, v: Any) -> Any:
    return call(fn, v)


# partials of these name the task's function as their first argument (errors name it)
_remote_stage0.af_stage = True  # type: ignore[attr-defined]
_remote_stage.af_stage = True  # type: ignore[attr-defined]


def _remote_retryable(t: Any, exc: BaseException | None, type_name: str, attempt: int) -> bool:
    if attempt > t.retries:
        return False
    if exc is not None:
        return bool(t.retryable(exc, attempt))
    if type_name in ("KeyboardInterrupt", "SystemExit", "GeneratorExit"):
        return False
    return t.retry_on is None or any(c.__name__ == type_name for c in t.retry_on)


class _EmitFailed(Exception):
    """Raised from ``__cause__``: emitting a processed batch failed (not a node crash)."""


class InjectedCrash(Exception):
    """An internal error injected by ``actorflow.testing.crash_node`` (fault injection)."""


def _message(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<{type(exc).__name__} with unprintable message>"


def _is_special(v: Any) -> bool:
    return v is SKIP or type(v) is Failed


def _wake_fd() -> Any:
    from actorflow.runtime.processes import WakeFd

    return WakeFd()


def _unthrottle(segments: list[Segment]) -> None:
    for seg in segments:
        seg.unthrottle()


class Edge:
    """Bookkeeping of one edge: sequence numbers of the batches sent on it."""

    __slots__ = ("next_seq", "sent_items")

    def __init__(self) -> None:
        self.next_seq = 0
        self.sent_items = 0


# a special batch prepared in the parent: (out, send_at, send, attempts, skipped,
# failures of arguments that could not be built)
_Prepared = tuple[list[Any], list[int], list[Any], list[int], int, list[Failure]]


_LATE_S = 0.05  # a timeout check this late means the loop was held meanwhile


async def _await_timed(coro: Any, timeout: float) -> Any:
    """``await coro`` under ``timeout``, not counting a loop held past the deadline.

    A coroutine that never yields holds the loop (until the watchdog interrupts
    it); the deadlines of the others pass meanwhile, and ``asyncio.wait_for``
    would cancel them the moment the loop is free, though they never had the
    loop. When the deadline check itself runs late (the loop was held), the
    coroutine gets that time back, once, up to ``timeout``: it times out only
    if it is still not done after it had the loop for that long.
    """
    import asyncio

    loop = asyncio.get_running_loop()
    when = loop.time() + timeout
    extended = False
    handle: Any = None

    async with asyncio.timeout(None) as scope:

        def check() -> None:
            nonlocal handle, extended
            late = loop.time() - when
            if late > _LATE_S and not extended:
                extended = True
                handle = loop.call_later(min(late, timeout), check)
            else:
                scope.reschedule(loop.time())  # cancels the await: TimeoutError

        handle = loop.call_at(when, check)
        try:
            return await coro
        finally:
            handle.cancel()


class _Held:
    """One worker leased by a pumped segment, and its batches in flight, oldest first:
    ``(ticket, ids, vals, sent_at, prep)``; ``prep`` is None for a clean batch, else
    what :meth:`Segment._prepare_special` made of a special one."""

    __slots__ = ("cold", "done_at", "hand", "lease", "returning")

    def __init__(self, lease: Any, now: float) -> None:
        self.lease = lease
        self.hand: deque[tuple[int, Any, list[Any], float, Any]] = deque()
        self.done_at = now  # when its previous batch came back (the next one's start)
        self.returning = False  # give the worker back once its batches are in
        # its worker starts or loads the chain's code with the first batch: that
        # batch's round trip says little of the items' cost (no estimate from it)
        self.cold = not lease.warm()


class Segment:
    """The logical actor of one node or one fused chain of nodes.

    ``deliver(port, ids, vals, special, sender)`` is called by upstream
    segments (or the entry) from any thread; ``run()`` is called by a host
    thread after ``schedule(self)`` asked for one, and processes queued work
    until there is none (or the segment is throttled).

    Example (no threads)::

        seg = Segment(plan.segments[0], ctx, schedule=ready.append)
        seg.deliver(0, range(0, 3), [1, 2, 3], False, None)
        ready.pop().run()
    """

    __slots__ = (
        "asem",
        "busy",
        "cancelled",
        "capacity",
        "consumers",
        "crash_next",
        "crash_target",
        "ctx",
        "direct_out",
        "emitting",
        "fast",
        "first_arg",
        "fns",
        "held",
        "held_leases",
        "helpable",
        "instances",
        "is_async",
        "is_process",
        "item_s",
        "joiner",
        "key_fn",
        "lane",
        "leasable",
        "lease_waits",
        "lock",
        "n_ports",
        "name",
        "next_emit",
        "next_ticket",
        "nodes",
        "offerable",
        "output_only",
        "plan",
        "pool_key",
        "pump_wake",
        "pumped",
        "queued",
        "restarts",
        "retrying",
        "rr",
        "running",
        "schedule",
        "simple",
        "singles",
        "stats",
        "throttle",
        "waiters",
        "work",
        "workers",
    )

    def __init__(
        self,
        plan: SegmentPlan,
        ctx: RunContext,
        schedule: Callable[[Segment], None],
        capacity: int,
    ) -> None:
        nodes = plan.nodes
        head = nodes[0]
        head_task = head.spec.task
        n_ports = len(head.ports)
        workers = head_task.workers
        self.plan = plan
        self.ctx = ctx
        self.schedule = schedule
        self.capacity = capacity
        self.name = head.name
        self.nodes = nodes
        self.n_ports = n_ports
        self.joiner = Joiner(n_ports) if n_ports > 1 else None
        self.workers = workers
        self.lock = threading.Lock()
        # (ticket, ids, vals, special, pin): pin is the instance a keyed batch must run on
        self.work: deque[tuple[int, Any, list[Any], bool, int]] = deque()
        self.queued = 0
        self.running = 0
        self.throttle = 0  # > 0: stopped by a full consumer
        self.waiters: list[Segment] = []
        self.next_ticket = 0
        self.next_emit = 0
        self.held: dict[int, tuple[Any, list[Any], bool]] = {}
        self.emitting = False  # a thread is emitting held batches in ticket order
        self.consumers: list[tuple[Segment | Any, int, Edge]] = []
        self.output_only = False  # see connect()
        self.direct_out: Callable[[Any, list[Any], bool, list[Any] | None], None] | None = None
        self.stats = [NodeStats()] if len(nodes) == 1 else [NodeStats() for _ in nodes]
        self.fns: list[Any] = []
        self.instances: list[Any] = []  # free instances of a class task
        self.fast: Callable[..., None] | None = None
        self.singles = 0  # single-item batches processed (one in _SAMPLE_SINGLES is timed)
        self.cancelled = False
        self.retrying = 0  # items waiting on a retry timer
        self.restarts = 0
        self.crash_next = 0  # fault injection: crash this many upcoming batches
        self.crash_target: str | None = None
        key_fn = self.key_fn = head_task.key
        self.first_arg = head.first_arg
        self.busy = [False] * workers
        executor = head_task.executor
        self.is_async = executor == "async"
        # an af.map of a process task maps its elements in the pool (see _call_map)
        self.is_process = executor == "process" and head.kind != "map"
        self.pool_key: str | None = None  # registered in the run's process pool on first use
        self.rr = itertools.count()
        self.asem: Any = None  # the node's asyncio.Semaphore(concurrency), made in the loop
        self.simple = n_ports == 1 and key_fn is None and workers == 1
        # a process chain of functions: clean batches go through a leased worker
        self.leasable = self.is_process and not head.is_class
        # leased runners waiting for a batch to send ahead: signalled on delivery
        self.lease_waits: list[Any] | None = [] if self.leasable else None
        # computes in its thread: a consumer waiting for results may run it (a process
        # runner mostly waits, better on a host while the consumer consumes)
        self.helpable = not self.is_process
        # one runner taking batches in arrival order: the thread that submitted an
        # item may run it (see HostPool.take_offer)
        self.offerable = self.simple and self.helpable
        # an untimed process chain of functions has one runner, its pump, that keeps
        # up to `workers` workers busy; a consumer of map / stream may run it in
        # rounds while it waits (see pump()), so no thread hands batches around
        self.pumped = self.leasable and key_fn is None and head_task.timeout is None
        self.held_leases: list[_Held] = []
        self.pump_wake: Any = None  # the pump's WakeFd when a host runs it
        self.item_s = -1.0  # the pump's running estimate of one item's time (-1: none yet)
        # a lone plain function thread task: a single clean item needs only the call
        self.lane = (
            len(nodes) == 1
            and head.kind == "task"
            and not head.is_class
            and executor == "thread"
            and head_task.timeout is None
        )

    # -- lifecycle -----------------------------------------------------------
    def open(self) -> None:
        """Create class-task instances (fresh for every run) and bind functions.

        A process node's instances live in the worker processes only (the pool
        creates them there on first use), never in the parent. A class whose
        ``__init__`` raises fails the run or ``start()`` with
        :class:`~actorflow.RunFailed` holding that task's failure.
        """
        self.fns = []
        for node in self.nodes:
            t = node.spec.task
            if t.is_class:
                if not self.is_process:
                    self.instances = self._new_instances(node)
                self.fns.append(None)
            else:
                self.fns.append(t.fn)

    def _new_instances(self, node: NodePlan) -> list[Any]:
        t = node.spec.task
        try:
            return [t.fn() for _ in range(t.workers)]
        except Exception as exc:
            failure = Failure.capture(
                exc, task=node.name, item_id=None, run_id=self.ctx.run_id, executor=t.executor
            )
            raise RunFailed([failure], self.ctx.run_id) from exc

    @property
    def label(self) -> str:
        """The node's name, or the names of a fused chain: ``'parse' -> 'score'``."""
        if len(self.nodes) == 1:
            return repr(self.name)
        return " -> ".join(repr(n.name) for n in self.nodes) + " (fused)"

    def restart(self) -> None:
        """Restart after an internal error: fresh class-task instances, queued work kept.

        Like an OTP restart, state held by the node's task instances starts
        over; the batch that was being processed was put back and is replayed
        (at least once: nodes of a fused chain that ran before the error may
        run again for its items).
        """
        self.restarts += 1
        with self.lock:
            for node in self.nodes:
                if node.spec.task.is_class and not self.is_process:
                    self.instances = self._new_instances(node)

    def connect(self, consumers: list[tuple[Any, int]]) -> None:
        self.consumers = [(target, port, Edge()) for target, port in consumers]
        # Only the flow's output reads this node, and it takes batches in any order
        # (map restores input order, stream yields in completion order, futures are
        # independent): each batch goes to it as soon as it is done, rather than
        # wait behind an earlier one still running (workers=N, process pumps, async).
        # W2 with process tasks: a worker that ran ahead of the other idled, its
        # results held back while they filled max_in_flight (0.86-0.93x -> 0.99-1.02x
        # of a chunked ProcessPool's speed). A keyed node keeps arrival order: a
        # key's items are emitted in order.
        self.output_only = (
            len(consumers) == 1
            and getattr(consumers[0][0], "any_order", False)
            and self.key_fn is None
        )
        # a pump is its node's only emitter, one thread at a time: what it emits to
        # the flow's output alone may go straight to the flow (see _pump_emit)
        self.direct_out = None
        if self.pumped and self.output_only:
            self.direct_out = getattr(consumers[0][0], "direct", None)

    # -- message intake (any thread) ----------------------------------------
    def deliver(self, port: int, ids: Any, vals: list[Any], special: bool, sender: Any) -> bool:
        """Accept a batch on ``port``; return True if the sender should throttle."""
        if self.simple:  # one input, no key, one worker: the common node, inlined
            with self.lock:
                self.work.append((self.next_ticket, ids, vals, special, -1))
                self.next_ticket += 1
                self.queued += len(vals)
                start = not self.running and not self.throttle and not self.cancelled
                if start:
                    self.running = 1
                throttle = False
                if self.queued > self.capacity and sender is not None:
                    self.waiters.append(sender)
                    throttle = True
                if self.lease_waits:
                    self.lease_waits.pop().signal()
            if start:
                self.schedule(self)
            return throttle
        pins = None
        if self.key_fn is not None:  # keyed: route outside the lock (the key is user code)
            vals, special, pins = self._route(ids, vals, special)
        with self.lock:
            if self.joiner is None:
                ready = [(ids, vals, special)]
            else:
                ready = self.joiner.add(port, ids, vals, special)
            for r_ids, r_vals, r_special in ready:
                if pins is None:
                    self._enqueue(r_ids, r_vals, r_special)
                else:
                    self._enqueue_pinned(r_ids, r_vals, r_special, pins)
            runners = self._claim_runners()
            throttle = False
            if self.queued > self.capacity and sender is not None:
                self.waiters.append(sender)
                throttle = True
            waits = self.lease_waits
            if waits:  # leased runners waiting: a batch each to send ahead
                for _ in range(min(len(waits), len(self.work))):
                    waits.pop().signal()
        for _ in range(runners):
            self.schedule(self)
        return throttle

    def _enqueue(self, ids: Any, vals: list[Any], special: bool) -> None:
        n = len(vals)
        size = 0
        if self.workers > 1 and n > 1:
            size = -(-n // self.workers)  # a share for every worker
            if self.pumped:
                # a pump spreads whole batches over its workers and keeps each busy
                # (W2: splitting a block in halves made each block wait for the slower
                # worker). Small batches (slow items, or a stream's first chunks) go
                # item by item; quick items in whole batches; slow ones in pieces of
                # about _PIECE_S, so no worker is left with a long tail while the
                # other idles (the estimate is the node's recent time per item)
                item_s = self.item_s
                if n <= _SMALL_BATCH:
                    size = 1
                elif item_s >= 0:
                    size = max(1, int(_PIECE_S / item_s)) if item_s * n > _PIECE_S else 0
        if size and size < n:
            for start in range(0, n, size):
                stop = start + size
                self.work.append((self.next_ticket, ids[start:stop], vals[start:stop], special, -1))
                self.next_ticket += 1
        else:
            self.work.append((self.next_ticket, ids, vals, special, -1))
            self.next_ticket += 1
        self.queued += n

    def _route(self, ids: Any, vals: list[Any], special: bool) -> tuple[list[Any], bool, list[int]]:
        """Instance index of every item: ``stable_hash(key(first argument)) % workers``.

        A key function that raises fails that item (its failure flows on).
        """
        key, first_arg, n = self.key_fn, self.first_arg, self.workers
        assert key is not None
        assert first_arg is not None
        pins: list[int] = []
        out: list[Any] | None = None
        for j, (item, v) in enumerate(zip(ids, vals, strict=True)):
            if special and (v is SKIP or type(v) is Failed):
                pins.append(0)
                continue
            try:
                pins.append(stable_hash(key(first_arg(v))) % n)
            except Exception as exc:
                failure = Failure.capture(
                    exc, task=self.name, item_id=item, run_id=self.ctx.run_id, inputs=(v,)
                )
                self.stats[0].failed += 1
                self.ctx.on_task_failed(failure)
                if out is None:
                    out = list(vals)
                out[j] = Failed((failure,))
                pins.append(0)
        if out is not None:
            return out, True, pins
        return vals, special, pins

    def _enqueue_pinned(self, ids: Any, vals: list[Any], special: bool, pins: list[int]) -> None:
        # under the lock: one sub-batch per instance, in arrival order within each
        groups: dict[int, tuple[list[Any], list[Any]]] = {}
        for item, v, pin in zip(ids, vals, pins, strict=True):
            g = groups.get(pin)
            if g is None:
                g = groups[pin] = ([], [])
            g[0].append(item)
            g[1].append(v)
        for pin, (g_ids, g_vals) in groups.items():
            self.work.append((self.next_ticket, g_ids, g_vals, special, pin))
            self.next_ticket += 1
        self.queued += len(vals)

    def _take_work(self) -> tuple[int, Any, list[Any], bool, int] | None:
        # under the lock: the next batch this runner may process
        work = self.work
        if self.key_fn is None:
            return work.popleft()
        busy = self.busy
        for j, entry in enumerate(work):
            if not busy[entry[4]]:
                del work[j]
                busy[entry[4]] = True
                return entry
        return None  # every waiting batch belongs to an instance that is busy

    def _taken(self, n: int) -> list[Segment] | None:
        """Under the lock: ``n`` items left the queue; the throttled upstream segments
        to wake (outside the lock, with :func:`_unthrottle`) once it is half empty."""
        self.queued -= n
        if self.waiters and self.queued <= self.capacity // 2:
            wake, self.waiters = self.waiters, []
            return wake
        return None

    def _claim_runners(self) -> int:
        # called under the lock: how many new runners to ask for
        if self.throttle > 0 or self.cancelled:
            return 0
        want = min((1 if self.pumped else self.workers) - self.running, len(self.work))
        if want > 0:
            self.running += want
            return want
        return 0

    # -- processing (a host thread) -----------------------------------------
    def run(self) -> None:
        """Process queued work until none is left, or a consumer throttles us.

        After ``ctx.quantum()`` batches (``_QUANTUM``; one when a consumer
        thread runs it) the segment yields its thread (it queues itself again
        behind other ready segments), so a busy node cannot starve the others
        and a consumer gets back to its results.
        """
        if self.pumped:
            self.pump(None, None)
            return
        batches = 0
        requeue = False
        work = self.work
        keyed = self.key_fn is not None
        head = self.stats[0]
        quantum = self.ctx.quantum()
        while True:
            wake: list[Segment] | None = None
            with self.lock:
                if not work or self.throttle > 0 or self.cancelled:
                    self.running -= 1
                    return
                if batches >= quantum:
                    requeue = True
                    break
                entry = self._take_work() if keyed else work.popleft()
                if entry is None:
                    self.running -= 1
                    return
                batches += 1
                ticket, ids, vals, special, pin = entry
                n = len(vals)
                wake = self._taken(n)
            if wake is not None:
                _unthrottle(wake)
            if self.is_async:  # hand the batch to the event loop; do not wait for it
                try:
                    self._check_injected()
                except InjectedCrash as exc:  # as an internal error on the general path
                    self._crashed((ticket, ids, vals, special, pin), exc)
                    return
                self._start_async(ticket, ids, vals, special, pin)
                continue
            if self.leasable and not special:  # clean batches through one leased worker
                in_hand: list[tuple[int, Any, list[Any], bool, int]] = []
                try:
                    batches = self._run_leased(ticket, ids, vals, batches, quantum, in_hand)
                except _EmitFailed as failed:
                    # as on the general path: an error while emitting is the run's end
                    raise failed.__cause__ or failed from None
                except Exception as exc:
                    with self.lock:  # put back what was taken and not emitted, in order
                        for held_entry in reversed(in_hand):
                            work.appendleft(held_entry)
                            self.queued += len(held_entry[2])
                            head.in_flight -= len(held_entry[2])
                        self.running -= 1
                    self.ctx.on_segment_crash(self, exc)
                    return
                continue
            head.in_flight += n
            try:
                out_ids, out, out_special = self.process(ids, vals, special, pin)
            except Exception as exc:
                head.in_flight -= n
                self._crashed((ticket, ids, vals, special, pin), exc)
                return
            head.in_flight -= n
            if pin >= 0:
                with self.lock:
                    self.busy[pin] = False
            if self.workers == 1:
                if not out:
                    continue  # every item of the batch is waiting for a retry
                throttled = self.emit(out_ids, out, out_special)
                if throttled:
                    with self.lock:
                        self.throttle += throttled
            else:
                self._emit_in_order(ticket, (out_ids, out, out_special))
        if requeue:  # keep our runner slot, but go to the back of the ready queue
            self.schedule(self)

    def _crashed(self, entry: tuple[int, Any, list[Any], bool, int], exc: Exception) -> None:
        """An internal error (not a task's: those are captured per item) while this
        runner held ``entry``: put the batch back first, then let the supervisor decide."""
        with self.lock:
            self.work.appendleft(entry)
            self.queued += len(entry[2])
            self.running -= 1
            if entry[4] >= 0:
                self.busy[entry[4]] = False
        self.ctx.on_segment_crash(self, exc)

    # -- process tasks (the run's pool of worker processes) -----------------------
    def _run_leased(
        self,
        ticket: int,
        ids: Any,
        vals: list[Any],
        batches: int,
        quantum: int,
        in_hand: list[tuple[int, Any, list[Any], bool, int]],
    ) -> int:
        """Run clean batches of a process chain through one leased worker, pipelined.

        While the worker runs one batch the next clean batch already waits in
        its pipe (:class:`~actorflow.runtime.processes.Lease` keeps two in
        flight), so the worker does not wait for this thread between batches.
        With one batch in flight and none queued, this thread waits for the
        results *or* for a delivery (which signals it), whichever comes first.
        Results are counted and emitted in order. Stops taking at a special
        batch, a throttle, cancellation or the quantum, and returns once the
        queue is empty and the batches in flight are emitted: the number of
        batches taken so far. ``in_hand`` lists the batches taken and not yet
        emitted, oldest first (put back on an internal error).
        """
        pool = self.ctx.process_pool()
        key = self.pool_key or self._register_remote(pool)
        timeout = self.nodes[0].spec.task.timeout
        head = self.stats[0]
        work = self.work
        waits = self.lease_waits
        assert waits is not None
        clock = time.perf_counter
        in_hand.append((ticket, ids, vals, False, -1))
        head.in_flight += len(vals)
        sent_at = [clock()]
        done_at = sent_at[0]
        wake: Any = None  # a WakeFd, made when first needed
        try:
            with pool.lease(key) as lease:
                self._check_injected()
                lease.send(vals, timeout=timeout)
                # with a timeout the second batch is only sent when the first is back
                # (see Lease.send): taking it meanwhile would hold it here, behind a
                # batch that may run to its timeout, while another runner is free
                ahead = 2 if timeout is None else 1
                while True:
                    if lease.in_flight < ahead and batches < quantum:
                        nxt = None
                        woken: list[Segment] | None = None
                        listening = False
                        with self.lock:
                            if work and not work[0][3] and not self.throttle and not self.cancelled:
                                nxt = work.popleft()
                                batches += 1
                                woken = self._taken(len(nxt[2]))
                            elif lease.in_flight and timeout is None and not work:
                                if wake is None:
                                    wake = _wake_fd()
                                waits.append(wake)  # a delivery signals us
                                listening = True
                        if woken is not None:
                            _unthrottle(woken)
                        if nxt is not None:
                            in_hand.append(nxt)
                            head.in_flight += len(nxt[2])
                            self._check_injected()
                            sent_at.append(clock())
                            lease.send(nxt[2], timeout=timeout)
                            continue
                        if listening:
                            signalled = not lease.ready(wake)
                            with self.lock:
                                if wake in waits:
                                    waits.remove(wake)
                                else:
                                    signalled = True  # a delivery popped us: clear it
                            if signalled:
                                wake.drain()
                                continue  # take the batch delivered meanwhile
                    if not lease.in_flight:
                        return batches
                    values, fails = lease.wait()
                    skips = lease.skips
                    ticket, ids, vals = in_hand[0][:3]
                    now = clock()
                    # its own run time: from when the worker could start it (sent, and
                    # the batch before it back) to its results
                    head.sample((now - max(sent_at.pop(0), done_at)) / len(vals))
                    done_at = now
                    out_ids, out, out_special = self._clean_outputs(
                        ids, vals, values, fails, skips=skips
                    )
                    del in_hand[0]
                    head.in_flight -= len(vals)
                    try:
                        if self.workers == 1:
                            throttled = self.emit(out_ids, out, out_special) if out else 0
                            if throttled:
                                with self.lock:
                                    self.throttle += throttled
                        else:
                            self._emit_in_order(ticket, (out_ids, out, out_special))
                    except Exception as exc:
                        raise _EmitFailed from exc
        finally:
            if wake is not None:
                with self.lock:
                    if wake in waits:
                        waits.remove(wake)
                wake.close()

    def pump(self, until: Callable[[], bool] | None, wake: Any) -> None:
        """Run a pumped process chain: keep up to ``workers`` leased workers busy.

        Each held worker has up to two clean batches in flight (the second waits
        in its pipe, see :class:`~actorflow.runtime.processes.Lease`); results
        are collected from whichever worker is ready first and emitted in
        ticket order (or at once, to the flow's output: see :meth:`connect`).
        One thread at a time runs the pump, which is the node's only runner;
        its leases and batches in flight outlive a round.

        A host calls it with ``until=None``: it runs until nothing is queued
        or in flight (then gives the workers back), or for ``ctx.quantum()``
        rounds of collecting results (then queues itself again). A consumer of
        ``map`` / ``stream`` calls it through :meth:`HostPool.help_one` with its
        own condition and wake descriptor: one round, which returns after
        emitting results (the consumer may have something to run or yield now)
        or once ``until()`` holds, queueing itself again while batches are in
        flight (the pool's watcher hands it to a host if the consumer does not
        come back). A consumer never waits for a worker to be free: if none is,
        a host takes the pump over.

        A batch with skipped, failed or retried items is pipelined the same way:
        those items are settled in the parent, the others go to a worker node by
        node (``_prepare_special``), and its results are merged back in order.
        """
        pool = self.ctx.process_pool()
        key = self.pool_key or self._register_remote(pool)
        consumer = until is not None
        quantum = 1 if consumer else self.ctx.quantum()
        held = self.held_leases
        clock = time.perf_counter
        if wake is None:
            wake = self.pump_wake
            if wake is None:
                wake = self.pump_wake = _wake_fd()
        rounds = 0
        try:
            while True:
                sent = self._pump_send(pool, key, held, block=not consumer)
                fdmap: dict[int, _Held] = {}
                ready: list[_Held] = []
                for h in held:
                    if h.hand:
                        fds = h.lease.poll_fds()
                        if fds is None:
                            ready.append(h)
                        else:
                            fdmap[fds[0]] = fdmap[fds[1]] = h
                if not ready and not fdmap:  # nothing in flight
                    self._return_leases(held, every=True)
                    with self.lock:
                        if not self._pump_can_send():
                            self.running -= 1
                            return
                    if consumer and not sent:
                        # no worker is free (other nodes hold them): a host waits for one
                        self.ctx.schedule_on_host(self)
                        return
                    continue  # work came meanwhile: send it
                if not ready:
                    if until is not None and until():
                        break
                    # a held worker with nothing in flight goes back before we wait:
                    # another node may be waiting for it
                    self._return_leases(held, every=True)
                    if not self._pump_block(pool, fdmap, ready, wake, until):
                        continue  # woken by a delivery (or the consumer's condition)
                now = clock()
                for h in ready:
                    self._pump_collect(h, now)
                rounds += 1
                if rounds >= quantum:
                    break
        except _EmitFailed as failed:
            self._pump_abandon(held)
            raise failed.__cause__ or failed from None
        except Exception as exc:
            self._pump_abandon(held)
            self.ctx.on_segment_crash(self, exc)
            return
        except BaseException:
            self._pump_abandon(held)
            raise
        # the round ends with batches in flight (or about to be sent): run again soon
        self.schedule(self)

    def _pump_can_send(self) -> bool:
        # under the lock: a batch waits and may be taken now
        return bool(self.work) and not self.throttle and not self.cancelled

    def _ahead_ok(self, h: _Held) -> bool:
        """Whether a batch may be sent ahead behind ``h``'s one batch in flight: it
        is estimated to take, and has taken so far, under ``_AHEAD_S``."""
        return self._ahead_since(h) >= 0

    def _ahead_since(self, h: _Held) -> float:
        """When ``h``'s one batch in flight started, if a batch may be sent ahead
        behind it (see :meth:`_ahead_ok`); else -1."""
        if len(h.hand) != 1:
            return -1.0
        item_s = self.item_s
        first = h.hand[0]
        if item_s < 0 or item_s * len(first[2]) >= _AHEAD_S:
            return -1.0  # no estimate yet, or a slow batch
        since = max(first[3], h.done_at)
        return since if time.perf_counter() - since < _AHEAD_S else -1.0

    def _pump_send(self, pool: Any, key: str, held: list[_Held], *, block: bool) -> bool:
        """Send queued batches (clean or special) to the held workers, leasing more
        (up to ``workers``; waiting for one only with ``block`` and none held).

        An idle held worker comes first, then a free worker of the pool, and only
        then the pipe of a busy one (send-ahead), so no worker idles while a
        batch waits behind another: of the busy ones, the one whose batch started
        first, which should be the first done. (With fewer batches in flight
        than two per worker, a batch sent ahead to a worker that finishes later
        leaves the other one idle until the parent sends it the next.) Returns
        whether anything was sent (or settled in the parent)."""
        work = self.work
        head = self.stats[0]
        sent = False
        while True:
            with self.lock:
                if not work or self.throttle or self.cancelled:
                    return sent
            idle = busy = None
            busy_since = math.inf
            for h in held:
                if len(h.hand) < 2 and not h.returning:
                    if h.lease.due_back():
                        h.returning = True  # another node waits, or it is due for recycling
                    elif not h.hand:
                        idle = h
                        break
                    else:
                        since = self._ahead_since(h)
                        if 0 <= since < busy_since:
                            busy, busy_since = h, since
            target = idle
            if target is None and len(held) < self.workers:
                lease = pool.try_lease(key)
                if lease is None and block and not held:
                    lease = pool.lease(key)
                if lease is not None:
                    target = _Held(lease, time.perf_counter())
                    held.append(target)
            if target is None:
                target = busy
            if target is None:
                return sent
            woken: list[Segment] | None = None
            with self.lock:
                if not work or self.throttle or self.cancelled:
                    # changed meanwhile: look again (a worker leased for it and left
                    # idle goes back before the pump waits)
                    continue
                ticket, ids, vals, special = work.popleft()[:4]
                woken = self._taken(len(vals))
            if woken is not None:
                _unthrottle(woken)
            head.in_flight += len(vals)
            sent = True
            prep = None
            send = vals
            if special:
                prep = self._prepare_special(ids, vals)
                send = prep[2]
                if not send:  # every item settled in the parent: nothing to run
                    head.in_flight -= len(vals)
                    self._pump_emit(ticket, *self._finish_special(ids, prep))
                    continue
            target.hand.append((ticket, ids, vals, time.perf_counter(), prep))
            self._check_injected()
            target.lease.send(send, fused=prep is None)

    def _pump_block(
        self,
        pool: Any,
        fdmap: dict[int, _Held],
        ready: list[_Held],
        wake: Any,
        until: Callable[[], bool] | None,
    ) -> bool:
        """Wait until a held worker has results (append it to ``ready``: True), or a
        delivery or the consumer's wake descriptor says to look again (False).
        Returns False at once, without waiting, when a queued batch can be sent
        to a held worker or to a free worker of the pool (what ``_pump_send``
        would take). A fresh worker's hello is read here, not taken for
        results (collecting would then wait for its whole first batch)."""
        waits = self.lease_waits
        assert waits is not None
        held = self.held_leases
        with self.lock:
            if self._pump_can_send() and (
                any(not h.returning and (not h.hand or self._ahead_ok(h)) for h in held)
                or (len(held) < self.workers and pool.has_free() and not pool.contended())
            ):
                return False  # something to send first
            waits.append(wake)  # a delivery signals us
        poller = select.poll()
        for fd in fdmap:
            poller.register(fd, select.POLLIN)
        wfd = wake.fileno()
        poller.register(wfd, select.POLLIN)
        wake.armed = True
        try:
            if until is not None and until():
                return False
            events = poller.poll()
        finally:
            wake.armed = False
            with self.lock:
                if wake in waits:
                    waits.remove(wake)
        woken = False
        for fd, _ in events:
            if fd == wfd:
                woken = True
                continue
            h = fdmap[fd]
            if h.lease.read_hello():
                continue  # a fresh worker said hello: its results are still to come
            if h not in ready:
                ready.append(h)
        if woken:
            wake.drain()
        return bool(ready)

    def _pump_collect(self, h: _Held, now: float) -> None:
        """Read the oldest batch of ``h`` back, count it and emit it (:meth:`_emit_in_order`)."""
        head = self.stats[0]
        values, fails = h.lease.wait()
        kept, skips = h.lease.kept, h.lease.skips
        ticket, ids, vals, sent_at, prep = h.hand.popleft()
        # its own run time: from when the worker could start it (sent, and the batch
        # before it back) to its results
        item_s = (now - max(sent_at, h.done_at)) / len(values)
        head.sample(item_s)
        if h.cold:
            h.cold = False  # (a batch sent ahead behind it is measured from its return)
        else:
            self.item_s = item_s if self.item_s < 0 else 0.75 * self.item_s + 0.25 * item_s
        h.done_at = now
        head.in_flight -= len(vals)
        if prep is not None:
            out_ids, out, out_special = self._finish_special(ids, prep, values, fails, skips=skips)
            kept = None
        else:
            out_ids, out, out_special = self._clean_outputs(
                ids, vals, values, fails, kept=kept, skips=skips
            )
        self._pump_emit(ticket, out_ids, out, out_special, kept)
        if not h.hand:
            self._return_leases([h], every=False)

    def _pump_emit(
        self, ticket: int, ids: Any, out: list[Any], special: bool, kept: list[Any] | None = None
    ) -> None:
        # in ticket order, whatever the number of workers (a special batch settled in
        # the parent must not overtake batches still in a worker), unless the flow's
        # output is the only consumer: then at once, and straight to the flow when
        # nothing stands between (one output, taken whole: ~8 us less per batch),
        # with ``kept`` (``out`` without the skipped, when the worker sent that)
        try:
            direct = self.direct_out
            if direct is None:
                self._emit_in_order(ticket, (ids, out, special))
            elif out:
                edge = self.consumers[0][2]
                edge.next_seq += 1
                edge.sent_items += len(out)
                direct(ids, out, special, kept)
        except Exception as exc:
            raise _EmitFailed from exc

    def _return_leases(self, leases: list[_Held], *, every: bool) -> None:
        """Give back the workers of ``leases`` with nothing in flight that are due back,
        or (``every``) all of them."""
        held = self.held_leases
        for h in list(leases):
            if h.hand or not (every or h.returning):
                continue
            held.remove(h)
            h.lease.release()

    def _pump_abandon(self, held: list[_Held]) -> None:
        """After an error in the pump: put the batches in flight back in the queue, in
        ticket order, give the workers back (stopping those with batches in them:
        their state is unknown) and stop being the node's runner."""
        back = sorted((e for h in held for e in h.hand), key=lambda e: e[0])
        for h in held:
            h.hand.clear()
            with contextlib.suppress(Exception):
                h.lease.release()
        held.clear()
        head = self.stats[0]
        with self.lock:
            for ticket, ids, vals, _sent, prep in reversed(back):
                self.work.appendleft((ticket, ids, vals, prep is not None, -1))
                self.queued += len(vals)
                head.in_flight -= len(vals)
            self.running -= 1

    def release_leases(self) -> None:
        """Give back every worker the pump holds, once the run's hosts are joined (a
        cancelled run dropped its queued pump; a host that waited for one of these
        workers got PoolClosed from ``ProcessPool.close()`` first)."""
        held = self.held_leases
        head = self.stats[0]
        while held:
            h = held.pop()
            for entry in h.hand:  # cancelled with the run: no longer in flight
                head.in_flight -= len(entry[2])
            h.hand.clear()
            with contextlib.suppress(Exception):
                h.lease.release()
        wake, self.pump_wake = self.pump_wake, None
        if wake is not None:
            wake.close()

    def _check_injected(self) -> None:
        if self.crash_next:  # fault injection (actorflow.testing): an internal error
            self.crash_next -= 1
            raise InjectedCrash(f"injected crash in node {self.crash_target or self.name!r}")

    def _register_remote(self, pool: Any) -> str:
        key = f"{self.plan.index}:{self.name}"
        head = self.nodes[0]
        t = head.spec.task
        if t.is_class:
            pool.register_instances(key, t.fn, t.workers)
        else:
            chain = [functools.partial(_remote_stage0, head.spec.task.fn, head.call)]
            chain.extend(
                functools.partial(_remote_stage, n.spec.task.fn, n.call) for n in self.nodes[1:]
            )
            pool.register(key, chain, loop=self.plan.remote_loop())
        self.pool_key = key
        return key

    def _process_remote(
        self, ids: Any, vals: list[Any], special: bool, pin: int
    ) -> tuple[Any, list[Any], bool]:
        """Run the batch's clean items in one worker process; map outcomes back.

        Items with failed or skipped inputs never leave the parent. ``Err`` /
        ``Crashed`` / ``Timeout`` outcomes are failed attempts under the retry
        policy (a crash is charged to the item that killed a worker alone).
        The common batch (no special input) goes as it is, and its results come
        back as one list: no per-item work in the parent.
        """
        skips: list[int] = []
        if not special:
            values, fails = self._remote_call(vals, pin, skips_at=skips)
            return self._clean_outputs(ids, vals, values, fails, pin, skips=skips)
        prep = self._prepare_special(ids, vals)
        if not prep[2]:
            return self._finish_special(ids, prep)
        # special items (retries, parent-built arguments) take the per-node chain
        values, fails = self._remote_call(prep[2], pin, fused=False, skips_at=skips)
        return self._finish_special(ids, prep, values, fails, pin, skips=skips)

    def _clean_outputs(
        self,
        ids: Any,
        vals: list[Any],
        values: list[Any],
        fails: dict[int, Any],
        pin: int = -1,
        kept: list[Any] | None = None,
        skips: list[int] | None = None,
    ) -> tuple[Any, list[Any], bool]:
        """A clean batch's remote results as ``(ids, outputs, special)``: counted,
        failures turned into retries (held back) or ``Failed`` values. ``kept``:
        ``values`` without the skipped (see ``Lease.wait``), if known; ``skips``:
        per node but the last, the items it skipped."""
        skipped = self._remote_results(ids, vals, values, fails, None, pin, kept, skips)
        if not fails:
            return ids, values, skipped > 0
        held = sum(1 for o in values if o is _PENDING)
        kept_ids, kept = self._without_held(ids, values, held)
        return kept_ids, kept, True

    def _prepare_special(self, ids: Any, vals: list[Any]) -> _Prepared:
        """Settle a special batch's items in the parent where possible: a failed
        input fails the item, a skipped one skips it (unless the function has a
        default for it), arguments that cannot be built (a missing key) fail it.
        Returns ``(out, send_at, send, attempts, skipped, failures)``: the
        outputs so far, what still has to run in a worker (node by node), and
        the items skipped and failed here (counted and reported when the batch
        is finished, not here: a batch put back after an internal error is
        prepared again). Never raises for an item, so a batch taken off the
        queue is never lost."""
        head = self.nodes[0]
        out: list[Any] = [None] * len(vals)
        send_at: list[int] = []
        send: list[Any] = []
        attempts: list[int] = []
        skipped = 0
        failures: list[Failure] = []
        for j, value in enumerate(vals):
            attempt = 1
            v = value
            if type(v) is _Resume:
                attempt, v = v.attempt, v.v
            if type(v) is not _ArgsCall:  # a retry of built arguments: send them again
                ports = v if self.n_ports > 1 else (v,)
                failed = [p for p in ports if type(p) is Failed]
                if failed:
                    out[j] = Failed.merge(failed) if len(failed) > 1 else failed[0]
                    continue
                if any(p is SKIP for p in ports[: head.n_data]):
                    try:
                        args = _build_args(head, ports)
                    except Exception as exc:
                        failure = Failure.capture(
                            exc, task=head.name, item_id=ids[j], run_id=self.ctx.run_id
                        )
                        failures.append(failure)
                        out[j] = Failed((failure,))
                        continue
                    if args is None:
                        skipped += 1
                        out[j] = SKIP
                        continue
                    v = _ArgsCall(args[0], args[1])
            send_at.append(j)
            send.append(v)
            attempts.append(attempt)
        return out, send_at, send, attempts, skipped, failures

    def _finish_special(
        self,
        ids: Any,
        prep: _Prepared,
        values: list[Any] | None = None,
        fails: dict[int, Any] | None = None,
        pin: int = -1,
        skips: list[int] | None = None,
    ) -> tuple[Any, list[Any], bool]:
        """Merge the worker's results for ``prep``'s items into its outputs."""
        out, send_at, send, attempts, skipped, failures = prep
        if skipped:
            # a skip marker passes every node of the chain: skipped at each, as on
            # the thread path (it was counted at the first node only)
            for k, node_stats in enumerate(self.stats):
                if self.nodes[k].kind != "exceptionally":
                    node_stats.skipped += skipped
        for failure in failures:
            self.stats[0].failed += 1
            self.ctx.on_task_failed(failure)
        if values is not None:
            self._remote_results(
                [ids[j] for j in send_at], send, values, fails or {}, attempts, pin, None, skips
            )
            for j, v in zip(send_at, values, strict=True):
                out[j] = v
        held = sum(1 for o in out if o is _PENDING)
        any_special = any(o is SKIP or type(o) is Failed for o in out)
        ids_out, out = self._without_held(ids, out, held)
        return ids_out, out, any_special

    def _remote_call(
        self, send: list[Any], pin: int, *, fused: bool = True, skips_at: list[int] | None = None
    ) -> tuple[list[Any], dict[int, Any]]:
        pool = self.ctx.process_pool()
        key = self.pool_key or self._register_remote(pool)
        t = self.nodes[0].spec.task
        t0 = time.perf_counter()
        if t.is_class:
            index = pin if pin >= 0 else self._next_instance()
            result: tuple[list[Any], dict[int, Any]] = pool.run_instance(
                key, index, send, timeout=t.timeout
            )
        else:
            result = pool.run_batch(key, send, timeout=t.timeout, fused=fused, skips_at=skips_at)
        self.stats[0].sample((time.perf_counter() - t0) / len(send))
        return result

    def _remote_results(
        self,
        ids: Any,
        sent: list[Any],
        values: list[Any],
        fails: dict[int, Any],
        attempts: list[int] | None,
        pin: int,
        kept: list[Any] | None = None,
        skips: list[int] | None = None,
    ) -> int:
        """Count a remote batch's outcomes (once per batch); turn its failures, in
        ``values``, into retries (``_PENDING``) or ``Failed`` values. Returns the
        number of skipped items (``kept``: the values without them, if known;
        ``skips[k]``: how many of them node ``k``, not the last, skipped: those
        count as skipped from node ``k`` on, as on the thread path)."""
        if kept is not None:
            skipped = len(values) - len(kept)
        else:
            # not values.count(SKIP): that calls each value's __eq__ (a numpy array's raises)
            skipped = sum(map(is_, values, repeat(SKIP)))
        ok = len(values) - len(fails)
        if fails:
            from actorflow.runtime import processes as pr

            for j, oc in fails.items():
                k = max(0, oc.stage) if type(oc) is pr.Err else 0
                for done_k in range(k):
                    self.stats[done_k].done += 1
                attempt = 1 if attempts is None else attempts[j]
                values[j] = self._remote_error(k, ids[j], sent[j], oc, attempt, pin)
        if ok:
            stats = self.stats
            for node_stats in stats:
                node_stats.done += ok
            stats[-1].done -= skipped
            stats[-1].skipped += skipped
            if skips:
                for k, n in enumerate(skips):
                    if not n:
                        continue
                    for j in range(k, len(stats) - 1):
                        stats[j].done -= n
                        if self.nodes[j].kind != "exceptionally":
                            stats[j].skipped += n
        return skipped

    def _next_instance(self) -> int:
        # an unkeyed class task in processes: its instances take batches in turn
        return next(self.rr) % self.workers

    def _remote_error(
        self, k: int, item: Any, v_in: Any, outcome: Any, attempt: int, pin: int
    ) -> Any:
        """A failed remote attempt: retry it later (``_PENDING``) or fail the item."""
        from actorflow.errors import WorkerCrashed
        from actorflow.runtime import processes as pr

        node = self.nodes[k]
        t = node.spec.task
        stats = self.stats[k]
        if type(outcome) is pr.Err:
            exc = outcome.error.exception
            type_name = outcome.error.error_type
            message = outcome.error.message
        elif type(outcome) is pr.Crashed:
            exc, type_name, message = WorkerCrashed(outcome.description), "WorkerCrashed", ""
        else:
            exc, type_name, message = TaskTimeout(str(outcome.seconds)), "TaskTimeout", ""
        if _remote_retryable(t, exc, type_name, attempt):
            delay = self._note_retry(k, item, attempt, type_name, message)
            with self.lock:
                self.retrying += 1
            self.ctx.call_later(delay, self._retry, item, _Resume(0, v_in, attempt + 1, pin))
            return _PENDING
        stats.failed += 1
        failure = outcome.to_failure(
            task=node.name, item_id=item, run_id=self.ctx.run_id, attempt=attempt, inputs=(v_in,)
        )
        self.ctx.on_task_failed(failure)
        return Failed((failure,))

    # -- async tasks (the run's event loop) --------------------------------------
    def _start_async(
        self, ticket: int, ids: Any, vals: list[Any], special: bool, pin: int = -1
    ) -> None:
        n = len(vals)
        with self.lock:
            self.stats[0].in_flight += n
        fut = self.ctx.run_coroutine(self._abatch(ids, vals, special, pin))
        fut.add_done_callback(lambda f: self._async_done(ticket, n, pin, f))

    def _async_done(self, ticket: int, n: int, pin: int, fut: Any) -> None:
        # runs in the loop thread: emitted like a node with several workers (in ticket
        # order, or at once to the flow's output). A keyed instance is free again: its
        # next batch may start (one batch per instance at a time keeps a key's order)
        runners = 0
        with self.lock:
            self.stats[0].in_flight -= n
            if pin >= 0:
                self.busy[pin] = False
                runners = self._claim_runners()
        for _ in range(runners):
            self.schedule(self)
        if fut.cancelled():
            return  # the run was stopped without draining
        exc = fut.exception()
        if exc is not None:
            self.ctx.on_internal_error(exc)
            return
        try:
            self._emit_in_order(ticket, fut.result())
        except BaseException as error:  # a done-callback's error would only be logged
            self.ctx.on_internal_error(error)

    async def _abatch(
        self, ids: Any, vals: list[Any], special: bool, pin: int = -1
    ) -> tuple[Any, list[Any], bool]:
        import asyncio

        if self.asem is None:
            self.asem = asyncio.Semaphore(self.nodes[0].spec.task.concurrency)
        if pin < 0 and self.workers > 1 and self.nodes[0].is_class:
            pin = next(self.rr) % self.workers  # unkeyed instances take batches in turn
        if self.key_fn is not None:
            # a keyed instance processes its key's items one at a time, in arrival
            # order (its state may depend on it); keys on other instances overlap
            results = [await self._aone(i, v, special, pin) for i, v in zip(ids, vals, strict=True)]
        else:
            results = await asyncio.gather(
                *(self._aone(i, v, special, pin) for i, v in zip(ids, vals, strict=True))
            )
        out_special = any(r is SKIP or type(r) is Failed for r in results)
        return ids, list(results), out_special

    async def _aone(self, item: Any, v: Any, special: bool, pin: int = -1) -> Any:
        """One item through an async node: skips, failures, timeout, retries (asleep)."""
        import asyncio

        node = self.nodes[0]
        stats = self.stats[0]
        t = node.spec.task
        ports = v if self.n_ports > 1 else (v,)
        args = None
        if special:
            failed = [p for p in ports if type(p) is Failed]
            if failed:
                return Failed.merge(failed) if len(failed) > 1 else failed[0]
            if any(p is SKIP for p in ports[: node.n_data]):
                args = _build_args(node, ports)
                if args is None:
                    stats.skipped += 1
                    return SKIP
        attempt = 1
        while True:
            t0 = time.perf_counter()
            try:
                async with self.asem:
                    if node.is_class:  # a keyed batch runs on its key's instance
                        if pin >= 0:
                            target = self.instances[pin]
                        else:
                            target = self.instances[0] if self.instances else t.fn()
                    else:
                        target = self.fns[0]
                    coro = node.call(target, v) if args is None else target(*args[0], **args[1])
                    watch = self.ctx.loop_watch
                    if watch is not None:  # a coroutine that never yields is found by it
                        watch.enter(coro, node.name, item, t.timeout)
                    try:
                        if t.timeout is None:
                            r = await coro
                        else:
                            try:
                                r = await _await_timed(coro, t.timeout)
                            except TimeoutError as exc:
                                if time.perf_counter() - t0 < t.timeout * 0.99:
                                    raise  # the task's own TimeoutError
                                raise TaskTimeout(
                                    f"task {node.name!r} (item {item!r}, attempt {attempt}) "
                                    f"took longer than {t.timeout} s; the coroutine was cancelled"
                                ) from exc
                    finally:
                        if watch is not None:
                            watch.leave(coro)
                stats.sample(time.perf_counter() - t0)
            except (Exception, asyncio.CancelledError) as exc:
                if isinstance(exc, asyncio.CancelledError):
                    current = asyncio.current_task()
                    if current is None or current.cancelling():
                        raise  # the run cancels us (stop): not the task's failure
                    # the task raised it itself (it awaited something cancelled): a
                    # failure of this item, not a silently cancelled batch
                if t.retryable(exc, attempt):
                    delay = self._note_retry(0, item, attempt, type(exc).__name__, _message(exc))
                    attempt += 1
                    await asyncio.sleep(delay)
                    continue
                stats.failed += 1
                failure = Failure.capture(
                    exc,
                    task=node.name,
                    item_id=item,
                    run_id=self.ctx.run_id,
                    attempt=attempt,
                    inputs=tuple(ports[: node.n_data]),
                    executor="async",
                )
                self.ctx.on_task_failed(failure)
                return Failed((failure,))
            if r is SKIP:
                stats.skipped += 1
            else:
                stats.done += 1
            return r

    def resume(self) -> None:
        """Ask for runners again (after a restart) if work is waiting."""
        with self.lock:
            runners = self._claim_runners()
        for _ in range(runners):
            self.schedule(self)

    def _emit_in_order(self, ticket: int, batch: tuple[Any, list[Any], bool]) -> None:
        """Emit batches in ticket order, from one thread at a time, never under the lock.

        Emitting under the segment's lock would deadlock a consumer that calls
        back into this segment (a future's done-callback that submits an item).
        A segment that only feeds the flow's output emits each batch as soon as
        it is done, in any order (see :meth:`connect`), still from one thread at
        a time: ``finally_do`` and future callbacks never run concurrently for it.
        """
        with self.lock:
            self.held[ticket] = batch
            if self.emitting:
                return  # the thread emitting now will emit this batch in its turn
            self.emitting = True
        held = self.held
        while True:
            with self.lock:
                if self.output_only:
                    ready = list(held.values())
                    held.clear()
                else:
                    ready = []
                    while self.next_emit in held:
                        ready.append(held.pop(self.next_emit))
                        self.next_emit += 1
                if not ready:
                    self.emitting = False
                    return
            throttled = 0
            try:
                for e_ids, e_vals, e_special in ready:
                    if e_vals:
                        throttled += self.emit(e_ids, e_vals, e_special)
            except BaseException:
                with self.lock:  # the next batch finds no emitter and emits itself
                    self.emitting = False
                raise  # the caller reports it: the run ends
            if throttled:
                with self.lock:
                    self.throttle += throttled

    def unthrottle(self) -> None:
        """A consumer drained below half its capacity: resume if nothing else holds us."""
        with self.lock:
            self.throttle -= 1
            runners = self._claim_runners() if self.throttle <= 0 else 0
        for _ in range(runners):
            self.schedule(self)

    def emit(self, ids: Any, vals: list[Any], special: bool) -> int:
        """Hand one output batch to every consumer; return how many asked us to throttle."""
        throttled = 0
        for target, port, edge in self.consumers:
            edge.next_seq += 1
            edge.sent_items += len(vals)
            if target.deliver(port, ids, vals, special, self):
                throttled += 1
        return throttled

    def process(
        self, ids: Any, vals: list[Any], special: bool, pin: int = -1
    ) -> tuple[Any, list[Any], bool]:
        """Run the chain over one batch; return (ids, outputs, whether any is special).

        Items whose failing call will be retried are held back: they are left
        out of the returned batch and re-enter the segment when their timer fires.
        """
        self._check_injected()
        if self.is_process:
            return self._process_remote(ids, vals, special, pin)
        careful = self.careful
        n = len(vals)
        if n == 1 and not special and not _log.isEnabledFor(logging.DEBUG):
            if self.lane:  # one plain function node, one clean item: the call, timed
                v = vals[0]
                stats = self.stats[0]
                t0 = time.perf_counter()
                try:
                    r = self.plan.nodes[0].call(self.fns[0], v)
                except Exception as error:
                    r = self._on_error(0, ids[0], v, error, 1, pin)
                    if r is _PENDING:
                        return ids[:0], [], False
                    return ids, [r], True
                stats.sample(time.perf_counter() - t0)
                if r is SKIP:
                    stats.skipped += 1
                    return ids, [r], True
                stats.done += 1
                return ids, [r], False
            # a single item of a chain: the first one, and one in _SAMPLE_SINGLES after
            # it, walks the careful path, timed (it samples latencies); the others take
            # the generated loop (compiled on the second item: a graph run once with
            # one item never pays for code generation)
            singles = self.singles
            self.singles = singles + 1
            if singles % _SAMPLE_SINGLES == 0 or not self.plan.fusable:
                r = careful(ids[0], vals[0], 0, timed=True, clean=True, pin=pin)
                if r is _PENDING:
                    return ids[:0], [], False
                return ids, [r], r is SKIP or type(r) is Failed
        out: list[Any] = []
        fast = self.fast
        if fast is None:
            fast = self.fast = self.plan.fast()
        debug = _debug_enabled()  # one check per batch; DEBUG events need the careful path
        held = 0
        any_special = False
        if fast is None or special or debug:
            clean = not special
            for i, v in zip(ids, vals, strict=True):
                r = careful(i, v, 0, timed=True, clean=clean, debug=debug, pin=pin)
                out.append(r)
                if r is SKIP or type(r) is Failed:
                    any_special = True
                elif r is _PENDING:
                    held += 1
            return (*self._without_held(ids, out, held), any_special)
        nodes = self.nodes
        n_nodes = len(nodes)
        skips = [0] * n_nodes
        stopped = [0] * n_nodes  # items that left node k failed or pending a retry
        start = 0
        if n > 1:
            # the first item of each batch walks the careful path: it samples latencies
            r = careful(ids[0], vals[0], 0, timed=True, clean=True)
            out.append(r)
            if r is _PENDING:
                held += 1
            else:
                any_special = r is SKIP or type(r) is Failed
            start = 1
        err: list[tuple[int, Any, BaseException]] = []
        while start < n:
            fast(islice(vals, start, None), out, skips, err)
            if not err:
                break
            # node k raised on item number len(out): retry it later, or fail it
            k, v_in, exc = err.pop()
            i = len(out)
            stopped[k] += 1
            outcome = self._on_error(k, ids[i], v_in, exc, 1)
            if outcome is _PENDING:
                held += 1
                out.append(_PENDING)
            else:
                any_special = True
                r = careful(ids[i], outcome, k + 1, timed=False)
                if r is _PENDING:  # a later node (e.g. an exceptionally handler) retries
                    held += 1
                out.append(r)
            start = i + 1
        entering = n - 1 if n > 1 else n  # items the generated loop took in
        skipped_so_far = 0  # a skip marker passes every later node of the chain: skipped there
        for k, node_stats in enumerate(self.stats):
            if nodes[k].kind == "exceptionally":
                continue  # a handler is skipped when there is no error: nothing ran
            leaving = entering - skips[k] - stopped[k]
            skipped_so_far += skips[k]
            node_stats.done += leaving
            node_stats.skipped += skipped_so_far
            entering = leaving
        if not any_special and any(skips):
            any_special = True
        return (*self._without_held(ids, out, held), any_special)

    @staticmethod
    def _without_held(ids: Any, out: list[Any], held: int) -> tuple[Any, list[Any]]:
        if not held:
            return ids, out
        keep = [(i, o) for i, o in zip(ids, out, strict=True) if o is not _PENDING]
        return [i for i, _ in keep], [o for _, o in keep]

    def _on_error(
        self, k: int, item: Any, v_in: Any, exc: BaseException, attempt: int, pin: int = -1
    ) -> Any:
        """Node ``k`` raised on ``item``: schedule a retry (returns _PENDING) or fail it."""
        node = self.nodes[k]
        t = node.spec.task
        stats = self.stats[k]
        ctx = self.ctx
        if isinstance(exc, _InnerFailures):
            # a continuation run by this task failed: its own records, reported there
            stats.failed += 1
            return Failed(tuple(exc.failures))
        if t.retryable(exc, attempt):
            delay = self._note_retry(k, item, attempt, type(exc).__name__, _message(exc))
            with self.lock:
                self.retrying += 1
            ctx.call_later(delay, self._retry, item, _Resume(k, v_in, attempt + 1, pin))
            return _PENDING
        stats.failed += 1
        inputs = v_in if (k == 0 and self.n_ports > 1) else (v_in,)
        if node.kind == "exceptionally" and type(v_in) is Failed:
            inputs = (v_in.failures[0],)
        failure = Failure.capture(
            exc,
            task=node.name,
            item_id=item,
            run_id=ctx.run_id,
            attempt=attempt,
            inputs=inputs,
            executor=t.executor,
        )
        if failure.file_path is None and node.kind == "task":
            # no user frame: it may have failed before the call, taking an indexed input
            try:
                why = projection_error(
                    _binding_refs(node.spec, v_in, self.n_ports if k == 0 else 1)
                )
            except Exception:  # describing must never fail the failure
                why = None
            if why is not None:
                failure = dataclasses.replace(
                    failure, message=f"task {node.name!r} did not run: {why}"
                )
        ctx.on_task_failed(failure)
        return Failed((failure,))

    def _note_retry(self, k: int, item: Any, attempt: int, error_type: str, message: str) -> float:
        """Count and log a retry of node ``k``; return the backoff delay to wait."""
        node = self.nodes[k]
        self.stats[k].retried += 1
        delay = node.spec.task.backoff.jittered(attempt)
        self.ctx.log.warning(
            "task_retried",
            task=node.name,
            item_id=item,
            attempt=attempt,
            delay_s=round(delay, 6),
            error_type=error_type,
            error_message=message,
        )
        return delay

    def _retry(self, item: Any, resume: _Resume) -> None:
        """Timer callback: the item's next attempt re-enters this segment's work queue."""
        with self.lock:
            self.retrying -= 1
            if self.cancelled:
                return
            self.work.append((self.next_ticket, [item], [resume], True, resume.pin))
            self.next_ticket += 1
            self.queued += 1
            runners = self._claim_runners()
            if self.lease_waits:  # a pump waiting for its workers sends it now
                self.lease_waits.pop().signal()
        for _ in range(runners):
            self.schedule(self)

    def careful(
        self,
        item: Any,
        v: Any,
        k0: int,
        *,
        timed: bool,
        clean: bool = False,
        debug: bool = False,
        pin: int = -1,
    ) -> Any:
        """Walk one item through nodes ``k0``.. of the chain, handling every special case.

        ``v`` may be a :class:`_Resume` (a retry: start at its node, with its
        attempt number). ``clean``: the input is known to hold no skip or
        failure. ``debug``: emit a ``task_finished`` DEBUG event per call.
        Returns the output, ``SKIP``, a :class:`Failed`, or ``_PENDING`` when
        a failed call will be retried.
        """
        attempt = 1
        if type(v) is _Resume:
            k0, attempt, pin, v = v.k, v.attempt, v.pin, v.v
        nodes = self.nodes
        for k in range(k0, len(nodes)):
            node = nodes[k]
            stats = self.stats[k]
            a = attempt if k == k0 else 1
            # inputs of the head may be a tuple of port values; later nodes get one value
            if k == 0 and self.n_ports > 1:
                ports = v
                if clean:
                    skipped = False
                else:
                    failed = [p for p in ports if type(p) is Failed]
                    if failed:
                        v = Failed.merge(failed) if len(failed) > 1 else failed[0]
                        continue
                    skipped = any(p is SKIP for p in ports[: node.n_data])
            else:
                if type(v) is Failed:
                    if node.kind != "exceptionally":
                        continue  # a failure upstream: forward it, do not run the task
                elif node.kind == "exceptionally":
                    continue  # no error: the handler is skipped, the value passes
                ports = (v,)
                skipped = v is SKIP
            if node.kind == "map":
                v = self._call_map(node, stats, item, v, ports, skipped)
                if v is SKIP:
                    stats.skipped += 1
                continue
            try:
                t0 = time.perf_counter() if timed else 0.0
                r = self._call(k, node, v, ports, skipped, item, a, pin)
                if r is _NOT_RUN:
                    stats.skipped += 1
                    v = SKIP
                    continue
                if timed:
                    elapsed = time.perf_counter() - t0
                    stats.sample(elapsed)
                    if debug:
                        self.ctx.log.debug(
                            "task_finished",
                            task=node.name,
                            item_id=item,
                            attempt=a,
                            elapsed_s=elapsed,
                        )
            except Exception as exc:
                v = self._on_error(k, item, v, exc, a, pin)
                if v is _PENDING:
                    return _PENDING
                continue
            if r is SKIP:
                stats.skipped += 1
                v = SKIP  # the next node of the chain decides (after= / gather / direct)
                continue
            stats.done += 1
            v = r
        return v

    def _call(
        self,
        k: int,
        node: NodePlan,
        v: Any,
        ports: Any,
        skipped: bool,
        item: Any,
        attempt: int,
        pin: int = -1,
    ) -> Any:
        """Call node ``k``'s task once (under its timeout, if any); ``_NOT_RUN`` if skipped."""
        args: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        if node.kind == "exceptionally":
            args = ((v.failures[0],), {})
        elif skipped:
            args = _build_args(node, ports)
            if args is None:
                return _NOT_RUN
        pinned = pin >= 0 and node.is_class
        if pinned:  # a keyed instance: this runner holds it for the whole batch
            inst = self.instances[pin]
        else:
            inst = self._take_instance() if node.is_class else None
        target = inst if inst is not None else self.fns[k]
        timeout = node.spec.task.timeout
        try:
            if timeout is None:
                if args is None:
                    return node.call(target, v)
                return target(*args[0], **args[1])
            call = node.call
            if args is None:
                thunk = lambda: call(target, v)  # noqa: E731
            else:
                a = args
                thunk = lambda: target(*a[0], **a[1])  # noqa: E731
            try:
                return self.ctx.call_with_timeout(thunk, timeout, node.name, item, attempt)
            except BaseException:
                if inst is not None:  # the abandoned call may still use it: replace it
                    inst = node.spec.task.fn()
                    if pinned:
                        self.instances[pin] = inst
                raise
        finally:
            if inst is not None and not pinned:
                self._give_instance(inst)

    def _take_instance(self) -> Any:
        # a class task with workers=N has N instances; each serves one call at a time
        with self.lock:
            return self.instances.pop()

    def _give_instance(self, inst: Any) -> None:
        with self.lock:
            self.instances.append(inst)

    def _call_map(
        self, node: NodePlan, stats: NodeStats, item: Any, v: Any, ports: Any, skipped: bool
    ) -> Any:
        try:
            if skipped:
                args = _build_args(node, ports)
                if args is None:
                    return SKIP
                items = list(args[0][0])  # the gathered list without its skipped elements
            else:
                items = list(node.call(None, v))
        except Exception as exc:
            stats.failed += 1
            failure = Failure.capture(exc, task=node.name, item_id=item, run_id=self.ctx.run_id)
            self.ctx.on_task_failed(failure)
            return Failed((failure,))
        b = node.spec.binding
        t = node.spec.task
        call: Callable[[Any], Any] = t
        parallelism = b.max_parallelism
        if t.is_class:  # the node's own instances, one call at a time each
            parallelism = min(parallelism, t.workers)

            def call(x: Any) -> Any:
                inst = self._take_instance()
                try:
                    return inst(x)
                finally:
                    self._give_instance(inst)

        if t.timeout is not None:
            plain = call
            timeout, ctx = t.timeout, self.ctx

            def call(x: Any) -> Any:
                return ctx.call_with_timeout(lambda: plain(x), timeout, node.name, item, 1)

        t0 = time.perf_counter()
        if t.executor == "process":
            results = self._map_remote(node, item, items, parallelism)
        else:
            results = self.ctx.map_parallel(call, items, parallelism, t)
        stats.sample(time.perf_counter() - t0)
        failures: list[Failure] = []
        out: list[Any] = []
        for element, (ok, value, attempts) in zip(items, results, strict=True):
            stats.retried += attempts - 1
            if ok:
                if value is not SKIP:
                    out.append(value)
                continue
            if b.return_exceptions:
                if isinstance(value, _InnerFailures):  # show the public type in place
                    out.append(RunFailed(value.failures, value.run_id))
                elif isinstance(value, Failure):  # a remote element: its exception
                    out.append(value.exception())
                else:
                    out.append(value)
                continue
            if isinstance(value, _InnerFailures):
                failures.extend(value.failures)  # a branch's own failure records
                continue
            if isinstance(value, Failure):  # a remote element's record, built by the pool
                self.ctx.on_task_failed(value)
                failures.append(value)
                continue
            failure = Failure.capture(
                value,
                task=node.name,
                item_id=item,
                run_id=self.ctx.run_id,
                attempt=attempts,
                inputs=(element,),
            )
            self.ctx.on_task_failed(failure)
            failures.append(failure)
        if failures:
            stats.failed += 1
            return Failed(tuple(failures))
        stats.done += 1
        return out

    def _map_remote(
        self, node: NodePlan, item: Any, items: list[Any], parallelism: int
    ) -> list[tuple[bool, Any, int]]:
        """af.map of a process task: the elements go to the worker pool in chunks.

        One chunk per worker that may run at once (``max_parallelism``, the
        pool size); each chunk is one batch message each way. A failed
        element comes back as its :class:`Failure` record.
        """
        from actorflow.runtime import processes as pr

        if not items:
            return []
        t = node.spec.task
        pool = self.ctx.process_pool()
        key = f"{self.plan.index}:{node.name}:map"
        with self.lock:
            if self.pool_key != key:
                pool.register(key, [t.fn])
                self.pool_key = key
        n_chunks = max(1, min(parallelism, pool.processes, len(items)))
        size = -(-len(items) // n_chunks)
        chunks = [items[i : i + size] for i in range(0, len(items), size)]

        def run_chunk(chunk: list[Any]) -> list[Any]:
            return list(pool.call_batch(key, chunk, timeout=t.timeout))

        outcomes: list[Any] = []
        for ok, value, _ in self.ctx.map_parallel(run_chunk, chunks, len(chunks)):
            if not ok:
                raise value  # the pool itself failed: an internal error
            outcomes.extend(value)
        results: list[tuple[bool, Any, int]] = []
        for element, oc in zip(items, outcomes, strict=True):
            if type(oc) is pr.Ok:
                results.append((True, oc.value, 1))
            else:
                failure = oc.to_failure(
                    task=node.name, item_id=item, run_id=self.ctx.run_id, inputs=(element,)
                )
                results.append((False, failure, 1))
        return results

    def pending_items(self) -> int:
        """Items queued, waiting in the join or on a retry timer (``metrics().queued``)."""
        with self.lock:
            extra = self.joiner.pending() if self.joiner is not None else 0
            return self.queued + extra + self.retrying

    def cancel(self) -> None:
        """Drop queued work (``stop(drain=False)``)."""
        with self.lock:
            self.cancelled = True
            self.work.clear()
            self.queued = 0


def _build_args(
    node: NodePlan, ports: tuple[Any, ...]
) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
    """Arguments of a call with skipped inputs: None if a directly used input was skipped."""
    b = node.spec.binding
    single = len(node.ports) == 1

    def value(t: Any, direct: bool) -> Any:
        if isinstance(t, Ref):
            x = ports[0] if single else ports[t.dep]
            for key in t.path:
                if x is SKIP:
                    break
                x = x[key]
            if x is SKIP and direct:
                raise _SkipNode
            return x
        if isinstance(t, Gather):
            if t.kind == "dict":
                return {k: y for k, vt in t.items if (y := value(vt, False)) is not SKIP}
            items = [y for vt in t.items if (y := value(vt, False)) is not SKIP]
            return items if t.kind == "list" else tuple(items)
        return t

    try:
        if b.passthrough:
            x = value(Ref(0), True)
            return tuple(x[0]), dict(x[1])
        if b.map_over:
            return (value(b.args[0], True),), {}
        args = tuple(value(a, True) for a in b.args)
        kwargs = {k: value(t, True) for k, t in b.kwargs}
    except _SkipNode:
        return None
    return args, kwargs


class _SkipNode(Exception):
    pass


def _debug_enabled() -> bool:
    return _log.isEnabledFor(logging.DEBUG)


class RunContext:
    """What a segment needs from its run: identity, events, timers, failures, supervision."""

    run_id: str = ""
    log: Any = None  # an EventLog bound with the run's id
    loop_watch: Any = None  # the event loop's watchdog (runtime/loopwatch.py), with the loop

    def on_task_failed(self, failure: Failure) -> None:  # pragma: no cover - interface
        """A call failed for good (retries ran out): log it, run on_failure handlers."""
        raise NotImplementedError

    def quantum(self) -> int:
        """Batches a segment runs before it requeues itself (fewer in a consumer's thread)."""
        return _QUANTUM

    def call_later(
        self, delay: float, fn: Callable[..., None], *args: Any
    ) -> None:  # pragma: no cover
        """Call ``fn(*args)`` after ``delay`` seconds, from the run's timer."""
        raise NotImplementedError

    def call_with_timeout(
        self, thunk: Callable[[], Any], timeout: float, task: str, item: Any, attempt: int
    ) -> Any:  # pragma: no cover - interface
        """Run ``thunk()`` and return its result, or raise TaskTimeout after ``timeout``."""
        raise NotImplementedError

    def on_segment_crash(self, segment: Segment, exc: Exception) -> None:  # pragma: no cover
        """An internal error escaped ``segment``: restart it or escalate."""
        raise NotImplementedError

    def run_coroutine(self, coro: Any) -> Any:  # pragma: no cover - interface
        """Schedule ``coro`` on the run's event loop; return a concurrent future."""
        raise NotImplementedError

    def on_internal_error(self, exc: BaseException) -> None:  # pragma: no cover
        """An error the engine cannot attribute to an item: fail the run."""
        raise NotImplementedError

    def process_pool(self) -> Any:  # pragma: no cover - interface
        """The run's shared pool of worker processes (started on first use)."""
        raise NotImplementedError

    def schedule_on_host(self, segment: Segment) -> None:  # pragma: no cover - interface
        """Queue ``segment`` for a host thread (never for the calling consumer)."""
        raise NotImplementedError

    def map_parallel(
        self, fn: Callable[[Any], Any], items: list[Any], parallelism: int, policy: Any = None
    ) -> list[tuple[bool, Any, int]]:  # pragma: no cover - interface
        """Call ``fn`` per item, ``parallelism`` at once; (ok, value, attempts) per item."""
        raise NotImplementedError
