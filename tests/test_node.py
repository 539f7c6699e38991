"""Unit tests of the node state machine, driven directly: no threads, no actors."""

from __future__ import annotations

from typing import Any

import pytest

import actorflow as af
from actorflow.errors import Failure
from actorflow.runtime.node import Failed, Joiner, RunContext, Segment
from actorflow.runtime.plan import compile_plan


class Ctx(RunContext):
    """A run context that records failures instead of logging them."""

    run_id = "test-run"

    def __init__(self) -> None:
        self.failures: list[Failure] = []

    def on_task_failed(self, failure: Failure) -> None:
        self.failures.append(failure)

    def map_parallel(
        self, fn: Any, items: list[Any], parallelism: int, policy: Any = None
    ) -> list[tuple[bool, Any, int]]:
        out = []
        for x in items:
            try:
                out.append((True, fn(x), 1))
            except Exception as exc:
                out.append((False, exc, 1))
        return out


class Collector:
    """Stands in for a downstream segment: records every batch delivered to it."""

    def __init__(self, throttle: bool = False) -> None:
        self.batches: list[tuple[int, Any, list[Any], bool]] = []
        self.throttle = throttle
        self.senders: list[Any] = []

    def deliver(self, port: int, ids: Any, vals: list[Any], special: bool, sender: Any) -> bool:
        self.batches.append((port, ids, list(vals), special))
        self.senders.append(sender)
        return self.throttle

    def values(self) -> list[Any]:
        return [v for b in self.batches for v in b[2]]


def build(graph: af.Graph, index: int = 0, capacity: int = 1024) -> tuple[Segment, list[Any]]:
    """A segment of the graph's plan, wired to a Collector, with a list as its scheduler."""
    plan = compile_plan(graph)
    ready: list[Any] = []
    seg = Segment(plan.segments[index], Ctx(), ready.append, capacity)
    seg.open()
    seg.connect([(Collector(), 0)])
    return seg, ready


def out_of(seg: Segment) -> Collector:
    collector: Collector = seg.consumers[0][0]
    return collector


def run_all(ready: list[Any]) -> None:
    while ready:
        ready.pop(0).run()


def chain(*fns: Any) -> af.Graph:
    g = af.Graph("chain")
    prev = None
    for i, fn in enumerate(fns):
        g.add(f"n{i}", fn, depends_on=[prev] if prev else [])
        prev = f"n{i}"
    return g


def inc(x: int) -> int:
    return x + 1


def double(x: int) -> int:
    return 2 * x


def test_a_linear_chain_of_plain_tasks_is_fused_into_one_segment() -> None:
    plan = compile_plan(chain(lambda: 1, inc, double, inc))
    # the root takes the run's arguments: its own segment; the rest fuse
    assert [[n.name for n in s.nodes] for s in plan.segments] == [["n0", "n1", "n2", "n3"]]


def test_delivering_a_batch_schedules_one_runner_and_processes_in_order() -> None:
    seg, ready = build(chain(lambda x: x, inc, double))
    seg.deliver(0, range(0, 4), [((1,), {}), ((2,), {}), ((3,), {}), ((4,), {})], False, None)
    seg.deliver(0, range(4, 5), [((5,), {})], False, None)
    assert ready == [seg]  # one runner for both batches
    run_all(ready)
    assert out_of(seg).values() == [4, 6, 8, 10, 12]
    assert [b[1] for b in out_of(seg).batches] == [range(0, 4), range(4, 5)]


def test_batches_on_an_edge_carry_increasing_sequence_numbers() -> None:
    seg, ready = build(chain(lambda x: x, inc))
    for i in range(3):
        seg.deliver(0, range(i, i + 1), [((i,), {})], False, None)
    run_all(ready)
    edge = seg.consumers[0][2]
    assert edge.next_seq == 3
    assert edge.sent_items == 3


def test_a_task_returning_skip_marks_the_batch_and_stops_the_item() -> None:
    calls: list[int] = []

    def keep_even(x: int) -> Any:
        return x if x % 2 == 0 else af.SKIP

    def record(x: int) -> int:
        calls.append(x)
        return x

    seg, ready = build(chain(lambda x: x, keep_even, record))
    seg.deliver(0, range(0, 6), [((i,), {}) for i in range(6)], False, None)
    run_all(ready)
    batch = out_of(seg).batches[0]
    assert batch[2] == [0, af.SKIP, 2, af.SKIP, 4, af.SKIP]
    assert batch[3] is True  # special: downstream must take the careful path
    assert calls == [0, 2, 4]
    stats = {n.name: s for n, s in zip(seg.nodes, seg.stats, strict=True)}
    assert (stats["n1"].done, stats["n1"].skipped) == (3, 3)
    assert stats["n2"].done == 3


