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
  concurrently and re-orders them before emitting);
- every batch on an edge carries the edge's next sequence number.

Credits: a segment accepts every batch delivered to it (so no sender ever
blocks a host thread), but once its queue holds more than ``capacity`` items
it answers "throttle": the sender finishes the batch at hand and takes no new
work until the receiver has drained below half its capacity and wakes it.
Memory per edge is therefore bounded by ``capacity`` plus one batch per sender.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from itertools import islice
from typing import Any

from actorflow._markers import SKIP
from actorflow.errors import Failure
from actorflow.graph import Gather, Ref
from actorflow.runtime.plan import NodePlan, SegmentPlan

__all__ = ["Failed", "NodeStats", "Segment"]

_log = logging.getLogger("actorflow")
_LATENCY_SAMPLES = 512
_QUANTUM = 16  # batches a segment processes before yielding its host


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

    __slots__ = ("done", "failed", "in_flight", "latencies", "retried", "skipped")

    def __init__(self) -> None:
        self.done = 0
        self.failed = 0
        self.skipped = 0
        self.retried = 0
        self.in_flight = 0
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


def _is_special(v: Any) -> bool:
    return v is SKIP or type(v) is Failed


class Edge:
    """Bookkeeping of one edge: sequence numbers of the batches sent on it."""

    __slots__ = ("next_seq", "sent_items")

    def __init__(self) -> None:
        self.next_seq = 0
        self.sent_items = 0


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
        "cancelled",
        "capacity",
        "consumers",
        "ctx",
        "fast",
        "fns",
        "held",
        "instances",
        "joiner",
        "lock",
        "n_ports",
        "name",
        "next_emit",
        "next_ticket",
        "nodes",
        "plan",
        "queued",
        "running",
        "schedule",
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
        self.plan = plan
        self.ctx = ctx
        self.schedule = schedule
        self.capacity = capacity
        self.name = plan.head.name
        self.nodes = plan.nodes
        self.n_ports = len(plan.head.ports)
        self.joiner = Joiner(self.n_ports) if self.n_ports > 1 else None
        self.workers = plan.workers
        self.lock = threading.Lock()
        self.work: deque[tuple[int, Any, list[Any], bool]] = deque()  # (ticket, ids, vals, sp)
        self.queued = 0
        self.running = 0
        self.throttle = 0  # > 0: stopped by a full consumer
        self.waiters: list[Segment] = []
        self.next_ticket = 0
        self.next_emit = 0
        self.held: dict[int, tuple[Any, list[Any], bool]] = {}
        self.consumers: list[tuple[Segment | Any, int, Edge]] = []
        self.stats = [NodeStats() for _ in plan.nodes]
        self.fns: list[Any] = []
        self.instances: list[Any] = []  # free instances of a class task
        self.fast: Callable[..., None] | None = None
        self.cancelled = False

    # -- lifecycle -----------------------------------------------------------
    def open(self) -> None:
        """Create class-task instances (fresh for every run) and bind functions."""
        self.fns = []
        for node in self.nodes:
            t = node.spec.task
            if t.is_class:
                self.instances = [t.fn() for _ in range(t.workers)]
                self.fns.append(None)
            else:
                self.fns.append(t.fn)

    def connect(self, consumers: list[tuple[Any, int]]) -> None:
        self.consumers = [(target, port, Edge()) for target, port in consumers]

    # -- message intake (any thread) ----------------------------------------
    def deliver(self, port: int, ids: Any, vals: list[Any], special: bool, sender: Any) -> bool:
        """Accept a batch on ``port``; return True if the sender should throttle."""
        with self.lock:
            if self.joiner is None:
                ready = [(ids, vals, special)]
            else:
                ready = self.joiner.add(port, ids, vals, special)
            for r_ids, r_vals, r_special in ready:
                self._enqueue(r_ids, r_vals, r_special)
            runners = self._claim_runners()
            throttle = False
            if self.queued > self.capacity and sender is not None:
                self.waiters.append(sender)
                throttle = True
        for _ in range(runners):
            self.schedule(self)
        return throttle

    def _enqueue(self, ids: Any, vals: list[Any], special: bool) -> None:
        n = len(vals)
        if self.workers > 1 and n > 1:
            size = -(-n // self.workers)
            for start in range(0, n, size):
                stop = start + size
                self.work.append((self.next_ticket, ids[start:stop], vals[start:stop], special))
                self.next_ticket += 1
        else:
            self.work.append((self.next_ticket, ids, vals, special))
            self.next_ticket += 1
        self.queued += n

    def _claim_runners(self) -> int:
        # called under the lock: how many new runners to ask for
        if self.throttle > 0 or self.cancelled:
            return 0
        want = min(self.workers - self.running, len(self.work))
        if want > 0:
            self.running += want
            return want
        return 0

    # -- processing (a host thread) -----------------------------------------
    def run(self) -> None:
        """Process queued work until none is left, or a consumer throttles us.

        After ``_QUANTUM`` batches the segment yields its host (it queues
        itself again behind other ready segments), so a busy node cannot
        starve the others.
        """
        batches = 0
        while True:
            wake: list[Segment] = []
            with self.lock:
                if not self.work or self.throttle > 0 or self.cancelled:
                    self.running -= 1
                    return
                if batches >= _QUANTUM:
                    requeue = True
                    break
                batches += 1
                ticket, ids, vals, special = self.work.popleft()
                n = len(vals)
                self.queued -= n
                if self.waiters and self.queued <= self.capacity // 2:
                    wake, self.waiters = self.waiters, []
            for w in wake:
                w.unthrottle()
            head = self.stats[0]
            head.in_flight += n
            try:
                out, out_special = self.process(ids, vals, special)
            finally:
                head.in_flight -= n
            if self.workers == 1:
                throttled = self.emit(ids, out, out_special)
                if throttled:
                    with self.lock:
                        self.throttle += throttled
            else:
                with self.lock:  # re-order: emit batches in the order they were queued
                    self.held[ticket] = (ids, out, out_special)
                    while self.next_emit in self.held:
                        e_ids, e_vals, e_special = self.held.pop(self.next_emit)
                        self.next_emit += 1
                        self.throttle += self.emit(e_ids, e_vals, e_special)
        if requeue:  # keep our runner slot, but go to the back of the ready queue
            self.schedule(self)

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

    def process(self, ids: Any, vals: list[Any], special: bool) -> tuple[list[Any], bool]:
        """Run the chain over one batch; return (outputs, whether any is special)."""
        out: list[Any] = []
        careful = self.careful
        fast = self.fast if len(vals) > 1 else None
        if fast is None and len(vals) > 1:
            fast = self.fast = self.plan.fast()
        debug = _debug_enabled()  # one check per batch; DEBUG events need the careful path
        if fast is None or special or debug:
            any_special = False
            clean = not special
            for i, v in zip(ids, vals, strict=True):
                r = careful(i, v, 0, timed=True, clean=clean, debug=debug)
                out.append(r)
                if r is SKIP or type(r) is Failed:
                    any_special = True
            return out, any_special
        n_nodes = len(self.nodes)
        skips = [0] * n_nodes
        fails = [0] * n_nodes
        n = len(vals)
        # the first item of each batch walks the careful path: it samples latencies
        r = careful(ids[0], vals[0], 0, timed=True, clean=True)
        out.append(r)
        any_special = r is SKIP or type(r) is Failed
        start = 1
        err: list[tuple[int, Any, BaseException]] = []
        while start < n:
            fast(islice(vals, start, None), out, skips, err)
            if not err:
                break
            # node k raised on item number len(out): record it, propagate the failure
            k, v_in, exc = err.pop()
            i = len(out)
            fails[k] += 1
            failed = self._failure(k, ids[i], v_in, exc)
            out.append(careful(ids[i], failed, k + 1, timed=False) if k + 1 < n_nodes else failed)
            any_special = True
            start = i + 1
        entering = n - 1
        for k, node_stats in enumerate(self.stats):
            leaving = entering - skips[k] - fails[k]
            node_stats.done += leaving
            node_stats.skipped += skips[k]
            node_stats.failed += fails[k]
            entering = leaving
        if not any_special and any(skips):
            any_special = True
        return out, any_special

    def _failure(self, k: int, item: Any, v_in: Any, exc: BaseException) -> Failed:
        node = self.nodes[k]
        inputs = v_in if (k == 0 and self.n_ports > 1) else (v_in,)
        failure = Failure.capture(
            exc, task=node.name, item_id=item, run_id=self.ctx.run_id, inputs=inputs
        )
        self.ctx.on_task_failed(failure)
        return Failed((failure,))

    def careful(
        self,
        item: Any,
        v: Any,
        k0: int,
        *,
        timed: bool,
        clean: bool = False,
        debug: bool = False,
    ) -> Any:
        """Walk one item through nodes ``k0``.. of the chain, handling every special case.

        ``clean``: the input is known to hold no skip or failure (saves the checks).
        ``debug``: emit a ``task_finished`` DEBUG event per call (``timed`` too).
        """
        nodes = self.nodes
        for k in range(k0, len(nodes)):
            node = nodes[k]
            stats = self.stats[k]
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
                    continue  # a failure upstream in the chain: forward it
                ports = (v,)
                skipped = v is SKIP
            if node.map_over:
                v = self._call_map(node, stats, item, v, ports, skipped)
                if v is SKIP:
                    stats.skipped += 1
                    return SKIP
                continue
            f = self.fns[k] if not node.is_class else None
            try:
                t0 = time.perf_counter() if timed else 0.0
                if skipped:
                    args = _build_args(node, ports)
                    if args is None:
                        stats.skipped += 1
                        return SKIP
                    if f is None:
                        inst = self._take_instance()
                        try:
                            r = inst(*args[0], **args[1])
                        finally:
                            self._give_instance(inst)
                    else:
                        r = f(*args[0], **args[1])
                elif f is None:
                    inst = self._take_instance()
                    try:
                        r = node.call(inst, v)
                    finally:
                        self._give_instance(inst)
                else:
                    r = node.call(f, v)
                if timed:
                    elapsed = time.perf_counter() - t0
                    stats.sample(elapsed)
                    if debug:
                        self.ctx.log.debug(
                            "task_finished", task=node.name, item_id=item, elapsed_s=elapsed
                        )
            except Exception as exc:
                stats.failed += 1
                v = self._failure(k, item, v, exc)
                continue
            if r is SKIP:
                stats.skipped += 1
                return SKIP
            stats.done += 1
            v = r
        return v

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
        if skipped:
            args = _build_args(node, ports)
            if args is None:
                return SKIP
        try:
            items = list(node.call(None, v))
        except Exception as exc:
            stats.failed += 1
            failure = Failure.capture(exc, task=node.name, item_id=item, run_id=self.ctx.run_id)
            self.ctx.on_task_failed(failure)
            return Failed((failure,))
        b = node.spec.binding
        t0 = time.perf_counter()
        results = self.ctx.map_parallel(node.spec.task, items, b.max_parallelism)
        stats.sample(time.perf_counter() - t0)
        failures: list[Failure] = []
        out: list[Any] = []
        for element, (ok, value) in zip(items, results, strict=True):
            if ok:
                if value is not SKIP:
                    out.append(value)
                continue
            if b.return_exceptions:
                out.append(value)
                continue
            failure = Failure.capture(
                value, task=node.name, item_id=item, run_id=self.ctx.run_id, inputs=(element,)
            )
            self.ctx.on_task_failed(failure)
            failures.append(failure)
        if failures:
            stats.failed += 1
            return Failed(tuple(failures))
        stats.done += 1
        return out

    def pending_items(self) -> int:
        """Items queued or waiting in the join (for ``metrics().queued``)."""
        extra = self.joiner.pending() if self.joiner is not None else 0
        return self.queued + extra

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
    """What a segment needs from its run: identity, events, failure reporting, parallel map."""

    run_id: str = ""
    log: Any = None  # an EventLog bound with the run's id

    def on_task_failed(self, failure: Failure) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def map_parallel(
        self, fn: Callable[[Any], Any], items: list[Any], parallelism: int
    ) -> list[tuple[bool, Any]]:  # pragma: no cover - interface
        raise NotImplementedError