def test_a_raising_task_fails_only_its_item_and_is_called_once() -> None:
    calls: list[int] = []

    def fragile(x: int) -> int:
        calls.append(x)
        if x == 2:
            raise ValueError("two is bad")
        return x

    seg, ready = build(chain(lambda x: x, fragile, inc))
    seg.deliver(0, range(0, 5), [((i,), {}) for i in range(5)], False, None)
    run_all(ready)
    vals = out_of(seg).batches[0][2]
    assert vals[:2] == [1, 2]
    assert vals[3:] == [4, 5]
    assert type(vals[2]) is Failed
    (failure,) = vals[2].failures
    assert (failure.task, failure.item_id, failure.error_type) == ("n1", 2, "ValueError")
    assert calls == [0, 1, 2, 3, 4]  # the failing item is not re-run
    assert seg.ctx.failures == [failure]  # type: ignore[attr-defined]


def test_a_failed_input_is_forwarded_without_running_the_task() -> None:
    calls: list[int] = []

    def record(x: int) -> int:
        calls.append(x)
        return x

    seg, ready = build(chain(lambda x: x, record))
    failed = Failed(())
    seg.deliver(0, range(0, 2), [failed, ((7,), {})], True, None)
    run_all(ready)
    assert out_of(seg).batches[0][2] == [failed, 7]
    assert calls == [7]


def test_joiner_zips_aligned_batches_without_a_table() -> None:
    j = Joiner(2)
    assert j.add(0, range(0, 3), [1, 2, 3], False) == []
    ((ids, vals, special),) = j.add(1, range(0, 3), ["a", "b", "c"], False)
    assert ids == range(0, 3)
    assert vals == [(1, "a"), (2, "b"), (3, "c")]
    assert special is False
    assert j.pending() == 0


def test_joiner_falls_back_to_per_item_join_when_batches_disagree() -> None:
    j = Joiner(2)
    j.add(0, range(0, 4), [0, 1, 2, 3], False)
    out = j.add(1, range(0, 2), ["a", "b"], False)  # misaligned: spill
    assert [(list(i), v) for i, v, _ in out] == [([0, 1], [(0, "a"), (1, "b")])]
    assert j.pending() == 2
    out = j.add(1, [3, 2], ["d", "c"], False)
    assert [(list(i), v) for i, v, _ in out] == [([3, 2], [(3, "d"), (2, "c")])]
    assert j.pending() == 0


def test_a_join_with_a_skipped_positional_input_is_skipped() -> None:
    g = af.Graph("j")
    g.add("a", lambda x: x)
    g.add("b", lambda x: x)
    g.add("both", lambda a, b: (a, b), depends_on=["a", "b"])
    plan = compile_plan(g)
    index = next(s.index for s in plan.segments if s.head.name == "both")
    seg, ready = build(g, index)
    seg.deliver(0, range(0, 2), [1, af.SKIP], True, None)
    seg.deliver(1, range(0, 2), [10, 20], False, None)
    run_all(ready)
    assert out_of(seg).batches[0][2] == [(1, 10), af.SKIP]


def test_a_gather_omits_skipped_elements() -> None:
    @af.task
    def ident(x: int) -> int:
        return x

    @af.task
    def total(xs: list[int]) -> int:
        return sum(xs)

    @af.flow
    def f(x: int) -> int:
        return total([ident(x), ident(x)])

    plan = compile_plan(f.graph)
    index = next(s.index for s in plan.segments if s.head.name == "total")
    seg, ready = build(f.graph, index)
    seg.deliver(0, range(0, 2), [5, af.SKIP], True, None)
    seg.deliver(1, range(0, 2), [7, af.SKIP], True, None)
    run_all(ready)
    assert out_of(seg).batches[0][2] == [12, 0]


def test_an_after_input_that_skipped_only_orders() -> None:
    g = af.Graph("after")
    g.add("a", lambda x: x)
    g.add("b", lambda x: x)
    g.add("c", lambda a: a * 10, depends_on=["a"], after=["b"])
    plan = compile_plan(g)
    index = next(s.index for s in plan.segments if s.head.name == "c")
    seg, ready = build(g, index)
    seg.deliver(0, range(0, 1), [3], False, None)
    seg.deliver(1, range(0, 1), [af.SKIP], True, None)
    run_all(ready)
    assert out_of(seg).batches[0][2] == [30]


def test_a_full_consumer_throttles_the_sender_until_it_drains() -> None:
    seg, ready = build(chain(lambda x: x, inc))
    seg.consumers = [(Collector(throttle=True), 0, seg.consumers[0][2])]
    seg.deliver(0, range(0, 1), [((1,), {})], False, None)
    seg.deliver(0, range(1, 2), [((2,), {})], False, None)
    run_all(ready)
    # the first output batch made the consumer answer "throttle": no more work taken
    assert out_of(seg).values() == [2]
    assert seg.throttle == 1
    assert seg.queued == 1
    seg.unthrottle()
    assert ready == [seg]
    run_all(ready)
    assert out_of(seg).values() == [2, 3]
    assert seg.throttle == 1  # throttled again by the second batch
    assert seg.queued == 0


def test_a_segment_over_capacity_asks_its_sender_to_throttle_and_wakes_it() -> None:
    seg, ready = build(chain(lambda x: x, inc), capacity=2)

    class Sender:
        woken = 0

        def unthrottle(self) -> None:
            self.woken += 1

    sender = Sender()
    assert seg.deliver(0, range(0, 2), [((0,), {}), ((1,), {})], False, sender) is False
    assert seg.deliver(0, range(2, 4), [((2,), {}), ((3,), {})], False, sender) is True
    assert seg.waiters == [sender]
    run_all(ready)
    assert sender.woken == 1
    assert seg.waiters == []


def test_a_node_with_several_workers_emits_batches_in_arrival_order() -> None:
    g = af.Graph("w")
    g.add("a", af.task(lambda x: x * 2, workers=3))
    seg, ready = build(g)
    seg.deliver(0, range(0, 6), [((i,), {}) for i in range(6)], False, None)
    # split into chunks, one runner per worker
    assert len(ready) == 3
    # run them in reverse order: outputs must still leave in order
    for runner in reversed(list(ready)):
        ready.remove(runner)
        runner.run()
    assert out_of(seg).values() == [0, 2, 4, 6, 8, 10]


class OutputCollector(Collector):
    """Stands in for the flow's output, which takes batches in any order."""

    any_order = True


def test_a_node_feeding_only_the_output_emits_each_batch_once_done() -> None:
    g = af.Graph("w")
    g.add("a", af.task(lambda x: x * 2, workers=3))
    seg, _ready = build(g)
    seg.connect([(OutputCollector(), 0)])
    seg._emit_in_order(1, (range(2, 4), [4, 6], False))  # ticket 0 still runs
    assert out_of(seg).values() == [4, 6]
    seg._emit_in_order(0, (range(0, 2), [0, 2], False))
    assert out_of(seg).values() == [4, 6, 0, 2]


def test_a_node_keeps_arrival_order_for_other_nodes_and_for_keys() -> None:
    @af.task(key=lambda x: x % 3, workers=3)
    class Last:
        def __call__(self, x: int) -> int:
            return x

    g = af.Graph("w")
    g.add("a", af.task(lambda x: x * 2, workers=3))
    k = af.Graph("k")
    k.add("a", Last)
    for graph, consumer in ((g, Collector()), (k, OutputCollector())):
        seg, _ready = build(graph)
        seg.connect([(consumer, 0)])
        seg._emit_in_order(1, (range(2, 4), [4, 6], False))
        assert out_of(seg).values() == []  # held back behind ticket 0
        seg._emit_in_order(0, (range(0, 2), [0, 2], False))
        assert out_of(seg).values() == [0, 2, 4, 6]


def test_class_task_instances_are_fresh_for_every_segment() -> None:
    @af.task
    class Counter:
        def __init__(self) -> None:
            self.n = 0

        def __call__(self, x: int) -> int:
            self.n += 1
            return self.n

    g = af.Graph("c")
    g.add("count", Counter)
    for _ in range(2):
        seg, ready = build(g)
        seg.deliver(0, range(0, 3), [((0,), {})] * 3, False, None)
        run_all(ready)
        assert out_of(seg).values() == [1, 2, 3]


def test_cancel_drops_queued_work() -> None:
    seg, ready = build(chain(lambda x: x, inc))
    seg.deliver(0, range(0, 2), [((1,), {}), ((2,), {})], False, None)
    seg.cancel()
    run_all(ready)
    assert out_of(seg).batches == []


@pytest.mark.parametrize("n", [1, 2, 65, 300])
def test_fast_and_careful_paths_agree_on_every_batch_size(n: int) -> None:
    def maybe(x: int) -> Any:
        if x % 7 == 3:
            raise KeyError(x)
        return af.SKIP if x % 5 == 4 else x

    seg, ready = build(chain(lambda x: x, inc, maybe, double))
    seg.deliver(0, range(0, n), [((i,), {}) for i in range(n)], False, None)
    run_all(ready)
    got = out_of(seg).values()
    for i, v in enumerate(got):
        y = i + 1
        if y % 7 == 3:
            assert type(v) is Failed
            assert v.failures[0].task == "n2"
        elif y % 5 == 4:
            assert v is af.SKIP
        else:
            assert v == 2 * y
    stats = dict(zip([nd.name for nd in seg.nodes], seg.stats, strict=True))
    assert stats["n1"].done == n
    fails = sum(1 for i in range(n) if (i + 1) % 7 == 3)
    skips = sum(1 for i in range(n) if (i + 1) % 7 != 3 and (i + 1) % 5 == 4)
    assert (stats["n2"].failed, stats["n2"].skipped) == (fails, skips)
    assert stats["n3"].done == n - fails - skips
